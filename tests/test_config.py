"""timm_sila.config: SilaConfig (the SilaNet settings, checked once), the mapping between sila_* and timm names,
and non-finite hyper-parameters refused by every entry point (SilaLoss, the functional loss, create_model, SilaNet)."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import timm

from timm_sila import SilaLoss, SilaNet, sila_cross_entropy, sila_log_probs, sila_set_weights
from timm_sila.config import SilaConfig
from timm_sila.io.trust import sanitize_file_model_kwargs
from timm_sila.loss.logits import wrap_sila_logits

NAN, INF = float('nan'), float('inf')


@pytest.mark.usefixtures('no_network')
def test_sila_config_table():
    assert SilaConfig().to_kwargs() == dict(sila_sets=3, sila_beta=0.1, sila_decay=0.5, sila_taps=None,
                                            sila_branch=0, sila_head='conv3x3', sila_stripped=False)
    assert SilaConfig.from_kwargs(dict(sila_sets=4, sila_taps=('a', 'b', 2))).taps == ['a', 'b', 2]
    for bad in (dict(sets=True), dict(sets=2.0), dict(beta=float('nan')), dict(decay=-0.1), dict(branch=3),
                dict(branch=False), dict(taps=['a']), dict(taps='layer3'), dict(head='../x'), dict(stripped=1)):
        with pytest.raises(ValueError):
            SilaConfig(**bad)
    with pytest.raises(ValueError, match='Unknown SilaNet arguments'):
        SilaConfig.from_kwargs(dict(sila_gamma=1))
    assert sanitize_file_model_kwargs({'img_size': (32, 32), 'drop_rate': None}, 'f') == {'img_size': [32, 32]}


@pytest.mark.parametrize('name,sila,base', [
    ('resnet18', 'sila_resnet18', 'resnet18'), ('sila_resnet18', 'sila_resnet18', 'resnet18'),
    ('sila_resnet18.a1_in1k', 'sila_resnet18', 'resnet18'), ('resnet18.a1_in1k', 'sila_resnet18', 'resnet18'),
])
def test_one_mapping_between_names(name, sila, base):
    from timm_sila.config import base_arch, is_sila_name, sila_name
    assert sila_name(name) == sila and base_arch(name) == base
    assert is_sila_name(name) == name.startswith('sila_')


def test_sila_kwargs_names_the_given_settings_only():
    from timm_sila.config import sila_kwargs
    assert sila_kwargs(sets=4, taps=('layer3', 'layer2', 'layer1'), head=None) == dict(
        sila_sets=4, sila_taps=['layer3', 'layer2', 'layer1'])
    with pytest.raises(TypeError, match='colour'):
        sila_kwargs(colour=1)


# --- non-finite hyper-parameters: ValueError from every entry point ---------------------------------------------
def _sila_logits():
    return wrap_sila_logits(torch.zeros(2, 30), 10, 0.1, 0.5)


BAD_HPARAMS = {
    'SilaLoss beta nan': lambda: SilaLoss(10, beta=NAN),
    'SilaLoss beta inf': lambda: SilaLoss(10, beta=INF),
    'SilaLoss beta an integer beyond float': lambda: SilaLoss(10, beta=10 ** 400),
    'SilaLoss smoothing an integer beyond float': lambda: SilaLoss(10, smoothing=10 ** 400),
    'SilaLoss decay nan': lambda: SilaLoss(10, decay=NAN),
    'SilaLoss decay -inf': lambda: SilaLoss(10, decay=-INF),
    'SilaLoss smoothing nan': lambda: SilaLoss(10, smoothing=NAN),
    'SilaLoss smoothing inf': lambda: SilaLoss(10, smoothing=INF),
    'SilaLoss beta numpy nan': lambda: SilaLoss(10, beta=np.float32('nan')),
    'SilaLoss beta string': lambda: SilaLoss(10, beta='0.1'),
    'SilaLoss beta bool': lambda: SilaLoss(10, beta=True),
    'SilaLoss weight nan': lambda: SilaLoss(3, weight=torch.tensor([1.0, NAN, 1.0])),
    'sila_cross_entropy beta nan': lambda: sila_cross_entropy(torch.zeros(2, 30), torch.tensor([0, 1]), 10, beta=NAN),
    'sila_cross_entropy smoothing nan': lambda: sila_cross_entropy(torch.zeros(2, 30), torch.tensor([0, 1]), 10,
                                                                   smoothing=NAN),
    'sila_log_probs decay inf': lambda: sila_log_probs(torch.zeros(2, 30), 10, decay=INF),
    'sila_set_weights beta nan': lambda: sila_set_weights(3, NAN, 0.5),
    'F.cross_entropy label_smoothing nan': lambda: F.cross_entropy(_sila_logits(), torch.tensor([0, 1]),
                                                                   label_smoothing=NAN),
    'create_model sila_beta nan': lambda: timm.create_model('sila_test_resnet', num_classes=2, sila_beta=NAN),
    'create_model sila_decay inf': lambda: timm.create_model('sila_test_resnet', num_classes=2, sila_decay=INF),
    'SilaNet beta inf': lambda: SilaNet('test_resnet', num_classes=2, beta=INF),
}


@pytest.mark.parametrize('make', BAD_HPARAMS.values(), ids=BAD_HPARAMS.keys())
def test_non_finite_hyperparameters_are_refused(make):
    with pytest.raises(ValueError, match=r'finite|beta|decay|smoothing|weight'):
        make()


def test_silanet_keeps_its_config_and_derives_its_settings_from_it():
    """A SilaNet holds one SilaConfig: the settings are read from it, `branch` keeps it current, and its sila_*
    keyword form (with the taps as resolved) rebuilds the same model."""
    config = SilaConfig(sets=2, beta=0.2, decay=0.25, taps='stages')
    net = SilaNet('test_resnet', num_classes=10, config=config)
    assert net.config == config and (net.sets, net.beta, net.decay, net.head_type) == (2, 0.2, 0.25, 'conv3x3')
    net.branch = 1
    assert net.config.branch == 1 and net.branch == 1
    assert net.sila_args() == dict(config.to_kwargs(), sila_taps=net.taps, sila_branch=1)
    rebuilt = timm.create_model('sila_test_resnet', num_classes=10, **net.sila_args())
    assert rebuilt.taps == net.taps and rebuilt.config == dataclasses.replace(net.config, taps=net.taps)
    with pytest.raises(ValueError, match='not both'):
        SilaNet('test_resnet', num_classes=10, sets=3, decay=0.4, config=config)
    with pytest.raises(ValueError, match='branch'):
        net.branch = 2  # validated by the same check as SilaConfig's

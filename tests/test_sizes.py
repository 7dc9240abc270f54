"""Branch sizes (Table 3): one definition of params / MB / CR for info, eval, bench and the model card, counted on the
stripped models themselves."""
import pytest
import torch

import timm
from conftest import build_sila
from timm_sila import SilaNet
from timm_sila.model import create_with_img_size
from timm_sila_cli.info import format_info
from timm_sila.ship.strip import branch_model
from timm_sila.measure.sizes import MB, branch_sizes, count_params, model_info, size_row


def test_size_row_formula():
    assert size_row(1, 'layer3', 250, 1000) == dict(branch=1, exit='layer3', params=250, size_mb=1000 / MB, cr=0.75)
    assert size_row(2, 'layer1', None, 1000) == dict(branch=2, exit='layer1', params=None, size_mb=None, cr=None)


def test_rows_count_the_real_stripped_models_of_a_vit():
    net = timm.create_model('sila_test_vit', num_classes=10)
    rows = branch_sizes(net)  # counted on the meta device
    assert [r['branch'] for r in rows] == [0, 1, 2]
    for k in (1, 2):
        assert rows[k]['params'] == count_params(branch_model(net, k)) < rows[0]['params']
    stripped = branch_model(net, 1)
    assert branch_sizes(stripped) == [rows[1]]


def test_branch_of_a_model_without_pruning_is_unknown_not_guessed():
    base = timm.create_model('test_resnet', num_classes=10)
    base.prune_intermediate_layers = None  # as for a timm model that does not implement it
    rows = branch_sizes(SilaNet(base))
    assert rows[0]['params'] == count_params(base)
    assert [r['params'] for r in rows[1:]] == [None, None]
    info = dict(model='sila_test_resnet', arch='test_resnet', num_classes=10, img_size=None, sets=3, head='conv3x3',
                taps=['layer3', 'layer1'], branches=rows, train=dict(params=1, size_mb=0.0))
    assert format_info(info).count('cannot be compressed') == 2


def test_model_info_is_branch_sizes_of_the_built_net():
    info = model_info('test_vit', num_classes=10, img_size=32)
    net = timm.create_model('sila_test_vit', num_classes=10, img_size=32)
    assert info['branches'] == branch_sizes(net)
    assert info['train']['params'] == count_params(net)


def test_img_size_goes_only_to_fixed_size_models():
    vit = create_with_img_size('test_vit', 48, num_classes=10)
    assert vit.patch_embed.img_size == (48, 48)
    cnn = create_with_img_size('test_resnet', 48, num_classes=10)  # runs at any size: built as it is
    with torch.no_grad():
        assert cnn.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 10)


@pytest.fixture(scope='module')
def sila():
    model, _ = build_sila('resnet18')
    return model.eval()


def test_sizes_are_the_stripped_models_and_match_info(sila):
    rows = branch_sizes(sila)
    base = count_params(sila.base)
    assert rows[0]['params'] == base and rows[0]['cr'] == 0.0
    for k in (1, 2):
        params = count_params(branch_model(sila, k))
        assert rows[k]['params'] == params < base
        assert rows[k]['cr'] == pytest.approx(1 - params / base)
        assert rows[k]['size_mb'] == pytest.approx(params * 4 / 2 ** 20)
        assert rows[k]['exit'] == sila.taps[k - 1]
    info = model_info('sila_resnet18', num_classes=10)
    assert [r['params'] for r in info['branches']] == [r['params'] for r in rows]

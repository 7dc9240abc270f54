"""sila_* names in timm's registry, pretrained tags, and SilaNet's construction errors."""
import json
import os

import pytest
import torch

import timm
from safetensors.torch import load_file, save_file

from timm_sila import SilaNet
from timm_sila.io.checkpoint import CheckpointError


def test_every_architecture_is_registered():
    base = [n for n in timm.list_models() if not n.startswith('sila_')]
    assert sorted(timm.list_models('sila_*')) == sorted(f'sila_{n}' for n in base)


def test_pretrained_tags_mirror_the_base():
    base = [n for n in timm.list_pretrained() if not n.startswith('sila_')]
    assert sorted(timm.list_pretrained('sila_*')) == sorted(f'sila_{n}' for n in base)
    assert 'sila_resnet18.a1_in1k' in timm.list_pretrained('sila_resnet18*')


def test_create_model_with_every_sila_keyword():
    model = timm.create_model('sila_resnet18', num_classes=10, sila_sets=3, sila_beta=0.2, sila_decay=0.8,
                              sila_taps=None, sila_branch=1, sila_head='conv3x3')
    assert isinstance(model, SilaNet)
    assert (model.sets, model.beta, model.decay, model.branch, model.num_classes) == (3, 0.2, 0.8, 1, 10)
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    four = timm.create_model('sila_resnet18', num_classes=10, sila_sets=4, sila_taps=['layer3', 'layer2', 'layer1'])
    assert four.taps == ['layer3', 'layer2', 'layer1']


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_pretrained_tag_loads_base_weights_and_fresh_heads(tmp_path, suffix):
    torch.manual_seed(123)
    vanilla = timm.create_model('resnet18')  # 1000 classes, like the a1_in1k weights
    path = tmp_path / f'resnet18{suffix}'
    if suffix == '.pth':
        torch.save(vanilla.state_dict(), path)
    else:
        save_file(vanilla.state_dict(), str(path))
    torch.manual_seed(0)
    model = timm.create_model('sila_resnet18.a1_in1k', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.pretrained_cfg['tag'] == 'a1_in1k'
    loaded = model.base.state_dict()
    for key, value in vanilla.state_dict().items():
        if key.startswith('fc.'):
            assert loaded[key].shape[0] == 10  # classifier adapted as timm does
        else:
            assert torch.equal(loaded[key], value), key
    torch.manual_seed(0)
    fresh = timm.create_model('sila_resnet18', num_classes=10)
    assert torch.equal(model.heads['1'].weight, fresh.heads['1'].weight)  # heads initialised, not loaded


@pytest.mark.parametrize('kwargs,match', [
    (dict(sila_sets=1), 'sets must be an integer >= 2'),
    (dict(sila_sets=6), 'needs 5 tap stages'),
    (dict(sila_branch=3), r'branch must be an integer in \[0, 2\]'),
    (dict(sila_branch=-1), r'branch must be an integer in \[0, 2\]'),
    (dict(sila_taps=['layer4', 'layer1']), 'final stage'),
    (dict(sila_taps=['layer1', 'layer3']), 'strictly ordered'),
    (dict(sila_taps=['layer9', 'layer1']), 'not a stage'),
    (dict(sila_taps=['layer3']), 'must list 2 stages'),
    (dict(sila_taps=[7, 1]), 'out of range'),
    (dict(sila_head='mlp'), 'Unknown head'),
    (dict(sila_beta=-1.0), 'beta >= 0'),
    (dict(sila_gamma=1.0), 'Unknown SilaNet arguments'),
])
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('sila_resnet18', num_classes=10, **kwargs)


def test_unknown_architecture():
    with pytest.raises(ValueError, match='Unknown timm architecture'):
        SilaNet('resnet_does_not_exist', num_classes=10)


def test_model_without_feature_info():
    base = timm.create_model('resnet18', num_classes=10)
    del base.feature_info
    with pytest.raises(ValueError, match='no feature_info'):
        SilaNet(base, num_classes=10)


def test_base_must_be_a_model():
    with pytest.raises(ValueError, match='timm model name or a timm model instance'):
        SilaNet(42, num_classes=10)


def test_instance_with_other_class_count():
    with pytest.raises(ValueError, match='reset_classifier'):
        SilaNet(timm.create_model('resnet18', num_classes=5), num_classes=10)


def test_branch_setter_validates():
    model = timm.create_model('sila_resnet18', num_classes=10)
    with pytest.raises(ValueError, match='branch must be'):
        model.branch = 5




@pytest.mark.parametrize('weights_name', ['pytorch_model.bin', 'model.pth', 'branch.safetensors'])
def test_local_dir_reads_any_weights_file_timm_finds_through_the_checked_reader(stripped_copy, tmp_path, weights_name):
    """A sila_* `local-dir:` folder whose weights are not model.safetensors is read from the file timm's own
    local-dir loader would pick, by the checked reader: the same outputs, and integer tensors refused, not cast."""
    folder = stripped_copy(1, tmp_path / 'folder')
    reference = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    tensors = load_file(str(folder / 'model.safetensors'))
    (folder / 'model.safetensors').unlink()
    target = folder / weights_name
    write = (lambda t: save_file(t, str(target))) if weights_name.endswith('.safetensors') else \
        (lambda t: torch.save(t, target))
    write(tensors)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(timm.create_model(f'local-dir:{folder}', pretrained=True).eval()(x), reference(x))
    key = 'base.conv1.0.weight'
    write(dict(tensors, **{key: tensors[key].to(torch.int64)}))
    with pytest.raises(CheckpointError, match=rf'dtype kind.*{key}'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_local_dir_reads_ema_weights_first_as_timm_does(stripped_copy, tmp_path):
    """A training checkpoint in a local-dir folder gives its EMA weights, as timm's local-dir loader reads it."""
    folder = stripped_copy(1, tmp_path / 'folder')
    tensors = load_file(str(folder / 'model.safetensors'))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}
    (folder / 'model.safetensors').unlink()
    torch.save({'state_dict': tensors, 'state_dict_ema': ema}, folder / 'pytorch_model.bin')
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    key = 'base.conv1.0.weight'
    assert torch.equal(model.state_dict()[key], ema[key])


def test_local_dir_weights_entry_that_is_not_a_file_is_refused_not_passed_over(stripped_copy, tmp_path):
    """A FIFO where timm looks first is refused in one line; a stale file further down timm's list is not read in
    its place."""
    folder = stripped_copy(1, tmp_path / 'folder')
    (folder / 'model.safetensors').rename(folder / 'old.safetensors')
    torch.save({}, folder / 'pytorch_model.bin')
    os.mkfifo(folder / 'model.safetensors')
    with pytest.raises(CheckpointError, match='not a regular file') as info:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert '\n' not in str(info.value) and 'model.safetensors' in str(info.value)


def test_local_dir_without_weights_is_one_clear_error(stripped_copy, tmp_path):
    folder = stripped_copy(1, tmp_path / 'folder')
    (folder / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='holds no weights file for sila_') as info:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert '\n' not in str(info.value) and str(folder) in str(info.value)


@pytest.mark.parametrize('pretrained', [False, True])
def test_local_dir_config_is_checked_with_or_without_its_weights(stripped_copy, tmp_path, pretrained):
    """A config.json's pretrained_cfg never reaches the model unchecked: where to fetch weights from (url, hub id,
    custom loader) is dropped and out-of-range data-config values are refused, whether or not the weights load."""
    folder = stripped_copy(1, tmp_path / 'folder')
    config = json.loads((folder / 'config.json').read_text())
    config['pretrained_cfg'].update(url='http://example.invalid/w.pth', hf_hub_id='someone/evil',
                                    custom_load=True)
    (folder / 'config.json').write_text(json.dumps(config))
    model = timm.create_model(f'local-dir:{folder}', pretrained=pretrained)
    for cfg in (model.pretrained_cfg, model.base.pretrained_cfg):  # timm's own cfg of the base stays as it is
        assert (cfg.get('url'), cfg.get('hf_hub_id'), cfg.get('custom_load')) == ('', 'timm/test_resnet.r160_in1k',
                                                                                    False)
    config['pretrained_cfg']['mean'] = [500.0, 500.0, 500.0]
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='mean'):
        timm.create_model(f'local-dir:{folder}', pretrained=pretrained)

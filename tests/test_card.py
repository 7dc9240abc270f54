"""model_card(): README.md in the Hugging Face hub's format for a strip output folder."""
import os

import pytest
import torch
import yaml

import timm

from conftest import build_sila
from timm_sila import load_stripped, strip
from timm_sila.ship.strip import branch_model
from timm_sila.ship.strip import model_card, write_model_card


def front_matter(text):
    assert text.startswith('---\n')
    head, sep, _ = text[4:].partition('\n---\n')
    assert sep, 'front matter is not closed'
    return yaml.safe_load(head)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    net = build_sila('resnet18')[0].eval()
    root = tmp_path_factory.mktemp('strip')
    return net, strip(net, 0, root / 'r18_b0', img_size=32), strip(net, 1, root / 'r18_b1', img_size=32)


EVAL = dict(num_samples=500, split='test', data_dir='/nonexistent/private/cifar10',
            branches=[dict(branch=0, top1=50.9, top5=93.93, loss=1.3304, params=11181642),
                      dict(branch=1, top1=46.86, top5=92.79, loss=1.4491, params=2805834)])


def test_branch1_card_front_matter_and_body(folders):
    _, _, b1 = folders
    path = write_model_card(b1, EVAL, repo_id='someone/r18-sila-b1', dataset='cifar10', overwrite=True)
    assert path == b1 / 'README.md'
    text = path.read_text(encoding='utf-8')
    meta = front_matter(text)
    assert meta['library_name'] == 'timm' and meta['pipeline_tag'] == 'image-classification'
    assert {'sila', 'image-classification', 'timm'} <= set(meta['tags'])
    assert 'license' not in meta and '# license:' in text  # left for the user
    for fact in ('`resnet18`', 'tap `layer3`', '1 of 3', '2,805,834', '10.70 MB', 'CR = 74.91 %', '3 × 32 × 32',
                 'mean (0.485, 0.456, 0.406)', 'std (0.229, 0.224, 0.225)', 'import timm_sila',
                 'timm.create_model("local-dir:r18_b1", pretrained=True)', 'hf-hub:someone/r18-sila-b1',
                 '| 46.86 | 92.79 | 1.4491 |', '`cifar10` split `test` (500 images)'):
        assert fact in text, fact
    assert '/nonexistent' not in text  # a local data path never goes into a card meant for publishing


def test_hub_parses_card_and_timm_still_loads_folder(folders, monkeypatch):
    net, b0, b1 = folders
    write_model_card(b0, overwrite=True)
    hub = pytest.importorskip('huggingface_hub')
    card = hub.ModelCard.load(b0 / 'README.md')
    assert card.data.library_name == 'timm' and 'sila' in card.data.tags
    text = (b0 / 'README.md').read_text()
    assert 'import timm_sila' not in text and 'No `timm_sila` is needed' in text
    assert '| Compression | 0 %' in text and '11,181,642' in text
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    monkeypatch.chdir(b0.parent)  # the card's own loading line, as written, from the folder's parent
    a = timm.create_model('local-dir:r18_b0', pretrained=True).eval()
    write_model_card(b1, overwrite=True)
    b = timm.create_model('local-dir:r18_b1', pretrained=True).eval()
    with torch.no_grad():
        net.branch = 0
        assert torch.equal(a(x), net(x))
        net.branch = 1
        assert torch.allclose(b(x), net(x), atol=1e-6)
        net.branch = 0
    assert type(a).__name__ == 'ResNet'
    assert sorted(os.listdir(b0)) == ['.timm-sila-manifest.json', 'README.md', 'config.json', 'model.safetensors']


def test_card_of_a_loaded_model_and_bad_metrics(folders, tmp_path):
    net, b0, b1 = folders
    model = load_stripped(b1)
    assert model_card(b1, model=model) == model_card(b1)
    # as strip would call it: the model it exported (timm's default 224 cfg) and a temp folder's name
    text = model_card(b0, model=branch_model(net, 0), name='final_name')
    assert '3 × 32 × 32' in text and 'local-dir:final_name"' in text  # config.json's input size, not the model's
    wrong = dict(EVAL, branches=[dict(branch=1, top1=40.0, params=123)])
    with pytest.raises(ValueError, match='another model'):
        model_card(b1, wrong, model=model)
    with pytest.raises(ValueError, match='no row for branch 1'):
        model_card(b1, dict(EVAL, branches=[EVAL['branches'][0]]), model=model)
    with pytest.raises(ValueError, match="top1 = '99'; an accuracy is a finite percentage"):
        model_card(b1, dict(num_samples=5, branches=[dict(branch=1, top1='99')]), model=model)
    bad = tmp_path / 'eval.json'
    bad.write_text('{not json')
    with pytest.raises(ValueError, match='is not valid JSON'):
        model_card(b1, bad, model=model)
    with pytest.raises(ValueError, match='user/name'):
        model_card(b1, model=model, repo_id='../../etc')
    before = (b1 / 'README.md').read_text() if (b1 / 'README.md').exists() else None
    with pytest.raises(ValueError):
        write_model_card(b1, wrong, model=model, overwrite=True)
    assert ((b1 / 'README.md').read_text() if (b1 / 'README.md').exists() else None) == before

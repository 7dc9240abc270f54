"""timm_sila.data.folder: the one image-folder reader of `eval` and `exit-curve`, table-driven over hostile folders.

ImageFolder's numbering and order are kept (checked against torchvision); what a folder may not do is hang a
command (FIFO, socket, device), count an image twice (symbolic link loops, links, hard links), shift labels without a
word (class folders vs the model's classes), or fail as a traceback (truncated, huge or non-image files, also in
DataLoader workers). Models with in_chans=1 get single-channel images, as timm's train.py gives them.
"""
import io
import json
import os
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import timm
from timm.data import create_transform

from conftest import build_sila, image_folder, run_in_fresh_process, train_py_checkpoint
from timm_sila.data.folder import ImageFolderDataset, ImageFolderError, ImageReadError, image_loader, image_mode
from timm_sila.ship.strip import class_names_from_config
from timm_sila.measure.evaluate import evaluate
from timm_sila_cli import main

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / 'shared' / 'data' / 'cifar10'


def _png(path: Path, seed: int, mode: str = 'RGB', size: int = 32) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (size, size, 3) if mode == 'RGB' else (size, size)
    Image.fromarray(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).numpy()).save(path)


def _bomb_png(path: Path, side: int = 15000) -> None:
    """A 225-Mpx grayscale PNG of a few dozen bytes: PIL refuses it on opening (DecompressionBombError)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b''))
                     + chunk(b'IEND', b''))


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.new('RGB', (32, 32), (200, 10, 10)).save(buf, 'JPEG')
    path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])


def _socket(path: Path):
    cwd = os.getcwd()
    os.chdir(path.parent)  # a relative name: socket paths are limited to ~100 bytes
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path.name)
    finally:
        os.chdir(cwd)
    return s


def test_classes_and_order_are_torchvisions(tmp_path):
    from torchvision.datasets import ImageFolder
    root = image_folder(tmp_path / 'split', classes=('b', 'a', 'B'), splits=None)
    (root / 'a' / 'deeper' / 'z').mkdir(parents=True)
    _png(root / 'a' / 'deeper' / 'z' / 'Q.JPG', 1)
    _png(root / 'a' / 'deeper' / '7.Png', 2)
    (root / 'a' / 'notes.txt').write_text('not an image')
    (root / 'empty').mkdir()  # a class without images keeps its index
    elsewhere = image_folder(tmp_path / 'elsewhere', classes=('d',), splits=None)
    (root / 'd').symlink_to(elsewhere / 'd', target_is_directory=True)  # a class folder may be a link
    ours = ImageFolderDataset(root)
    theirs = ImageFolder(str(root), allow_empty=True)
    assert ours.classes == theirs.classes == ['B', 'a', 'b', 'd', 'empty']
    assert ours.samples == theirs.samples and ours.targets == theirs.targets and len(ours) == 14
    assert ours.class_to_idx == theirs.class_to_idx and ours.skipped == []


# --- the folder: what is skipped, what is refused ----------------------------------------------------------------
def _fifo(root):
    os.mkfifo(root / 'c0' / 'x.png')


def _device(root):
    (root / 'c0' / 'dev.png').symlink_to('/dev/null')


def _broken(root):
    (root / 'c1' / 'gone.png').symlink_to(root / 'nowhere.png')


def _sock(root):
    return _socket(root / 'c1' / 's.png')


# (id, change to a folder of c0/{0,1,2}.png and c1/{0,1,2}.png, what the skip warning / the error names)
SKIPPED = [
    ('fifo', _fifo, 'c0/x.png (a FIFO)'),
    ('socket', _sock, 'c1/s.png (a socket)'),
    ('device', _device, 'c0/dev.png (a character device)'),
    ('broken-link', _broken, 'c1/gone.png (a broken link)'),
]
REFUSED = [
    ('loop-to-root', lambda r: (r / 'c0' / 'loop').symlink_to('..'), 'c0/loop is a symbolic link loop'),
    ('loop-to-itself', lambda r: (r / 'c1' / 'self').symlink_to('.'), 'c1/self is a symbolic link loop'),
    ('loop-deeper', lambda r: ((r / 'c0' / 'a' / 'b').mkdir(parents=True),
                               (r / 'c0' / 'a' / 'b' / 'up').symlink_to('../..')), 'c0/a/b/up is a symbolic link loop'),
    ('file-link-loop', lambda r: ((r / 'c0' / 'p.png').symlink_to('q.png'), (r / 'c0' / 'q.png').symlink_to('p.png')),
     'is a symbolic link loop'),
    ('symlinked-image', lambda r: (r / 'c1' / 'dup.png').symlink_to(r / 'c0' / '0.png'), 'are the same file'),
    ('hard-link', lambda r: os.link(r / 'c0' / '1.png', r / 'c0' / 'copy.png'), 'are the same file'),
    ('folder-twice', lambda r: (r / 'c0' / 'more').symlink_to(r / 'c1', target_is_directory=True),
     'are the same folder'),
    ('class-folder-twice', lambda r: (r / 'c2').symlink_to(r / 'c1', target_is_directory=True),
     'are the same folder'),
    ('no-class-folder', lambda r: [shutil.rmtree(r / c) for c in ('c0', 'c1')] + [_png(r / 'x.png', 0)],
     'no class folder'),
    ('no-image', lambda r: [os.remove(p) for p in r.rglob('*.png')], 'is empty'),
]


@pytest.mark.parametrize('change,named', [c[1:] for c in SKIPPED], ids=[c[0] for c in SKIPPED])
def test_entries_that_are_not_regular_files_are_skipped_with_one_warning(tmp_path, change, named):
    root = image_folder(tmp_path / 'split', splits=None)
    keep = change(root)
    with pytest.warns(UserWarning) as caught:
        started = time.monotonic()
        dataset = ImageFolderDataset(root)
        images = [dataset[i][0] for i in range(len(dataset))]  # reading never touches the skipped entry
    assert time.monotonic() - started < 5
    assert len(caught) == 1 and named in str(caught[0].message) and 'skipped 1 entry' in str(caught[0].message)
    assert len(images) == 6 and dataset.skipped
    if keep is not None:
        keep.close()


@pytest.mark.parametrize('change,named', [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_loops_duplicates_and_empty_folders_are_refused_naming_the_path(tmp_path, change, named):
    root = image_folder(tmp_path / 'split', splits=None)
    change(root)
    with pytest.raises(ImageFolderError) as err:
        ImageFolderDataset(root)
    assert named in str(err.value) and '\n' not in str(err.value)


# --- the folder's classes against the model's ---------------------------------------------------------------------
CLASS_CASES = [  # (id, extra folders, num_classes, class_names, error fragment or None)
    ('match', (), 2, None, None),
    ('missing-folder', (), 3, None, 'create an empty folder for each class without images'),
    ('extra-folder', ('c2',), 2, None, 'has 3 class folders but the model predicts 2 classes'),
    ('hidden-folder', ('.ipynb_checkpoints',), 2, None, 'hidden folders such as .ipynb_checkpoints'),
    ('empty-class-folder', ('c2',), 3, None, None),
    ('names-match', (), 2, ['c0', 'c1'], None),
    ('names-differ', (), 2, ['cat', 'dog'], "class 0 of the model is 'cat', but folder 0 (in sorted order) is 'c0'"),
    ('names-unsorted', (), 2, ['c1', 'c0'], 'not in sorted order'),
    ('names-count', (), None, ['c0', 'c1', 'c2'], 'records 3 class names'),
]


@pytest.mark.parametrize('extra,num_classes,names,error', [c[1:] for c in CLASS_CASES],
                         ids=[c[0] for c in CLASS_CASES])
def test_class_folders_are_checked_against_the_model(tmp_path, extra, num_classes, names, error):
    root = image_folder(tmp_path / 'split', splits=None)
    for name in extra:
        (root / name).mkdir()
    if error is None:
        dataset = ImageFolderDataset(root, num_classes=num_classes, class_names=names)
        assert dataset.class_to_idx['c0'] == 0 and dataset.class_to_idx['c1'] == 1  # labels as the model numbers them
        assert sorted(set(dataset.targets)) == [0, 1]
    else:
        with pytest.raises(ImageFolderError) as err:
            ImageFolderDataset(root, num_classes=num_classes, class_names=names)
        assert error in str(err.value)


def test_class_names_from_a_timm_hub_config():
    assert class_names_from_config({'label_names': ['a', 'b']}, 2) == ['a', 'b']
    assert class_names_from_config({'pretrained_cfg': {'label_names': {'1': 'b', '0': 'a'}}}, 2) == ['a', 'b']
    assert class_names_from_config({'label_names': ['a', 'b']}, 3) is None  # timm drops names of another count
    assert class_names_from_config({'label_names': ['a', 7]}, 2) is None
    assert class_names_from_config({'label_names': ['a', 'b' * 1000]}, 2) is None
    assert class_names_from_config({}, 2) is None and class_names_from_config([1], 2) is None


# --- one image that cannot be read: one line naming it, with or without workers -----------------------------------
def _replace_with_fifo(path):
    path.unlink()
    os.mkfifo(path)


def _replace_with_folder(path):
    path.unlink()
    path.mkdir()


BAD_IMAGES = [  # (id, how c1/1.png is spoiled after the folder was read, what the error says)
    ('truncated-jpeg', lambda p: _truncated_jpeg(p), 'OSError'),
    ('decompression-bomb', lambda p: _bomb_png(p), 'DecompressionBombError: Image size (225000000 pixels)'),
    ('not-an-image', lambda p: p.write_text('plain text'), 'UnidentifiedImageError'),
    ('empty-file', lambda p: p.write_bytes(b''), 'UnidentifiedImageError'),
    ('fifo-since-the-scan', _replace_with_fifo, 'it is a FIFO'),
    ('folder-since-the-scan', _replace_with_folder, 'it is a folder'),
]


@pytest.mark.parametrize('spoil,fragment', [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
@pytest.mark.parametrize('workers', [0, 2])
def test_an_image_that_cannot_be_read_is_one_line_naming_it(tmp_path, spoil, fragment, workers):
    root = image_folder(tmp_path / 'split', splits=None)
    dataset = ImageFolderDataset(root, transform=create_transform(input_size=(3, 32, 32), crop_pct=1.0))
    bad = root / 'c1' / '1.png'
    spoil(bad)
    started = time.monotonic()
    with pytest.raises(ImageReadError) as err:
        for _ in image_loader(dataset, batch_size=2, workers=workers):
            pass
    assert time.monotonic() - started < 30  # a FIFO is never waited on (the worker start-up is the slow part)
    message = str(err.value)
    assert message.startswith(f'cannot read image {bad} (') and fragment in message
    assert '\n' not in message and 'Traceback' not in message and len(message) < 300, message
    if workers == 0:
        with pytest.raises(ImageReadError, match='cannot read image'):
            dataset[dataset.samples.index((str(bad), 1))]


# --- single-channel models ------------------------------------------------------------------------------------------
def test_image_mode_follows_the_input_channels_as_trainpy():
    assert image_mode(3) == 'RGB' and image_mode(1) == 'L'
    with pytest.raises(ValueError, match='takes 4 input channels'):
        image_mode(4)


@pytest.fixture(scope='module')
def gray(tmp_path_factory):
    """A sila_test_resnet trained with in_chans=1 saved as timm's train.py saves it, and a folder of RGB and
    grayscale images."""
    root = tmp_path_factory.mktemp('gray')
    for split in ('val', 'test'):
        for i, c in enumerate(('a', 'b')):
            (root / 'data' / split / c).mkdir(parents=True)
            for j in range(3):
                _png(root / 'data' / split / c / f'{j}.png', seed=100 * i + j, mode='RGB' if j % 2 else 'L')
    torch.manual_seed(4)
    net = timm.create_model('sila_test_resnet', num_classes=2, in_chans=1).eval()
    train_py_checkpoint(root / 'last.pth.tar', net, 'sila_test_resnet', in_chans=1, img_size=32)
    return root, net


def test_cli_eval_feeds_single_channel_images_to_an_in_chans_1_checkpoint(gray, capfd):
    root, net = gray
    rc = main(['eval', '--model', 'sila_test_resnet', '--checkpoint', str(root / 'last.pth.tar'), '--data-dir',
               str(root / 'data'), '--workers', '0', '--json'])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    cfg = out['data_config']
    assert cfg['input_size'] == [1, 32, 32] and len(cfg['mean']) == len(cfg['std']) == 1
    # test_resnet's pretrained cfg has 3-value mean / std: averaged, as timm's train.py loader does, said in one line
    assert captured.err.count('timm-sila eval: warning: the model takes 1 input channel but its mean has 3') == 1
    transform = create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    paths = sorted((root / 'data' / 'test').rglob('*.png'))
    x = torch.stack([transform(Image.open(p).convert('L')) for p in paths])
    y = torch.tensor([0 if p.parent.name == 'a' else 1 for p in paths])
    ref = evaluate(net, [(x, y)])
    for got, want in zip(out['branches'], ref['branches']):
        assert got['top1'] == want['top1'] and got['loss'] == pytest.approx(want['loss'], rel=1e-5)


def test_cli_exit_curve_runs_an_in_chans_1_checkpoint(gray, capfd):
    root, _ = gray
    rc = main(['exit-curve', '--model', 'sila_test_resnet', '--checkpoint', str(root / 'last.pth.tar'),
               '--data-dir', str(root / 'data'), '--calib-split', 'val', '--batch-size', '3', '--points', '2',
               '--json'])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)['eval_samples'] == 6


# --- the command line: one line, exit 2, nothing written; a FIFO never hangs eval ------------------------------------
@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    net = build_sila('test_resnet', 2)[0]
    train_py_checkpoint(root / 'ckpt.pth.tar', net, 'sila_test_resnet', args_as_dict=True, img_size=32)
    return root / 'ckpt.pth.tar'


CLI_CASES = [  # (id, change to DIR/test (c0, c1 with 3 images each), extra argv, fragment of the error line)
    ('loop', lambda r: (r / 'c0' / 'loop').symlink_to('..'), [], 'c0/loop is a symbolic link loop'),
    ('duplicate', lambda r: (r / 'c1' / 'dup.png').symlink_to(r / 'c0' / '0.png'), [], 'are the same file'),
    ('missing-class', lambda r: [os.remove(p) for p in (r / 'c1').iterdir()] + [os.rmdir(r / 'c1')], [],
     'has 1 class folders but the model predicts 2 classes'),
    ('truncated-worker', lambda r: _truncated_jpeg(r / 'c0' / 'broken.jpg'), ['--workers', '2'],
     'cannot read image'),
    ('bomb-no-worker', lambda r: _bomb_png(r / 'c1' / 'huge.png'), ['--workers', '0'], 'DecompressionBombError'),
]


@pytest.mark.parametrize('change,argv,fragment', [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_folder_is_one_line_exit_2(ckpt, tmp_path, capfd, change, argv, fragment):
    change(image_folder(tmp_path / 'data' / 'test', splits=None))
    rc = main(['eval', '--model', 'sila_test_resnet', '--checkpoint', str(ckpt), '--data-dir', str(tmp_path / 'data'),
               '--no-progress'] + (argv or ['--workers', '0']))
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('timm-sila eval: error: '), captured.err
    assert fragment in lines[0] and len(lines[0]) < 400 and captured.out == ''


@pytest.mark.parametrize('names,error', [(['c0', 'c1'], None), (['cat', 'dog'], "class 0 of the model is 'cat'"),
                                         ({'0': 'c1', '1': 'c0'}, 'not in sorted order')])
def test_cli_eval_checks_the_class_names_a_stripped_folder_records(tmp_path, capfd, names, error):
    from timm_sila import strip
    folder = strip(build_sila('test_resnet', 2)[0], 0, tmp_path / 'b0', img_size=32)
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps(dict(config, label_names=names)))  # as timm's hub config holds them
    image_folder(tmp_path / 'data' / 'test', splits=None)
    rc = main(['eval', '--model', f'local-dir:{folder}', '--data-dir', str(tmp_path / 'data'), '--workers', '0',
               '--json'])
    captured = capfd.readouterr()
    if error is None:
        assert rc == 0 and json.loads(captured.out)['num_samples'] == 6, captured.err
    else:
        lines = captured.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and error in lines[0] and captured.out == '', captured.err


@pytest.mark.slow
def test_cli_fifo_named_like_an_image_is_skipped_not_waited_on(ckpt, tmp_path):
    root = image_folder(tmp_path / 'data' / 'test', splits=None)
    os.mkfifo(root / 'c0' / 'x.png')
    argv = ['eval', '--model', 'sila_test_resnet', '--checkpoint', str(ckpt), '--data-dir', str(tmp_path / 'data'),
            '--workers', '0', '--json']
    scratch = tmp_path / 'runner'
    scratch.mkdir()
    run = run_in_fresh_process([dict(id='eval', kind='cli', argv=argv)], tmp_path / 'data', scratch, timeout=120)['eval']
    assert run['rc'] == 0 and run['wall'] < 5 and run['rss_mb'] < 1024, run
    assert json.loads(run['stdout'])['num_samples'] == 6
    warning, = run['stderr'].strip().splitlines()
    assert warning.startswith('timm-sila eval: warning: ') and f'{root}/c0/x.png (a FIFO)' in warning


@pytest.mark.skipif(not (CIFAR / 'test').is_dir(), reason='needs ../shared/data/cifar10')
def test_real_cifar10_folder_reads_as_torchvision_reads_it():
    from torchvision.datasets import ImageFolder
    ours = ImageFolderDataset(CIFAR / 'test', num_classes=10)
    theirs = ImageFolder(str(CIFAR / 'test'))
    assert ours.classes == theirs.classes and ours.samples == theirs.samples
    image, label = ours[0]
    assert image.mode == 'RGB' and label == theirs.targets[0]

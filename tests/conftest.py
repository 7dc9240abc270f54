"""What several test files share: models built once per test run; the files commands read (an image folder, a timm
train.py checkpoint, an EarlyExit file, a strip folder); a tree snapshot, the no-network fixture and a small tmpfs;
the runner that times CLI commands in one fresh process."""
import argparse
import copy
import errno
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import pytest
import torch
from PIL import Image

import timm
from safetensors import safe_open
from safetensors.torch import save_file

import timm_sila  # registers sila_* names
from timm_sila.exits.early_exit import EarlyExit

REPO = Path(__file__).resolve().parents[1]


# --- models: built once per test run, handed out as copies -----------------------------------------------------
# The paper's six architectures plus other families, each at a small input it accepts: (model kwargs, input size).
REPRESENTATIVE = {
    'resnet18': ({}, 32),
    'vgg19_bn': ({}, 32),
    'mobilenetv1_100': ({}, 32),
    'wide_resnet50_2': ({}, 32),
    'densenet121': ({}, 32),
    'inception_v3': ({}, 75),
    'efficientnet_b0': ({}, 32),
    'convnext_atto': ({}, 32),
    'regnetx_002': ({}, 32),
    'vit_tiny_patch16_224': ({'img_size': 32}, 32),
    'swin_tiny_patch4_window7_224': ({'img_size': 64, 'window_size': 4}, 64),
}


@functools.lru_cache(maxsize=None)
def _built_sila(arch: str, num_classes: int):
    kwargs, size = REPRESENTATIVE.get(arch, ({}, 32))  # another arch (timm's test_* models): as is, at 32x32
    torch.manual_seed(0)
    model = timm.create_model(f'sila_{arch}', num_classes=num_classes, **kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def build_sila(arch: str, num_classes: int = 10):
    """A fresh copy of sila_<arch> (built once per test run, right after torch.manual_seed(0), in train mode) and its
    input batch: a test may change the copy (branch, mode, BN statistics, gradients) without reaching any other
    test. `arch`: a key of REPRESENTATIVE, or another timm architecture that runs at 32x32 as it is."""
    model, x = _built_sila(arch, num_classes)
    return copy.deepcopy(model), x.clone()


@functools.lru_cache(maxsize=None)
def _built_vanilla(arch: str, num_classes: int):
    kwargs, _ = REPRESENTATIVE[arch]
    return timm.create_model(arch, num_classes=num_classes, **kwargs)


def vanilla_like(arch: str, sila_model, num_classes: int = 10):
    """The plain timm model carrying the SilaNet's base weights (a fresh copy of one built once per test run: its
    state_dict is all replaced, and nothing outside it depends on how it was initialised)."""
    model = copy.deepcopy(_built_vanilla(arch, num_classes))
    model.load_state_dict(sila_model.base.state_dict())
    return model


def randomize_bn(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BN statistics and affine params, as after training, so a dropped or wrong buffer shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
    return net


def branch_logits(net, x: torch.Tensor, branch: int) -> torch.Tensor:
    """A SilaNet's eval logits with `branch` selected (the branch it had is restored)."""
    old, net.branch = net.branch, branch
    try:
        with torch.no_grad():
            return net.eval()(x)
    finally:
        net.branch = old


def eval_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A model's logits in eval mode, without gradients."""
    with torch.no_grad():
        return model.eval()(x)


# --- the files commands read: an image folder, a train.py checkpoint, an EarlyExit file, a strip folder -------
def image_folder(root: Path, classes: Union[int, Sequence[str]] = 2, n: Union[int, Mapping[str, int]] = 3,
                 splits: Optional[Sequence[str]] = ('test',), size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder tree of random RGB PNG images (lossless: a reader gets these pixels back exactly):
    root/<split>/<class>/<i>.png for each split, or root/<class>/<i>.png when `splits` is None. `classes`: a count
    (folders c0, c1, ...) or the folder names; `n`: images per class, or {class: count}. One generator seeded `seed`
    draws every pixel, split by split, class by class. Returns root."""
    g = torch.Generator().manual_seed(seed)
    names = [f'c{i}' for i in range(classes)] if isinstance(classes, int) else list(classes)
    for split in [None] if splits is None else splits:
        top = root if split is None else root / split
        for name in names:
            (top / name).mkdir(parents=True)
            for i in range(n[name] if isinstance(n, Mapping) else n):
                pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(top / name / f'{i}.png')
    return root


# vars(parser.parse_args([])) of timm 1.0's train.py (the values a checkpoint's `args` carries unless set), plus
# what train.py adds after parsing. Data config defaults: interpolation='', mean/std/crop_pct/input_size/img_size/
# in_chans None.
TRAIN_PY_DEFAULTS = dict(
    data=None, data_dir=None, dataset='', train_split='train', val_split='validation', train_num_samples=None,
    val_num_samples=None, dataset_download=False, class_map='', input_img_mode=None, input_key=None, target_key=None,
    dataset_trust_remote_code=False, model='resnet50', pretrained=False, pretrained_path=None, initial_checkpoint='',
    resume='', no_resume_opt=False, num_classes=None, gp=None, img_size=None, in_chans=None, input_size=None,
    crop_pct=None, mean=None, std=None, interpolation='', batch_size=128, validation_batch_size=None,
    channels_last=False, fuser='', grad_accum_steps=1, grad_checkpointing=False, fast_norm=False, model_kwargs={},
    head_init_scale=None, head_init_bias=None, torchcompile_mode=None, torchscript=False, torchcompile=None,
    device='cuda', amp=False, amp_dtype='float16', model_dtype=None, no_ddp_bb=False, synchronize_step=False,
    local_rank=0, device_modules=None, opt='sgd', opt_eps=None, opt_betas=None, momentum=0.9, weight_decay=2e-05,
    clip_grad=None, clip_mode='norm', layer_decay=None, layer_decay_min_scale=0, layer_decay_no_opt_scale=None,
    opt_kwargs={}, sched='cosine', sched_on_updates=False, lr=None, lr_base=0.1, lr_base_size=256, lr_base_scale='',
    lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0, lr_cycle_mul=1.0, lr_cycle_decay=0.5, lr_cycle_limit=1,
    lr_k_decay=1.0, warmup_lr=1e-05, min_lr=0, epochs=300, epoch_repeats=0.0, start_epoch=None,
    decay_milestones=[90, 180, 270], decay_epochs=90, warmup_epochs=5, warmup_prefix=False, cooldown_epochs=0,
    patience_epochs=10, decay_rate=0.1, no_aug=False, train_crop_mode=None, scale=[0.08, 1.0],
    ratio=[0.75, 1.3333333333333333], hflip=0.5, vflip=0.0, color_jitter=0.4, color_jitter_prob=None,
    grayscale_prob=None, gaussian_blur_prob=None, aa=None, aug_repeats=0, aug_splits=0, jsd_loss=False,
    bce_loss=False, bce_sum=False, bce_target_thresh=None, bce_pos_weight=None, reprob=0.0, remode='pixel',
    recount=1, resplit=False, mixup=0.0, cutmix=0.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
    mixup_mode='batch', mixup_off_epoch=0, smoothing=0.1, train_interpolation='random', drop=0.0,
    drop_connect=None, drop_path=None, drop_block=None, bn_momentum=None, bn_eps=None, sync_bn=False,
    dist_bn='reduce', split_bn=False, model_ema=False, model_ema_force_cpu=False, model_ema_decay=0.9998,
    model_ema_warmup=False, seed=42, worker_seeding='all', log_interval=50, val_interval=1, recovery_interval=0,
    checkpoint_hist=10, workers=4, save_images=False, pin_mem=False, no_prefetcher=False, output='', experiment='',
    eval_metric='top1', tta=0, use_multi_epochs_loader=False, log_wandb=False, wandb_project=None, wandb_tags=[],
    wandb_resume_id='', train_img_sizes=None, train_batch_sizes=None, train_size_probs=None,
    train_size_schedule='constant', train_size_schedule_spread=0.65, train_size_random_mix=0.1,
    train_batches_per_epoch=None, variable_batch_loss_scale='none', naflex_loader=False,
    naflex_train_seq_lens=[128, 256, 576, 784, 1024], naflex_max_seq_len=576, naflex_patch_sizes=None,
    naflex_patch_size_probs=None, naflex_loss_scale='linear', naflex_patchify_channels_first=False,
    kd_model_name=None, kd_distill_type='logit', kd_loss_type='kl', distill_loss_weight=None, task_loss_weight=None,
    kd_temperature=4.0, kd_student_feature_dim=None, kd_teacher_feature_dim=None, kd_token_distill_type='soft',
    # set by train.py after parsing
    prefetcher=True, distributed=False, world_size=1, rank=0,
)


def train_py_args(**fields) -> argparse.Namespace:
    """The `args` timm's train.py saves in a checkpoint: every argument at its default, `fields` on top."""
    return argparse.Namespace(**copy.deepcopy(dict(TRAIN_PY_DEFAULTS, **fields)))


def train_py_checkpoint(path: Path, net: torch.nn.Module, arch: str, *, ema: Optional[torch.nn.Module] = None,
                        args_as_dict: bool = False, with_args: bool = True, entries: Optional[dict] = None,
                        **fields) -> Path:
    """`net` saved as timm's train.py saves a checkpoint: {'epoch', 'arch': arch, 'state_dict', 'version', 'args'}.
    args: train_py_args with model=arch, num_classes=net.num_classes and `fields` on top (a dict with `args_as_dict`,
    as scripts that save vars(args) write it; left out without `with_args`); 'state_dict_ema' from `ema`; then
    `entries`, other top-level keys or replacements. Returns path."""
    args = train_py_args(**dict(dict(model=arch, num_classes=net.num_classes), **fields))
    ckpt = dict(epoch=1, arch=arch, state_dict=net.state_dict(), version=2)
    if with_args:
        ckpt['args'] = vars(args) if args_as_dict else args
    if ema is not None:
        ckpt['state_dict_ema'] = ema.state_dict()
    ckpt.update(entries or {})
    torch.save(ckpt, path)
    return Path(path)


def early_exit_file(path: Path, net: torch.nn.Module, meta_text: Optional[str] = None, **changes) -> Path:
    """An EarlyExit file of `net` (thresholds 0.5) at path, its metadata changed as a stranger's file could be:
    num_classes replaced at the top level, any other key in model_args; or its text replaced by `meta_text`."""
    EarlyExit(net, thresholds=0.5).save(path)
    with safe_open(str(path), framework='pt') as f:
        meta = json.loads(f.metadata()['timm_sila'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        (meta['model_args'] if key != 'num_classes' else meta)[key] = value
    save_file(tensors, str(path), metadata={'timm_sila': meta_text or json.dumps(meta)})
    return Path(path)


def x_input() -> torch.Tensor:
    """The (2, 3, 32, 32) input a test compares two models' outputs on."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope='module')
def net():
    """sila_test_resnet (10 classes), eval mode, the model `stripped` strips; a file that needs another model
    defines its own `net`."""
    return build_sila('test_resnet')[0].eval()


@pytest.fixture(scope='module')
def trained():
    """sila_resnet18 with BN statistics as after training, and an input batch: (net, x)."""
    net = randomize_bn(build_sila('resnet18')[0], seed=1).eval()
    return net, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope='session')
def stripped(tmp_path_factory):
    """sila_test_resnet (10 classes, built after torch.manual_seed(0): the `net` of the files that use this) stripped
    once per test run: {branch: folder} for branches 0 and 1. Read-only: a test that changes a folder changes a copy
    (`stripped_copy`)."""
    net = build_sila('test_resnet')[0].eval()
    root = tmp_path_factory.mktemp('stripped')
    return {branch: timm_sila.strip(net, branch, root / f'b{branch}') for branch in (0, 1)}


@pytest.fixture
def stripped_copy(stripped):
    """stripped_copy(branch, dest): a copy of the test run's strip folder of that branch at dest, for the test to
    change."""
    return lambda branch, dest: Path(shutil.copytree(stripped[branch], dest))


# --- what a test compares before and after, what it may not do, where the disk is full -------------------------
def snapshot(root: Path, folders: bool = False) -> dict:
    """Every path under root: a file's size and modification time and whether it is a link; with `folders`, each
    folder's size and modification time too (so an entry made and removed inside it shows)."""
    def entry(p):
        st = p.lstat()
        if p.is_dir():
            return ('dir', p.is_symlink()) + ((st.st_size, st.st_mtime_ns) if folders else ())
        return p.is_symlink(), st.st_size, st.st_mtime_ns
    return {str(p.relative_to(root)): entry(p) for p in sorted(root.rglob('*'))}


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt or name lookup fails (and is recorded: the list is yielded); hub / torch caches point
    into tmp_path, so a download would show in a snapshot of it too. The test fails if anything was attempted."""
    attempts = []

    def refuse(*args, **kwargs):
        address = args[1] if args and isinstance(args[0], socket.socket) else args[:2]
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, f'test: network access to {address} refused')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket.socket, 'connect_ex', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    for var in ('HF_HOME', 'TORCH_HOME', 'XDG_CACHE_HOME'):
        monkeypatch.setenv(var, str(tmp_path / 'cache'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '0')
    yield attempts
    assert attempts == [], f'network access attempted: {attempts}'


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size) -> a folder on a new tmpfs of that size ('1m', ...), unmounted after the test: a full disk for
    real. The test is skipped where this process cannot mount one (that needs root, or CAP_SYS_ADMIN, and
    mount(8))."""
    mounts = []

    def mount(size: str) -> Path:
        path = tmp_path / f'tmpfs{len(mounts)}'
        path.mkdir()
        try:
            run = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                                 capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f'cannot mount a tmpfs here: {e}')
        if run.returncode != 0:
            pytest.skip(f'cannot mount a tmpfs here: {run.stderr.decode(errors="replace").strip()}')
        mounts.append(path)
        return path
    yield mount
    for path in mounts:
        subprocess.run(['umount', str(path)], capture_output=True, timeout=30)


# --- commands in one fresh process: exit status, output, time and peak memory of each --------------------------
# For scripts the tests run in a fresh interpreter: this process's own peak resident memory in MB. VmHWM belongs to
# the process's own address space; ru_maxrss would also count the parent's memory at fork time, which exec records.
PEAK_RSS_MB = "[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0] / 1024"


# Runs the cases of run_in_fresh_process in one process (imports first: they are no case's work).
_FRESH_RUNNER = r'''
import json, os, resource, socket, sys, time
cases, root, report = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:2] or args[:1]))
    raise OSError('network access refused by the test')
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = refuse
import timm_sila, timm_sila.measure.evaluate, timm_sila.ship.export, timm_sila.measure.bench, timm_sila.exits.curve
from timm_sila.exits.early_exit import EarlyExit
from timm_sila_cli import error_line, main
try:  # a regression must fail the test, not swap the machine: address space = after imports + 4 GiB
    size = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')][0] * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (4 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
except (OSError, ValueError, IndexError):
    pass
baseline = ''' + PEAK_RSS_MB + r'''
def snapshot():
    return sorted((os.path.relpath(os.path.join(d, n), root), os.lstat(os.path.join(d, n)).st_size,
                   os.lstat(os.path.join(d, n)).st_mtime_ns) for d, dirs, files in os.walk(root) for n in dirs + files)
results = {}
for case in cases:
    before, tried = snapshot(), len(attempts)
    captured = {}
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: open(os.path.join(os.path.dirname(report), f'fd{fd}.txt'), 'w+b') for fd in (1, 2)}
    for fd in (1, 2):
        os.dup2(files[fd].fileno(), fd)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        if case['kind'] == 'cli':
            rc = main(case['argv'])
        else:
            try:
                EarlyExit.load(case['path'])
                rc = 0
            except ValueError as e:
                print(f'EarlyExit.load: error: {error_line(e)}', file=sys.stderr)
                rc = 2
    except BaseException as e:
        import traceback
        traceback.print_exc()
        rc = f'{type(e).__name__}'
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    sys.stdout.flush(); sys.stderr.flush()
    for fd in (1, 2):
        os.dup2(saved[fd], fd)
        files[fd].seek(0)
        captured[fd] = files[fd].read().decode('utf-8', 'replace')
        files[fd].close()
    results[case['id']] = dict(rc=rc, stdout=captured[1], stderr=captured[2], cpu=cpu, wall=wall,
                               rss_mb=''' + PEAK_RSS_MB + r''', baseline_mb=baseline,
                               connects=attempts[tried:], changed=snapshot() != before)
json.dump(results, open(report, 'w'))
'''


def run_in_fresh_process(cases: Sequence[dict], root: Path, scratch: Path, env: Optional[dict] = None,
                         timeout: float = 600) -> dict:
    """Run `cases` one after another in ONE fresh Python process, this checkout first on its path, every
    connection and name lookup refused, its address space capped at its size after the imports + 4 GiB (a
    regression fails the test rather than swap the machine). A case is dict(id=..., kind='cli', argv=[...]) for
    `timm_sila_cli.main`, or dict(id=..., kind='early_exit', path=...) for EarlyExit.load, reported as the CLI
    reports errors. Returns {id: dict(rc, stdout, stderr, cpu, wall, rss_mb, baseline_mb, connects, changed)}: the
    exit status (or the name of the exception that escaped), what reached file descriptors 1 and 2, the case's CPU
    and wall seconds, the process's peak RSS after the case and after the imports (MB), the connections attempted,
    and whether anything under `root` changed. `scratch`: a folder for the runner's own files; `env`: added to
    this process's environment."""
    (scratch / 'cases.json').write_text(json.dumps(list(cases)))
    path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    run = subprocess.run([sys.executable, '-c', _FRESH_RUNNER, str(scratch / 'cases.json'), str(root),
                          str(scratch / 'report.json')], capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, **(env or {}), PYTHONPATH=path))
    assert run.returncode == 0 and (scratch / 'report.json').exists(), run.stderr[-3000:]
    return json.loads((scratch / 'report.json').read_text())

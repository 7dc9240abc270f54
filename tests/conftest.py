import copy
import errno
import functools
import socket
from pathlib import Path

import pytest
import torch

import timm
import timm_sila  # noqa: F401  registers sila_* names

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
    kwargs, size = REPRESENTATIVE[arch]
    torch.manual_seed(0)
    model = timm.create_model(f'sila_{arch}', num_classes=num_classes, **kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def build_sila(arch: str, num_classes: int = 10):
    """A fresh copy of sila_<arch> (built once per session, seed 0, train mode) and its input batch: a test may
    change the copy (branch, mode, BN statistics, gradients) without reaching any other test."""
    model, x = _built_sila(arch, num_classes)
    return copy.deepcopy(model), x.clone()


def vanilla_like(arch: str, sila_model, num_classes: int = 10):
    """The plain timm model carrying the SilaNet's base weights."""
    kwargs, _ = REPRESENTATIVE[arch]
    model = timm.create_model(arch, num_classes=num_classes, **kwargs)
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


# For scripts the tests run in a fresh interpreter: this process's own peak resident memory in MB. VmHWM belongs to
# the process's own address space; ru_maxrss would also count the parent's memory at fork time, which exec records.
PEAK_RSS_MB = "[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0] / 1024"


# --- what a test compares before and after, and what it may not do -------------------------------------------------
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

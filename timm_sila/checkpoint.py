"""Safe reading of SilaNet checkpoints: timm train.py `*.pth.tar`, plain state_dicts and `.safetensors`.

Files are read with `torch.load(..., weights_only=True)` (allow-listing only `argparse.Namespace`, which timm's
train.py stores as `args`) or with safetensors; arbitrary pickles are refused. What a file says about its model
passes `timm_sila.config`'s checks: its create_model kwargs the allow-list (anything that loads, fetches or writes
is refused with UnsafeFileError), its data config the range checks, its model name the registry. Weights are
loaded strictly and never cast across kinds (an integer tensor where the model holds floats is refused). Every
failure to read is a CheckpointError (or FileNotFoundError / IsADirectoryError / PermissionError) naming the file.
"""
import argparse
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm
from timm.models import clean_state_dict

from .config import (
    CheckpointError, UnsafeFileError, sanitize_file_data_config, sanitize_file_model_kwargs, sila_kwargs,
    base_arch, is_sila_name, sila_name)
from .model import SilaNet
from .timm_compat import pretrained_form_args

__all__ = ['CheckpointError', 'UnsafeFileError', 'Checkpoint', 'read_checkpoint', 'read_safetensors',
           'load_silanet', 'load_state_dict_checked', 'create_with_img_size']

_EMA_KEYS = ('state_dict_ema', 'model_ema')  # where timm's load_state_dict looks for EMA weights, in its order
_NAME_CHARS = frozenset('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-')
# exceptions torch.load / safetensors raise on a truncated, corrupt or crafted file
_READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                UnicodeDecodeError, OverflowError, MemoryError)


@dataclass
class Checkpoint:
    """What a checkpoint file holds: weights, optional EMA weights, and what it says about its model."""
    path: Path
    state_dict: Dict[str, torch.Tensor]  # keys cleaned by timm's clean_state_dict (no 'module.' / '_orig_mod.')
    state_dict_ema: Optional[Dict[str, torch.Tensor]] = None  # 'state_dict_ema' or 'model_ema', cleaned alike
    model_name: Optional[str] = None  # e.g. 'sila_resnet18', from train.py's args.model / arch
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # allow-listed create_model kwargs from train.py args
    data_config: Dict[str, Any] = field(default_factory=dict)  # range-checked input_size / mean / std ... from args
    from_pretrained: bool = False  # train.py's args.pretrained: trained from timm's pretrained weights


def create_with_img_size(name: str, img_size: Optional[int] = None, **kwargs) -> nn.Module:
    """timm.create_model at input size `img_size`: passed as img_size= to models with a fixed input size (timm's
    pretrained cfg `fixed_input_size`, e.g. ViTs); other models run at any size and are built as they are."""
    if img_size is None or not timm.models.get_pretrained_cfg_value(name, 'fixed_input_size'):
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as e:
        raise ValueError(f'{name} has a fixed input size and no img_size argument, so it cannot be built for '
                         f'{img_size}x{img_size}; leave the image size at its default.') from e


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _check_file(path: Path, what: str = 'Checkpoint') -> None:
    if not path.exists():
        raise FileNotFoundError(f'{what} {path} does not exist.')
    if path.is_dir():
        raise IsADirectoryError(f'{what} {path} is a folder; pass the file inside it.')


def _is_utf8(path: Path) -> bool:
    try:
        os.fsencode(path).decode('utf-8')
    except UnicodeDecodeError:
        return False
    return True


def _read_safetensors_bytes(data: bytes) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """safetensors from memory (its file API takes UTF-8 paths only)."""
    from safetensors.torch import load
    header = json.loads(data[8:8 + int.from_bytes(data[:8], 'little')])
    metadata = header.get('__metadata__') if isinstance(header, dict) else None
    return load(data), dict(metadata or {})


def read_safetensors(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors on CPU, header metadata or {}) of a .safetensors file; any failure to parse is a CheckpointError
    naming the file."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    _check_file(path, 'File')
    try:
        if not _is_utf8(path):
            return _read_safetensors_bytes(path.read_bytes())
        with safe_open(str(path), framework='pt', device='cpu') as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError:
        raise
    except (SafetensorError,) + _READ_ERRORS as e:
        raise CheckpointError(f'Cannot read {path}: it is not a valid safetensors file (truncated or corrupt?): '
                              f'{_first_line(e)}') from e
    return tensors, metadata


def _read_raw(path: Path) -> Any:
    _check_file(path)
    with path.open('rb') as f:
        magic = f.read(8)
    if not magic:
        raise CheckpointError(f'Checkpoint {path} is empty (0 bytes).')
    torch_format = magic.startswith(b'PK\x03\x04') or magic[:1] == b'\x80'  # torch zip / legacy pickle
    if not torch_format:
        try:
            return read_safetensors(path)[0]
        except CheckpointError as e:
            raise CheckpointError(f'Cannot read {path}: it is neither a torch checkpoint nor a valid safetensors '
                                  f'file (truncated or corrupt?): {_first_line(e.__cause__ or e)}') from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'Refusing to load {path}: it contains Python objects other than tensors, containers and '
            f'argparse.Namespace, and is read with weights_only=True for safety ({_first_line(e)}). '
            f'Re-save just its state_dict.') from e
    except PermissionError:
        raise
    except _READ_ERRORS as e:
        raise CheckpointError(f'Cannot read {path}: the file is truncated or corrupt ({_first_line(e)}).') from e


def _getter(args: Any):
    if isinstance(args, dict):
        return args.get
    if isinstance(args, argparse.Namespace):
        return lambda k: getattr(args, k, None)
    return lambda k: None


def _args_to_kwargs(args: Any, source: str, overridden: Iterable[str]) -> Dict[str, Any]:
    """The create_model kwargs timm train.py derives from its args (those that change the weights or outputs),
    through the allow-list of keys a file may set."""
    get = _getter(args)
    kwargs = {}
    for src, dst in (('num_classes', 'num_classes'), ('in_chans', 'in_chans'), ('gp', 'global_pool'),
                     ('bn_momentum', 'bn_momentum'), ('bn_eps', 'bn_eps')):
        if get(src) is not None:
            kwargs[dst] = get(src)
    extra = get('model_kwargs')
    if extra is not None and not isinstance(extra, dict):
        raise UnsafeFileError(f'{source}: args.model_kwargs must be a mapping, got {type(extra).__name__}.',
                              'model_kwargs', source)
    kwargs.update(extra or {})
    return sanitize_file_model_kwargs(kwargs, source, overridden)


def _file_model_name(name: Any, path: Path) -> Optional[str]:
    """A model name recorded in a checkpoint: a plain timm name, never a hub or local source."""
    if name is None:
        return None
    if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
        raise UnsafeFileError(f'{path} names its model {name!r}, which is not a timm model name (a file may not '
                              f'name a hub or local source); pass the model name yourself.', 'model', str(path))
    return name


def read_checkpoint(path: Union[str, Path], overridden: Iterable[str] = ()) -> Checkpoint:
    """Read a checkpoint file safely; raises FileNotFoundError or CheckpointError with what is wrong.

    The create_model kwargs and data config of train.py's `args` pass the allow-list and range checks of
    `timm_sila.config` (UnsafeFileError otherwise); kwargs named in `overridden` -- those the caller sets itself --
    are not read from the file.
    """
    path = Path(path)
    raw = _read_raw(path)
    ckpt = Checkpoint(path=path, state_dict={})
    if _is_tensor_dict(raw):
        ckpt.state_dict = raw
    elif isinstance(raw, dict) and _is_tensor_dict(raw.get('state_dict')):
        ckpt.state_dict = raw['state_dict']
        ema_key = next((k for k in _EMA_KEYS if _is_tensor_dict(raw.get(k))), None)
        if ema_key is not None:
            ckpt.state_dict_ema = clean_state_dict(raw[ema_key])
        args = raw.get('args')
        get = _getter(args)
        name = _file_model_name(get('model'), path)
        arch = raw.get('arch')
        ckpt.model_name = name if name is not None else (_file_model_name(arch, path) if isinstance(arch, str)
                                                         else None)
        if args is not None:
            source = f'{path} (train.py args)'
            ckpt.model_kwargs = _args_to_kwargs(args, source, overridden)
            ckpt.from_pretrained = get('pretrained') is True
            ckpt.data_config = sanitize_file_data_config(
                {k: get(k) for k in ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode',
                                     'interpolation')}, source)
    elif isinstance(raw, dict) and _is_tensor_dict(raw.get('model')):
        ckpt.state_dict = raw['model']
    else:
        keys = sorted(map(str, raw))[:6] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f'{path} holds no state_dict (found {keys}); expected a timm train.py checkpoint, '
                              f'a state_dict or a .safetensors file.')
    ckpt.state_dict = clean_state_dict(ckpt.state_dict)
    return ckpt


def _check_sila_keys(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    keys = list(state_dict)
    has_base = any(k.startswith('base.') for k in keys)
    has_heads = any(k.startswith('heads.') for k in keys)
    if not (has_base and has_heads):
        raise CheckpointError(
            f'{path} is not a SilaNet checkpoint: its keys ({", ".join(keys[:3])}, ...) are those of a plain model, '
            f'while a SilaNet state_dict has base.* and heads.* keys. Train with a sila_<arch> model; a plain timm '
            f'model needs no stripping.')


def _infer_sets(state_dict: Dict[str, torch.Tensor]) -> int:
    ids = {k.split('.')[1] for k in state_dict if k.startswith('heads.')}
    return 1 + len(ids)


def _infer_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    weight = state_dict.get('heads.1.weight')
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def _describe(keys: Sequence[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f', ... (+{len(keys) - n})' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def _dtype_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return 'bool'
    if t.is_complex():
        return 'complex'
    return 'floating-point' if t.is_floating_point() else 'integer'


def load_state_dict_checked(model: nn.Module, state_dict: Dict[str, Any], source: Any, what: str = '',
                            hint: str = '') -> nn.Module:
    """Load `state_dict` (read from file `source`) into `model` strictly; returns the model.

    Missing or unexpected keys, shape mismatches and tensors of another dtype kind than the model's (an integer
    or bool tensor where the model holds floats, or the reverse: never silently cast) raise one CheckpointError
    naming the file, the model (`what`) and `hint` (what to do). Floating-point precision may differ (fp16 weights
    load into an fp32 model).
    """
    expected = model.state_dict()
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
              if k in state_dict and k not in not_tensors and state_dict[k].shape != v.shape]
    kinds = [f'{k} {state_dict[k].dtype} vs {v.dtype}' for k, v in expected.items()
             if k in state_dict and k not in not_tensors and _dtype_kind(state_dict[k]) != _dtype_kind(v)]
    problems: List[str] = []
    if not_tensors:
        problems.append(f'{len(not_tensors)} entries that are not tensors ({_describe(not_tensors)})')
    if missing:
        problems.append(f'{len(missing)} missing keys ({_describe(missing)})')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys ({_describe(unexpected)})')
    if shapes:
        problems.append(f'{len(shapes)} shape mismatches (file vs model: {_describe(shapes, 2)})')
    if kinds:
        problems.append(f'{len(kinds)} tensors of another dtype kind, refused rather than cast (file vs model: '
                        f'{_describe(kinds, 2)})')
    if problems:
        target = f' {what}' if what else ' the model'
        raise CheckpointError(f'The state_dict in {source} does not match{target}: {"; ".join(problems)}.'
                              + (f' {hint}' if hint else ''))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'Cannot load the weights in {source}: {_first_line(e)}') from e
    return model


def _overridden(model_kwargs: Dict[str, Any], **explicit: Any) -> List[str]:
    """The create_model kwargs the caller sets itself: the file's values of these are never used."""
    return list(model_kwargs) + [k for k, v in explicit.items() if v is not None]


def load_silanet(
        source: Union[str, Path, Checkpoint],
        model: Optional[str] = None,
        num_classes: Optional[int] = None,
        sets: Optional[int] = None,
        taps: Optional[Sequence[Union[int, str]]] = None,
        head: Optional[str] = None,
        ema: bool = False,
        img_size: Optional[int] = None,
        **model_kwargs,
) -> SilaNet:
    """Rebuild the full SilaNet a checkpoint was saved from and load its weights strictly (eval mode).

    The model comes from the arguments given, else from the checkpoint's train.py args (allow-listed: see
    `timm_sila.config`; an argument given here replaces the file's, which is then not read); num_classes and sets
    default to what the heads in the state_dict show. `ema=True` loads `state_dict_ema`.
    """
    if isinstance(source, Checkpoint):
        ckpt = source
    else:
        ckpt = read_checkpoint(source, _overridden(model_kwargs, num_classes=num_classes, sila_sets=sets,
                                                   sila_taps=taps, sila_head=head, img_size=img_size))
    if ema:
        if ckpt.state_dict_ema is None:
            raise CheckpointError(f'EMA weights were asked for, but {ckpt.path} has no state_dict_ema or model_ema '
                                  f'(timm train.py saves them only when trained with --model-ema).')
        state_dict = ckpt.state_dict_ema
    else:
        state_dict = ckpt.state_dict
    _check_sila_keys(state_dict, ckpt.path)

    name = model or ckpt.model_name
    if name is not None and not is_sila_name(name):
        name = None if model is None else sila_name(name)  # no model given: e.g. train.py arch 'silanet'
    if name is None:
        raise CheckpointError(f'{ckpt.path} does not say which SilaNet it holds; pass the model name '
                              f'(model="sila_resnet18", CLI --model sila_resnet18) and its num_classes/sets/taps.')
    name = name.split('.', 1)[0]  # drop a pretrained tag: the weights come from the checkpoint
    if not timm.is_model(name):
        raise CheckpointError(f'Unknown model {name!r}; see timm.list_models("sila_*").')

    kwargs = dict(ckpt.model_kwargs)
    if ckpt.from_pretrained:  # the module timm built for its pretrained weights (fbnetc_100: BN eps 1e-3)
        for key, value in pretrained_form_args(base_arch(name), dict(kwargs, **model_kwargs)).items():
            kwargs.setdefault(key, value)
    if img_size is not None:
        kwargs.pop('img_size', None)
    kwargs.update(model_kwargs)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    kwargs.update(sila_kwargs(sets=sets, taps=taps, head=head))
    kwargs.setdefault('num_classes', _infer_num_classes(state_dict))
    kwargs.setdefault('sila_sets', _infer_sets(state_dict))
    kwargs.update(sila_branch=0, sila_stripped=False)
    try:
        net = create_with_img_size(name, None if 'img_size' in kwargs else img_size, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f'Cannot build {name} with {kwargs} (read from {ckpt.path} or given): '
                              f'{_first_line(e)}') from e
    shown = {k: v for k, v in kwargs.items() if k not in ('sila_branch', 'sila_stripped')}
    load_state_dict_checked(net, state_dict, ckpt.path, what=f'{name}({shown})',
                            hint='Pass the model, num_classes, sets, taps and head it was trained with.')
    return net.eval()

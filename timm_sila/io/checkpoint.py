"""Safe reading of SilaNet checkpoints: timm train.py `*.pth.tar`, plain state_dicts and `.safetensors`.

Files are read with `torch.load(..., weights_only=True)` (allow-listing only `argparse.Namespace`, which timm's
train.py stores as `args`) or with safetensors; arbitrary pickles are refused. What a file says about its model
passes `timm_sila.io.trust`'s checks: its create_model kwargs the allow-list (anything that loads, fetches or writes
is refused with UnsafeFileError), its data config the range checks, its model name the registry. Weights are
loaded strictly and never cast across kinds (an integer tensor where the model holds floats is refused). Every
failure to read is a CheckpointError (or FileNotFoundError / IsADirectoryError / PermissionError) naming the file.
"""
import argparse
import json
import os
import pickle
import re
import stat
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from timm.models import clean_state_dict

from timm_sila._checks import first_line, listing, short
from timm_sila.config import base_arch, is_sila_name, sila_kwargs, sila_name
from timm_sila.io.trust import (
    FILE_LIMITS, CheckpointError, UnsafeFileError, bound_violation, check_file_model_name, sanitize_file_data_config,
    sanitize_file_model_kwargs)
from timm_sila.model import SilaNet, create_with_img_size
from timm_sila._timm_compat import pretrained_form_args

__all__ = ['Checkpoint', 'read_checkpoint', 'read_safetensors', 'is_sila_state_dict', 'load_silanet',
           'load_state_dict_checked', 'build_checked', 'overridden_kwargs']

# Where timm's load_state_dict looks for weights, in its order: the model's under 'state_dict' or 'model' (else the
# file is the state_dict itself), the EMA copy's under 'state_dict_ema' or 'model_ema'.
_WEIGHT_KEYS = ('state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema')
# exceptions torch.load / safetensors raise on a truncated, corrupt or crafted file
_READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                UnicodeDecodeError, OverflowError, MemoryError, RecursionError)


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
    img_size: Optional[int] = None  # the input side the model was built at, where args give it apart from
    #                                 model_kwargs (an int args.input_size, as DeiT / ConvNeXt-style scripts save)
    origins: Dict[str, str] = field(default_factory=dict)  # where the file sets each model kwarg: 'args.num_classes'
    keys: Tuple[str, ...] = ()  # the file's top-level keys (empty for a bare state_dict)
    ema_key: Optional[str] = None  # the top-level key of the EMA weights (or of what is there instead of them)

    def weights(self, ema: bool = False) -> Dict[str, torch.Tensor]:
        """The state_dict, or with `ema` the EMA weights (read as timm's load_checkpoint(use_ema=True) reads them,
        but never falling back to the model's); CheckpointError naming the keys looked for when there are none."""
        if not ema:
            return self.state_dict
        if self.state_dict_ema is not None:
            return self.state_dict_ema
        if self.ema_key is not None:
            raise CheckpointError(f'EMA weights were asked for, but the {self.ema_key!r} entry of {self.path} is not a '
                                  f'mapping of names to tensors.')
        held = (f'its top-level keys are {_names(self.keys, 8)}' if self.keys else 'it is a bare state_dict')
        raise CheckpointError(f'EMA weights were asked for, but {self.path} has no state_dict_ema or model_ema entry '
                              f'(where timm\'s load_checkpoint looks for them; {held}). timm train.py saves them '
                              f'only when trained with --model-ema; leave out --ema / ema=True for the model\'s '
                              f'own weights.')


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _check_file(path: Path, what: str = 'Checkpoint') -> None:
    """A missing file, a folder, and anything that is not a regular file (a FIFO would block the reader forever, a
    device would stream without end) is refused before it is opened."""
    if not path.exists():
        raise FileNotFoundError(f'{what} {path} does not exist.')
    if path.is_dir():
        raise IsADirectoryError(f'{what} {path} is a folder; pass the file inside it.')
    if not stat.S_ISREG(path.stat().st_mode):
        raise CheckpointError(f'{what} {path} is not a regular file (a FIFO, socket or device); pass a file.')


def _is_utf8(path: Path) -> bool:
    try:
        os.fsencode(path).decode('utf-8')
    except UnicodeDecodeError:
        return False
    return True


def _read_safetensors_bytes(data: bytes) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """safetensors from memory (its file API takes UTF-8 paths only)."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], 'little')])
    metadata = header.get('__metadata__') if isinstance(header, dict) else None
    return safetensors_load(data), dict(metadata or {})


def read_safetensors(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors on CPU, header metadata or {}) of a .safetensors file; any failure to parse is a CheckpointError
    naming the file."""
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
                              f'{first_line(e)}') from e
    return tensors, metadata


def _check_zip_expansion(path: Path) -> None:
    """Refuse a torch zip checkpoint whose compressed entries expand beyond FILE_LIMITS['zip_expansion'] times
    the file's size (torch.save stores entries uncompressed; torch.load would inflate them all into memory)."""
    bound = FILE_LIMITS['zip_expansion']
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        if isinstance(e, PermissionError):
            raise
        raise CheckpointError(f'Cannot read {path}: the file is truncated or corrupt ({first_line(e)}).') from e
    compressed = [e for e in entries if e.compress_type != zipfile.ZIP_STORED]
    expanded = sum(e.file_size for e in compressed)
    if compressed and expanded > bound.hi * size + (1 << 20):
        raise CheckpointError(
            f'Refusing {path}: its {len(compressed)} compressed entries expand to {expanded:,} bytes, '
            f'{expanded / size:,.0f}x the file\'s {size:,} bytes, above the bound of {bound.hi:g}x ({bound.why}). '
            f'Re-save it with torch.save.')


def _read_raw(path: Path) -> Any:
    _check_file(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))  # never waits on a FIFO put there meanwhile
    with os.fdopen(fd, 'rb') as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise CheckpointError(f'Checkpoint {path} is not a regular file (a FIFO, socket or device); pass a file.')
        magic = f.read(8)
    if not magic:
        raise CheckpointError(f'Checkpoint {path} is empty (0 bytes).')
    torch_format = magic.startswith(b'PK\x03\x04') or magic[:1] == b'\x80'  # torch zip / legacy pickle
    if not torch_format:
        try:
            return read_safetensors(path)[0]
        except CheckpointError as e:
            raise CheckpointError(f'Cannot read {path}: it is neither a torch checkpoint nor a valid safetensors '
                                  f'file (truncated or corrupt?): {first_line(e.__cause__ or e)}') from e
    if magic.startswith(b'PK\x03\x04'):
        _check_zip_expansion(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'Refusing to load {path}: it contains Python objects other than tensors, containers and '
            f'argparse.Namespace, and is read with weights_only=True for safety ({first_line(e)}). '
            f'Re-save just its state_dict.') from e
    except PermissionError:
        raise
    except _READ_ERRORS as e:
        raise CheckpointError(f'Cannot read {path}: the file is truncated or corrupt ({first_line(e)}).') from e


def _getter(args: Any):
    if isinstance(args, dict):
        return args.get
    if isinstance(args, argparse.Namespace):
        return lambda k: getattr(args, k, None)
    return lambda k: None


# train.py args fields that are create_model kwargs: (field, kwarg). 'nb_classes' is what DeiT / ConvNeXt-style
# scripts call num_classes; it is read only where num_classes is absent.
_ARGS_KWARGS = (('num_classes', 'num_classes'), ('nb_classes', 'num_classes'), ('in_chans', 'in_chans'),
                ('gp', 'global_pool'), ('bn_momentum', 'bn_momentum'), ('bn_eps', 'bn_eps'))
_ARGS_DATA = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')


def _args_to_kwargs(args: Any, source: str, overridden: Iterable[str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(create_model kwargs timm train.py derives from its args -- those that change the weights or outputs --
    through the allow-list of keys a file may set, where in the args each one is set)."""
    get = _getter(args)
    kwargs, origins = {}, {}
    for src, dst in _ARGS_KWARGS:
        if get(src) is not None and dst not in kwargs:
            kwargs[dst], origins[dst] = get(src), f'args.{src}'
    extra = get('model_kwargs')
    if extra is not None and not isinstance(extra, dict):
        raise UnsafeFileError(f'{source}: args.model_kwargs must be a mapping, got {type(extra).__name__}.',
                              'model_kwargs', source)
    for key, value in (extra or {}).items():
        kwargs[key] = value
        origins[key] = f'args.model_kwargs.{key}' if isinstance(key, str) else 'args.model_kwargs'
    kwargs = sanitize_file_model_kwargs(kwargs, source, overridden)
    return kwargs, {k: origins[k] for k in kwargs}


def _read_args(ckpt: Checkpoint, raw: Dict[str, Any], overridden: Iterable[str]) -> None:
    """What the file's `args` (argparse.Namespace or dict, in any layout) and `arch` say about its model.

    train.py's fields are read as train.py means them. Of other scripts' fields, those meaning the same are read
    too: `nb_classes` (DeiT / ConvNeXt) as num_classes, an integer `input_size` (their image side, at which DeiT
    builds its model) as img_size; every other field is ignored."""
    path = ckpt.path
    args = raw.get('args')
    get = _getter(args)
    name = None if get('model') is None else check_file_model_name(get('model'), path, 'model')
    arch = raw.get('arch')
    ckpt.model_name = name if name is not None else (
        check_file_model_name(arch, path, 'arch') if isinstance(arch, str) else None)
    if args is None:
        return
    source = f'{path} (its args)'
    ckpt.model_kwargs, ckpt.origins = _args_to_kwargs(args, source, overridden)
    ckpt.from_pretrained = get('pretrained') is True
    data = {k: get(k) for k in _ARGS_DATA}
    side = data['input_size']
    if isinstance(side, int) and not isinstance(side, bool):  # DeiT / ConvNeXt: --input-size 224
        data['input_size'] = None
        data['img_size'] = data['img_size'] if data['img_size'] is not None else side
    ckpt.data_config = sanitize_file_data_config(data, source)
    if isinstance(side, int) and not isinstance(side, bool) and ckpt.data_config.get('img_size') == side:
        ckpt.img_size = side


def read_checkpoint(path: Union[str, Path], overridden: Iterable[str] = ()) -> Checkpoint:
    """Read a checkpoint file safely; raises FileNotFoundError or CheckpointError with what is wrong.

    Every layout timm's load_checkpoint reads: the weights under 'state_dict' or 'model' (in that order) or the
    file a state_dict itself (torch or safetensors), the EMA weights under 'state_dict_ema' or 'model_ema', and in
    each of them the training script's `args` (see `_read_args`). The create_model kwargs and data config of the
    args pass the allow-list, range checks and bounds of `timm_sila.io.trust` (UnsafeFileError otherwise); kwargs
    named in `overridden` -- those the caller sets itself -- are not read from the file.
    """
    path = Path(path)
    raw = _read_raw(path)
    ckpt = Checkpoint(path=path, state_dict={})
    if _is_tensor_dict(raw):
        ckpt.state_dict = clean_state_dict(raw)
        return ckpt
    if not isinstance(raw, dict):
        raise CheckpointError(f'{path} holds no state_dict (found a {type(raw).__name__}); expected a timm train.py '
                              f'checkpoint, a state_dict or a .safetensors file.')
    ckpt.keys = tuple(sorted(map(str, raw)))
    key = next((k for k in _WEIGHT_KEYS if k in raw), None)
    if key is None:
        raise CheckpointError(f'{path} holds no state_dict (found the keys {_names(ckpt.keys, 6)}); expected the '
                              f'weights under {" or ".join(_WEIGHT_KEYS)} as timm\'s load_checkpoint reads them, a '
                              f'state_dict or a .safetensors file.')
    if not _is_tensor_dict(raw[key]):
        raise CheckpointError(f'{path} holds no state_dict: its {key!r} entry is a {type(raw[key]).__name__}, not a '
                              f'mapping of names to tensors.')
    ckpt.state_dict = clean_state_dict(raw[key])
    ckpt.ema_key = next((k for k in _EMA_KEYS if raw.get(k) is not None), None)  # timm: the first one not None
    if ckpt.ema_key is not None and _is_tensor_dict(raw[ckpt.ema_key]):
        ckpt.state_dict_ema = clean_state_dict(raw[ckpt.ema_key])
    _read_args(ckpt, raw, overridden)
    return ckpt


def is_sila_state_dict(state_dict: Dict[str, Any]) -> bool:
    """Whether a state_dict is a SilaNet's: it has base.* (the timm model) and heads.* (auxiliary heads) keys."""
    return any(k.startswith('base.') for k in state_dict) and any(k.startswith('heads.') for k in state_dict)


def _check_sila_keys(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    if not is_sila_state_dict(state_dict):
        raise CheckpointError(
            f'{path} is not a SilaNet checkpoint: its keys ({_names(state_dict, 3)}) are those of a plain model, '
            f'while a SilaNet state_dict has base.* and heads.* keys. Train with a sila_<arch> model; a plain timm '
            f'model needs no stripping.')


def _infer_sets(state_dict: Dict[str, torch.Tensor]) -> int:
    ids = {k.split('.')[1] for k in state_dict if k.startswith('heads.')}
    return 1 + len(ids)


def _infer_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    weight = state_dict.get('heads.1.weight')
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def _names(keys: Iterable[Any], most: int) -> str:
    """The first `most` of a file's keys, then "(+N more)"; a key that is long or holds unprintable characters is
    shown as its cut repr, so a file cannot stretch the message or break it over lines."""
    names = [str(k) for k in keys]
    return listing([n if n.isprintable() and len(n) <= 60 else short(n, 60) for n in names], most)


def _describe(keys: Sequence[str], n: int = 4) -> str:
    return _names(sorted(keys), n)


def _dtype_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return 'bool'
    if t.is_complex():
        return 'complex'
    return 'floating-point' if t.is_floating_point() else 'integer'


def _state_dict_problems(expected: Dict[str, torch.Tensor], state_dict: Dict[str, Any]) -> List[str]:
    """What keeps `state_dict` from loading strictly into a model whose state_dict is `expected` (real or meta
    tensors): entries that are not tensors, missing / unexpected keys, shapes, dtype kinds. Empty when it loads."""
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
    return problems


def load_state_dict_checked(model: nn.Module, state_dict: Dict[str, Any], source: Any, what: str = '',
                            hint: str = '') -> nn.Module:
    """Load `state_dict` (read from file `source`) into `model` strictly; returns the model.

    Missing or unexpected keys, shape mismatches and tensors of another dtype kind than the model's (an integer
    or bool tensor where the model holds floats, or the reverse: never silently cast) raise one CheckpointError
    naming the file, the model (`what`) and `hint` (what to do). Floating-point precision may differ (fp16 weights
    load into an fp32 model).
    """
    problems = _state_dict_problems(model.state_dict(), state_dict)
    if problems:
        target = f' {what}' if what else ' the model'
        raise CheckpointError(f'The state_dict in {source} does not match{target}: {"; ".join(problems)}.'
                              + (f' {hint}' if hint else ''))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'Cannot load the weights in {source}: {first_line(e)}') from e
    return model


# --- building a model from what a file says, checked against the weights it carries --------------------------
_DEPTH_KWARGS = ('depth', 'depths', 'layers')


def _cfg_names(model: nn.Module, field_name: str) -> List[str]:
    value = (getattr(model, 'pretrained_cfg', None) or {}).get(field_name)
    return [value] if isinstance(value, str) else [v for v in value or () if isinstance(v, str)]


def _indexed_counts(keys: Iterable[str]) -> Dict[str, int]:
    """{'base.blocks': 12, 'heads': 2, ...}: how many numbered children each container of a state_dict has."""
    found: Dict[str, set] = defaultdict(set)
    for key in keys:
        parts = key.split('.')
        for i in range(1, len(parts) - 1):
            if parts[i].isdigit():
                found['.'.join(parts[:i])].add(parts[i])
    return {prefix: len(ids) for prefix, ids in found.items()}


def _explain_mismatch(skeleton: nn.Module, state_dict: Dict[str, Any], kwargs: Dict[str, Any],
                      origins: Dict[str, str]) -> Optional[str]:
    """'args.num_classes = 200000 but the classifier weights (fc.weight) hold 10 classes': the argument in `kwargs`
    behind a disagreement between a model (built on the meta device) and a file's tensors, or None when the
    disagreement is not one of an argument that was set (num_classes, in_chans, depth / depths / layers,
    sila_sets)."""
    expected = skeleton.state_dict()

    def said(key: str) -> str:
        return f'{origins.get(key, key)} = {short(kwargs[key])}'

    def shapes(key: str) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
        held = state_dict.get(key)
        if key in expected and isinstance(held, torch.Tensor) and held.shape != expected[key].shape:
            return tuple(held.shape), tuple(expected[key].shape)
        return None

    if 'num_classes' in kwargs:
        classifiers = [f'{c}.weight' for c in _cfg_names(skeleton, 'classifier')]
        classifiers += sorted(k for k in expected if re.fullmatch(r'heads\.\d+\.weight', k))
        for key in classifiers:
            pair = shapes(key)
            if pair and pair[0][:1] != pair[1][:1] and pair[1][:1] == (kwargs['num_classes'],):
                return f'{said("num_classes")} but the classifier weights ({key}) hold {pair[0][0]} classes'
    if 'in_chans' in kwargs:
        for key in (f'{c}.weight' for c in _cfg_names(skeleton, 'first_conv')):
            pair = shapes(key)
            if pair and len(pair[0]) > 1 and len(pair[1]) > 1 and pair[0][1] != pair[1][1]:
                return f'{said("in_chans")} but the first layer\'s weights ({key}) take {pair[0][1]} input channels'
    built, held = _indexed_counts(expected), _indexed_counts(state_dict)
    depths = [said(k) for k in _DEPTH_KWARGS if k in kwargs]
    for prefix in sorted(set(built) & set(held), key=lambda p: (p.count('.'), p)):
        if built[prefix] == held[prefix]:
            continue
        if prefix == 'heads' and 'sila_sets' in kwargs:
            return (f'{said("sila_sets")} but the weights hold {held[prefix]} auxiliary heads (heads.*), i.e. '
                    f'sila_sets = {held[prefix] + 1}')
        if prefix != 'heads' and depths:
            return (f'{" and ".join(depths)} but the weights hold {held[prefix]} numbered {prefix}.* entries where '
                    f'the model has {built[prefix]}')
    return None


def build_checked(name: str, kwargs: Dict[str, Any], state_dict: Dict[str, Any], source: Any, *,
                  img_size: Optional[int] = None, origins: Optional[Dict[str, str]] = None, what: str = '',
                  hint: str = '') -> nn.Module:
    """`timm.create_model(name, **kwargs)` carrying `state_dict`, where the kwargs and the weights were read from
    file `source` (or given), built for real only once they are known to agree:

    1. the model is built on the meta device (no memory, no initialisation) and its keys, shapes and dtype kinds
       compared with the file's tensors: a disagreement raises one CheckpointError within milliseconds, naming the
       argument behind it where it can (`origins` maps a kwarg to where it was set, e.g. 'args.num_classes');
    2. where timm cannot build the model on the meta device (its construction computes on tensors) it is built
       for real, but only when every kwarg is within `timm_sila.io.trust.FILE_LIMITS`;
    3. the real model is built and `state_dict` loaded strictly (`load_state_dict_checked`).
    Any exception timm raises while building (KeyError for an unknown layer name, AssertionError for an output
    stride it does not support, ...) becomes one CheckpointError naming the file and the arguments. `img_size`:
    as `create_with_img_size` takes it (a kwargs img_size wins). Returns the model as timm creates it (train mode).
    """
    origins = origins or {}
    shown = {k: v for k, v in kwargs.items() if k not in ('sila_branch', 'sila_stripped')}
    try:
        with torch.device('meta'):
            skeleton = create_with_img_size(name, img_size, **kwargs)
    except Exception:  # noqa: BLE001 -- the real build below says what is wrong, or it was the meta device
        skeleton = None
    if skeleton is None:
        for key, value in kwargs.items():
            problem = bound_violation(key, value)
            if problem is not None:
                raise CheckpointError(f'Cannot check the weights of {source} before building {name}: it cannot be '
                                      f'built on the meta device, and {origins.get(key, key)}={short(value)}: '
                                      f'{problem}.')
    else:
        problems = _state_dict_problems(skeleton.state_dict(), state_dict)
        if problems:
            reason = _explain_mismatch(skeleton, state_dict, kwargs, origins)
            target = what or f'{name}({shown})'
            detail = (f'{reason}' if reason else
                      f'the state_dict does not match {target}: {"; ".join(problems)}')
            raise CheckpointError(f'{source}: {detail}, so the model was not built.' + (f' {hint}' if hint else ''))
        del skeleton
    try:
        model = create_with_img_size(name, img_size, **kwargs)
    except Exception as e:  # noqa: BLE001 -- whatever timm raises on values read from a file is one line
        given = ', '.join(f'{origins.get(k, k)}={short(v)}' for k, v in shown.items())
        raise CheckpointError(f'Cannot build {name} with the arguments of {source} ({given}): '
                              f'{type(e).__name__}: {first_line(e)}') from e
    return load_state_dict_checked(model, state_dict, source, what=what or f'{name}({shown})', hint=hint)


def overridden_kwargs(model_kwargs: Dict[str, Any], **explicit: Any) -> List[str]:
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

    The model comes from the arguments given, else from the checkpoint's train.py args (allow-listed and bounded:
    see `timm_sila.io.trust`; an argument given here replaces the file's, which is then not read); num_classes and
    sets default to what the heads in the state_dict show. `ema=True` loads the EMA weights ('state_dict_ema' or
    'model_ema'). `img_size` replaces an img_size in the file's model_kwargs. The arguments are checked against
    the weights before the model is built (`build_checked`).
    """
    if isinstance(source, Checkpoint):
        ckpt = source
    else:
        ckpt = read_checkpoint(source, overridden_kwargs(model_kwargs, num_classes=num_classes, sila_sets=sets,
                                                   sila_taps=taps, sila_head=head, img_size=img_size))
    state_dict = ckpt.weights(ema)
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
    origins = dict(ckpt.origins)
    if ckpt.from_pretrained:  # the module timm built for its pretrained weights (fbnetc_100: BN eps 1e-3)
        for key, value in pretrained_form_args(base_arch(name), dict(kwargs, **model_kwargs)).items():
            kwargs.setdefault(key, value)
    if img_size is not None:
        kwargs.pop('img_size', None)  # the explicit size wins over the file's model_kwargs
    elif 'img_size' not in kwargs:
        img_size = ckpt.img_size
    given = dict(model_kwargs, **sila_kwargs(sets=sets, taps=taps, head=head))
    if num_classes is not None:
        given['num_classes'] = num_classes
    kwargs.update(given)
    origins.update({k: f'{k} (given)' for k in given})
    inferred = _infer_num_classes(state_dict)
    if 'num_classes' not in kwargs and inferred is not None:
        kwargs['num_classes'] = inferred
        origins['num_classes'] = 'num_classes (read from heads.1.weight)'
    kwargs.setdefault('sila_sets', _infer_sets(state_dict))
    origins.setdefault('sila_sets', 'sila_sets (read from the heads.* keys)')
    kwargs.update(sila_branch=0, sila_stripped=False)
    net = build_checked(name, kwargs, state_dict, ckpt.path, img_size=img_size, origins=origins,
                        hint='Pass the model, num_classes, sets, taps and head it was trained with.')
    return net.eval()

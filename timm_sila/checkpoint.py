"""Safe reading of SilaNet checkpoints: timm train.py `*.pth.tar`, plain state_dicts and `.safetensors`.

Files are read with `torch.load(..., weights_only=True)` (allow-listing only `argparse.Namespace`, which timm's
train.py stores as `args`) or with safetensors; arbitrary pickles are refused.
"""
import argparse
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

import timm

from .model import SilaNet

__all__ = ['CheckpointError', 'Checkpoint', 'read_checkpoint', 'load_silanet', 'create_with_img_size']

_SILA_PREFIX = 'sila_'
_DATA_KEYS = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, is not a SilaNet's, or does not match the named model."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds: weights, optional EMA weights, and what it says about its model."""
    path: Path
    state_dict: Dict[str, torch.Tensor]
    state_dict_ema: Optional[Dict[str, torch.Tensor]] = None
    model_name: Optional[str] = None  # e.g. 'sila_resnet18', from train.py's args.model / arch
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # create_model kwargs recorded by train.py
    data_config: Dict[str, Any] = field(default_factory=dict)  # input_size / mean / std ... from train.py args


def create_with_img_size(name: str, img_size: Optional[int] = None, **kwargs) -> nn.Module:
    """timm.create_model, passing img_size only to architectures that take it (ViT-like); CNNs ignore it."""
    if img_size is None:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as e:
        if 'img_size' not in str(e):
            raise
        return timm.create_model(name, **kwargs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """DDP / DataParallel checkpoints prefix every key with 'module.'."""
    if state_dict and all(k.startswith('module.') for k in state_dict):
        return {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def _read_raw(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    if path.is_dir():
        raise IsADirectoryError(f'Checkpoint {path} is a folder; pass the checkpoint file inside it.')
    with path.open('rb') as f:
        magic = f.read(8)
    if not magic:
        raise CheckpointError(f'Checkpoint {path} is empty (0 bytes).')
    torch_format = magic.startswith(b'PK\x03\x04') or magic[:1] == b'\x80'  # torch zip / legacy pickle
    if not torch_format:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f'Cannot read {path}: it is neither a torch checkpoint nor a valid safetensors file '
                f'(truncated or corrupt?): {_first_line(e)}') from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'Refusing to load {path}: it contains Python objects other than tensors, containers and '
            f'argparse.Namespace, and is read with weights_only=True for safety ({_first_line(e)}). '
            f'Re-save just its state_dict.') from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f'Cannot read {path}: the file is truncated or corrupt ({_first_line(e)}).') from e


def _args_to_kwargs(args: Any) -> Dict[str, Any]:
    """The create_model kwargs timm train.py derives from its args (those that change the weights or outputs)."""
    get = (lambda k: args.get(k)) if isinstance(args, dict) else (lambda k: getattr(args, k, None))
    kwargs = {}
    for src, dst in (('num_classes', 'num_classes'), ('in_chans', 'in_chans'), ('gp', 'global_pool'),
                     ('bn_momentum', 'bn_momentum'), ('bn_eps', 'bn_eps')):
        if get(src) is not None:
            kwargs[dst] = get(src)
    extra = get('model_kwargs')
    if isinstance(extra, dict):
        kwargs.update(extra)
    return kwargs


def read_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """Read a checkpoint file safely; raises FileNotFoundError or CheckpointError with what is wrong."""
    path = Path(path)
    raw = _read_raw(path)
    ckpt = Checkpoint(path=path, state_dict={})
    if _is_tensor_dict(raw):
        ckpt.state_dict = raw
    elif isinstance(raw, dict) and _is_tensor_dict(raw.get('state_dict')):
        ckpt.state_dict = raw['state_dict']
        if _is_tensor_dict(raw.get('state_dict_ema')):
            ckpt.state_dict_ema = _strip_module_prefix(raw['state_dict_ema'])
        args = raw.get('args')
        name = getattr(args, 'model', None) if args is not None else None
        arch = raw.get('arch')
        ckpt.model_name = name if isinstance(name, str) else (arch if isinstance(arch, str) else None)
        if args is not None:
            ckpt.model_kwargs = _args_to_kwargs(args)
            get = (lambda k: args.get(k)) if isinstance(args, dict) else (lambda k: getattr(args, k, None))
            ckpt.data_config = {k: get(k) for k in _DATA_KEYS if get(k) is not None}
    elif isinstance(raw, dict) and _is_tensor_dict(raw.get('model')):
        ckpt.state_dict = raw['model']
    else:
        keys = sorted(map(str, raw))[:6] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f'{path} holds no state_dict (found {keys}); expected a timm train.py checkpoint, '
                              f'a state_dict or a .safetensors file.')
    ckpt.state_dict = _strip_module_prefix(ckpt.state_dict)
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

    The model comes from the arguments given, else from the checkpoint's train.py args; num_classes and sets
    default to what the heads in the state_dict show. `ema=True` loads `state_dict_ema`.
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    if ema:
        if ckpt.state_dict_ema is None:
            raise CheckpointError(f'EMA weights were asked for, but {ckpt.path} has no state_dict_ema '
                                  f'(timm train.py saves them only when trained with --model-ema).')
        state_dict = ckpt.state_dict_ema
    else:
        state_dict = ckpt.state_dict
    _check_sila_keys(state_dict, ckpt.path)

    name = model or ckpt.model_name
    if name is not None and not name.startswith(_SILA_PREFIX):
        if model is None:  # e.g. train.py arch 'silanet' when saved without args
            name = None
        else:
            name = _SILA_PREFIX + name
    if name is None:
        raise CheckpointError(f'{ckpt.path} does not say which SilaNet it holds; pass the model name '
                              f'(model="sila_resnet18", CLI --model sila_resnet18) and its num_classes/sets/taps.')
    name = name.split('.', 1)[0]  # drop a pretrained tag: the weights come from the checkpoint
    if not timm.is_model(name):
        raise CheckpointError(f'Unknown model {name!r}; see timm.list_models("sila_*").')

    kwargs = dict(ckpt.model_kwargs)
    kwargs.update(model_kwargs)
    for key, value in (('num_classes', num_classes), ('sila_sets', sets), ('sila_taps', taps),
                       ('sila_head', head)):
        if value is not None:
            kwargs[key] = list(value) if key == 'sila_taps' else value
    kwargs.setdefault('num_classes', _infer_num_classes(state_dict))
    kwargs.setdefault('sila_sets', _infer_sets(state_dict))
    kwargs.update(sila_branch=0, sila_stripped=False)
    try:
        net = create_with_img_size(name, None if 'img_size' in kwargs else img_size, **kwargs)
    except TypeError as e:
        raise CheckpointError(f'Cannot build {name} with {kwargs}: {_first_line(e)}') from e

    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems: List[str] = []
        if missing:
            problems.append(f'{len(missing)} missing keys ({_describe(missing)})')
        if unexpected:
            problems.append(f'{len(unexpected)} unexpected keys ({_describe(unexpected)})')
        if shapes:
            problems.append(f'{len(shapes)} shape mismatches (checkpoint vs model: {_describe(shapes, 2)})')
        shown = {k: v for k, v in kwargs.items() if k not in ('sila_branch', 'sila_stripped')}
        raise CheckpointError(
            f'The state_dict in {ckpt.path} does not match {name}({shown}): {"; ".join(problems)}. Pass the '
            f'model, num_classes, sets, taps and head it was trained with.')
    net.load_state_dict(state_dict, strict=True)
    return net.eval()

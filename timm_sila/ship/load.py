"""Opening what a user names: a SilaNet checkpoint, a folder written by `strip`, a plain timm checkpoint, or a model.

Every file is read through the checked readers (`timm_sila.io.checkpoint`: allow-listed arguments, checked against
the weights before the model is built, loaded strictly; `load_stripped` for folders). Each function returns the
model with the data-config args its file records (range-checked; see `timm_sila.data.config`).
"""
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch.nn as nn

from timm_sila.config import is_sila_name
from timm_sila.io.checkpoint import build_checked, is_sila_state_dict, load_silanet, overridden_kwargs, read_checkpoint
from timm_sila.model import SilaNet
from .strip import CONFIG_NAME, branch_model, load_stripped

__all__ = ['LOCAL_DIR', 'load_silanet_and_data_args', 'load_branch', 'load_model']

LOCAL_DIR = 'local-dir:'  # the model-name prefix of a folder written by strip, as timm spells it


def load_silanet_and_data_args(path: Union[str, Path], img_size: Optional[int] = None, **load_kwargs
                               ) -> Tuple[SilaNet, Dict[str, Any]]:
    """(the full SilaNet of checkpoint `path` in eval mode, the data-config args its file records).

    `load_kwargs` as `load_silanet` takes them (model=, num_classes=, sets=, taps=, head=, ema=, model kwargs);
    an argument given replaces the file's, which is then not read."""
    kwargs = dict(load_kwargs)
    ema = bool(kwargs.pop('ema', False))
    names = {k: kwargs.pop(k) for k in ('model', 'num_classes', 'sets', 'taps', 'head') if k in kwargs}
    ckpt = read_checkpoint(path, overridden_kwargs(kwargs, num_classes=names.get('num_classes'),
                                                   sila_sets=names.get('sets'), sila_taps=names.get('taps'),
                                                   sila_head=names.get('head'), img_size=img_size))
    return load_silanet(ckpt, ema=ema, img_size=img_size, **names, **kwargs), dict(ckpt.data_config)


def _held_branch(model: nn.Module, branch: Optional[int], what: str) -> int:
    """The one branch `model` holds, refusing another `branch`."""
    have = model.branch if isinstance(model, SilaNet) else 0
    if branch is not None and branch != have:
        raise ValueError(f'{what} holds branch {have} only; pass branch={have} (or none), or start from the full '
                         f'SilaNet checkpoint to get branch {branch}.')
    return have


def load_branch(source: Union[str, Path, nn.Module], branch: Optional[int] = None, img_size: Optional[int] = None,
                **load_kwargs) -> Tuple[nn.Module, int, Dict[str, Any]]:
    """(eval-mode model of one branch, its branch index, data-config args) for a strip folder, a SilaNet
    checkpoint file, a SilaNet or any other nn.Module (branch 0).

    Folder: `load_stripped(dir, **load_kwargs)`, its one branch. Checkpoint: `load_silanet_and_data_args`, then
    `branch_model(net, branch)`; `branch` is required. The data-config args are the file's, range-checked.
    """
    if isinstance(source, nn.Module):
        if load_kwargs:
            raise ValueError(f'{sorted(load_kwargs)} only apply when source is a file or folder.')
        if isinstance(source, SilaNet) and not source.stripped:
            if branch is None:
                raise ValueError(f'Pass the branch: an integer in [0, {source.sets - 1}] (0 = the base model).')
            return branch_model(source, branch), branch, {}
        return source.eval(), _held_branch(source, branch, f'This {type(source).__name__}'), {}
    if not isinstance(source, (str, Path)):
        raise ValueError(f'source must be a strip output folder, a SilaNet checkpoint file or an nn.Module, got '
                         f'{type(source).__name__}.')
    path = Path(source)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f'{path} has no {CONFIG_NAME}: pass a folder written by `timm-sila strip` or a '
                                    f'checkpoint file.')
        model = load_stripped(path, **load_kwargs)
        return model, _held_branch(model, branch, f'The folder {path}'), {}
    if not path.exists():
        raise FileNotFoundError(f'{path} does not exist: pass a strip output folder or a SilaNet checkpoint file.')
    net, data_args = load_silanet_and_data_args(path, img_size, **load_kwargs)
    if branch is None:
        raise ValueError(f'{path} holds every branch of a SilaNet; pass the branch, an integer in '
                         f'[0, {net.sets - 1}] (0 = the base model).')
    return branch_model(net, branch), branch, data_args


def load_model(name: str, checkpoint: Union[str, Path, None] = None, num_classes: Optional[int] = None,
               ema: bool = False, img_size: Optional[int] = None, given_as: Optional[Dict[str, str]] = None
               ) -> Tuple[nn.Module, Dict[str, Any]]:
    """(eval-mode model, the data-config args its file records) for a model name and its weights.

    `name`: 'local-dir:DIR' (a folder written by strip, which holds its own weights and config), a sila_<arch>
    name (the full SilaNet of `checkpoint`), or a plain timm architecture (its `checkpoint`). A checkpoint whose
    state_dict is a SilaNet's is read as one whatever the name. Every file is checked against its weights before
    the model is built and loaded strictly (integer tensors are refused, never cast). `num_classes` / `img_size`
    replace the file's, which is then not read; `ema` reads the EMA weights. `given_as` names the arguments in error
    messages the way the caller spells them (default {'checkpoint': 'checkpoint', 'num_classes': 'num_classes',
    'ema': 'ema'}; a command line passes its flags)."""
    names = dict(dict(checkpoint='checkpoint', num_classes='num_classes', ema='ema'), **(given_as or {}))
    if name.startswith(LOCAL_DIR):
        for key, value in (('checkpoint', checkpoint), ('ema', ema), ('num_classes', num_classes)):
            if value:
                raise ValueError(f'{names[key]} does not apply to {name}: the folder holds its own weights, and its '
                                 f'config.json says what they are.')
        return load_stripped(name[len(LOCAL_DIR):]), {}
    if checkpoint is None:
        raise ValueError(f'{name} needs {names["checkpoint"]} CKPT, the file of its weights (or name a folder written '
                         f'by strip as {LOCAL_DIR}DIR).')
    ckpt = read_checkpoint(checkpoint, overridden_kwargs({}, num_classes=num_classes, img_size=img_size))
    if is_sila_name(name) or is_sila_state_dict(ckpt.state_dict):
        return load_silanet(ckpt, model=name, num_classes=num_classes, ema=ema, img_size=img_size), ckpt.data_config
    kwargs, origins = dict(ckpt.model_kwargs), dict(ckpt.origins)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
        origins['num_classes'] = names['num_classes'] if given_as else 'num_classes (given)'
    if img_size is None and 'img_size' not in kwargs:
        img_size = ckpt.img_size
    model = build_checked(name.split('.', 1)[0], kwargs, ckpt.weights(ema), checkpoint, img_size=img_size,
                          origins=origins, hint='Pass the right model name and num_classes.')
    return model.eval(), ckpt.data_config

"""Shipping (paper Sec 2.2-2.3, Table 3): keep one output set of a trained SilaNet, saved in timm's hub format.

Branch 0 is written as the plain base architecture (loads in timm without timm_sila); branch k >= 1 as a stripped
`sila_<arch>` (backbone up to tap k + head k) that loads after `import timm_sila`. Both are the files
`timm.models.save_for_hf` writes: `model.safetensors` + `config.json`.
"""
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch.nn as nn

import timm
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from .checkpoint import Checkpoint, create_with_img_size, load_silanet, read_checkpoint
from .model import SilaNet, prune_base

__all__ = ['strip', 'load_stripped', 'export_model', 'model_info', 'create_with_img_size']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
_TMP_PREFIX = '.timm-sila-tmp-'
MB = 2 ** 20  # bytes; "Params size (MB)" as in torchsummary and the paper's Table 3


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _base_args(net: SilaNet) -> Dict[str, Any]:
    """The create_model kwargs of the base, as timm recorded them; num_classes always the current one."""
    args = dict(getattr(net.base, '_model_args', None) or {})
    args['num_classes'] = net.num_classes
    return args


def _check_branch(net: SilaNet, branch: Any) -> int:
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < net.sets:
        raise ValueError(f'branch {branch!r} is out of range: this SilaNet has sets={net.sets}, so branch must be '
                         f'an integer in [0, {net.sets - 1}] (0 = the base model, k >= 1 = head k on tap k).')
    if net.stripped and branch != net.branch:
        raise ValueError(f'This SilaNet was already stripped to branch {net.branch}; it has no branch {branch}.')
    return branch


def export_model(net: SilaNet, branch: int = 0) -> nn.Module:
    """The stand-alone eval-mode timm model of one branch, carrying the SilaNet's weights.

    Branch 0: a vanilla `timm.create_model(net.arch, ...)`; branch k >= 1: `sila_<arch>` with
    sila_branch=k, sila_stripped=True (no layer after tap k, no other head).
    """
    branch = _check_branch(net, branch)
    base_args = _base_args(net)
    if branch == 0:
        model = timm.create_model(net.arch, **base_args)
        model.load_state_dict(net.base.state_dict(), strict=True)
        return model.eval()
    if not callable(getattr(net.base, 'prune_intermediate_layers', None)):
        raise ValueError(f'{net.arch} has no prune_intermediate_layers(), so branch {branch} cannot be stripped '
                         f'to a smaller model; strip(..., branch=0) still exports the base model.')
    sila = dict(net.sila_args(), sila_branch=branch, sila_stripped=True)
    model = timm.create_model(f'sila_{net.arch}', **base_args, **sila)
    # Prune a copy of the trained base the way the stripped model was pruned: some models' pruning reshapes
    # parameters (EfficientViM slices its per-stage `weights`), so the full model's tensors would not fit.
    pruned = copy.deepcopy(net.base)
    prune_base(pruned, net.tap_indices[branch - 1])
    source = {f'base.{k}': v for k, v in pruned.state_dict().items()}
    source.update({f'heads.{branch}.{k}': v for k, v in net.heads[str(branch)].state_dict().items()})
    wanted = model.state_dict()
    absent = [k for k in wanted if k not in source]
    if absent:
        raise ValueError(f'The SilaNet lacks {len(absent)} tensors of its stripped branch {branch} '
                         f'(e.g. {absent[:3]}); was it built with other taps or head?')
    model.load_state_dict({k: source[k] for k in wanted}, strict=True)
    return model.eval()


def _is_empty_dir(path: Path) -> bool:
    return not any(p for p in path.iterdir() if not p.name.startswith(_TMP_PREFIX))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise NotADirectoryError(f'Output {out_dir} exists and is not a folder.')
        if not overwrite and not _is_empty_dir(out_dir):
            raise FileExistsError(f'Output folder {out_dir} exists and is not empty; pass overwrite=True '
                                  f'(CLI --force) to replace its {WEIGHTS_NAME} and {CONFIG_NAME}.')


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unshared(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The state_dict with each tensor whose storage an earlier one uses cloned (safetensors needs no sharing)."""
    seen, out = set(), {}
    for key, value in state_dict.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.detach().clone() if ptr in seen else value.detach().contiguous()
        seen.add(ptr)
    return out


def write_atomic(model: nn.Module, out_dir: Path, model_args: Dict[str, Any],
                 data_config: Optional[Dict[str, Any]] = None) -> None:
    """What save_for_hf writes (safetensors weights, save_config_for_hf's config.json), into a temp folder
    inside out_dir, then renamed into place.

    config.json is the commit marker: an old one is removed before the weights are replaced and the new one is
    renamed in last, so a failure or kill at any point never leaves a config.json beside foreign or partial
    weights, nor a partial model.safetensors.
    """
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(_TMP_PREFIX + '*'):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out_dir))
    try:
        # save_for_hf's weights step, with tensors that share storage copied apart: safetensors refuses shared
        # storage (CoaT shares its conv position encoders), timm loads every key back strictly.
        save_file(_unshared(model.state_dict()), str(tmp / WEIGHTS_NAME))
        save_config_for_hf(model, tmp / CONFIG_NAME, model_args=model_args, data_config=data_config or None)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            if not (tmp / name).is_file():
                raise RuntimeError(f'timm save_for_hf did not write {name}.')
            _fsync(tmp / name)
        # safetensors creates its file 0600; give it the umask-default mode open() gave config.json
        os.chmod(tmp / WEIGHTS_NAME, (tmp / CONFIG_NAME).stat().st_mode & 0o777)
        (out_dir / CONFIG_NAME).unlink(missing_ok=True)
        os.replace(tmp / WEIGHTS_NAME, out_dir / WEIGHTS_NAME)
        os.replace(tmp / CONFIG_NAME, out_dir / CONFIG_NAME)
        _fsync(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _data_config(net: SilaNet, data_config: Dict[str, Any], img_size: Optional[int]) -> Dict[str, Any]:
    cfg = dict(data_config)
    if img_size is not None:
        cfg.pop('input_size', None)
        cfg['img_size'] = int(img_size)
    if 'img_size' in cfg and 'input_size' not in cfg:
        chans = net.pretrained_cfg.get('input_size', (3,))[0]
        chans = cfg.pop('in_chans', None) or _base_args(net).get('in_chans', chans)
        size = cfg.pop('img_size')
        cfg['input_size'] = (chans, size, size) if isinstance(size, int) else (chans, *size)
    return cfg


def strip(
        source: Union[SilaNet, str, Path],
        branch: int = 0,
        out_dir: Union[str, Path, None] = None,
        ema: bool = False,
        overwrite: bool = False,
        *,
        model: Optional[str] = None,
        num_classes: Optional[int] = None,
        sets: Optional[int] = None,
        taps: Optional[Sequence[Union[int, str]]] = None,
        head: Optional[str] = None,
        img_size: Optional[int] = None,
        **model_kwargs,
) -> Path:
    """Write branch `branch` of a SilaNet (instance or checkpoint file) to `out_dir`; returns out_dir.

    Output: `model.safetensors` + `config.json` as `timm.models.save_for_hf` writes them. Branch 0 loads with
    plain timm (`timm.create_model('local-dir:<out_dir>', pretrained=True)`), branch k >= 1 after
    `import timm_sila` (or with `load_stripped`). For files that do not record their model, pass
    `model`/`num_classes`/`sets`/`taps`/`head`/model kwargs; `img_size` sets the config's input size (and is a
    model kwarg for architectures that take one). `ema=True` exports the checkpoint's EMA weights.
    """
    if out_dir is None:
        raise ValueError('strip() needs out_dir, the folder to write model.safetensors and config.json into.')
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    data_config: Dict[str, Any] = {}
    if isinstance(source, SilaNet):
        if ema or model or num_classes or sets or taps or head or model_kwargs:
            raise ValueError('ema/model/num_classes/sets/taps/head only apply when source is a checkpoint file; '
                             'pass the (EMA) SilaNet itself.')
        net = source
    elif isinstance(source, nn.Module):
        raise ValueError(f'source must be a SilaNet or a checkpoint path, got a {type(source).__name__}; a plain '
                         f'timm model needs no stripping (use timm.models.save_for_hf).')
    elif isinstance(source, (str, Path, Checkpoint)):
        ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
        net = load_silanet(ckpt, model=model, num_classes=num_classes, sets=sets, taps=taps, head=head, ema=ema,
                           img_size=img_size, **model_kwargs)
        data_config = ckpt.data_config
    else:
        raise ValueError(f'source must be a SilaNet or a checkpoint path, got {type(source).__name__}.')
    exported = export_model(net, branch)
    model_args = dict(getattr(exported, '_model_args', None) or {})
    model_args['num_classes'] = net.num_classes
    write_atomic(exported, out_dir, model_args, _data_config(net, data_config, img_size))
    return out_dir


def load_stripped(out_dir: Union[str, Path]) -> nn.Module:
    """Load a folder written by `strip` (either branch) as a timm model in eval mode."""
    out_dir = Path(out_dir)
    if not (out_dir / CONFIG_NAME).is_file() or not (out_dir / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f'{out_dir} has no {CONFIG_NAME} + {WEIGHTS_NAME}; write it with timm_sila.strip.')
    return timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()


def model_info(model: str, num_classes: int, img_size: Optional[int] = None, sets: Optional[int] = None,
               taps: Optional[Sequence[Union[int, str]]] = None, head: Optional[str] = None,
               **model_kwargs) -> Dict[str, Any]:
    """Table 3 columns for every branch: params, fp32 size in MB (2**20 bytes), CR = 1 - params/params(base).

    Branch k's params are those of the stripped branch-k model; 'train' is the whole SilaNet.
    """
    name = model.split('.', 1)[0]
    name = name if name.startswith('sila_') else f'sila_{name}'
    if not timm.is_model(name):
        raise ValueError(f'Unknown model {model!r}; see timm.list_models().')
    sila = {k: v for k, v in (('sila_sets', sets), ('sila_taps', list(taps) if taps else None),
                              ('sila_head', head)) if v is not None}
    kwargs = dict(model_kwargs, num_classes=num_classes, **sila)
    net = create_with_img_size(name, img_size, **kwargs)
    base_params = count_params(net.base)
    rows: List[Dict[str, Any]] = []
    for k in range(net.sets):
        if k == 0:
            params, exit_at = base_params, 'classifier'
        else:
            stripped = create_with_img_size(
                name, img_size, **dict(kwargs, sila_taps=net.tap_args(), sila_sets=net.sets),
                sila_branch=k, sila_stripped=True)
            params, exit_at = count_params(stripped), net.taps[k - 1]
        rows.append(dict(branch=k, exit=exit_at, params=params, size_mb=params * 4 / MB,
                         cr=1.0 - params / base_params))
    train = count_params(net)
    return dict(model=name, arch=net.arch, num_classes=num_classes, img_size=img_size, sets=net.sets,
                taps=list(net.taps), head=net.head_type, branches=rows,
                train=dict(params=train, size_mb=train * 4 / MB),
                units='size_mb = params * 4 bytes (fp32) / 2**20; cr = 1 - params(branch) / params(branch 0)')

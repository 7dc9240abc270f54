"""Shipping (paper Sec 2.2-2.3, Table 3): keep one output set of a trained SilaNet, saved in timm's hub format.

Branch 0 is written as the plain base architecture (loads in timm without timm_sila); branch k >= 1 as a stripped
`sila_<arch>` (backbone up to tap k + head k) that loads after `import timm_sila`. Both are the files
`timm.models.save_for_hf` writes: `model.safetensors` + `config.json`, the latter holding only what is true of the
exported weights (no pretrained tag, origin URL or hub id of the weights the base model was created from).
Folders are written by `timm_sila.io.atomic` (whole or not at all, one writer at a time, never over an input, with a
manifest of the files written: overwriting replaces only those); `load_stripped` reads a folder as a stranger's
(see `timm_sila.io.trust`).
"""
import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch.nn as nn

import timm
from safetensors.torch import save_file

from timm_sila.config import check_branch, sila_name
from timm_sila.data.config import data_args, model_channels
from timm_sila.io.atomic import atomic_output_dir, check_output_dir
from timm_sila.io.checkpoint import (Checkpoint, overridden_kwargs, build_checked, load_silanet, read_checkpoint,
    read_safetensors)
from timm_sila.io.trust import (CheckpointError, check_file_architecture, read_file_json, sanitize_file_data_config,
    sanitize_file_model_kwargs)
from timm_sila.measure.metrics import read_eval_metrics
from timm_sila.model import SilaNet, prune_base
from timm_sila._timm_compat import model_args, save_config_for_hf
from .card import CARD_NAME, render_model_card

__all__ = ['strip', 'load_stripped', 'branch_model', 'model_card', 'write_model_card', 'class_names_from_config',
           'WEIGHTS_NAME', 'CONFIG_NAME']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
_EXPORT_FILES = f'{WEIGHTS_NAME}, {CONFIG_NAME} and README.md'
# pretrained_cfg fields of an export: how to feed and read the exported weights; no tag / url / hf_hub_id / license
EXPORTED_CFG_KEYS = ('input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'interpolation',
                     'crop_pct', 'test_crop_pct', 'crop_mode', 'mean', 'std', 'num_classes', 'pool_size',
                     'test_pool_size', 'first_conv', 'classifier', 'custom_load')
# data config fields of a config.json that load_stripped puts into the model's pretrained_cfg
_CFG_DATA_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')


def branch_model(net: SilaNet, branch: int = 0) -> nn.Module:
    """The stand-alone eval-mode timm model of one branch, carrying the SilaNet's weights.

    Branch 0: a vanilla `timm.create_model(net.arch, ...)`; branch k >= 1: `sila_<arch>` with
    sila_branch=k, sila_stripped=True (no layer after tap k, no other head).
    """
    branch = check_branch(branch, net.sets, net.branch if net.stripped else None)
    base_args = net.base_args()
    if branch == 0:
        model = timm.create_model(net.arch, **base_args)
        model.load_state_dict(net.base.state_dict(), strict=True)
        return model.eval()
    if not callable(getattr(net.base, 'prune_intermediate_layers', None)):
        raise ValueError(f'{net.arch} has no prune_intermediate_layers(), so branch {branch} cannot be stripped '
                         f'to a smaller model; strip(..., branch=0) still exports the base model.')
    sila = dict(net.sila_args(), sila_branch=branch, sila_stripped=True)
    model = timm.create_model(sila_name(net.arch), **base_args, **sila)
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


def _unshared(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The state_dict with each tensor whose storage an earlier one uses cloned (safetensors needs no sharing)."""
    seen, out = set(), {}
    for key, value in state_dict.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.detach().clone() if ptr in seen else value.detach().contiguous()
        seen.add(ptr)
    return out


def _write_export(model: nn.Module, folder: Path, model_args: Dict[str, Any],
                  data_config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What save_for_hf writes into `folder`, with config.json's pretrained_cfg cut to EXPORTED_CFG_KEYS; returns
    the config written."""
    # save_for_hf's weights step, with tensors that share storage copied apart: safetensors refuses shared
    # storage (CoaT shares its conv position encoders), timm loads every key back strictly.
    save_file(_unshared(model.state_dict()), str(folder / WEIGHTS_NAME))
    save_config_for_hf(model, folder / CONFIG_NAME, model_args=model_args, data_config=data_config or None)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding='utf-8'))
    config['pretrained_cfg'] = {k: v for k, v in config.get('pretrained_cfg', {}).items() if k in EXPORTED_CFG_KEYS}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding='utf-8')
    return config


def _card(model: nn.Module, config: Dict[str, Any], source: Any, name: str, metrics: Optional[Dict[str, Any]],
          **card_kwargs: Any) -> str:
    """The model card of a folder whose config.json is `config` (read from `source`), holding `model`."""
    cfg = config.get('pretrained_cfg')
    data_config = sanitize_file_data_config(cfg if isinstance(cfg, dict) else {}, source)
    return render_model_card(model, data_config, name, metrics, **card_kwargs)


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
        metrics: Union[str, Path, Dict[str, Any], None] = None,
        card: bool = True,
        **model_kwargs,
) -> Path:
    """Write branch `branch` of a SilaNet (instance or checkpoint file) to `out_dir`; returns out_dir.

    Output: `model.safetensors` + `config.json` as `timm.models.save_for_hf` writes them. Branch 0 loads with
    plain timm (`timm.create_model('local-dir:<out_dir>', pretrained=True)`), branch k >= 1 after
    `import timm_sila` (or with `load_stripped`). For files that do not record their model, pass
    `model`/`num_classes`/`sets`/`taps`/`head`/model kwargs; `img_size` sets the config's input size (and is a
    model kwarg for architectures that take one). `ema=True` exports the checkpoint's EMA weights. With `card`,
    a hub model card `README.md` is written too (with the branch's metrics from a `timm-sila eval --json` result).

    `out_dir` must be new or empty; with `overwrite`, the files an earlier strip wrote there (as its manifest lists
    them, unchanged) are replaced, and the ones not written now -- the card, with `card=False` -- removed. A folder
    holding any other file is refused (ForeignFilesError), as is one that is or contains an input (the checkpoint,
    the metrics file), even with overwrite. See `timm_sila.io.atomic`.
    """
    if out_dir is None:
        raise ValueError('strip() needs out_dir, the folder to write model.safetensors and config.json into.')
    out_dir = Path(out_dir)
    sources = [source.path if isinstance(source, Checkpoint) else source] if isinstance(
        source, (str, Path, Checkpoint)) else []
    if isinstance(metrics, (str, Path)):
        sources.append(metrics)
    check_output_dir(out_dir, overwrite, sources, _EXPORT_FILES)  # fail before the (slow) load; again under lock
    checked = read_eval_metrics(metrics) if card and metrics is not None else None
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
        ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source, overridden_kwargs(
            model_kwargs, num_classes=num_classes, sila_sets=sets, sila_taps=taps, sila_head=head, img_size=img_size))
        net = load_silanet(ckpt, model=model, num_classes=num_classes, sets=sets, taps=taps, head=head, ema=ema,
                           img_size=img_size, **model_kwargs)
        data_config = ckpt.data_config
    else:
        raise ValueError(f'source must be a SilaNet or a checkpoint path, got {type(source).__name__}.')
    exported = branch_model(net, branch)
    file_args = model_args(exported)
    file_args['num_classes'] = net.num_classes
    channels = model_channels(net)
    with atomic_output_dir(out_dir, overwrite, sources, _EXPORT_FILES, commit_last=CONFIG_NAME) as folder:
        config = _write_export(exported, folder, file_args, data_args(data_config, img_size, channels))
        if card:
            text = _card(exported, config, folder / CONFIG_NAME, out_dir.name, checked)
            (folder / CARD_NAME).write_text(text, encoding='utf-8')
    return out_dir


def _read_config(path: Path) -> Dict[str, Any]:
    config = read_file_json(path)  # bounded in size and nesting: a stranger's file
    if not isinstance(config, dict):
        raise CheckpointError(f'{path} must hold a JSON object, got {type(config).__name__}.')
    return config


def class_names_from_config(config: Any, num_classes: Optional[int]) -> Optional[List[str]]:
    """The class names a timm hub config (config.json) records -- top-level or pretrained_cfg `label_names`, a list
    or an {index: name} mapping -- when they are one short name per class; else None (not recorded, or not usable:
    timm drops label names whose count differs from num_classes)."""
    if not isinstance(config, dict):
        return None
    cfg = config.get('pretrained_cfg')
    names = config.get('label_names', cfg.get('label_names') if isinstance(cfg, dict) else None)
    if isinstance(names, dict):
        try:
            by_index = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            return None
        names = [by_index.get(i) for i in range(len(by_index))]
    if not isinstance(names, (list, tuple)) or not names or (num_classes is not None and len(names) != num_classes):
        return None
    if not all(isinstance(n, str) and 0 < len(n) <= 256 for n in names):
        return None
    return list(names)


def load_stripped(out_dir: Union[str, Path], **model_kwargs) -> nn.Module:
    """Load a folder written by `strip` (either branch) as a timm model in eval mode.

    The folder is read as a stranger's: config.json's `architecture` must be a registered timm name, its
    `model_args` pass the allow-list of `timm_sila.io.trust` (an argument given here replaces the file's, which is
    then not read), only the data config fields of its `pretrained_cfg` are used (range-checked), and its class
    names (`label_names`, one short name per class) become the model's `pretrained_cfg['label_names']`; the model is
    checked against model.safetensors on the meta device, then built with pretrained=False and the weights loaded
    strictly (`build_checked`). config.json is read within the JSON bounds of `timm_sila.io.trust.FILE_LIMITS`.
    Nothing is fetched or written.
    """
    out_dir = Path(out_dir)
    config_path, weights_path = out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f'{out_dir} has no {CONFIG_NAME} + {WEIGHTS_NAME}; write it with timm_sila.strip.')
    config = _read_config(config_path)
    arch = check_file_architecture(config.get('architecture'), config_path)
    args = sanitize_file_model_kwargs(config.get('model_args'), config_path, overridden=model_kwargs)
    origins = {k: f'model_args.{k}' for k in args}
    if 'num_classes' not in args and config.get('num_classes') is not None:
        args.update(sanitize_file_model_kwargs({'num_classes': config['num_classes']}, config_path, model_kwargs))
        origins.setdefault('num_classes', 'num_classes')
    args.update(model_kwargs)
    origins.update({k: f'{k} (given)' for k in model_kwargs})
    pretrained_cfg = config.get('pretrained_cfg')
    data_config = sanitize_file_data_config(pretrained_cfg if isinstance(pretrained_cfg, dict) else {}, config_path)
    tensors, _ = read_safetensors(weights_path)
    model = build_checked(arch, args, tensors, f'{weights_path} with its {CONFIG_NAME}',
                          origins=origins, what=f'{arch}({args})',
                          hint=f'Is {CONFIG_NAME} the one written with these weights?')
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != 'label_names'}  # timm's, for another head
    cfg.update({k: v for k, v in data_config.items() if k in _CFG_DATA_KEYS})
    names = class_names_from_config(config, getattr(model, 'num_classes', None))
    if names is not None:
        cfg['label_names'] = names
    model.pretrained_cfg = model.default_cfg = cfg
    return model.eval()


def model_card(folder: Union[str, Path], metrics: Union[str, Path, Dict[str, Any], None] = None, *,
               model: Optional[nn.Module] = None, repo_id: Optional[str] = None, dataset: Optional[str] = None,
               name: Optional[str] = None) -> str:
    """The README.md text of a strip output folder (config.json + model.safetensors), read as a stranger's folder.

    `model`: the folder's model if already loaded (else `load_stripped(folder)`). `metrics`: a `timm-sila eval
    --json` result (file or dict) holding this branch, range-checked (`read_eval_metrics`). `repo_id`, `dataset`:
    as `render_model_card` takes them. `name`: the folder name in the card's `local-dir:` line (default: its own).
    Input size and normalisation are those of the folder's config.json (range-checked)."""
    folder = Path(folder)
    checked = read_eval_metrics(metrics) if metrics is not None else None
    if model is None:
        model = load_stripped(folder)
    config_path = folder / CONFIG_NAME
    return _card(model, _read_config(config_path), config_path, name or folder.name, checked, repo_id=repo_id,
                 dataset=dataset)


def write_model_card(folder: Union[str, Path], metrics: Union[str, Path, Dict[str, Any], None] = None, *,
                     overwrite: bool = False, **kwargs) -> Path:
    """Write `model_card(folder, metrics, **kwargs)` to folder/README.md atomically; returns its path.

    An existing README.md is replaced only with `overwrite`, and only when timm-sila wrote it (the folder's
    manifest lists it, unchanged): else OutputExistsError / ForeignFilesError (see `timm_sila.io.atomic`); the
    folder's other files are kept, the manifest records the new card.
    """
    folder = Path(folder)
    sources = [metrics] if isinstance(metrics, (str, Path)) else []
    check_output_dir(folder, overwrite, sources, names=[CARD_NAME])  # before reading the model
    text = model_card(folder, metrics, **kwargs)
    with atomic_output_dir(folder, overwrite, sources, names=[CARD_NAME], commit_last=CARD_NAME) as tmp:
        (tmp / CARD_NAME).write_text(text, encoding='utf-8')
    return folder / CARD_NAME

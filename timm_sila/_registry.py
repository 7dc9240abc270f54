"""`sila_<arch>` names in timm's registry, with the base architecture's pretrained tags."""
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import timm
from timm.models import DefaultCfg, generate_default_cfgs, load_pretrained, register_model

from timm_sila.config import SILA_PREFIX, SilaConfig
from timm_sila.io.checkpoint import load_state_dict_checked, read_checkpoint
from timm_sila.io.trust import sanitize_file_data_config, sanitize_file_model_kwargs
from timm_sila.model import SilaNet, sila_pretrained_cfg
from timm_sila._timm_compat import LOCAL_DIR_WEIGHT_EXTS, LOCAL_DIR_WEIGHT_FILES, arch_pretrained_cfgs

__all__ = ['register_sila_models']

# pretrained_cfg fields of a hub / local-dir config.json that reach load_pretrained: where the weights are, which
# timm sets from the model name the caller typed, never a url or path from the file
_SOURCE_CFG_KEYS = {'local-dir': ('source', 'file'), 'hf-hub': ('source', 'hf_hub_id')}

default_cfgs: Dict[str, Any] = {}  # read by timm's register_model for this module's entrypoints


def _is_sila_checkpoint(pretrained_cfg) -> bool:
    """Whether the cfg comes from a hub / local-dir config.json of a sila_* model (whose weights are SilaNet
    state_dicts, not base ones)."""
    if pretrained_cfg is None or isinstance(pretrained_cfg, str):
        return False
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()
    return cfg.get('source') in ('local-dir', 'hf-hub')


def _file_config(pretrained_cfg, file_args: dict, given: dict) -> dict:
    """What a sila_* model takes from a hub / local-dir config.json: its model_args (those timm copied into the
    kwargs `given` and the caller did not replace) must pass the allow-list, and its pretrained_cfg is cut to where
    timm was told to look (from the name the caller typed) plus range-checked data config and num_classes."""
    cfg = {} if pretrained_cfg is None or isinstance(pretrained_cfg, str) else (
        pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict())
    source = f"{cfg.get('file') or cfg.get('hf_hub_id') or 'the model'}'s config.json"
    sanitize_file_model_kwargs({k: v for k, v in file_args.items() if given.get(k) is v}, source)
    kept = {k: cfg[k] for k in _SOURCE_CFG_KEYS.get(cfg.get('source'), ()) if cfg.get(k) is not None}
    kept.update({k: v for k, v in sanitize_file_data_config(cfg, source).items() if k not in ('img_size', 'in_chans')})
    if cfg.get('num_classes') is not None:
        kept.update(sanitize_file_model_kwargs({'num_classes': cfg['num_classes']}, source))
    return kept


def _local_dir_weights(folder: Path, name: str) -> Path:
    """The weights file timm would pick in a `local-dir:` folder, chosen exactly as timm chooses it (an entry that
    exists, whatever it is: the checked reader then refuses a FIFO or a folder in one line instead of another file
    being read in its place); FileNotFoundError naming the folder when it holds none."""
    for fname in LOCAL_DIR_WEIGHT_FILES:
        if os.path.lexists(folder / fname):
            return folder / fname
    for ext in LOCAL_DIR_WEIGHT_EXTS:
        found = sorted(folder.glob(f'*{ext}'))
        if found:
            return found[0]
    raise FileNotFoundError(f'{folder} holds no weights file for {name} (looked for {", ".join(LOCAL_DIR_WEIGHT_FILES[:2])} '
                            f'and any *{", *".join(LOCAL_DIR_WEIGHT_EXTS)}); `timm-sila strip` writes model.safetensors '
                            f'there.')


def _create_sila(arch: str, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                 cache_dir=None, **kwargs) -> SilaNet:
    sila = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith(SILA_PREFIX)}
    file_args = kwargs.pop('pretrained_model_args', None) or {}  # model_args of a hub / local-dir config.json
    from_file = _is_sila_checkpoint(pretrained_cfg)  # a hub / local-dir config.json, with or without its weights
    if file_args or from_file:
        file_cfg = _file_config(pretrained_cfg, file_args, dict(kwargs, **sila))
    config = SilaConfig.from_kwargs(sila)
    if from_file:  # the file's pretrained_cfg never reaches timm: only its checked fields, set below
        base = timm.create_model(arch, **kwargs)
    else:
        base = timm.create_model(
            arch, pretrained=pretrained, pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir, **kwargs)
    model = SilaNet(base, config=config)
    if from_file:
        model.pretrained_cfg = dict(sila_pretrained_cfg(base.pretrained_cfg, arch), **file_cfg,
                                    architecture=f'{SILA_PREFIX}{arch}')
        model.default_cfg = model.pretrained_cfg
    if from_file and pretrained:
        if file_cfg.get('source') == 'local-dir':  # a folder on disk: always the checked reader
            weights = _local_dir_weights(Path(file_cfg.get('file') or ''), f'{SILA_PREFIX}{arch}')
            ckpt = read_checkpoint(weights)  # EMA weights first where the file has them, as timm's loader reads it
            state_dict = ckpt.state_dict_ema if ckpt.state_dict_ema is not None else ckpt.state_dict
            load_state_dict_checked(model, state_dict, weights, what=f'{SILA_PREFIX}{arch}',
                                    hint='Is config.json the one written with these weights?')
        else:  # the hub: timm fetches the file and loads it strictly
            load_pretrained(model, pretrained_cfg=model.pretrained_cfg, num_classes=model.num_classes,
                            in_chans=kwargs.get('in_chans', 3), strict=True, cache_dir=cache_dir)
    return model


def _entrypoint(arch: str):
    def fn(pretrained: bool = False, **kwargs) -> SilaNet:
        return _create_sila(arch, pretrained=pretrained, **kwargs)
    fn.__name__ = f'{SILA_PREFIX}{arch}'
    fn.__qualname__ = fn.__name__
    fn.__module__ = __name__
    fn.__doc__ = f'SilaNet over timm `{arch}`; sila_* keyword arguments configure the auxiliary sets.'
    return fn


def _mirror_cfgs(arch: str) -> Optional[DefaultCfg]:
    """DefaultCfg for sila_<arch> with every pretrained tag of <arch> in its order (the default first),
    classifier/first_conv under `base.`; None when <arch> has no pretrained cfg."""
    cfgs = {}
    for i, (name, cfg) in enumerate(arch_pretrained_cfgs(arch).items()):
        tag = name[len(arch) + 1:] if name.startswith(f'{arch}.') else ''
        remapped = sila_pretrained_cfg({'classifier': cfg.classifier, 'first_conv': cfg.first_conv}, arch)
        # '*' marks <arch>'s default tag as sila_<arch>'s default, whether or not it has weights
        cfgs[f'{SILA_PREFIX}{arch}.{tag}{"*" if i == 0 else ""}'] = replace(
            cfg, classifier=remapped['classifier'], first_conv=remapped['first_conv'])
    return generate_default_cfgs(cfgs)[f'{SILA_PREFIX}{arch}'] if cfgs else None


def register_sila_models() -> int:
    """Register sila_<arch> for every timm architecture not yet registered; returns how many were added."""
    module = sys.modules[__name__]
    added = 0
    for arch in timm.list_models():
        name = f'{SILA_PREFIX}{arch}'
        if arch.startswith(SILA_PREFIX) or timm.is_model(name):
            continue
        mirrored = _mirror_cfgs(arch)
        if mirrored is not None:
            module.default_cfgs[name] = mirrored
        register_model(_entrypoint(arch))
        added += 1
    return added

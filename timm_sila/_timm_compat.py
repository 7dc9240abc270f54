"""The only place timm_sila touches timm internals that have no public API (tested against every timm release
the package allows: tests/test_timm_compat.py, run by CI with the newest one setup.cfg's bound admits).

* `model_args(model)`: the create_model kwargs timm records on a model it built (`_model_args`), which
  `save_config_for_hf` writes as config.json `model_args` so the model rebuilds the same;
* `built_by_timm(model)`: whether timm recorded the model's input config (`_traits`), i.e. whether
  `timm.models.get_model_input_config` describes it;
* `copy_traits(src, dst, rename_first_conv)`: give a wrapper the input config timm recorded on the model it wraps;
* `arch_pretrained_cfgs(arch)`: the public `timm.models.get_arch_pretrained_cfgs` without its deep copies, which
  would cost ~0.6 s at `import timm_sila` (every architecture's cfgs are mirrored for sila_<arch>);
* `group_with_matcher`, `save_config_for_hf`: timm's layer grouping (for layer-wise LR decay) and config.json writer;
* `LOCAL_DIR_WEIGHT_FILES`, `LOCAL_DIR_WEIGHT_EXTS`: the file names, then extensions, timm's `local-dir:` loader
  looks for (`load_state_dict_from_path`), so timm_sila picks the same file to read with its checked reader;
* `pinned_args(arch, model)`: the kwargs that make timm rebuild `model` as it is, for the entrypoints that build a
  different module when called with pretrained=True (as `local-dir:` loading does); `pretrained_form_args(arch)`:
  the kwargs that build that pretrained form without loading weights (for checkpoints trained from them).
"""
from typing import Any, Callable, Dict, Optional, Tuple

import torch.nn as nn
from timm.models import PretrainedCfg
from timm.models import _registry
from timm.models._efficientnet_builder import BN_EPS_TF_DEFAULT
from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES, save_config_for_hf
from timm.models._manipulate import group_with_matcher

__all__ = ['model_args', 'built_by_timm', 'copy_traits', 'arch_pretrained_cfgs', 'group_with_matcher',
           'save_config_for_hf', 'pinned_args', 'pretrained_form_args', 'TESTED_TIMM', 'LOCAL_DIR_WEIGHT_FILES',
           'LOCAL_DIR_WEIGHT_EXTS']

LOCAL_DIR_WEIGHT_FILES: Tuple[str, ...] = tuple(_PREFERRED_FILES)
LOCAL_DIR_WEIGHT_EXTS: Tuple[str, ...] = tuple(_EXT_PRIORITY)

TESTED_TIMM = '1.0.31'  # the newest timm these internals were checked against (setup.cfg: timm>=1.0.31,<1.1)


def _bn_eps_pin(model: nn.Module) -> Dict[str, Any]:
    """bn_eps of the model's BatchNorm, unless it was built with its own norm_layer (which takes no bn_eps)."""
    if 'norm_layer' in model_args(model):
        return {}
    norm = next((m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    return {} if norm is None else {'bn_eps': norm.eps}


def _bn_eps_form(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """What the entrypoint sets for pretrained=True, given the create_model kwargs (none with a norm_layer)."""
    return {} if 'norm_layer' in kwargs else dict(bn_eps=BN_EPS_TF_DEFAULT)


# Entrypoints whose module depends on `pretrained` (timm 1.0.31: fbnetc_100 sets bn_eps=1e-3 for its weights):
# {arch: (fn(kwargs) -> kwargs the entrypoint sets for pretrained=True, fn(model) -> kwargs that rebuild model)}.
_PRETRAINED_DEPENDENT: Dict[str, Tuple[Callable[[Dict[str, Any]], Dict[str, Any]],
                                       Callable[[nn.Module], Dict[str, Any]]]] = {
    'fbnetc_100': (_bn_eps_form, _bn_eps_pin),
}


def pinned_args(arch: str, model: nn.Module) -> Dict[str, Any]:
    """Kwargs for timm.create_model(arch, ...) that rebuild `model`'s architecture with pretrained=True or False
    ({} for the architectures whose module does not depend on `pretrained`)."""
    pin = _PRETRAINED_DEPENDENT.get(arch)
    return pin[1](model) if pin is not None else {}


def pretrained_form_args(arch: str, kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Kwargs to add to `kwargs` so that timm.create_model(arch, pretrained=False, **kwargs) builds the module that
    pretrained=True builds ({} for the architectures whose module does not depend on `pretrained`)."""
    pin = _PRETRAINED_DEPENDENT.get(arch)
    return pin[0](dict(kwargs or {})) if pin is not None else {}


def model_args(model: nn.Module) -> Dict[str, Any]:
    """A copy of the kwargs timm.create_model recorded for `model` ({} for a model timm did not build)."""
    return dict(getattr(model, '_model_args', None) or {})


def built_by_timm(model: nn.Module) -> bool:
    return getattr(model, '_traits', None) is not None


def copy_traits(src: nn.Module, dst: nn.Module, rename_first_conv: Callable[[Any], Any]) -> None:
    """dst (a wrapper of src) gets src's recorded input config (img_size, in_chans, ...), its first conv's name
    passed through `rename_first_conv` (src's module path as seen from dst)."""
    traits = getattr(src, '_traits', None)
    if traits:
        dst._traits = dict(traits, first_conv=rename_first_conv(traits.get('first_conv')))


def arch_pretrained_cfgs(arch: str) -> Dict[str, PretrainedCfg]:
    """{'arch.tag': resolved PretrainedCfg} of every tag of `arch`, the default first; timm's own objects, so
    callers must not modify them (dataclasses.replace makes changed copies)."""
    return {name: _registry._model_pretrained_cfgs[name] for name in _registry._model_with_tags.get(arch, [])}

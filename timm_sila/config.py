"""What a file may tell timm-sila: the `sila_*` settings, an allow-list of model arguments, and data config values.

Every file timm-sila opens may come from a stranger: a timm train.py checkpoint (`args.model_kwargs`, `args.mean`,
...), a stripped folder's `config.json` (`architecture`, `model_args`, `pretrained_cfg`) or an EarlyExit file's
metadata. Such a file may choose *which weights* are built and how inputs are preprocessed, never code, URLs,
paths or downloads. So values read from a file pass through this module before they reach `timm.create_model`:

* `sanitize_file_model_kwargs` keeps only keys on `FILE_MODEL_KWARGS` (the `sila_*` settings and arguments that
  shape an architecture) with values of the expected type and range. Any other key -- in particular everything
  that can load, fetch or write (`pretrained`, `pretrained_cfg*`, `checkpoint_path`, `cache_dir`, URLs, paths,
  `hf_hub_*`) -- is **refused** with `UnsafeFileError` naming the key and the file. Refusing (rather than dropping
  with a warning) is deliberate: a file that asks for a download was not written by timm-sila or timm's train.py,
  and silently rebuilding a different model from it would be a wrong result.
* `sanitize_file_data_config` range-checks mean / std / crop_pct / input_size / interpolation; an empty or None
  value means "the model's default", as in timm's `resolve_data_config`.
* `check_file_architecture` accepts only a registered model name (no `hf-hub:` / `local-dir:` source prefix).

Exceptions for files that are read (all are `ValueError`s, so the CLI reports them in one line):
    CheckpointError(ValueError)       a file cannot be read safely, is not a SilaNet's, or does not match the model
      UnsafeFileError(CheckpointError)  a file asks for something a file may not choose (key, type or range)
Errors of writes are in `timm_sila.atomic` (`OutputError` and subclasses).
"""
import math
import numbers
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

__all__ = [
    'CheckpointError', 'UnsafeFileError', 'SilaConfig', 'SILA_PREFIX', 'SILA_KWARGS', 'FILE_MODEL_KWARGS',
    'sila_name', 'base_arch', 'is_sila_name', 'sila_kwargs',
    'DATA_CONFIG_KEYS', 'sanitize_file_model_kwargs', 'sanitize_file_data_config', 'check_file_architecture',
]

SILA_PREFIX = 'sila_'


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, is not a SilaNet's, or does not match the named model."""


class UnsafeFileError(CheckpointError):
    """A file asks for something a file may not choose: a create_model argument off the allow-list (anything that
    can load, fetch or write), or a value of the wrong type or range. `.key` is the offending key, `.source` the
    file."""

    def __init__(self, message: str, key: Optional[str] = None, source: Optional[str] = None):
        super().__init__(message)
        self.key = key
        self.source = source


# --- value checks ------------------------------------------------------------------------------------------
_NAME = re.compile(r'[A-Za-z0-9_.\-]{0,64}')  # a layer / pool / head name: never a path or URL
_MAX_LIST = 64


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= lo


def _real(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: _is_real(v) and (v > lo if lo_open else v >= lo) and v <= hi


def _name(v: Any) -> bool:
    return isinstance(v, str) and _NAME.fullmatch(v) is not None


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _seq(item: Callable[[Any], bool], min_len: int = 1, max_len: int = _MAX_LIST) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and min_len <= len(v) <= max_len and all(item(x) for x in v)


def _either(*checks: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: any(check(v) for check in checks)


_POS = _int(1)
_POS_OR_SEQ = _either(_POS, _seq(_POS))
_RATE = _real(0.0, 1.0)
_TAP = _either(_name, _int(-_MAX_LIST))


def _describe(check: Callable[[Any], bool]) -> str:
    return getattr(check, 'expected', 'a value of another type')


def _spec(check: Callable[[Any], bool], expected: str) -> Callable[[Any], bool]:
    """`check` with the wording of what it accepts, used in error messages."""
    def spec(value: Any) -> bool:
        return check(value)
    spec.expected = expected
    return spec


# Named tap rules for `sila_taps` (None = 'depth'); the rules themselves live in taps.choose_taps.
TAP_RULES = ('depth', 'stages')


# --- SilaNet settings --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SilaConfig:
    """The SilaNet settings a `sila_<arch>` model takes as `sila_*` keyword arguments, validated on creation.

    sets: output sets M >= 2 (set 0 = the base model); beta, decay: finite >= 0 (set j weighs beta * decay**(j-1));
    taps: None or a tap rule name ('depth' = paper Sec 2.2, the default; 'stages' = the M-1 stages before the
    final one) or M-1 stage names / feature_info indices, deepest first; branch: the set answered in
    eval mode, 0 <= branch < sets; head: auxiliary head type name; stripped: build only `branch`'s layers.
    """
    sets: int = 3
    beta: float = 0.1
    decay: float = 0.5
    taps: Union[None, str, List[Union[str, int]]] = None
    branch: int = 0
    head: str = 'conv3x3'
    stripped: bool = False

    def __post_init__(self):
        if not _SILA_CHECKS['sila_sets'](self.sets):
            raise ValueError(f'sila_sets must be an integer >= 2 (the paper uses 3), got {self.sets!r}.')
        if not (_SILA_CHECKS['sila_beta'](self.beta) and _SILA_CHECKS['sila_decay'](self.decay)):
            raise ValueError(f'Sila loss needs finite beta >= 0 and decay >= 0 (no NaN or inf), got '
                             f'sila_beta={self.beta!r}, sila_decay={self.decay!r}.')
        if isinstance(self.taps, (list, tuple)) and len(self.taps) == 1 and self.taps[0] in TAP_RULES:
            object.__setattr__(self, 'taps', self.taps[0])  # e.g. CLI `--taps stages`
        if self.taps is not None and not (isinstance(self.taps, str) and self.taps in TAP_RULES):
            if not _SILA_CHECKS['sila_taps'](self.taps):
                raise ValueError(f'sila_taps must be a list of stage names or feature_info indices, got '
                                 f'{self.taps!r}.')
            if len(self.taps) != self.sets - 1:
                raise ValueError(f'sila_taps must list {self.sets - 1} stages (one per auxiliary set, deepest '
                                 f'first), got {list(self.taps)}.')
            object.__setattr__(self, 'taps', list(self.taps))
        if not (_is_int(self.branch) and 0 <= self.branch < self.sets):
            raise ValueError(f'sila_branch must be an integer in [0, {self.sets - 1}] for sila_sets={self.sets}, '
                             f'got {self.branch!r}.')
        for name in ('head', 'stripped'):
            check = _SILA_CHECKS[SILA_PREFIX + name]
            if not check(getattr(self, name)):
                raise ValueError(f'sila_{name} must be {_describe(check)}, got {getattr(self, name)!r}.')
        object.__setattr__(self, 'beta', float(self.beta))
        object.__setattr__(self, 'decay', float(self.decay))

    def to_kwargs(self) -> Dict[str, Any]:
        """{'sila_sets': ..., 'sila_beta': ..., ...}: create_model keyword arguments (taps None = automatic)."""
        return {SILA_PREFIX + k: v for k, v in asdict(self).items()}

    @classmethod
    def from_kwargs(cls, kwargs: Dict[str, Any]) -> 'SilaConfig':
        """From `sila_*` keyword arguments (missing ones take their defaults); any other key is a ValueError."""
        unknown = sorted(k for k in kwargs if k not in SILA_KWARGS)
        if unknown:
            raise ValueError(f'Unknown SilaNet arguments {unknown}; valid ones are {list(SILA_KWARGS)}.')
        return cls(**{k[len(SILA_PREFIX):]: v for k, v in kwargs.items()})


_SILA_CHECKS: Dict[str, Callable[[Any], bool]] = {
    'sila_sets': _spec(_int(2), 'an integer >= 2'),
    'sila_beta': _spec(_real(0.0), 'a finite number >= 0'),
    'sila_decay': _spec(_real(0.0), 'a finite number >= 0'),
    'sila_taps': _spec(_either(lambda v: isinstance(v, str) and v in TAP_RULES, _seq(_TAP)),
                       f'a tap rule {TAP_RULES} or a list of stage names or feature_info indices'),
    'sila_branch': _spec(_int(0), 'an integer >= 0'),
    'sila_head': _spec(_name, 'a head type name'),
    'sila_stripped': _spec(_flag, 'a bool'),
}
SILA_KWARGS = tuple(SILA_PREFIX + f.name for f in fields(SilaConfig))  # the one list of sila_* names


def sila_name(name: str) -> str:
    """The registered SilaNet model name of an architecture or model name, without a pretrained tag:
    'resnet18', 'sila_resnet18' and 'sila_resnet18.a1_in1k' -> 'sila_resnet18'."""
    return SILA_PREFIX + base_arch(name)


def base_arch(name: str) -> str:
    """The timm architecture under a (sila_) model name: 'sila_resnet18.a1_in1k' -> 'resnet18'."""
    arch = name.split(':')[-1].split('.', 1)[0]
    return arch[len(SILA_PREFIX):] if arch.startswith(SILA_PREFIX) else arch


def is_sila_name(name: str) -> bool:
    return name.split(':')[-1].startswith(SILA_PREFIX)


def sila_kwargs(**settings: Any) -> Dict[str, Any]:
    """`sila_*` create_model kwargs of the SilaConfig fields given and not None: sila_kwargs(sets=3, taps=None)
    -> {'sila_sets': 3}. Unknown field names are a TypeError (a programming error)."""
    names = {f.name for f in fields(SilaConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise TypeError(f'sila_kwargs() got unknown SilaConfig fields {unknown}')
    return {SILA_PREFIX + k: (list(v) if k == 'taps' and isinstance(v, tuple) else v)
            for k, v in settings.items() if v is not None}

# --- the create_model arguments a file may set -------------------------------------------------------------
_COUNT = _spec(_int(0), 'an integer >= 0')
_POSITIVE = _spec(_POS, 'an integer >= 1')
_SIZE = _spec(_either(_POS, _seq(_POS, 1, 3)), 'an integer >= 1 or a list of 1-3 of them')
_DIMS = _spec(_POS_OR_SEQ, 'an integer >= 1 or a list of them')
_PROB = _spec(_RATE, 'a number in [0, 1]')
_SCALE = _spec(_real(0.0, lo_open=True), 'a finite number > 0')
_SCALES = _spec(_either(_real(0.0, lo_open=True), _seq(_real(0.0, lo_open=True))),
                'a finite number > 0 or a list of them')
_NUMBER = _spec(_real(), 'a finite number')
_FLAG = _spec(_flag, 'a bool')
_LAYER = _spec(_name, 'a short name (letters, digits, _ . -)')

FILE_MODEL_KWARGS: Dict[str, Callable[[Any], bool]] = dict(
    _SILA_CHECKS,
    # classifier and input
    num_classes=_COUNT, in_chans=_POSITIVE, global_pool=_LAYER, img_size=_SIZE, patch_size=_SIZE,
    window_size=_SIZE, output_stride=_POSITIVE, head_hidden_size=_POSITIVE,
    # widths and depths (ViT / Swin / ConvNeXt / ResNet-like families)
    embed_dim=_DIMS, embed_dims=_DIMS, dims=_DIMS, depth=_DIMS, depths=_DIMS, num_heads=_DIMS, layers=_DIMS,
    stem_width=_POSITIVE, reg_tokens=_COUNT, mlp_ratio=_SCALES,
    width_multiplier=_SCALE, channel_multiplier=_SCALE, depth_multiplier=_SCALE,
    stem_type=_LAYER, pos_embed=_LAYER, act_layer=_LAYER, norm_layer=_LAYER,
    class_token=_FLAG, no_embed_class=_FLAG, qkv_bias=_FLAG, qk_norm=_FLAG, fc_norm=_FLAG,
    dynamic_img_size=_FLAG, dynamic_img_pad=_FLAG,
    init_values=_NUMBER, layer_scale_init_value=_NUMBER, ls_init_value=_NUMBER,
    # regularisation and normalisation (what train.py's --drop*, --bn-* set)
    drop_rate=_PROB, drop_path_rate=_PROB, drop_block_rate=_PROB, proj_drop_rate=_PROB, attn_drop_rate=_PROB,
    pos_drop_rate=_PROB, patch_drop_rate=_PROB, bn_momentum=_PROB, bn_eps=_SCALE,
)
"""Keys a file may pass to create_model, with the check of each value (None always allowed: timm drops it)."""

_LOADS_OR_WRITES = re.compile(r'pretrained|checkpoint|cache|url|uri|hf_hub|hub|path|file|dir|download|'
                              r'features_only|scriptable|exportable|jit|device|dtype', re.IGNORECASE)


def sanitize_file_model_kwargs(kwargs: Any, source: Any, overridden: Iterable[str] = ()) -> Dict[str, Any]:
    """The create_model kwargs read from file `source`, checked against `FILE_MODEL_KWARGS`.

    Returns a new dict (tuples become lists, None values dropped). Keys in `overridden` -- those the caller passes
    explicitly, so the file's value is never used -- are dropped unchecked. Raises UnsafeFileError naming the key
    and the file for any key off the allow-list or value of the wrong type / range; never warns and continues.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise UnsafeFileError(f'{source}: model arguments must be a mapping of names to values, got '
                              f'{type(kwargs).__name__}.', source=str(source))
    skip = set(overridden)
    out: Dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in skip or value is None:
            continue
        if not isinstance(key, str):
            raise UnsafeFileError(f'{source}: model argument names must be strings, got {key!r}.', source=str(source))
        check = FILE_MODEL_KWARGS.get(key)
        if check is None:
            if _LOADS_OR_WRITES.search(key):
                why = ('it can make timm load, fetch or write files (a file may choose weights, never URLs, '
                       'paths or downloads)')
            else:
                why = 'it is not on the allow-list of architecture arguments a file may set'
            raise UnsafeFileError(
                f'{source} sets the model argument {key!r}={_short(value)}, refused because {why}. Allowed keys: '
                f'timm_sila.config.FILE_MODEL_KWARGS; if you trust the file, pass {key} yourself '
                f'(Python keyword / CLI --model-kwargs), which replaces the file\'s value.', key, str(source))
        if not check(value):
            raise UnsafeFileError(f'{source} sets the model argument {key}={_short(value)}, which must be '
                                  f'{_describe(check)}.', key, str(source))
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


# --- data config ---------------------------------------------------------------------------------------------
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')  # timm's str_to_interp_mode
CROP_MODES = ('center', 'squash', 'border')
_MAX_SIDE = 65536

_DATA_CHECKS: Dict[str, Callable[[Any], bool]] = {
    'input_size': _spec(_seq(_int(1), 3, 3), 'a list of 3 integers >= 1 (channels, height, width)'),
    'img_size': _spec(_either(_POS, _seq(_POS, 2, 2)), 'an integer >= 1 or a list of 2 of them'),
    'in_chans': _POSITIVE,
    'mean': _spec(_seq(_real(0.0, 1.0), 1, 4), 'a list of 1-4 numbers in [0, 1]'),
    'std': _spec(_seq(_real(0.0, 1.0, lo_open=True), 1, 4), 'a list of 1-4 numbers in (0, 1]'),
    # timm's own registry uses crop_pct up to 1.15 (crop larger than the resized image)
    'crop_pct': _spec(_real(0.0, 2.0, lo_open=True), 'a number in (0, 2]'),
    'crop_mode': _spec(lambda v: v in CROP_MODES, f'one of {CROP_MODES}'),
    'interpolation': _spec(lambda v: v in INTERPOLATIONS, f'one of {INTERPOLATIONS}'),
}
DATA_CONFIG_KEYS = tuple(_DATA_CHECKS)


def sanitize_file_data_config(config: Any, source: Any) -> Dict[str, Any]:
    """The data config keys of `config` (read from file `source`), range-checked.

    Only DATA_CONFIG_KEYS are kept (other keys are not data config and are ignored); None and '' mean the model's
    default (timm's resolve_data_config) and are dropped; a value of the wrong type or range raises UnsafeFileError.
    Sizes and mean/std are returned as tuples; sides are limited to 65536 pixels.
    """
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UnsafeFileError(f'{source}: the data config must be a mapping, got {type(config).__name__}.',
                              source=str(source))
    out: Dict[str, Any] = {}
    for key, check in _DATA_CHECKS.items():
        value = config.get(key)
        if value is None or value == '':
            continue
        sides = value[1:] if key == 'input_size' and isinstance(value, (list, tuple)) else value
        too_big = any(_is_int(s) and s > _MAX_SIDE for s in (sides if isinstance(sides, (list, tuple)) else [sides]))
        if not check(value) or (key in ('input_size', 'img_size') and too_big):
            raise UnsafeFileError(f'{source} gives the data config value {key}={_short(value)}, which must be '
                                  f'{_describe(check)}' + (f' (at most {_MAX_SIDE} pixels a side)'
                                                           if key in ('input_size', 'img_size') else '') + '.',
                                  key, str(source))
        out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return out


# --- architecture names --------------------------------------------------------------------------------------
def check_file_architecture(name: Any, source: Any) -> str:
    """A model name read from file `source`: a registered timm name (a pretrained tag is dropped: the weights come
    from the file). Source prefixes (`hf-hub:`, `local-dir:`) and anything else are refused with UnsafeFileError."""
    import timm
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UnsafeFileError(f'{source} names the architecture {_short(name)}, which is not a timm model name '
                              f'(a file may not name a hub or local source).', 'architecture', str(source))
    arch = name.split('.', 1)[0]
    if not timm.is_model(arch):
        raise UnsafeFileError(f'{source} names the architecture {arch!r}, which is not a registered timm model '
                              f'(see timm.list_models()).', 'architecture', str(source))
    return arch

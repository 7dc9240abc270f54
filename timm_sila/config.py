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
* `FILE_LIMITS` bounds every size a file may set (classes, channels, depth, widths, input size, crop, JSON size and
  nesting, compressed-storage expansion) to what real timm models use, with a margin, so that no file can make
  timm-sila do unbounded work; both sanitizers enforce it, `parse_file_json` / `read_file_json` read JSON with it.

Exceptions for files that are read (all are `ValueError`s, so the CLI reports them in one line):
    CheckpointError(ValueError)       a file cannot be read safely, is not a SilaNet's, or does not match the model
      UnsafeFileError(CheckpointError)  a file asks for something a file may not choose (key, type or range)
Errors of writes are in `timm_sila.atomic` (`OutputError` and subclasses).
"""
import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

__all__ = [
    'CheckpointError', 'UnsafeFileError', 'SilaConfig', 'SILA_PREFIX', 'SILA_KWARGS', 'FILE_MODEL_KWARGS',
    'sila_name', 'base_arch', 'is_sila_name', 'sila_kwargs',
    'DATA_CONFIG_KEYS', 'sanitize_file_model_kwargs', 'sanitize_file_data_config', 'check_file_architecture',
    'Bound', 'FILE_LIMITS', 'bound_violation', 'parse_file_json', 'read_file_json',
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

# --- bounds on every size a file may set -------------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """The range a file may give one size, and why. A number must lie in [lo, hi] (`lo_open`: above lo); a list
    has at most `max_len` items, each number of it in range, and a sum of at most `max_total` where one is set;
    `values`, where set, are the only numbers allowed. Names in a list (e.g. sila_taps) are not numbers here."""
    lo: float
    hi: float
    why: str
    lo_open: bool = False
    max_len: int = 16
    max_total: Optional[float] = None
    values: Optional[Tuple[float, ...]] = None


# Derived from timm 1.0.31: its 3,394 registered pretrained cfgs and the literal model arguments of timm/models/*.py
# (entrypoint model_args and constructor defaults), scanned programmatically; the margin is stated with each bound.
# A value within these bounds can still disagree with the file's own weights: `checkpoint.build_checked` compares
# them on the meta device before anything is built for real.
FILE_LIMITS: Dict[str, Bound] = {
    # classifier and input
    'num_classes': Bound(0, 262_144, "2.3x the largest registered classifier, the 115,217 classes "
                                     "of vit_base_patch16_224.bamboo"),
    'in_chans': Bound(1, 1024, "every registered cfg takes 3 channels; 1024 leaves room for hyperspectral images "
                               "of a few hundred bands"),
    'img_size': Bound(1, 4096, "4x the largest registered input side, 1024 of the SAM ViTs and sapiens2; also "
                               "each side of input_size", max_len=2),
    'patch_size': Bound(1, 64, "2x the largest registered patch, 32", max_len=3),
    'window_size': Bound(1, 64, "2.7x the largest registered window, 24 of swinv2_large_window12to24_192to384",
                         max_len=4),
    'output_stride': Bound(8, 32, "the strides timm's dilated backbones accept: resnet, convnext and regnet "
                                  "assert one of them", values=(8, 16, 32)),
    # depths: transformer blocks, blocks per stage
    'depth': Bound(1, 128, "2x the deepest registered transformer, the 64 blocks of eva02_enormous; a list "
                           "of stages at most 256 in all", max_total=256),
    'depths': Bound(1, 128, "2.1x the longest registered stage, 60 blocks of mvitv2_huge; at most 256 in all, "
                            "1.8x the 139 blocks of the deepest registered model, resnetrs420", max_total=256),
    'layers': Bound(1, 128, "1.5x the longest registered stage, 87 blocks of resnetrs420; at most 256 in all, "
                            "1.8x its 139 blocks", max_total=256),
    # widths
    'embed_dim': Bound(1, 8192, "2x the widest registered embedding, 4096 of vit_7b_patch16_dinov3"),
    'embed_dims': Bound(1, 8192, "2.7x the widest registered stage, 3072 of davit_giant"),
    'dims': Bound(1, 8192, "2.7x the widest registered stage, 3072 of convnext_xxlarge"),
    'head_hidden_size': Bound(1, 8192, "4x the widest registered pre-logits layer, 2048 of coatnet_5"),
    'stem_width': Bound(1, 1024, "5x the widest registered stem, 192 of vitamin_xlarge_384"),
    'num_heads': Bound(1, 256, "2x the most registered attention heads, 128 of swinv2_cr_giant"),
    'reg_tokens': Bound(0, 32, "3.5x the most registered register tokens, 9 of vit_huge_patch16_radio_v4"),
    'mlp_ratio': Bound(0, 16, "1.9x the largest registered MLP ratio, 15360 / 1792 = 8.57 of eva02_enormous",
                       lo_open=True),
    'width_multiplier': Bound(0, 8, "6.4x the largest registered width multiplier, 1.25 of cs3sedarknet_xdw",
                              lo_open=True),
    'channel_multiplier': Bound(0, 8, "1.9x the largest registered channel multiplier, 4.3 of tf_efficientnet_l2",
                                lo_open=True),
    'depth_multiplier': Bound(0, 8, "1.5x the largest registered depth multiplier, 5.3 of tf_efficientnet_l2",
                              lo_open=True),
    # SilaNet settings
    'sila_sets': Bound(2, 32, "the paper uses 3; every auxiliary set taps its own stage, and a model has at most a "
                              "few dozen: one per stage, or one per block of a ViT"),
    'sila_taps': Bound(-64, 64, "one tap per auxiliary set, at most sila_sets - 1 = 31", max_len=31),
    'sila_branch': Bound(0, 31, "a set index below sila_sets"),
    # data config
    'crop_pct': Bound(0.5, 2.0, "registered cfgs use 0.875-1.15; below 0.5 an image is resized to more than twice "
                                "the crop side, 0.002 to 500x"),
    # files themselves
    'json_bytes': Bound(0, 1 << 20, "a config.json or early-exit metadata written by timm-sila is 1-3 KB"),
    'json_depth': Bound(0, 32, "a config.json nests 3 levels; deeper JSON only exhausts the parser's recursion"),
    'zip_expansion': Bound(0, 4, "torch.save stores entries uncompressed, ratio 1; deflate-compressed entries may "
                                 "expand to 4x the file's size plus 1 MiB, never to gigabytes"),
}
"""Upper (and where needed lower) bound of every size a file may set, with the reason, by key."""


def bound_violation(key: str, value: Any) -> Optional[str]:
    """Why `value` of `key` lies outside FILE_LIMITS[key] ('... above the bound 262144 (reason)'), or None when it
    lies inside or `key` has no bound. Values of the wrong type are the type checks' business, not this one's."""
    bound = FILE_LIMITS.get(key)
    if bound is None or isinstance(value, (str, bool)) or value is None:
        return None
    is_list = isinstance(value, (list, tuple))
    items = list(value) if is_list else [value]
    why = f' ({bound.why})'
    if is_list and len(items) > bound.max_len:
        return f'a list of {len(items)} items, more than the bound of {bound.max_len}{why}'
    numbers_ = [v for v in items if _is_real(v)]
    for v in numbers_:
        if bound.values is not None and v not in bound.values:
            return f'{v!r} is not one of the allowed values {bound.values}{why}'
        if v > bound.hi:
            return f'{v!r} is above the bound {bound.hi:g}{why}'
        if v < bound.lo or (bound.lo_open and v <= bound.lo):
            return f'{v!r} is below the bound {">" if bound.lo_open else ">="} {bound.lo:g}{why}'
    if bound.max_total is not None and is_list and sum(numbers_) > bound.max_total:
        return f'its items add up to {sum(numbers_)!r}, above the bound {bound.max_total:g}{why}'
    return None


def _json_depth(text: str) -> int:
    """Deepest nesting of [ and { in JSON text, strings skipped (linear, no recursion)."""
    depth = deepest = 0
    for bracket in re.findall(r'[\[\]{}]', re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)):
        depth = depth + 1 if bracket in '[{' else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def parse_file_json(text: Union[str, bytes], source: Any, parse_constant: Optional[Callable[[str], Any]] = None
                    ) -> Any:
    """JSON text read from file `source`, within FILE_LIMITS' 'json_bytes' and 'json_depth'.

    Bytes must be UTF-8. Raises CheckpointError naming `source` for text over the bounds, undecodable or invalid
    JSON (never RecursionError); `parse_constant` is json.loads' (e.g. to refuse NaN / Infinity)."""
    size, depth_bound = FILE_LIMITS['json_bytes'], FILE_LIMITS['json_depth']
    if len(text) > size.hi:
        raise CheckpointError(f'Cannot read {source}: it holds {len(text):,} bytes of JSON, above the bound of '
                              f'{int(size.hi):,} ({size.why}).')
    try:
        if isinstance(text, bytes):
            text = text.decode('utf-8')
        depth = _json_depth(text)
        if depth > depth_bound.hi:
            raise CheckpointError(f'Cannot read {source}: its JSON nests {depth} levels deep, above the bound of '
                                  f'{int(depth_bound.hi)} ({depth_bound.why}).')
        return json.loads(text, parse_constant=parse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f'Cannot read {source}: it is not valid UTF-8 JSON ({first}).') from None


def read_file_json(path: Union[str, Path]) -> Any:
    """The JSON document in file `path` (parse_file_json's bounds; a larger file is not read past the bound)."""
    path = Path(path)
    with path.open('rb') as f:
        data = f.read(int(FILE_LIMITS['json_bytes'].hi) + 1)
    return parse_file_json(data, path)


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
    and the file for any key off the allow-list or value of the wrong type / range or outside `FILE_LIMITS` (the
    message names the value and the bound); never warns and continues.
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
        _check_bound(key, value, source, 'model argument')
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _check_bound(key: str, value: Any, source: Any, what: str, part: Any = None, bound_key: str = '',
                 part_name: str = '') -> None:
    """UnsafeFileError naming the file, key, value and bound when `value` (or `part` of it, bounded as
    `bound_key`) lies outside FILE_LIMITS."""
    problem = bound_violation(bound_key or key, value if part is None else part)
    if problem is not None:
        hint = (f' If the file is right, pass {key} yourself, which replaces the file\'s value.'
                if what == 'model argument' else '')
        raise UnsafeFileError(f'{source} sets the {what} {key}={_short(value)}: {part_name}{problem}.{hint}', key,
                              str(source))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


# --- data config ---------------------------------------------------------------------------------------------
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')  # timm's str_to_interp_mode
CROP_MODES = ('center', 'squash', 'border')

_DATA_CHECKS: Dict[str, Callable[[Any], bool]] = {
    'input_size': _spec(_seq(_int(1), 3, 3), 'a list of 3 integers >= 1 (channels, height, width)'),
    'img_size': _spec(_either(_POS, _seq(_POS, 2, 2)), 'an integer >= 1 or a list of 2 of them'),
    'in_chans': _POSITIVE,
    'mean': _spec(_seq(_real(0.0, 1.0), 1, 4), 'a list of 1-4 numbers in [0, 1]'),
    'std': _spec(_seq(_real(0.0, 1.0, lo_open=True), 1, 4), 'a list of 1-4 numbers in (0, 1]'),
    'crop_pct': _spec(_real(0.0, lo_open=True), 'a finite number > 0'),  # range: FILE_LIMITS['crop_pct']
    'crop_mode': _spec(lambda v: v in CROP_MODES, f'one of {CROP_MODES}'),
    'interpolation': _spec(lambda v: v in INTERPOLATIONS, f'one of {INTERPOLATIONS}'),
}
DATA_CONFIG_KEYS = tuple(_DATA_CHECKS)


def sanitize_file_data_config(config: Any, source: Any) -> Dict[str, Any]:
    """The data config keys of `config` (read from file `source`), range-checked.

    Only DATA_CONFIG_KEYS are kept (other keys are not data config and are ignored); None and '' mean the model's
    default (timm's resolve_data_config) and are dropped; a value of the wrong type or range, or outside
    `FILE_LIMITS` (input_size: its channels as 'in_chans', its sides as 'img_size'), raises UnsafeFileError.
    Sizes and mean/std are returned as tuples.
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
        if not check(value):
            raise UnsafeFileError(f'{source} gives the data config value {key}={_short(value)}, which must be '
                                  f'{_describe(check)}.', key, str(source))
        if key == 'input_size':
            _check_bound(key, value, source, 'data config value', value[0], 'in_chans', 'its channels: ')
            _check_bound(key, value, source, 'data config value', list(value[1:]), 'img_size', 'a side: ')
        else:
            _check_bound(key, value, source, 'data config value')
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

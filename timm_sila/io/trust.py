"""What a file may make timm-sila do: the trust rules for every value read from a file someone else wrote.

Every file timm-sila opens may come from a stranger: a timm train.py checkpoint (`args.model_kwargs`, `args.mean`,
...), a stripped folder's `config.json` (`architecture`, `model_args`, `pretrained_cfg`), an EarlyExit file's
metadata or an `eval --json` result. Such a file may choose *which weights* are built and how inputs are
preprocessed, never code, URLs, paths, downloads or unbounded work. So values read from a file pass through this
module before they reach `timm.create_model`:

* `sanitize_file_model_kwargs` keeps only keys on `FILE_MODEL_KWARGS` (the `sila_*` settings and arguments that
  shape an architecture) with values of the expected type and range. Any other key -- in particular everything
  that can load, fetch or write (`pretrained`, `pretrained_cfg*`, `checkpoint_path`, `cache_dir`, URLs, paths,
  `hf_hub_*`) -- is **refused** with `UnsafeFileError` naming the key and the file. Refusing (rather than dropping
  with a warning) is deliberate: a file that asks for a download was not written by timm-sila or timm's train.py,
  and silently rebuilding a different model from it would be a wrong result.
* `sanitize_file_data_config` range-checks mean / std / crop_pct / input_size / interpolation; an empty or None
  value means "the model's default", as in timm's `resolve_data_config`.
* `check_file_model_name` accepts only a model name (no `hf-hub:` / `local-dir:` source prefix, path or URL);
  `check_file_architecture` also requires it to be registered.
* `FILE_LIMITS` bounds every size a file may set (classes, channels, depth, widths, input size, crop, JSON size and
  nesting, compressed-storage expansion) to what real timm models use, with a margin, so that no file can make
  timm-sila do unbounded work; both sanitizers enforce it, `parse_file_json` / `read_file_json` read JSON with it.

Exceptions for files that are read (all are `ValueError`s, so the CLI reports them in one line):
    CheckpointError(ValueError)       a file cannot be read safely, is not a SilaNet's, or does not match the model
      UnsafeFileError(CheckpointError)  a file asks for something a file may not choose (key, type or range)
Errors of writes are in `timm_sila.io.atomic` (`OutputError` and subclasses).
"""
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Type, Union

import timm

from timm_sila import _checks as checks
from timm_sila.config import SILA_CHECKS

__all__ = [
    'CheckpointError', 'UnsafeFileError', 'Bound', 'FILE_LIMITS', 'bound_violation', 'parse_file_json',
    'read_file_json', 'FILE_MODEL_KWARGS', 'sanitize_file_model_kwargs',
    'sanitize_file_data_config', 'check_file_model_name', 'check_file_architecture',
]


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
# A value within these bounds can still disagree with the file's own weights: `io.checkpoint.build_checked` compares
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
    numbers_ = [v for v in items if checks.is_real(v)]
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
    """Deepest nesting of [ and { in JSON text, strings skipped (linear in the text, whatever it holds; no recursion)."""
    depth = deepest = 0
    # a string's closing quote is optional: an unclosed one ends the text, so no quote is ever rescanned to the end
    for bracket in re.findall(r'[\[\]{}]', re.sub(r'"(?:[^"\\]|\\.)*"?', '""', text, flags=re.DOTALL)):
        depth = depth + 1 if bracket in '[{' else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def parse_file_json(text: Union[str, bytes], source: Any, parse_constant: Optional[Callable[[str], Any]] = None,
                    error: Type[ValueError] = CheckpointError, hint: str = '') -> Any:
    """JSON text read from file `source`, within FILE_LIMITS' 'json_bytes' and 'json_depth'.

    Bytes must be UTF-8. Raises `error` (a ValueError; default CheckpointError) naming `source`, followed by `hint`,
    for text over the bounds, undecodable or invalid JSON -- never RecursionError, however deep the nesting: the
    depth is counted before parsing. `parse_constant` is json.loads' (e.g. to refuse NaN / Infinity)."""
    size, depth_bound = FILE_LIMITS['json_bytes'], FILE_LIMITS['json_depth']
    hint = f' {hint}' if hint else ''
    if len(text) > size.hi:
        raise error(f'Cannot read {source}: it is larger than {int(size.hi):,} bytes ({size.why}).{hint}')
    if isinstance(text, bytes):
        try:
            text = text.decode('utf-8')
        except UnicodeDecodeError as e:
            raise error(f'Cannot read {source}: it is not UTF-8 text ({e.reason} at byte {e.start}).{hint}') from None
    depth = _json_depth(text)
    if depth > depth_bound.hi:
        raise error(f'Cannot read {source}: it nests {depth} levels deep, above the bound of {int(depth_bound.hi)} '
                    f'({depth_bound.why}).{hint}')
    try:
        return json.loads(text, parse_constant=parse_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, refused constants, integers too long to convert
        raise error(f'Cannot read {source}: it is not valid JSON ({" ".join(str(e).split())[:120]}).{hint}') from None


def read_file_json(path: Union[str, Path], what: str = 'the file', error: Type[ValueError] = CheckpointError,
                   hint: str = '') -> Any:
    """The JSON document in the regular file `path`, within `parse_file_json`'s bounds (a larger file is not read
    past the bound). The file is opened without blocking: a FIFO, socket or device is refused, not waited on.
    Raises `error` naming `what` and the file (see parse_file_json), IsADirectoryError for a folder, OSError from
    the system (missing, permission denied)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0))
    with os.fdopen(fd, 'rb') as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f'Cannot read {what} {path}: it is a folder; pass the file.')
        if not stat.S_ISREG(mode):
            raise error(f'Cannot read {what} {path}: it is not a regular file (a FIFO, socket or device); pass a '
                        f'file.')
        data = f.read(int(FILE_LIMITS['json_bytes'].hi) + 1)
    return parse_file_json(data, f'{what} {path}', error=error, hint=hint)


# --- the create_model arguments a file may set -------------------------------------------------------------
_COUNT = checks.spec(checks.integer(0), 'an integer >= 0')
_POSITIVE = checks.spec(checks.integer(1), 'an integer >= 1')
_SIZE = checks.spec(checks.either(checks.integer(1), checks.seq(checks.integer(1), 1, 3)),
                    'an integer >= 1 or a list of 1-3 of them')
_DIMS = checks.spec(checks.either(checks.integer(1), checks.seq(checks.integer(1))),
                    'an integer >= 1 or a list of them')
_PROB = checks.spec(checks.real(0.0, 1.0), 'a number in [0, 1]')
_SCALE = checks.spec(checks.real(0.0, lo_open=True), 'a finite number > 0')
_SCALES = checks.spec(checks.either(checks.real(0.0, lo_open=True), checks.seq(checks.real(0.0, lo_open=True))),
                'a finite number > 0 or a list of them')
_NUMBER = checks.spec(checks.real(), 'a finite number')
_FLAG = checks.spec(checks.flag, 'a bool')
_LAYER = checks.spec(checks.name, 'a short name (letters, digits, _ . -)')

FILE_MODEL_KWARGS: Dict[str, Callable[[Any], bool]] = dict(
    SILA_CHECKS,
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
                f'{source} sets the model argument {key!r}={checks.short(value)}, refused because {why}. Allowed keys: '
                f'timm_sila.io.trust.FILE_MODEL_KWARGS; if you trust the file, pass {key} yourself '
                f'(Python keyword / CLI --model-kwargs), which replaces the file\'s value.', key, str(source))
        if not check(value):
            raise UnsafeFileError(f'{source} sets the model argument {key}={checks.short(value)}, which must be '
                                  f'{checks.describe(check)}.', key, str(source))
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
        raise UnsafeFileError(f'{source} sets the {what} {key}={checks.short(value)}: {part_name}{problem}.{hint}', key,
                              str(source))


# --- data config ---------------------------------------------------------------------------------------------
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')  # timm's str_to_interp_mode
CROP_MODES = ('center', 'squash', 'border')

_DATA_CHECKS: Dict[str, Callable[[Any], bool]] = {
    'input_size': checks.spec(checks.seq(checks.integer(1), 3, 3),
                              'a list of 3 integers >= 1 (channels, height, width)'),
    'img_size': checks.spec(checks.either(checks.integer(1), checks.seq(checks.integer(1), 2, 2)),
                            'an integer >= 1 or a list of 2 of them'),
    'in_chans': _POSITIVE,
    'mean': checks.spec(checks.seq(checks.real(0.0, 1.0), 1, 4), 'a list of 1-4 numbers in [0, 1]'),
    'std': checks.spec(checks.seq(checks.real(0.0, 1.0, lo_open=True), 1, 4), 'a list of 1-4 numbers in (0, 1]'),
    'crop_pct': checks.spec(checks.real(0.0, lo_open=True), 'a finite number > 0'),  # range: FILE_LIMITS['crop_pct']
    'crop_mode': checks.spec(lambda v: v in CROP_MODES, f'one of {CROP_MODES}'),
    'interpolation': checks.spec(lambda v: v in INTERPOLATIONS, f'one of {INTERPOLATIONS}'),
}


def sanitize_file_data_config(config: Any, source: Any) -> Dict[str, Any]:
    """The data config keys of `config` (read from file `source`), range-checked.

    Only the data config keys (input_size, img_size, in_chans, mean, std, crop_pct, crop_mode, interpolation) are
    kept (other keys are not data config and are ignored); None and '' mean the model's
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
            raise UnsafeFileError(f'{source} gives the data config value {key}={checks.short(value)}, which must be '
                                  f'{checks.describe(check)}.', key, str(source))
        if key == 'input_size':
            _check_bound(key, value, source, 'data config value', value[0], 'in_chans', 'its channels: ')
            _check_bound(key, value, source, 'data config value', list(value[1:]), 'img_size', 'a side: ')
        else:
            _check_bound(key, value, source, 'data config value')
        out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return out


# --- model names ----------------------------------------------------------------------------------------------
def check_file_model_name(name: Any, source: Any, key: str = 'architecture') -> str:
    """A model name read from file `source` (under `key`): a plain timm model name, never a hub or local source,
    path or URL; UnsafeFileError naming the file otherwise. Whether timm knows the name is not checked here."""
    if not checks.name(name) or not name:
        raise UnsafeFileError(f'{source} names the model {checks.short(name)} under {key!r}, which is not a timm model '
                              f'name (a file may not name a hub or local source, a path or a URL); pass the model '
                              f'name yourself.', key, str(source))
    return name


def check_file_architecture(name: Any, source: Any) -> str:
    """A registered timm architecture named by file `source` (`check_file_model_name`; a pretrained tag is
    dropped: the weights come from the file); UnsafeFileError otherwise."""
    arch = check_file_model_name(name, source).split('.', 1)[0]
    if not timm.is_model(arch):
        raise UnsafeFileError(f'{source} names the architecture {arch!r}, which is not a registered timm model '
                              f'(see timm.list_models()).', 'architecture', str(source))
    return arch

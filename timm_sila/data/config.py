"""The one data-config resolver: how a model's inputs are prepared (input size, interpolation, mean, std, crop).

A checkpoint's training args (timm train.py's `--input-size`, `--mean`, ...) or a stripped folder's config.json give
the data config the model was trained with, range-checked by `timm_sila.io.trust.sanitize_file_data_config`; an
explicit `img_size` (CLI --img-size) replaces a stored input size. `data_args` merges the two into the args timm's
resolver takes; `resolve_data_config` resolves them against the model exactly as timm's train.py resolves its
validation transform (`timm.data.resolve_data_config(args, model=model)`, where an empty or None value means the
model's own), with the model's real input channels and, for a fixed-size model, the size it was built at.
"""
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import torch.nn as nn
from timm.data import resolve_data_config as timm_resolve_data_config
from timm.models import get_model_input_config

from timm_sila._checks import is_int
from timm_sila._timm_compat import built_by_timm

__all__ = ['data_args', 'model_channels', 'resolve_data_config']


def model_channels(model: nn.Module) -> Optional[int]:
    """The input channels the model takes (`model.in_chans`; timm's pretrained cfg says 3 even for a model built with
    in_chans=1), or None when the model does not say."""
    channels = getattr(model, 'in_chans', None)
    return channels if is_int(channels) and channels > 0 else None


def data_args(file_args: Optional[Dict[str, Any]] = None, img_size: Union[int, Tuple[int, int], None] = None,
              channels: Optional[int] = None) -> Dict[str, Any]:
    """The data-config args of a file (checked values; None / '' = the model's default) with `img_size` (a side,
    or (H, W)) replacing a stored input size. An image size, stored or given, becomes `input_size` (channels, H, W), channels from the
    args' in_chans, else `channels`, else 3 (timm's resolver reads only a square int img_size)."""
    args = dict(file_args or {})
    if img_size is not None:
        args.pop('input_size', None)
        args['img_size'] = int(img_size) if is_int(img_size) else tuple(int(s) for s in img_size)
    size = args.pop('img_size', None)
    if size is not None and args.get('input_size') is None:
        chans = args.get('in_chans') or channels or 3
        args['input_size'] = (chans, size, size) if is_int(size) else (chans, *size)
    return args


def resolve_data_config(model: nn.Module, file_args: Optional[Dict[str, Any]] = None,
                        img_size: Optional[int] = None) -> Dict[str, Any]:
    """timm's data config for `model` (input_size, interpolation, mean, std, crop_pct, crop_mode) from a file's
    data args and `img_size` (see `data_args`).

    Without a stored or given size, a fixed-size model (timm's `fixed_input_size`, e.g. a ViT) gets the size it was
    built at (timm's pretrained cfg would give its default). Channels are the model's: a stored input size of another
    channel count is a ValueError; mean / std of another length are averaged to one value per channel with a
    warning, as timm's train.py loader does (`adapt_to_chs`)."""
    channels = model_channels(model)
    args = data_args(file_args, img_size, channels)
    if args.get('input_size') is None and built_by_timm(model):
        built = get_model_input_config(model)
        if built['fixed_input_size']:
            args['input_size'] = tuple(built['input_size'])
    stored = (args.get('input_size') or (None,))[0] or args.get('in_chans')
    if channels is not None and stored is not None and stored != channels:
        raise ValueError(f'the data config gives {stored}-channel input (input_size / in_chans) but the model takes '
                         f'{channels} input channels; the file does not describe this model.')
    if channels is not None and stored is None:
        args['in_chans'] = channels
    try:
        cfg = timm_resolve_data_config(args, model=model)
    except AssertionError:  # timm asserts that mean / std have one value or one per input channel
        raise ValueError(f'the data config {args} is inconsistent: mean and std need one value or one per input '
                         f'channel.') from None
    if channels is not None and cfg['input_size'][0] != channels:  # the size came from the model's pretrained cfg
        cfg['input_size'] = (channels, *cfg['input_size'][1:])
    chans = cfg['input_size'][0]
    for key in ('mean', 'std'):
        values = tuple(cfg[key])
        if len(values) != chans:
            cfg[key] = (sum(values) / len(values),) * chans
            warnings.warn(f'the model takes {chans} input channel{"s" if chans > 1 else ""} but its {key} has '
                          f'{len(values)} values: using their average {cfg[key][0]:.4g} for each, as timm\'s '
                          f'train.py does.', UserWarning, stacklevel=2)
    return cfg

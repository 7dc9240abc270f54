"""README.md model card, in the Hugging Face hub's format, for a folder written by `timm_sila.strip`: a pure text
renderer (`render_model_card`: facts in, markdown out, no file read or written; `strip` and `write_model_card` in
`timm_sila.ship.strip` gather the facts and write the file).

The card is YAML front matter (`library_name: timm`, `pipeline_tag`, tags incl. `sila`; the license is left for
the user, as a comment) and a body stating what the file is: base architecture, branch kept and its tap, params /
MB / CR, input size and normalisation, how to load it (plain timm for branch 0; `import timm_sila` first for
k >= 1) and, given a `timm-sila eval --json` result, the metrics of the branch. With the card the folder is what
`huggingface_hub.upload_folder` or timm's `push_to_hf_hub` publishes; timm reads only config.json and the weights.
"""
import json
import re
from typing import Any, Dict, Optional

import torch.nn as nn

from timm_sila.measure.metrics import check_params
from timm_sila.measure.sizes import branch_sizes
from timm_sila.model import SilaNet

__all__ = ['render_model_card', 'CARD_NAME']

CARD_NAME = 'README.md'
_REPO_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$')
_PLAIN = re.compile(r'^[A-Za-z0-9_.:/ -]{1,64}$')  # text from a metrics file shown in the card: short, no markup


def _metrics_row(checked: Dict[str, Any], branch: int, params: int) -> Dict[str, Any]:
    """The eval row of `branch` (top1..top5, loss) plus split / num_samples of a `read_eval_metrics` result, its
    params compared with the model's."""
    row = checked['branches'].get(branch)
    if row is None:
        raise ValueError(f'{checked["source"]} holds no row for branch {branch}; evaluate this branch (or the full '
                         f'SilaNet) with `timm-sila eval --json`.')
    check_params(checked, branch, params, 'this folder')
    out = {k: v for k, v in row.items() if k != 'params'}
    split = checked['split']
    out['num_samples'] = checked['num_samples']
    out['split'] = split if split is not None and _PLAIN.match(split) else None
    return out


def _floats(values) -> str:
    return '(' + ', '.join(f'{float(v):.4g}' for v in values) + ')'


def render_model_card(
        model: nn.Module,
        data_config: Dict[str, Any],
        name: str,
        metrics: Optional[Dict[str, Any]] = None,
        *,
        repo_id: Optional[str] = None,
        dataset: Optional[str] = None,
) -> str:
    """The README.md text for a strip folder holding `model` (a plain timm model = branch 0, or a stripped SilaNet).

    `data_config`: the folder's data config as its config.json states it (input_size, mean, std, interpolation,
    crop_pct, crop_mode). `name`: the folder name in the card's `local-dir:` line. `metrics`: a checked
    `read_eval_metrics` result holding this branch (its params must be the model's). `repo_id` ('user/name'): adds
    the hub loading line. `dataset`: the name of the evaluation data set, shown with the metrics. ValueError for a
    malformed repo_id / dataset, or metrics of another branch or model."""
    if repo_id is not None and not _REPO_ID.match(repo_id):
        raise ValueError(f'repo_id must look like "user/name", got {repo_id!r}.')
    if dataset is not None and not _PLAIN.match(dataset):
        raise ValueError(f'dataset must be a short name (letters, digits, _ . : / - and spaces), got {dataset!r}.')
    cfg = dict(model.pretrained_cfg or {}, **data_config)
    size = branch_sizes(model)[0]
    sila = isinstance(model, SilaNet)
    branch = model.branch if sila else 0
    arch = model.arch if sila else cfg.get('architecture') or type(model).__name__
    num_classes = model.num_classes
    row = _metrics_row(metrics, branch, size['params']) if metrics is not None else None

    tags = ['image-classification', 'timm', 'sila', f'sila-branch-{branch}']
    front = ['---', 'library_name: timm', 'pipeline_tag: image-classification', 'tags:']
    front += [f'- {json.dumps(t)}' for t in tags]
    front += ['# license: set the license of these weights here (e.g. apache-2.0) before publishing', '---', '']

    if sila:
        tap = model.taps[branch - 1]
        title = f'{arch} · SilaNet branch {branch} ({tap})'
        what = (f'Branch {branch} of a SilaNet (Siamese Labels Auxiliary Network, Gan et al.) trained with '
                f'timm-sila on `{arch}`: the `{arch}` backbone up to '
                f'`{tap}`, followed by auxiliary head {branch} ({model.head_type}: 3×3 conv → global average '
                f'pooling → {num_classes} logits). No layer after the tap is stored: this is the compressed model '
                f'of the paper\'s Sec 2.3.')
        kept = f'{branch} of {model.sets} (tap `{tap}`, head `{model.head_type}`)'
        cr = (f'CR = {100 * size["cr"]:.2f} % (1 − params / params of `{arch}`)' if size['cr'] is not None
              else 'unknown (the base architecture cannot be sized)')
    else:
        title = f'{arch} · SilaNet branch 0'
        what = (f'Branch 0 of a SilaNet (Siamese Labels Auxiliary Network, Gan et al.) trained with '
                f'timm-sila: the unchanged `{arch}` architecture, its '
                f'auxiliary heads removed. SilaNet training changed only the weights; it loads with timm alone.')
        kept = '0 (the base model: classifier output)'
        cr = '0 % (the full base model)'
    chans, *hw = cfg.get('input_size', (3, 224, 224))
    body = [f'# {title}', '', what, '', '## Model details', '', '| | |', '|---|---|',
            f'| Base architecture | `{arch}` |', f'| Branch kept | {kept} |', f'| Classes | {num_classes} |',
            f'| Parameters | {size["params"]:,} ({size["size_mb"]:.2f} MB as fp32; MB = 2^20 bytes) |',
            f'| Compression | {cr} |', f'| Input size | {chans} × {" × ".join(map(str, hw))} |',
            f'| Normalisation | mean {_floats(cfg.get("mean", ()))}, std {_floats(cfg.get("std", ()))} |']
    if cfg.get('interpolation') or cfg.get('crop_pct'):
        body.append(f'| Eval resize | {cfg.get("interpolation", "-")}, crop_pct {cfg.get("crop_pct", "-")}, '
                    f'{cfg.get("crop_mode", "center")} crop |')
    if sila:
        body.append(f'| SilaNet training | {model.sets} sets, β = {model.beta:g}, λ (decay) = {model.decay:g} |')

    local = f'local-dir:{name}'
    load = ['## How to load', '', '```python', 'import timm']
    if sila:
        load.append('import timm_sila  # pip install timm-sila: registers the sila_* architecture of this branch')
    load.append(f'model = timm.create_model("{local}", pretrained=True).eval()  # from the folder\'s parent')
    if repo_id:
        load.append(f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()  # from the hub')
    load += ['data_config = timm.data.resolve_data_config(model=model)',
             'transform = timm.data.create_transform(**data_config, is_training=False)',
             'logits = model(transform(pil_image).unsqueeze(0))  # (1, num_classes)', '```', '']
    if not sila:
        load += ['No `timm_sila` is needed: `config.json` names the plain timm architecture.', '']

    out = front + body + [''] + load
    if row is not None:
        where = ' '.join(p for p in (f'`{dataset}`' if dataset else None,
                                     f'split `{row["split"]}`' if row['split'] else None,
                                     f'({row["num_samples"]:,} images)' if row['num_samples'] else None) if p)
        ks = [k for k in ('top1', 'top2', 'top3', 'top4', 'top5') if k in row]
        out += ['## Metrics', '', f'Measured with `timm-sila eval`{" on " + where if where else ""}:', '',
                '| ' + ' | '.join([k.replace('top', 'top-') + ' (%)' for k in ks] + (['loss'] if 'loss' in row
                                                                                     else [])) + ' |',
                '|' + '---|' * (len(ks) + ('loss' in row)),
                '| ' + ' | '.join([f'{row[k]:.2f}' for k in ks] + ([f'{row["loss"]:.4f}'] if 'loss' in row
                                                                  else [])) + ' |', '']
    return '\n'.join(out)

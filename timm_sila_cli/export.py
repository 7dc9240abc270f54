"""`timm-sila export`: one branch as ONNX (checked with onnxruntime) or torch.export .pt2, verified before it lands."""
import argparse
from typing import Any, Dict, Sequence

from timm_sila.ship.export import export

from ._common import checkpoint_options, print_json


_EXPORTER_NAMES = {'dynamo': "torch.onnx's dynamo exporter", 'torchscript': "torch.onnx's TorchScript exporter",
                   'torch.export': 'torch.export'}


def format_export(report: Dict[str, Any]) -> str:
    """Two lines for the CLI: what was written (by which exporter, and why) and its verification."""
    fmt = report['format'] + (f' (opset {report["opset"]})' if report['opset'] else '')
    by = _EXPORTER_NAMES.get(report.get('exporter'), report.get('exporter'))
    if report.get('exporter_reason'):
        by += f' ({report["exporter_reason"]})'
    axes = report.get('dynamic_axes', ['batch'])
    dynamic = 'batch dimension dynamic' if axes == ['batch'] else f'{", ".join(axes[:-1])} and {axes[-1]} dynamic'
    sizes = ' and '.join('x'.join(map(str, s)) for s in report.get('input_sizes', [report['input_size'][1:]]))
    return (f'wrote {report["out"]} ({report["bytes"]:,} bytes): {report["architecture"]} branch '
            f'{report["branch"]} as {fmt} by {by}, input (batch, {", ".join(map(str, report["input_size"]))}), '
            f'{dynamic}\nverified with {report["runtime"]} on batches of {report["batch_sizes"]} at {sizes}: max '
            f'|delta| = {report["max_abs_diff"]:.2e} <= tolerance {report["tolerance"]:.2e}; feed images normalised '
            f'with mean={_fmt_floats(report["mean"])} std={_fmt_floats(report["std"])}')


def _fmt_floats(values: Sequence[float]) -> str:
    return '(' + ', '.join(f'{v:.4g}' for v in values) + ')'


def run(args: argparse.Namespace) -> int:
    """Writes the verified file; prints what was written (or the JSON report)."""
    report = export(args.source, args.branch, args.format, args.out, img_size=args.img_size,
                    batch_size=args.batch_size, atol=args.atol, opset=args.opset, overwrite=args.force,
                    dynamic_size=args.dynamic_size, exporter=args.exporter, **checkpoint_options(args))
    if args.json:
        print_json(report)
    else:
        print(format_export(report))
    return 0

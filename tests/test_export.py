"""export(): one branch to ONNX (checked with onnxruntime) or torch.export .pt2, verified before it lands."""
import os
import sys

import pytest
import torch
import torch.nn as nn

import timm

from conftest import branch_logits, randomize_bn
from timm_sila import strip
from timm_sila.export import (
    DEFAULT_RTOL, ExportParityError, MissingExtraError, export, export_check, format_export)

onnx = pytest.importorskip('onnx', reason='ONNX export tests need pip install "timm-sila[export]"')
ort = pytest.importorskip('onnxruntime', reason='ONNX export tests need pip install "timm-sila[export]"')

# fp32 rounding only: relative to max(1, |logit|), ONNX Runtime differs from PyTorch by <= 1.2e-6 on these models
MEASURED_BOUND = 1e-5


def ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def rel_diff(got, want):
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


@pytest.fixture(scope='module')
def sila_r18(tmp_path_factory):
    """A sila_resnet18 with trained-like BN, its state_dict file, and a batch of 3 (neither export batch size)."""
    torch.manual_seed(0)
    net = randomize_bn(timm.create_model('sila_resnet18', num_classes=10), seed=1).eval()
    ckpt = tmp_path_factory.mktemp('ckpt') / 'sila_r18.pth'
    torch.save(net.state_dict(), ckpt)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return net, ckpt, x


def test_onnx_branch0_from_strip_folder(sila_r18, tmp_path):
    net, _, x = sila_r18
    folder = strip(net, branch=0, out_dir=tmp_path / 'b0', img_size=32)
    out = tmp_path / 'b0.onnx'
    report = export(folder, format='onnx', out=out)  # branch and input size come from the folder
    assert report['branch'] == 0 and report['architecture'] == 'resnet18'
    assert report['input_size'] == [3, 32, 32] and report['opset'] == 18
    assert report['batch_sizes'] == [1, 2] and report['max_abs_diff'] <= report['tolerance']
    assert report['bytes'] == out.stat().st_size
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version == 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    # the file at a third batch size equals the SilaNet's branch 0 (= plain timm resnet18)
    assert rel_diff(ort_run(out, x), branch_logits(net, x, 0)) < MEASURED_BOUND
    assert 'verified with onnxruntime' in format_export(report)
    assert sorted(os.listdir(tmp_path)) == ['b0', 'b0.onnx']


@pytest.mark.slow
def test_onnx_branch1_from_checkpoint(sila_r18, tmp_path):
    net, ckpt, x = sila_r18
    out = tmp_path / 'b1.onnx'
    report = export(ckpt, 1, 'onnx', out, img_size=32, model='sila_resnet18')
    assert report['branch'] == 1 and report['architecture'] == 'sila_resnet18'
    assert report['max_abs_diff'] <= DEFAULT_RTOL * max(1.0, report['max_abs_logit'])
    assert rel_diff(ort_run(out, x), branch_logits(net, x, 1)) < MEASURED_BOUND
    # the head's fast form (a custom autograd.Function) is in the graph as plain ONNX ops
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert 'Gemm' in ops or 'MatMul' in ops
    # ...built from reductions and stacks: no indexed writes, which onnxruntime runs 4x slower than the backbone
    assert not ops & {'ScatterElements', 'ScatterND'}, ops


def test_pt2_round_trip_branch1(sila_r18, tmp_path):
    net, _, x = sila_r18
    out = tmp_path / 'b1.pt2'
    report = export(net, 1, 'pt2', out, img_size=32)
    assert report['format'] == 'pt2' and report['opset'] is None and report['runtime'].startswith('torch ')
    reloaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        got = reloaded(x)
    assert rel_diff(got, branch_logits(net, x, 1)) < MEASURED_BOUND


@pytest.mark.slow
def test_onnx_convnext_branch1(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model('sila_convnext_atto', num_classes=10).eval()
    out = tmp_path / 'convnext_b1.onnx'
    report = export(net, 1, 'onnx', out, img_size=32)
    assert report['max_abs_diff'] <= report['tolerance']
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert rel_diff(ort_run(out, x), branch_logits(net, x, 1)) < MEASURED_BOUND


class TracedDifferently(nn.Module):
    """A model whose traced graph is not its eager behaviour (as with Python-side state read at trace time)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        y = self.fc(x.mean((2, 3)))
        return y + 0.5 if torch.compiler.is_exporting() else y


@pytest.mark.parametrize('fmt', ['onnx', 'pt2'])
def test_parity_failure_leaves_nothing(tmp_path, fmt):
    out = tmp_path / f'model.{fmt}'
    with pytest.raises(ExportParityError, match=r'max \|delta\| = 0\.5 .*nothing was written'):
        export(TracedDifferently(), 0, fmt, out, img_size=8)
    assert os.listdir(tmp_path) == []
    out.write_bytes(b'previous')  # an existing file survives a failed overwrite
    with pytest.raises(ExportParityError):
        export(TracedDifferently(), 0, fmt, out, img_size=8, overwrite=True)
    assert os.listdir(tmp_path) == [out.name] and out.read_bytes() == b'previous'
    # the same model passes under a tolerance that admits the difference
    report = export(TracedDifferently(), 0, fmt, out, img_size=8, overwrite=True, atol=0.6)
    assert abs(report['max_abs_diff'] - 0.5) < 1e-6 and out.read_bytes() != b'previous'


def test_missing_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(MissingExtraError, match=r'onnxruntime.*pip install "timm-sila\[export\]"') as e:
        export(TracedDifferently(), 0, 'onnx', tmp_path / 'm.onnx', img_size=8)
    assert isinstance(e.value, ImportError) and isinstance(e.value, ValueError)  # the CLI reports it in one line
    assert os.listdir(tmp_path) == []


def test_bad_requests_fail_before_exporting(sila_r18, tmp_path):
    net, ckpt, _ = sila_r18
    with pytest.raises(ValueError, match='pass the branch'):
        export(ckpt, None, 'pt2', tmp_path / 'm.pt2', model='sila_resnet18')
    with pytest.raises(ValueError, match=r'branch .* out of range'):
        export(net, 3, 'pt2', tmp_path / 'm.pt2')
    with pytest.raises(ValueError, match='holds branch 0 only'):
        export(TracedDifferently(), 1, 'pt2', tmp_path / 'm.pt2')
    with pytest.raises(ValueError, match='format must be one of'):
        export(net, 0, 'tflite', tmp_path / 'm.tflite')
    with pytest.raises(ValueError, match='batch_size must be an integer >= 2'):
        export(net, 0, 'pt2', tmp_path / 'm.pt2', batch_size=1)
    with pytest.raises(ValueError, match='is an input of the export'):
        export(ckpt, 0, 'pt2', ckpt, overwrite=True, model='sila_resnet18')
    (tmp_path / 'taken.pt2').write_bytes(b'x')
    with pytest.raises(FileExistsError, match='overwrite=True'):
        export(net, 0, 'pt2', tmp_path / 'taken.pt2')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        export(net, 0, 'pt2', tmp_path / 'no' / 'm.pt2')
    with pytest.raises(ValueError, match='does not run on an input of shape'):
        export(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), 0, 'pt2', tmp_path / 'm.pt2', img_size=16)
    assert sorted(os.listdir(tmp_path)) == ['taken.pt2']


@pytest.mark.slow
def test_cli_handler_json_is_the_only_stdout(tmp_path, capsys):
    import argparse
    import json
    from timm_sila.export import run_export
    torch.manual_seed(0)
    folder = strip(timm.create_model('sila_test_resnet', num_classes=10), 1, tmp_path / 'small', img_size=32)
    args = argparse.Namespace(source=str(folder), branch=None, format='onnx', out=str(tmp_path / 'small.onnx'),
                              img_size=None, batch_size=2, atol=None, opset=18, force=False, json=True, model=None,
                              num_classes=None, sets=None, taps=None, head=None, ema=False, model_kwargs={})
    assert run_export(args) == 0
    report = json.loads(capsys.readouterr().out)  # torch.onnx's progress lines went to stderr
    assert report['branch'] == 1 and report['max_abs_diff'] <= report['tolerance']
    with pytest.raises(ValueError, match='--model: only for a checkpoint file'):
        run_export(argparse.Namespace(**dict(vars(args), model='sila_resnet18', force=True)))


def test_export_check_reports_success_and_reason():
    ok, reason = export_check('test_vit', 32, 1, format='pt2')
    assert ok and reason.startswith('max |delta|')
    ok, reason = export_check('resnet18', 32, 5, format='pt2')
    assert not ok and 'ValueError' in reason and 'branch' in reason


class DataDependent(TracedDifferently):
    """Control flow on tensor values: torch.export cannot trace it."""

    def forward(self, x):
        y = self.fc(x.mean((2, 3)))
        return y if y.sum() > 0 else -y


def test_torch_failure_is_one_line_naming_the_root_cause(tmp_path):
    from timm_sila.export import ExportError, _torch_failure
    try:
        try:
            raise ValueError('Cannot view a tensor with shape (s0, 3)\nWhile executing %view ...')
        except ValueError as inner:
            raise RuntimeError('Failed to decompose. \x1b[96mThis is step 2/3\x1b[0m of exporting. Next steps:\n'
                               '- Create an issue') from inner
    except RuntimeError as e:
        assert _torch_failure(e) == ('RuntimeError: Failed to decompose. '
                                     'Cause: ValueError: Cannot view a tensor with shape (s0, 3)')
    try:  # an exception met while handling another (implicit context) is not named as the cause
        try:
            raise ImportError('optional dependency missing')
        except ImportError:
            raise RuntimeError('Unsupported op')
    except RuntimeError as e:
        assert _torch_failure(e) == 'RuntimeError: Unsupported op'
    assert _torch_failure(AssertionError()) == 'AssertionError'
    with pytest.raises(ExportError) as e:
        export(DataDependent(), 0, 'pt2', tmp_path / 'm.pt2', img_size=8)
    message = str(e.value)
    assert message.startswith('torch.export cannot trace DataDependent branch 0: ')
    assert '\n' not in message and '\x1b' not in message
    assert os.listdir(tmp_path) == []

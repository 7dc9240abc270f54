"""export(): one branch to ONNX (checked with onnxruntime) or torch.export .pt2, verified before it lands."""
import os
import sys

import pytest
import torch
import torch.nn as nn

import timm

from conftest import branch_logits, build_sila, randomize_bn
from timm_sila import SourceInOutputError, strip
from timm_sila.ship.export import (DEFAULT_RTOL, ExportError, ExportParityError, MissingExtraError, export,
    fixed_size_reason)
from timm_sila_cli.export import format_export
from timm_sila_cli import main as cli_main

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
    net = randomize_bn(build_sila('resnet18')[0], seed=1).eval()
    ckpt = tmp_path_factory.mktemp('ckpt') / 'sila_r18.pth'
    torch.save(net.state_dict(), ckpt)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return net, ckpt, x


@pytest.mark.slow
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


@pytest.mark.parametrize('fmt,exporter', [('onnx', 'dynamo'), ('pt2', 'auto')])
def test_parity_failure_leaves_nothing(tmp_path, fmt, exporter):
    out = tmp_path / f'model.{fmt}'
    with pytest.raises(ExportParityError, match=r'max \|delta\| = 0\.5 .*nothing was written'):
        export(TracedDifferently(), 0, fmt, out, img_size=8, exporter=exporter)
    assert os.listdir(tmp_path) == []
    out.write_bytes(b'previous')  # an existing file survives a failed overwrite
    with pytest.raises(ExportParityError):
        export(TracedDifferently(), 0, fmt, out, img_size=8, overwrite=True, exporter=exporter)
    assert os.listdir(tmp_path) == [out.name] and out.read_bytes() == b'previous'
    # the same model passes under a tolerance that admits the difference
    report = export(TracedDifferently(), 0, fmt, out, img_size=8, overwrite=True, atol=0.6, exporter=exporter)
    assert abs(report['max_abs_diff'] - 0.5) < 1e-6 and out.read_bytes() != b'previous'


class TracedDifferentlyByBoth(TracedDifferently):
    """Traced wrongly by torch.export and by torch.jit.trace alike."""

    def forward(self, x):
        y = self.fc(x.mean((2, 3)))
        return y + 0.5 if torch.compiler.is_exporting() or torch.jit.is_tracing() else y


def test_auto_falls_back_to_torchscript_when_dynamo_fails_parity(tmp_path):
    out = tmp_path / 'model.onnx'
    report = export(TracedDifferently(), 0, 'onnx', out, img_size=8)  # exporter='auto'
    assert report['exporter'] == 'torchscript' and report['max_abs_diff'] < 1e-6
    assert report['exporter_reason'].startswith('dynamo failed: max |delta| 0.5 > tolerance')
    assert "by torch.onnx's TorchScript exporter (dynamo failed: max |delta| 0.5" in format_export(report)
    # when both exporters fail: one line naming each one's cause, and nothing written
    with pytest.raises(ExportParityError) as e:
        export(TracedDifferentlyByBoth(), 0, 'onnx', tmp_path / 'both.onnx', img_size=8)
    assert str(e.value).startswith('Neither ONNX exporter can export TracedDifferentlyByBoth branch 0: dynamo: max '
                                   '|delta| 0.5 > tolerance') and '; torchscript: max |delta| 0.5' in str(e.value)
    assert '\n' not in str(e.value) and sorted(os.listdir(tmp_path)) == ['model.onnx']


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
    with pytest.raises(SourceInOutputError, match=r'is the input.*sila_r18\.pth'):  # as every writer says it
        export(ckpt, 0, 'pt2', ckpt, overwrite=True, model='sila_resnet18')
    (tmp_path / 'taken.pt2').write_bytes(b'x')
    with pytest.raises(FileExistsError, match='overwrite=True'):
        export(net, 0, 'pt2', tmp_path / 'taken.pt2')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        export(net, 0, 'pt2', tmp_path / 'no' / 'm.pt2')
    with pytest.raises(ValueError, match='does not run on an input of shape'):
        export(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), 0, 'pt2', tmp_path / 'm.pt2', img_size=16)
    with pytest.raises(ValueError, match='exporter must be one of'):
        export(net, 0, 'onnx', tmp_path / 'm.onnx', exporter='tensorrt')
    with pytest.raises(ValueError, match='writes ONNX only'):
        export(net, 0, 'pt2', tmp_path / 'm.pt2', exporter='torchscript')
    with pytest.raises(ValueError, match='dynamic_size must be True or False'):
        export(net, 0, 'pt2', tmp_path / 'm.pt2', dynamic_size='yes')
    # a model that takes no other input size: refused before anything is exported
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ValueError, match=r'does not run on an input of shape \(2, 3, 40, 72\).*cannot be exported '
                                         r'with a dynamic input size \(checked at 8x8 and 40x72\)'):
        export(flat, 0, 'pt2', tmp_path / 'm.pt2', img_size=8, dynamic_size=True)
    assert sorted(os.listdir(tmp_path)) == ['taken.pt2']


def test_cli_handler_json_is_the_only_stdout(tmp_path, capsys):
    import argparse
    import json
    from timm_sila_cli.export import run as run_export
    folder = strip(build_sila('test_resnet')[0], 1, tmp_path / 'small', img_size=32)
    args = argparse.Namespace(source=str(folder), branch=None, format='onnx', out=str(tmp_path / 'small.onnx'),
                              img_size=None, batch_size=2, atol=None, opset=18, force=False, json=True, model=None,
                              dynamic_size=False, exporter='auto',
                              num_classes=None, sets=None, taps=None, head=None, ema=False, model_kwargs={})
    assert run_export(args) == 0
    report = json.loads(capsys.readouterr().out)  # torch.onnx's progress lines went to stderr
    assert report['branch'] == 1 and report['max_abs_diff'] <= report['tolerance']
    with pytest.raises(ValueError, match='--model: only for a checkpoint file'):
        run_export(argparse.Namespace(**dict(vars(args), model='sila_resnet18', force=True)))


def test_stripped_branch_of_a_vit_exports_and_a_missing_branch_is_refused(tmp_path):
    """A stripped ViT branch (random weights, 32 px) exports within tolerance; a branch the model does not have is
    one ValueError naming the branch, and nothing is written."""
    vit = timm.create_model('sila_test_vit', img_size=32, num_classes=10, sila_branch=1, sila_stripped=True)
    report = export(vit.eval(), 1, 'pt2', tmp_path / 'vit.pt2', img_size=32)
    assert report['max_abs_diff'] <= report['tolerance']
    net = timm.create_model('sila_resnet18', num_classes=10).eval()
    with pytest.raises(ValueError, match='branch'):
        export(net, 5, 'pt2', tmp_path / 'r18.pt2', img_size=32)
    assert not (tmp_path / 'r18.pt2').exists()


class DataDependent(TracedDifferently):
    """Control flow on tensor values: torch.export cannot trace it."""

    def forward(self, x):
        y = self.fc(x.mean((2, 3)))
        return y if y.sum() > 0 else -y


def test_torch_failure_is_one_line_naming_the_root_cause(tmp_path):
    from timm_sila.ship.export import _torch_failure
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


# --- dynamic input size -----------------------------------------------------------------------------------------
@pytest.mark.parametrize('exporter', [pytest.param('dynamo', marks=pytest.mark.slow), 'torchscript'])
def test_dynamic_size_cnn_branch_runs_at_other_sizes(tmp_path, exporter):
    net = randomize_bn(build_sila('test_resnet')[0], seed=2).eval()
    out = tmp_path / 'b1.onnx'
    report = export(net, 1, 'onnx', out, img_size=32, dynamic_size=True, exporter=exporter)
    assert report['exporter'] == exporter and report['dynamic_axes'] == ['batch', 'height', 'width']
    assert report['input_size'] == [3, 32, 32]  # img_size keeps its meaning: the example (and default) size
    assert report['input_sizes'] == [[32, 32], [64, 96]] and report['batch_sizes'] == [1, 2]
    assert sorted(report['max_abs_diff_per_input']) == ['1x3x32x32', '1x3x64x96', '2x3x32x32', '2x3x64x96']
    assert report['max_abs_diff'] <= report['tolerance']
    assert 'batch, height and width dynamic' in format_export(report) and 'at 32x32 and 64x96' in format_export(report)
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # batch, 3, height, width
    g = torch.Generator().manual_seed(7)
    for shape in [(3, 3, 48, 40), (1, 3, 80, 80)]:  # neither checked size, nor batch size, nor square
        x = torch.randn(*shape, generator=g)
        assert rel_diff(ort_run(out, x), branch_logits(net, x, 1)) < MEASURED_BOUND


def test_dynamic_size_refused_for_a_fixed_size_model(tmp_path):
    fixed = timm.create_model('test_vit', img_size=32, dynamic_img_size=False, num_classes=10)
    with pytest.raises(ValueError) as e:
        export(fixed, 0, 'onnx', tmp_path / 'vit.onnx', img_size=32, dynamic_size=True)
    assert str(e.value) == ('test_vit has a fixed input size (its position embedding is 2x2); build it with '
                            'dynamic_img_size=True (CLI --model-kwargs dynamic_img_size=True), or drop '
                            'dynamic_size=True (CLI --dynamic-size) to export it at one size.')
    assert os.listdir(tmp_path) == []
    # timm's traits: the same ViT built with dynamic_img_size=True, and a CNN, take any size
    assert fixed_size_reason(timm.create_model('test_vit', img_size=32, dynamic_img_size=True), 'test_vit') is None
    assert fixed_size_reason(timm.create_model('sila_test_resnet', num_classes=10), 'sila_test_resnet') is None
    # a fixed-size model without dynamic_img_size is told to export at one size
    assert 'drop dynamic_size=True (CLI --dynamic-size) to export it at one size, the one you deploy' in \
        fixed_size_reason(timm.create_model('test_vit_relpos', img_size=32), 'test_vit_relpos')


# --- exporter fallback ------------------------------------------------------------------------------------------
class RmsNormed(nn.Module):
    """torch's RMSNorm (aten::rms_norm) with and without a weight and eps, over one and two dimensions."""

    def __init__(self):
        super().__init__()
        self.norm_hw = nn.RMSNorm([8, 8], eps=None, elementwise_affine=False)
        self.norm_c = nn.RMSNorm(3, eps=1e-3)
        self.fc = nn.Linear(3, 4)
        with torch.no_grad():
            self.norm_c.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.fc(self.norm_c(self.norm_hw(x * 3).mean((2, 3))))


def test_torchscript_exporter_converts_rms_norm(tmp_path):
    from torch.onnx._internal.torchscript_exporter.registration import registry
    torch.manual_seed(0)
    model = RmsNormed().eval()
    report = export(model, 0, 'onnx', tmp_path / 'rms.onnx', img_size=8, exporter='torchscript')
    assert report['max_abs_diff'] <= report['tolerance']
    ops = {n.op_type for n in onnx.load(str(tmp_path / 'rms.onnx')).graph.node}
    assert {'ReduceMean', 'Sqrt'} <= ops
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(ort_run(tmp_path / 'rms.onnx', x), model(x)) < MEASURED_BOUND
    assert not registry.is_registered_op('aten::rms_norm', 18)  # registered for that export only


@pytest.fixture(scope='module')
def relpos_folder(tmp_path_factory):
    """Branch 1 of a sila_test_vit_relpos (32x32) as a strip folder: a family the dynamo exporter cannot convert
    (torch.onnx's decomposition cannot view its relative-position attention), and the SilaNet it came from."""
    torch.manual_seed(0)
    net = timm.create_model('sila_test_vit_relpos', num_classes=10, img_size=32).eval()
    return strip(net, 1, tmp_path_factory.mktemp('relpos') / 'b1'), net


@pytest.mark.slow
def test_dynamo_failure_falls_back_to_torchscript(relpos_folder, tmp_path, capfd):
    import json
    folder, net = relpos_folder
    out = tmp_path / 'relpos.onnx'
    assert cli_main(['export', str(folder), '--out', str(out), '--json']) == 0
    captured = capfd.readouterr()
    report = json.loads(captured.out)  # stdout holds the report alone: torch's warnings and progress are not on it
    assert report['exporter'] == 'torchscript' and report['max_abs_diff'] <= report['tolerance']
    assert report['exporter_reason'].startswith('dynamo failed: torch.onnx: ValueError: Cannot view a tensor')
    assert "TorchScript exporter (dynamo failed: torch.onnx: ValueError: Cannot view" in format_export(report)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert rel_diff(ort_run(out, x), branch_logits(net, x, 1)) < MEASURED_BOUND


@pytest.mark.slow
def test_exporter_dynamo_names_the_root_cause_in_one_line(relpos_folder, tmp_path, capfd):
    folder, _ = relpos_folder
    out = tmp_path / 'relpos.onnx'
    assert cli_main(['export', str(folder), '--out', str(out), '--exporter', 'dynamo']) == 2
    captured = capfd.readouterr()
    assert captured.out == '' and captured.err.count('\n') == 1
    assert captured.err.startswith('timm-sila export: error: torch.onnx cannot convert sila_test_vit_relpos branch 1 '
                                   'to ONNX opset 18: ')
    assert 'Cause: ValueError: Cannot view a tensor with shape' in captured.err
    assert not out.exists()

"""benchmarks/coverage.py, the coverage sweep: its report and records, its family and selection rules, and a fast
slice of the sweep itself (same checks, same code, families outside conftest's).

In the slice, each architecture gets every sweep check: train forward/backward to every head, eval branch 0 bitwise
equal to vanilla timm, strip branch 0 reloaded bitwise equal by a fresh process without timm_sila (one process for
all), strip branch 1 reloaded bitwise equal and smaller than the base. The full sweep: `python benchmarks/coverage.py`.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import timm

from conftest import REPRESENTATIVE

REPO = Path(__file__).resolve().parents[1]
_PATH = REPO / 'benchmarks' / 'coverage.py'
_spec = importlib.util.spec_from_file_location('sila_coverage', _PATH)
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

# Families not in conftest.REPRESENTATIVE, each with its own code path: timm's tiny test models of several modules
# (byobnet, nfnet, maxxvit with a fixed input size, relpos ViT) and small real ones (GhostNet; LeViT, distilled
# with two classifiers and a fixed input size).
SUBSET = ['test_byobnet', 'test_nfnet', 'test_coatnet', 'test_vit_relpos', 'ghostnet_050', 'levit_128s']
EXPORTED = ['test_byobnet']  # the sweep's ONNX checks run here too (each export takes seconds)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp('coverage')
    records = {arch: coverage.check_arch(arch, work / arch, fresh=False, export_checks=arch in EXPORTED)
               for arch in SUBSET}
    pending = [arch for arch, rec in records.items() if 'fresh_item' in rec]
    verdicts = coverage.verify_fresh([records[arch]['fresh_item'] for arch in pending])
    for arch, verdict in zip(pending, verdicts):
        coverage.finish_fresh(records[arch], verdict)
    return records


def test_subset_is_outside_conftest_families():
    family_of = {n: f for f, names in coverage.family_map().items() for n in names}
    assert not {family_of[a] for a in SUBSET} & {family_of[a] for a in REPRESENTATIVE}
    assert len({family_of[a] for a in SUBSET}) == len(SUBSET)


@pytest.mark.slow  # runs the sweep slice (the module fixture `results`), slow as pyproject.toml defines it
@pytest.mark.parametrize('arch', SUBSET)
def test_arch_passes_every_sweep_check(results, arch):
    rec = results[arch]
    assert set(rec['checks']) == set(coverage.CHECKS) | (set(coverage.EXPORT_CHECKS) if arch in EXPORTED else set())
    failed = {c: v['reason'] for c, v in rec['checks'].items() if v['status'] != 'pass'}
    assert not failed, f'{arch}: {failed}'
    assert rec['status'] == 'pass'
    assert rec['params_branch1'] < rec['params_base']


@pytest.mark.slow  # runs the sweep slice (the module fixture `results`), slow as pyproject.toml defines it
def test_onnx_checks_record_parity(results):
    for arch in EXPORTED:
        diffs = results[arch]['onnx_max_abs_diff']
        assert set(diffs) == {'0', '1'} and all(0 <= d < 1e-3 for d in diffs.values()), diffs
        assert results[arch]['onnx_exporter'] == {'0': 'dynamo', '1': 'dynamo'}  # no fallback needed
        assert 'onnx_exporter_reason' not in results[arch]


def test_export_report_groups_each_exporters_cause():
    # a branch the fallback wrote: grouped by dynamo's step and blanked root cause
    assert coverage._dynamo_cause('dynamo failed: torch.onnx: AssertionError: only 4D query, key, and value are '
                                  'supported') == ('torch.onnx', 'AssertionError: only ND query, key, and value are '
                                                                 'supported')
    assert coverage._dynamo_cause('dynamo failed: max |delta| 0.5 > tolerance 0.0001 (batch of 2 at 8x8)')[0] == \
        'parity or running the file'
    # a branch neither exporter could write: both causes kept, each cut to a fixed prefix
    step, cause = coverage._export_failure(
        "ExportError: Neither ONNX exporter can export x branch 1: dynamo: torch.export: GuardOnDataDependentSymNode: "
        "Could not extract specialized integer from data-dependent expression u0 (unhinted: u0); torchscript: "
        "torch.onnx: UnsupportedOperatorError: Exporting the operator 'aten::foo' to ONNX opset version 18 is not "
        "supported. Nothing was written. [export.py:512]")
    assert step == 'dynamo, then torchscript'
    assert cause.startswith('dynamo: torch.export: GuardOnDataDependentSymNode: Could not extract')
    assert "; torchscript: torch.onnx: UnsupportedOperatorError: Exporting the operator '…'" in cause
    assert 'Nothing was written' not in cause and 'export.py' not in cause
    assert coverage._export_cell({'status': 'pass'}, 'torchscript') == 'ok (torchscript)'
    assert coverage._export_cell({'status': 'pass'}) == 'ok' and coverage._export_cell(None) == '-'


@pytest.mark.slow  # runs the sweep slice (the module fixture `results`), slow as pyproject.toml defines it
def test_fixed_size_model_is_built_at_a_small_img_size(results):
    # test_coatnet has a fixed input size (160); the sweep rebuilds it with img_size= instead of using 160
    assert results['test_coatnet']['kwargs'] == {'img_size': 32}
    assert results['test_coatnet']['input_size'] == [3, 32, 32]


@pytest.mark.parametrize('name,prefix', [
    ('resnet18', 'resnet'), ('resnet50d', 'resnet'), ('vit_tiny_patch16_224', 'vit'), ('vgg19_bn', 'vgg'),
    ('mobilenetv3_large_100', 'mobilenetv3'), ('convnextv2_atto', 'convnextv2'), ('res2net50_14w_8s', 'res2net'),
    ('dla102x2', 'dla'), ('eva02_tiny_patch14_224', 'eva'), ('regnetx_002', 'regnetx'),
])
def test_family_prefix_rule(name, prefix):
    assert coverage.name_prefix(name) == prefix


def test_families_cover_every_architecture_once():
    families = coverage.family_map()
    names = [n for n in timm.list_models() if not n.startswith('sila_')]
    listed = [n for v in families.values() for n in v]
    assert sorted(listed) == sorted(names)
    # same prefix, different timm modules -> separate families, labelled with the module
    assert 'resnet18' in families['resnet (resnet)'] and 'resnet50_clip' in families['resnet (byobnet)']
    counts = {n: i for i, n in enumerate(names)}  # any order works for the selection rule
    pairs = coverage.select_archs(families, counts)
    assert {a for _, a in pairs} >= set(coverage.PAPER_SIX)
    assert len({f for f, _ in pairs}) == len(families)


def test_outcome_tells_clear_plugin_errors_from_failures(tmp_path):
    with pytest.raises(ValueError) as plugin_error:
        timm.create_model('sila_test_resnet', num_classes=10, sila_sets=1)
    assert coverage._outcome(plugin_error.value)['status'] == 'refused'
    with pytest.raises(RuntimeError) as timm_error:
        timm.create_model('sila_resnet_does_not_exist')
    assert coverage._outcome(timm_error.value)['status'] == 'fail'
    # an architecture that cannot be built fails at build, the other checks are not run
    rec = coverage.check_arch('resnet_does_not_exist', tmp_path, setup=({}, (3, 32, 32)))
    assert (rec['status'], rec['check'], list(rec['checks'])) == ('fail', 'build', ['build'])
    assert 'resnet_does_not_exist' in rec['reason']


# --- the report and the records -----------------------------------------------------------------------------------
def test_coverage_report_only_without_results_refuses_and_keeps_the_report(tmp_path):
    doc = REPO / 'docs' / 'coverage.md'
    before = doc.read_bytes()
    for results in (tmp_path / 'missing.jsonl', tmp_path / 'empty.jsonl'):
        if results.name == 'empty.jsonl':
            results.write_text('\n')
        run = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'coverage.py'), '--report-only',
                              '--results', str(results)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and str(results) in lines[0] and 'left as it is' in lines[0], run.stderr
        assert run.stdout == ''
    assert doc.read_bytes() == before


def test_coverage_param_count_shows_progress(capsys, tmp_path):
    names = timm.list_models('test_*')[:3]
    counts = coverage.param_counts(tmp_path / 'params.json', names=names)
    assert set(counts) == set(names)
    assert all(counts[n] == sum(p.numel() for p in timm.create_model(n).parameters()) for n in names)
    captured = capsys.readouterr()
    assert 'counting parameters of 3 architectures' in captured.err and 'counted 3' in captured.err
    assert captured.out == ''


def test_coverage_results_line_cut_short_is_skipped_and_the_report_written_whole(tmp_path, capsys):
    results = tmp_path / 'results.jsonl'
    whole = dict(arch='test_resnet', family='test', status='pass', check=None, reason='', checks={})
    results.write_text(json.dumps(whole) + '\n' + json.dumps(dict(whole, arch='test_vit'))[:40])  # killed mid-append
    assert list(coverage.load_results(results)) == ['test_resnet']
    assert f'{results}:2: not a whole result record, skipped' in capsys.readouterr().err
    coverage._end_line(results)  # what a resumed sweep does before appending: the next record is whole
    with open(results, 'a') as f:
        f.write(json.dumps(dict(whole, arch='test_vit')) + '\n')
    assert list(coverage.load_results(results)) == ['test_resnet', 'test_vit']
    doc = tmp_path / 'coverage.md'
    doc.write_text('previous report')
    coverage.write_report(coverage.load_results(results), [('test', 'test_resnet'), ('test', 'test_vit')], doc,
                          'python benchmarks/coverage.py')
    text = doc.read_text()
    assert text.startswith('# Coverage') and 'test_resnet' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ['coverage.md', 'results.jsonl']  # no temp left behind


def test_coverage_groups_export_failures_by_step_and_root_cause():
    long = ('ExportError: torch.onnx cannot convert {} to ONNX opset 18: ConversionError: Failed to decompose the FX '
            'graph for ONNX compatibility. Cause: ValueError: Cannot view a tensor with shape torch.Size([s77, {}, 3, '
            '32]) and strides (384, 32, 128, 1) as a tensor with shape (s77, 4, 96)! [export.py:284]')
    a = coverage._export_failure(long.format('beit_base_patch16_224 branch 0', 5))
    b = coverage._export_failure(long.format('sila_test_vit_relpos branch 1', 4)[:330])  # recorded reasons are cut
    assert a == b and a[0] == 'torch.onnx FX decomposition' and a[1].startswith('ValueError: Cannot view a tensor')
    assert coverage._export_failure('ExportError: torch.export cannot trace sila_x branch 1: '
                                    'GuardOnDataDependentSymNode: data-dependent u0 [export.py:203]') == (
        'torch.export tracing', 'GuardOnDataDependentSymNode: data-dependent uN')

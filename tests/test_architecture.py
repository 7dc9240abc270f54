"""The package's structural rules (docs/architecture.md) hold in the code: no import cycle (imports inside functions
counted), the library never imports the CLI and never prints, imports sit at module top unless they defer an
optional dependency, modules import only from their own layer or below, and `timm_sila.__all__` is the public API."""
import ast
import importlib
from pathlib import Path
from typing import Dict, Set

import pytest

import timm_sila

ROOT = Path(timm_sila.__file__).resolve().parent
# The only imports allowed inside a function: optional dependencies, and torch.onnx's TorchScript exporter.
DEFERRED = {'onnx', 'onnxruntime', 'matplotlib', 'matplotlib.pyplot', 'tqdm', 'torch.onnx',
            'torch.onnx._internal.torchscript_exporter.registration'}
# Layers, bottom up (docs/architecture.md): a module imports only from its own layer or below.
LAYERS = {'_checks': 0, 'config': 0, '_timm_compat': 0, 'taps': 1, 'heads': 1, 'loss': 1, 'model': 2, 'io': 3,
          'data': 4, '_registry': 4, 'measure.sizes': 5, 'measure.metrics': 5, 'measure.evaluate': 5, 'ship': 6,
          'measure.bench': 7, 'exits': 7}


def _modules() -> Dict[str, Path]:
    out = {}
    for path in ROOT.rglob('*.py'):
        parts = list(path.relative_to(ROOT.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, tree: ast.AST, inside_functions_only: bool = False):
    """(imported module, line) of every import in `tree`, relative ones resolved; `from P import m` also yields P.m."""
    path = MODULES[module]
    package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
    nodes = ast.walk(tree)
    if inside_functions_only:
        nodes = (n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f))
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            yield target, node.lineno
            for alias in node.names:
                yield f'{target}.{alias.name}', node.lineno


TREES = {m: ast.parse(p.read_text(encoding='utf-8')) for m, p in MODULES.items()}


def _graph() -> Dict[str, Set[str]]:
    return {m: {t for t, _ in _imports(m, TREES[m]) if t in MODULES and t != m} for m in MODULES}


def test_no_import_cycle():
    graph = _graph()
    # the package imports its public API from its modules; every other edge must be acyclic
    edges = {m: {t for t in ts if t != 'timm_sila'} for m, ts in graph.items() if m != 'timm_sila'}
    state: Dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            assert state.get(t) != 1, f'import cycle: {" -> ".join(path + [t])}'
            if t not in state:
                visit(t, path + [t])
        state[m] = 2
    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_the_library_never_imports_the_cli_nor_prints():
    for m, tree in TREES.items():
        assert not [t for t, _ in _imports(m, tree) if t.split('.')[0] == 'timm_sila_cli'], m
        prints = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Name) and n.func.id == 'print']
        assert not prints, f'{m} calls print() at lines {prints}; return data or report through a callback'


def test_imports_inside_functions_only_defer_optional_dependencies():
    for m, tree in TREES.items():
        local = {t for t, _ in _imports(m, tree, inside_functions_only=True)}
        bare = {t for t in local if not any(t == d or t.startswith(d + '.') for d in DEFERRED)}
        assert not bare, f'{m} imports {sorted(bare)} inside a function; import it at the top of the module'


def _layer(module: str) -> str:
    parts = module.split('.')[1:]
    for key in ('.'.join(parts[:2]), parts[0] if parts else ''):
        if key in LAYERS:
            return key
    raise AssertionError(f'{module} belongs to no layer of docs/architecture.md')


@pytest.mark.parametrize('module', sorted(m for m, p in MODULES.items() if p.name != '__init__.py'))
def test_modules_import_only_their_layer_or_below(module):
    own = LAYERS[_layer(module)]
    for target in _graph()[module]:
        if target == 'timm_sila':
            continue
        assert LAYERS[_layer(target)] <= own, f'{module} ({_layer(module)}) imports {target} ({_layer(target)})'


def test_public_api_is_all():
    assert len(timm_sila.__all__) == len(set(timm_sila.__all__))
    for name in timm_sila.__all__:
        assert getattr(timm_sila, name) is not None, name
    exported = {n for n in vars(timm_sila) if not n.startswith('_') and not isinstance(getattr(timm_sila, n),
                                                                                      type(timm_sila))}
    assert exported <= set(timm_sila.__all__), f'public but not in __all__: {sorted(exported - set(timm_sila.__all__))}'
    for name in ('SilaNet', 'SilaLoss', 'strip', 'load_stripped', 'EarlyExit', 'export', 'evaluate', 'SilaConfig'):
        assert name in timm_sila.__all__


def test_every_public_error_and_warning_is_exported():
    """A caller can catch any error or warning the library raises from `timm_sila` itself (private `_` classes and
    classes of private modules aside)."""
    missing = []
    for name in _modules():
        if any(part.startswith('_') for part in name.split('.')):
            continue
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == name \
                    and not attr.startswith('_') and attr not in timm_sila.__all__:
                missing.append(f'{name}.{attr}')
    assert not missing, f'public errors not in timm_sila.__all__: {missing}'

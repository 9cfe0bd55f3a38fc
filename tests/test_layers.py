"""The import graph: layered, one way, no cycle (imports inside functions count).

docs/architecture.md describes the layers; this is their enforcement.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import modules of its own layer or of a lower
# one, never of a higher one; a package entry covers its submodules.
LAYERS = (
    ('leaves', {'app.config', 'app.extensions', 'app.states', 'app.text', 'app.models',
                'app.tracebacks', 'app.endings',
                'app.events', 'app.catalog', 'app.task_api', 'app.roles', 'app.masking',
                'app.rules'}),
    ('adapters', {'app.message', 'app.storage', 'app.broker', 'app.ledger', 'app.leader',
                  'app.controls', 'app.websocket', 'app.sockets', 'app.serving'}),
    ('services', {'app.jobs', 'app.queries', 'app.queues', 'app.periodic', 'app.reaper', 'app.reconcile',
                  'app.inputs', 'app.openapi', 'app.accounts', 'app.audit', 'app.alerts',
                  'app.metrics', 'app.charts'}),
    ('wiring', {'app', 'app.consumer', 'app.producer', 'app.embedded', 'app.fragments', 'app.live', 'app.auth', 'app.cli', 'app.admin',
                'app.pages', 'app.api', 'app.health', 'app.errors', 'app.headers', 'app.templating',
                'huey_tasks',
                'wsgi',
                'gunicorn.conf'}),
)


def project_modules(root):
    """``{module name: path}`` for the project's own Python modules under ``root``."""
    paths = [*root.glob('app/**/*.py'), *root.glob('*.py')]
    modules = {}
    for path in paths:
        parts = list(path.relative_to(root).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        modules['.'.join(parts)] = path
    return modules


def import_graph(root):
    """``{module: set of project modules it imports}``, function-level imports included."""
    modules = project_modules(root)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')[:len(package.split('.')) - node.level + 1]
                    target = '.'.join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ''
                named = [f'{target}.{alias.name}' for alias in node.names]
                submodules = [m for m in named if m in modules]
                found.update(submodules or [target])
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layer_of(module):
    """The index in :data:`LAYERS` of ``module``'s layer, or None if it has none."""
    for i, (_name, members) in enumerate(LAYERS):
        for member in members:
            if module == member or module.startswith(member + '.'):
                return i
    return None


def upward_imports(graph):
    """``[(importer, imported)]`` where a module imports one of a higher layer."""
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if layer_of(b) > layer_of(a))


def test_the_project_has_no_import_cycle():
    assert cycles(import_graph(ROOT)) == []


def test_every_module_has_a_layer():
    assert [m for m in import_graph(ROOT) if layer_of(m) is None] == []


def test_imports_only_point_down():
    assert upward_imports(import_graph(ROOT)) == []


def test_the_checks_see_cycles_and_upward_imports_in_functions(tmp_path):
    (tmp_path / 'app').mkdir()
    (tmp_path / 'app' / '__init__.py').write_text('from . import api\n')
    (tmp_path / 'app' / 'api.py').write_text('from . import jobs\n')
    (tmp_path / 'app' / 'jobs.py').write_text('def f():\n    from .api import bp\n')
    (tmp_path / 'app' / 'text.py').write_text('def g():\n    from app import jobs\n')
    graph = import_graph(tmp_path)
    assert graph['app.text'] == {'app.jobs'}
    assert cycles(graph) == [['app.api', 'app.jobs']]
    assert upward_imports(graph) == [('app.jobs', 'app.api'), ('app.text', 'app.jobs')]


# Modules whose tests live in a file named otherwise: the package's own
# module (create_app) is tested with the configuration it loads, and the
# ledger package's modules together, through its recorder.
TESTED_IN = {'app': 'test_config.py', 'app.ledger': 'test_ledger.py'}


def test_every_module_has_a_test_file_of_its_own():
    tests = {path.name for path in (ROOT / 'tests').glob('test_*.py')}
    untested = []
    for module in project_modules(ROOT):
        if not module.startswith('app'):
            continue  # huey_tasks, wsgi and gunicorn.conf run in the process tests
        top = module if module.count('.') < 2 else module.rsplit('.', module.count('.') - 1)[0]
        wanted = TESTED_IN.get(top, f'test_{top.rpartition(".")[2]}.py')
        if wanted not in tests:
            untested.append(f'{module} (tests/{wanted})')
    assert untested == []

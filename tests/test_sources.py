"""The project's sources as a whole: nothing a merge left half-done."""
from helpers import ROOT

# Where the project's own text lives (not the virtualenv, the instance folder or .git).
TREES = ('app', 'templates', 'static', 'tests', 'migrations', 'bench', 'deploy', 'docs', '.ci')
TOP = ('README.md', 'Makefile', 'Dockerfile', 'docker-compose.yml', 'huey_tasks.py', 'wsgi.py',
       'gunicorn.conf.py', 'requirements.txt', 'requirements-dev.txt', 'pytest.ini')


def _sources():
    for tree in TREES:
        yield from (p for p in (ROOT / tree).rglob('*') if p.is_file() and '__pycache__' not in p.parts)
    yield from (ROOT / name for name in TOP if (ROOT / name).is_file())


def _is_marker(line):
    return line.startswith(('<<<<<<< ', '>>>>>>> ')) or line.rstrip() == '======='


def test_no_source_holds_a_merge_conflict_marker():
    found = []
    for path in _sources():
        try:
            lines = path.read_text(encoding='utf-8').splitlines()
        except UnicodeDecodeError:
            continue  # an image or another binary
        found += [f'{path.relative_to(ROOT)}:{n}' for n, line in enumerate(lines, 1)
                  if _is_marker(line)]
    assert found == []


def test_a_marker_is_told_from_a_heading_rule():
    assert _is_marker('=======\n') and _is_marker('<<<<<<< HEAD') and _is_marker('>>>>>>> charts')
    assert not _is_marker('=============') and not _is_marker('/* ==== end ==== */')

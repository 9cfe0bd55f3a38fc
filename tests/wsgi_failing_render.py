"""The app, with attempts of ``flaky`` jobs failing to render (for tests/test_live.py).

Run by gunicorn as ``wsgi_failing_render:app`` with ``tests`` on the path:
a real web process in which one fragment raises.
"""
from app import create_app, queries

app = create_app()
_attempts = queries.attempts


def attempts(job):
    if job.task == 'flaky':
        raise RuntimeError('this fragment cannot render (a test of render failures)')
    return _attempts(job)


queries.attempts = attempts

"""Stored tracebacks read into frames: the task's own first, the framework's folded."""
import json
import traceback

import sqlalchemy as sa
from conftest import flushed, recording_app, run_next

from app import catalog, jobs, tracebacks
from app.extensions import db
from app.models import Attempt


def printed(exc):
    return ''.join(traceback.format_exception(exc))


def raised(function):
    try:
        function()
    except Exception as exc:
        return exc
    raise AssertionError('nothing raised')


def _hook(obj):
    raise KeyError(f'no field {sorted(obj)[0]}')


def _decode():
    json.loads('{"a": 1}', object_hook=_hook)


def _chained():
    try:
        _decode()
    except KeyError as exc:
        raise RuntimeError('could not read the order') from exc


def _while_handling():
    try:
        _decode()
    except KeyError:
        raise ValueError('and then this broke')


def test_a_traceback_through_the_standard_library_keeps_our_frames_and_folds_its():
    text = printed(raised(_decode))
    tb = tracebacks.parse(text)
    [section] = tb.sections
    assert section.chain is None
    assert section.exception == "KeyError: 'no field a'"
    assert [f.function for f in section.own] == ['raised', '_decode', '_hook']
    assert all(f.file.endswith('test_tracebacks.py') for f in section.own)
    assert section.folded and all('json' in f.file for f in section.folded)
    hook = section.own[-1]
    assert hook.code.startswith("raise KeyError(f'no field {sorted(obj)[0]}')")
    assert int(hook.line) > 0
    assert tb.text == text


def test_chained_exceptions_are_sections_in_printed_order():
    for function, chain, last in (
            (_chained, tracebacks.CHAINS[0], 'RuntimeError: could not read the order'),
            (_while_handling, tracebacks.CHAINS[1], 'ValueError: and then this broke')):
        tb = tracebacks.parse(printed(raised(function)))
        first, second = tb.sections
        assert (first.chain, first.exception) == (None, "KeyError: 'no field a'")
        assert (second.chain, second.exception) == (chain, last)
        assert second.own[-1].function == function.__name__


def test_a_cause_printed_without_frames_is_a_section_without_frames():
    exc = RuntimeError('outer')
    exc.__cause__ = ValueError('never raised')
    try:
        raise exc
    except RuntimeError as caught:
        tb = tracebacks.parse(printed(caught))
    cause, outer = tb.sections
    assert (cause.frames, cause.exception) == ((), 'ValueError: never raised')
    assert outer.exception == 'RuntimeError: outer' and outer.own


def test_a_multi_line_message_and_a_repeated_line_are_kept():
    def deep(n):
        if n == 0:
            raise RuntimeError('first line\nsecond line')
        deep(n - 1)
    section = tracebacks.parse(printed(raised(lambda: deep(10)))).sections[0]
    assert section.exception == 'RuntimeError: first line\nsecond line'
    assert any('Previous line repeated' in f.code for f in section.frames)


def test_frames_of_huey_the_app_package_and_installed_code_are_framework():
    for path in ('/usr/lib/python3/dist-packages/huey/api.py',
                 '/srv/venv/lib/python3.11/site-packages/huey/api.py',
                 '/usr/lib/python3.11/threading.py',
                 '<frozen importlib._bootstrap>',
                 '/opt/queue-manager/app/broker.py',  # written on another host
                 '/app/app/ledger/recorder.py',       # in the container
                 'C:\\qm\\app\\task_api.py'):
        assert tracebacks.is_framework(path), path
    for path in ('/opt/queue-manager/huey_tasks.py', '/srv/billing/tasks.py',
                 '/srv/billing/app/invoices.py'):  # another package's "app"
        assert not tracebacks.is_framework(path), path


def test_a_stored_timeout_shows_the_task_frame_and_folds_huey_and_our_plumbing(tmp_path):
    with recording_app(tmp_path) as (app, recorder):
        sub = catalog.validate({'task': 'sleep', 'params': {'seconds': 0.2, 'steps': 2},
                                'timeout': 0.05, 'retries': 0}, app.config)
        job = jobs.submit(sub).orm()
        run_next()
        flushed(recorder)
        attempt = db.session.scalars(sa.select(Attempt).where(Attempt.job_id == job.id)).one()
    assert attempt.error_type == 'huey.exceptions.TaskTimeout'
    [section] = tracebacks.parse(attempt.traceback).sections
    assert [f.function for f in section.own] == ['sleep']
    assert section.own[0].file.endswith('huey_tasks.py')
    folded = [f.file.replace('\\', '/') for f in section.folded]
    assert any('/huey/' in f for f in folded)
    assert any(f.endswith('app/task_api.py') for f in folded)
    assert section.exception.startswith('huey.exceptions.TaskTimeout: timeout')


def test_text_that_is_not_a_whole_traceback_is_not_parsed():
    whole = printed(raised(_chained))
    head, tail = whole[:len(whole) // 2], whole[len(whole) // 2:]
    group = printed(ExceptionGroup('two', [ValueError('a'), KeyError('b')]))
    for text in (None, '', '   \n', 'Traceback...\nRuntimeError: <b>', 'RuntimeError: no frames',
                 'the traceback could not be formatted',
                 head + '… [300,000 characters, cut] …' + tail,  # cut by the ledger
                 head,  # ends inside the frames
                 'Traceback (most recent call last):\n  garbage\nValueError: x',
                 group):
        assert tracebacks.parse(text) is None, text


def test_an_exception_group_is_not_parsed_even_when_raised():
    def both():
        raise ExceptionGroup('two', [ValueError('a'), KeyError('b')])
    assert tracebacks.parse(printed(raised(both))) is None

"""What ended an attempt or a job, in an operator's words."""
from types import SimpleNamespace

from app import endings


def attempt(error_type, message, outcome='failed'):
    return SimpleNamespace(error_type=error_type, error_message=message, outcome=outcome)


def job(error, error_type, timeout=None):
    return SimpleNamespace(error=error, error_type=error_type, timeout=timeout)


def test_an_operator_cancel_reads_as_one():
    e = endings.of_attempt(attempt('app.task_api.Canceled',
                                   'canceled by an operator at 40% (step 4 of 10)', 'canceled'))
    assert e.text == 'Canceled by an operator at 40% (step 4 of 10)'
    assert (e.kind, e.raw) == ('canceled', 'app.task_api.Canceled: canceled by an operator '
                                           'at 40% (step 4 of 10)')
    assert e.reworded
    assert endings.explain('huey.exceptions.CancelExecution', '').text == 'Canceled'


def test_a_timeout_says_after_how_long():
    assert endings.explain('huey.exceptions.TaskTimeout', 'timeout 2.5s').text == \
        'Timed out after 2.5 s'
    assert endings.explain('huey.exceptions.TaskTimeout', 'timeout (30s)').text == \
        'Timed out after 30 s'
    # no number in the message: the job's own timeout, else none
    assert endings.explain('huey.exceptions.TaskTimeout', '', timeout=12.0).text == \
        'Timed out after 12 s'
    assert endings.explain('huey.exceptions.TaskTimeout', None).text == 'Timed out'
    e = endings.of_job(job('huey.exceptions.TaskTimeout: timeout 0.05s',
                           'huey.exceptions.TaskTimeout', timeout=0.05))
    assert (e.text, e.kind, e.raw) == ('Timed out after 0.05 s', 'timeout',
                                      'huey.exceptions.TaskTimeout: timeout 0.05s')


def test_a_lost_attempt_names_its_consumer():
    reason = 'worker host:1-2 stopped heartbeating (last seen 2026-01-31 12:00:00 UTC, 40 s before)'
    e = endings.of_attempt(attempt('WorkerLost', reason, 'lost'))
    assert e.text == f'Lost: {reason}'
    assert e.kind == 'lost'
    # the job's error carries why it was not run again
    e = endings.of_job(job(f'WorkerLost: {reason} (no retries left)', 'WorkerLost'))
    assert e.text == f'Lost: {reason} (no retries left)'


def test_an_interrupted_attempt_is_told_by_its_outcome():
    e = endings.of_attempt(attempt('RuntimeError', 'the consumer stopped during this attempt; '
                                                   're-enqueued', 'interrupted'))
    assert e.text == ('Interrupted by its consumer shutting down: the consumer stopped during '
                      'this attempt; re-enqueued')
    assert e.kind == 'interrupted'


def test_an_error_the_task_raised_reads_as_stored():
    e = endings.of_attempt(attempt('RuntimeError', 'boom <b>'))
    assert (e.text, e.raw, e.kind, e.reworded) == ('RuntimeError: boom <b>',
                                                   'RuntimeError: boom <b>', 'error', False)
    assert endings.of_job(job('RuntimeError: boom', 'RuntimeError')).text == 'RuntimeError: boom'
    assert endings.of_job(job('KeyError', 'KeyError')).text == 'KeyError'
    # a job error written without a type (an old row) is shown as it is
    assert endings.of_job(job('something odd', None)).text == 'something odd'


def test_no_error_has_no_ending():
    assert endings.of_attempt(attempt(None, None, 'succeeded')) is None
    assert endings.of_job(job(None, None)) is None
    assert endings.explain('', 'x') is None

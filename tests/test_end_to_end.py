"""Jobs end to end through real processes, in both deployment modes.

distributed: a private redis-server, gunicorn with two workers and a
huey_consumer process, sharing a SQLite ledger. embedded: gunicorn alone,
Huey on SQLite with consumer threads inside the web process.
"""
import datetime as dt
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest
from helpers import ROOT, Deployment, Socket, wait_for

# Every test here starts real processes: the full suite only (make test).
pytestmark = pytest.mark.processes


@pytest.fixture(scope='module', params=['distributed', 'embedded'])
def deployment(request, tmp_path_factory):
    dep = Deployment(request.param, tmp_path_factory.mktemp(request.param))
    yield dep
    dep.close()


def ts(text):
    return dt.datetime.fromisoformat(text.rstrip('Z'))


def test_noop_succeeds_with_one_attempt(deployment):
    api = deployment.api
    job = api.wait_state(api.submit('noop')['id'], 'succeeded')
    [attempt] = job['attempts']
    assert (attempt['number'], attempt['state'], attempt['error']) == (1, 'succeeded', None)
    assert attempt['worker'] and attempt['duration'] >= 0
    assert job['started_at'] and job['finished_at'] and job['progress'] == 1.0


def test_flaky_succeeds_on_attempt_three_with_two_recorded_errors(deployment):
    api = deployment.api
    job = api.submit('flaky', {'failures': 2}, retry_delay=0)
    job = api.wait_state(job['id'], 'succeeded')
    assert [a['state'] for a in job['attempts']] == ['failed', 'failed', 'succeeded']
    assert [a['number'] for a in job['attempts']] == [1, 2, 3]
    for n, attempt in enumerate(job['attempts'][:2], 1):
        assert attempt['error'] == f'RuntimeError: attempt {n} of a job set to fail 2 times'
        assert 'Traceback (most recent call last)' in attempt['traceback']
    assert job['result'] == {'succeeded_on_attempt': 3}


def test_fail_ends_failed_after_retries_plus_one_attempts(deployment):
    api = deployment.api
    job = api.submit('fail', {'message': 'no luck'}, retries=3, retry_delay=0)
    job = api.wait_state(job['id'], 'failed')
    assert [a['state'] for a in job['attempts']] == ['failed'] * 4
    assert all('RuntimeError: no luck' in a['traceback'] for a in job['attempts'])
    assert job['error'] == 'RuntimeError: no luck' and job['attempt_count'] == 4


def test_retry_waits_the_retry_delay_and_no_longer(deployment):
    api = deployment.api
    job = api.submit('fail', retries=1, retry_delay=1.5)
    job = api.wait_state(job['id'], 'failed')
    first, second = job['attempts']
    gap = (ts(second['started_at']) - ts(first['finished_at'])).total_seconds()
    assert 1.5 * 0.75 <= gap <= 1.5 * 1.25 + 1.0, gap  # the delay, +-25% jitter, plus 1 s


def test_a_delayed_job_starts_within_a_second_and_a_half_of_its_time(deployment):
    api = deployment.api
    job = api.submit('noop', delay=2)
    done = api.wait_state(job['id'], 'succeeded', 20)
    late = (ts(done['started_at']) - ts(job['scheduled_for'])).total_seconds()
    assert 0 <= late <= 1.5, late


def test_permanent_error_is_not_retried(deployment):
    api = deployment.api
    job = api.submit('payment', {'amount': 50000, 'failure_rate': 0})
    job = api.wait_state(job['id'], 'failed')
    assert len(job['attempts']) == 1
    assert job['attempts'][0]['error'].startswith('huey_tasks.CardDeclined')


def test_sleep_reports_progress_while_running(deployment):
    api = deployment.api
    job = api.submit('sleep', {'seconds': 3, 'steps': 10})
    seen = api.wait_state(job['id'], 'running', 10)
    midway = wait_for(lambda: (lambda j: j if j['state'] == 'running' and 0 < (j['progress'] or 0) < 1
                               else None)(api.job(job['id'])), 10, 0.1, 'progress between 0 and 1')
    assert midway['progress_message'].startswith('step ')
    done = api.wait_state(job['id'], 'succeeded', 15)
    assert done['progress'] == 1.0 and done['result'] == {'slept': 3.0}
    assert seen['started_at']


def test_cancel_a_scheduled_job_then_retry_runs_it_now(deployment):
    api = deployment.api
    job = api.submit('noop', delay=4)
    assert job['state'] == 'scheduled'
    status, canceled = api.post(f'/api/jobs/{job["id"]}/cancel')
    assert (status, canceled['state']) == (200, 'canceled'), canceled
    # Past its due time it must still be canceled, never run.
    deadline = ts(job['scheduled_for']) + dt.timedelta(seconds=2)
    while dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) < deadline:
        current = api.job(job['id'])
        assert current['state'] == 'canceled' and current['attempts'] == []
        time.sleep(0.2)
    status, retried = api.post(f'/api/jobs/{job["id"]}/retry')
    assert status == 200 and retried['state'] == 'queued'
    done = api.wait_state(job['id'], 'succeeded')
    assert [a['number'] for a in done['attempts']] == [1]


def test_retrying_a_failed_job_adds_the_next_attempt(deployment):
    api = deployment.api
    job = api.wait_state(api.submit('fail', retries=0)['id'], 'failed')
    assert len(job['attempts']) == 1
    status, _ = api.post(f'/api/jobs/{job["id"]}/retry')
    assert status == 200
    job = api.wait_state(job['id'], 'failed')
    assert [(a['number'], a['state']) for a in job['attempts']] == [(1, 'failed'), (2, 'failed')]


def test_actions_follow_the_state_rules(deployment):
    api = deployment.api
    job = api.submit('sleep', {'seconds': 1.5, 'steps': 3})
    api.wait_state(job['id'], 'running', 10)
    assert api.post(f'/api/jobs/{job["id"]}/retry')[0] == 409
    assert api.delete(f'/api/jobs/{job["id"]}')[0] == 409
    api.wait_state(job['id'], 'succeeded')
    assert api.post(f'/api/jobs/{job["id"]}/retry')[0] == 409
    assert api.delete(f'/api/jobs/{job["id"]}')[0] == 204
    assert api.get(f'/api/jobs/{job["id"]}')[0] == 404


def test_job_page_shows_every_attempt(deployment):
    api = deployment.api
    job = api.wait_state(api.submit('flaky', {'failures': 1}, retry_delay=0)['id'], 'succeeded')
    status, html = api.get(f'/jobs/{job["id"]}')
    assert status == 200
    assert html.count('class="attempt attempt-') == 2
    assert 'RuntimeError: attempt 1 of a job set to fail 1 times' in html


def test_health_and_stats(deployment):
    status, health = deployment.api.get('/healthz')
    assert status == 200 and health['broker'] == 'ok' and health['database'] == 'ok'
    assert health['broker_kind'] == ('redis' if deployment.mode == 'distributed' else 'sqlite (embedded)')
    status, stats = deployment.api.get('/api/stats')
    assert status == 200 and stats['total'] == sum(stats['states'].values()) > 0


# -- hostile input and poisoned rows, against the real processes ---------------------

def test_a_lone_surrogate_is_refused_at_submit_and_pages_stay_up(deployment):
    api = deployment.api
    before = api.get('/api/stats')[1]['total']
    status, body = api.post('/api/jobs', raw=b'{"task":"fail","params":{"message":"\\ud800"},'
                                             b'"delay":3600}')
    assert (status, body['fields']) == (400, {
        'params.message': 'contains an unpaired surrogate (U+D800)'})
    assert api.get('/api/stats')[1]['total'] == before  # no row written
    for path in ('/', '/jobs', '/api/jobs?q=%C3%A9'):
        assert api.get(path)[0] == 200, path
    status, body = api.get('/api/jobs/%ff%fe')  # raw bytes in the path, as gunicorn passes them
    assert (status, body['fields']) == (400, {'path': 'is not valid UTF-8'})


def test_a_task_raising_unencodable_text_fails_with_its_error_not_as_lost(deployment):
    # Enqueued around the API, as a Python producer would: the edge never saw it.
    script = ("import huey_tasks\n"
              "huey = huey_tasks.huey\n"
              "wrapper = huey_tasks.fail.task_type.wrappers[huey.name]\n"
              "task = wrapper.s(params={'message': 'boom \\ud800 \\x00 ☕'}, "
              "meta={'base': 0, 'retries': 0})\n"
              "huey.enqueue(task)\nprint(task.id)\n")
    out = subprocess.run([sys.executable, '-c', script], env=deployment.env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().splitlines()[-1]
    # The ledger hears of it when a consumer takes it (until then: 404).
    wait_for(lambda: deployment.api.get(f'/api/jobs/{job_id}')[0] == 200, 20, 0.1,
             'the job to be recorded')
    # Seconds, not the ~50 s after which a job whose outcome was lost is reaped.
    job = deployment.api.wait_state(job_id, ('failed', 'retrying'), timeout=20)
    assert job['state'] == 'failed'
    assert job['error'] == 'RuntimeError: boom \\ud800 \\x00 ☕'
    assert [(a['state'], a['error_type']) for a in job['attempts']] == [('failed', 'RuntimeError')]
    assert job['params'] == {'message': 'boom \\ud800 \\x00 ☕'}
    status, found = deployment.api.get('/api/jobs?q=%E2%98%95')  # ☕
    assert status == 200 and job_id in [j['id'] for j in found['jobs']]


def test_poisoned_rows_cost_neither_the_pages_nor_the_socket(deployment):
    ids = [str(uuid.uuid4()) for _ in range(3)]
    db = sqlite3.connect(deployment.tmp / 'ledger.db', timeout=30)
    try:
        with db:
            for job_id, params, error in [
                    (ids[0], '{not json', "CAST(x'eda080ff41' AS TEXT)"),
                    (ids[1], '{"m": "\\ud800"}', f"'{'é' * (10 * 1024 * 1024)}'"),
                    (ids[2], '{}', "x'ff00'")]:
                db.execute(
                    'INSERT INTO job (id, task, queue, params, state, priority, attempts, '
                    'attempt_base, retries, retry_delay, created_at, updated_at, finished_at, '
                    f"version, error) VALUES (?, 'fail', 'default', ?, 'failed', 0, 1, 0, 0, 0, "
                    f'?, ?, ?, 2, {error})',
                    (job_id, params, *[dt.datetime.now(dt.timezone.utc).strftime(
                        '%Y-%m-%d %H:%M:%S.%f')] * 3))
    finally:
        db.close()
    api = deployment.api
    for path in ['/', '/jobs', '/failures', '/api/jobs', '/api/failures'] + [
            f'/jobs/{job_id}' for job_id in ids]:
        status, _ = api.get(path)
        assert status == 200, path
    sock = Socket(f'{deployment.ws_base}/ws?view=dashboard')
    try:
        first = wait_for(lambda: sock.messages, 10, message='the dashboard snapshot')[0][1]
        assert all(f'id="job-{job_id}"' in first for job_id in ids)
        # A change after the snapshot still arrives: the socket lives on.
        api.submit('noop')
        wait_for(lambda: len(sock.messages) > 1, 10, message='a live update')
        assert not sock.closed.is_set()
    finally:
        sock.close()

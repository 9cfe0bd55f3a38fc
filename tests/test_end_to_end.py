"""Jobs end to end through real processes, in both deployment modes.

distributed: a private redis-server, gunicorn with two workers and a
huey_consumer process, sharing a SQLite ledger. embedded: gunicorn alone,
Huey on SQLite with consumer threads inside the web process.
"""
import datetime as dt
import time

import pytest
from helpers import Deployment, wait_for


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

"""Operating the queue, through real processes in both modes.

Queues (pause, resume, priorities, a second queue with its own consumer),
cancelling a running job, attempt logs, timeouts, scheduled jobs, unique
jobs, failures grouped, bulk actions and periodic tasks.
"""
import time

import pytest
from helpers import Deployment, start_consumer, wait_for

# Every test here starts real processes: the full suite only (make test).
pytestmark = pytest.mark.processes


@pytest.fixture(scope='module', params=['distributed', 'embedded'])
def dep(request, tmp_path_factory):
    d = Deployment(request.param, tmp_path_factory.mktemp(f'ops-{request.param}'),
                   web_workers=1, QUEUES='default,reports', EMBEDDED_WORKERS=1)
    if d.redis:
        # the second queue's own consumer: one thread, so order is visible
        d.processes.append(start_consumer(dict(d.env, QUEUE='reports'), d.tmp,
                                          name='consumer-reports', workers=1))
    yield d
    d.close()


def queue(api, name):
    return next(q for q in api.get('/api/queues')[1]['queues'] if q['name'] == name)


def test_paused_queue_keeps_its_jobs_and_resumes(dep):
    api = dep.api
    status, body = api.post('/api/queues/reports/pause')
    assert status == 200 and body['paused'] is True
    ids = [api.submit('noop', queue='reports')['id'] for _ in range(3)]
    wait_for(lambda: queue(api, 'reports')['depth'] == 3, 10, 0.1, 'three messages waiting')
    time.sleep(2)  # paused: the condition under test is that nothing runs meanwhile
    assert [api.job(i)['state'] for i in ids] == ['queued'] * 3
    assert queue(api, 'default')['paused'] is False
    assert api.post('/api/queues/reports/resume')[1]['paused'] is False
    for job_id in ids:
        api.wait_state(job_id, 'succeeded', 20)
    assert queue(api, 'reports')['depth'] == 0


def test_priorities_are_honoured_within_a_queue(dep):
    api = dep.api
    api.post('/api/queues/reports/pause')
    low = [api.submit('noop', queue='reports', priority=0)['id'] for _ in range(3)]
    high = api.submit('noop', queue='reports', priority=90)['id']
    wait_for(lambda: queue(api, 'reports')['depth'] == 4, 10, 0.1, 'four messages waiting')
    api.post('/api/queues/reports/resume')
    done = [api.wait_state(i, 'succeeded', 20) for i in [high, *low]]
    first = min(done, key=lambda j: j['started_at'])
    assert first['id'] == high


def test_unknown_queue_is_404_and_a_job_for_it_400(dep):
    assert dep.api.post('/api/queues/nope/pause')[0] == 404
    status, body = dep.api.post('/api/jobs', {'task': 'noop', 'queue': 'nope'})
    assert status == 400 and body['fields']['queue'].startswith('unknown queue')


def test_a_running_job_stops_when_canceled_keeping_its_progress(dep):
    api = dep.api
    job = api.submit('sleep', {'seconds': 20, 'steps': 40})
    wait_for(lambda: (api.job(job['id'])['progress'] or 0) > 0, 20, 0.1, 'some progress')
    status, body = api.post(f'/api/jobs/{job["id"]}/cancel')
    assert status == 202 and body['state'] == 'running' and body['cancel_requested_at']
    done = api.wait_state(job['id'], 'canceled', 10)
    [attempt] = done['attempts']
    assert attempt['state'] == 'canceled'
    assert 'canceled by an operator at' in attempt['error']
    assert 0 < done['progress'] < 1  # the partial work stays on record


def test_what_a_task_logs_is_kept_with_its_attempt(dep):
    api = dep.api
    job = api.wait_state(api.submit('sleep', {'seconds': 0.4, 'steps': 4})['id'], 'succeeded')
    status, log = api.get(f'/api/jobs/{job["id"]}/log')
    assert status == 200
    assert [line['message'] for line in log['attempts']['1']] == [
        f'huey_tasks: step {n} of 4 done' for n in range(1, 5)]
    status, html = api.get(f'/jobs/{job["id"]}')
    assert 'huey_tasks: step 4 of 4 done' in html


def test_an_attempt_over_its_timeout_stops_as_timed_out(dep):
    api = dep.api
    job = api.submit('sleep', {'seconds': 30, 'steps': 60}, timeout=1, retries=0)
    done = api.wait_state(job['id'], 'failed', 20)
    [attempt] = done['attempts']
    assert attempt['state'] == 'timeout' and attempt['duration'] < 5
    assert done['timeout'] == 1


def test_scheduled_jobs_are_listed_and_can_run_now(dep):
    api = dep.api
    job = api.submit('noop', delay=3600)
    listed = api.get('/api/scheduled')[1]['jobs']
    assert job['id'] in [j['id'] for j in listed]
    status, body = api.post(f'/api/jobs/{job["id"]}/run-now')
    assert status == 200 and body['state'] == 'queued'
    done = api.wait_state(job['id'], 'succeeded', 20)
    assert len(done['attempts']) == 1
    assert api.post(f'/api/jobs/{job["id"]}/run-now')[0] == 409


def test_a_second_submission_with_the_same_key_returns_the_first_job(dep):
    api = dep.api
    status, first = api.post('/api/jobs', {'task': 'noop', 'idempotency_key': f'order-{dep.mode}'})
    assert status == 201
    status, again = api.post('/api/jobs', {'task': 'noop', 'idempotency_key': f'order-{dep.mode}'})
    assert status == 200 and again['id'] == first['id']


def test_failures_are_grouped_by_task_and_error_type(dep):
    api = dep.api
    for message in ('disk full', 'disk full'):
        api.wait_state(api.submit('fail', {'message': message}, retries=0)['id'], 'failed')
    api.wait_state(api.submit('payment', {'amount': 99999})['id'], 'failed')
    groups = {(g['task'], g['error_type']): g for g in api.get('/api/failures')[1]['groups']}
    assert groups[('fail', 'RuntimeError')]['count'] >= 2
    declined = groups[('payment', 'huey_tasks.CardDeclined')]
    assert declined['latest']['error'].startswith('huey_tasks.CardDeclined: issuer declined')
    status, html = api.get('/failures')
    assert 'huey_tasks.CardDeclined' in html


def test_bulk_actions_on_a_filter_and_on_ids(dep):
    api = dep.api
    failed = [api.wait_state(api.submit('flaky', {'failures': 1}, retries=0)['id'], 'failed')['id']
              for _ in range(3)]
    status, summary = api.post('/api/jobs/bulk', {'action': 'retry',
                                                  'filter': {'state': 'failed', 'task': 'flaky'}})
    assert status == 200 and summary['done'] >= 3 and not summary['truncated']
    for job_id in failed:
        done = api.wait_state(job_id, 'succeeded', 20)
        assert [a['state'] for a in done['attempts']] == ['failed', 'succeeded']

    waiting = [api.submit('noop', delay=3600)['id'] for _ in range(3)]
    status, summary = api.post('/api/jobs/bulk', {'action': 'cancel', 'ids': waiting + failed})
    assert summary['done'] == 3 and summary['skipped'] == {'succeeded': 3}
    assert {api.job(i)['state'] for i in waiting} == {'canceled'}

    status, summary = api.post('/api/jobs/bulk', {'action': 'delete', 'ids': waiting})
    assert summary['done'] == 3
    assert all(api.get(f'/api/jobs/{i}')[0] == 404 for i in waiting)

    status, body = api.post('/api/jobs/bulk', {'action': 'explode', 'ids': []})
    assert status == 400 and set(body['fields']) == {'action'}
    status, body = api.post('/api/jobs/bulk', {'action': 'retry'})
    assert status == 400 and body['fields']['ids'] == 'give ids or filter, not both'


def test_periodic_tasks_list_pause_and_run_now(dep):
    api = dep.api
    listed = {p['name']: p for p in api.get('/api/periodic')[1]['periodic']}
    assert listed['purge']['schedule'] == '0 3 * * *' and listed['purge']['next_run'].endswith('03:00:00.000Z')
    assert listed['report']['params'] == {'hours': 1}
    assert api.post('/api/periodic/report/pause')[1]['paused'] is True
    assert api.get('/api/periodic')[1]['periodic'][1]['next_run'] is None
    assert api.post('/api/periodic/report/resume')[1]['paused'] is False
    status, job = api.post('/api/periodic/report/trigger')
    assert status == 201 and job['task'] == 'report'
    done = api.wait_state(job['id'], 'succeeded', 20)
    assert any(key.startswith('noop ') for key in done['result'])
    listed = {p['name']: p for p in api.get('/api/periodic')[1]['periodic']}
    assert listed['report']['last']['id'] == job['id']
    assert api.post('/api/periodic/nope/trigger')[0] == 404
    assert api.post('/api/periodic/nope/pause')[0] == 404
    assert api.post('/periodic/nope/resume')[0] == 404


def test_operator_pages_render(dep):
    for path in ('/queues', '/workers', '/failures', '/scheduled', '/periodic'):
        status, html = dep.api.get(path)
        assert status == 200 and 'hx-ws:connect="/ws?view=' in html, path
    status, html = dep.api.get('/workers')
    assert 'data-online="true"' in html


"""The distributed mode when Redis goes away: clear 503s, no phantom rows, recovery."""
import pytest
from helpers import (CREDENTIALS, RedisServer, grant_admin, migrate, service_env, start_consumer,
                     start_web)

# Every test here starts real processes: the full suite only (make test).
pytestmark = pytest.mark.processes


@pytest.fixture
def stack(tmp_path):
    redis = RedisServer(tmp_path / 'redis')
    env = service_env(tmp_path, redis.url)
    migrate(env, tmp_path)
    token = grant_admin(env)  # the distributed mode asks for a login
    web, api = start_web(env, tmp_path, workers=1)
    netloc = api.base.split('//', 1)[1]
    CREDENTIALS[netloc] = token
    consumer = start_consumer(env, tmp_path)
    yield redis, api
    CREDENTIALS.pop(netloc, None)
    for proc in (consumer, web):
        proc.stop()
        print(f'--- {proc.name} ---\n{proc.log()[-3000:]}')
    redis.stop()


def test_redis_stopped_gives_503_and_no_phantom_row(stack):
    redis, api = stack
    before = api.wait_state(api.submit('noop')['id'], 'succeeded')
    redis.stop()

    status, body = api.post('/api/jobs', {'task': 'noop'})
    assert status == 503
    # Unreachable to take the message back either: the job is named, as the
    # broker may have taken it before it went (here it had stopped before).
    assert body['error'].startswith('the job broker is unreachable; no job was recorded, but if '
                                    'it took the messages of the jobs in "unconfirmed"')
    [unconfirmed] = body['unconfirmed']
    assert 'recorded' not in body
    status, page = api.get('/api/jobs')
    assert status == 200 and [j['id'] for j in page['jobs']] == [before['id']]
    # With an idempotency key the job is recorded (the broker may hold it, and
    # the caller's retry must not make a second one), and the retry gets it.
    status, body = api.post('/api/jobs', {'task': 'noop', 'idempotency_key': 'outage'})
    assert status == 503 and body['unconfirmed'] == body['recorded']
    [keyed] = body['recorded']
    status, again = api.post('/api/jobs', {'task': 'noop', 'idempotency_key': 'outage'})
    assert status == 200 and (again['id'], again['state']) == (keyed, 'queued')
    status, health = api.get('/healthz')
    assert status == 503 and health['broker'].startswith('unreachable') and health['database'] == 'ok'

    # Redis comes back on the same port: no restart of web or consumer needed.
    redis.start()
    job = api.wait_state(api.submit('flaky', {'failures': 1}, retry_delay=0)['id'], 'succeeded', 60)
    assert [a['state'] for a in job['attempts']] == ['failed', 'succeeded']
    assert api.get('/healthz')[0] == 200
    assert api.get(f'/api/jobs/{unconfirmed}')[0] == 404  # Redis had taken nothing
    # Redis had taken nothing: the reconciler enqueues the keyed job, which runs once.
    ran = api.wait_state(keyed, 'succeeded', 60)
    assert len(ran['attempts']) == 1
    assert [e['kind'] for e in ran['events']] == ['unconfirmed', 'restored']
    status, again = api.post('/api/jobs', {'task': 'noop', 'idempotency_key': 'outage'})
    assert status == 200 and again['id'] == keyed


def test_cancel_while_redis_is_down_changes_nothing(stack):
    redis, api = stack
    job = api.submit('noop', delay=600)
    redis.stop()
    status, body = api.post(f'/api/jobs/{job["id"]}/cancel')
    assert status == 503
    assert api.job(job['id'])['state'] == 'scheduled'
    redis.start()
    status, body = api.post(f'/api/jobs/{job["id"]}/cancel')
    assert status == 200 and body['state'] == 'canceled'

"""The embedded mode as `make run` starts it: one gunicorn process does everything."""
import signal
import sqlite3

import pytest
from helpers import migrate, service_env, start_web, wait_for

# Every test here starts real processes: the full suite only (make test).
pytestmark = pytest.mark.processes


def test_ctrl_c_stops_cleanly_and_the_running_job_resumes_after_restart(tmp_path):
    env = service_env(tmp_path)
    migrate(env, tmp_path)
    web, api = start_web(env, tmp_path, workers=1)
    try:
        job = api.submit('sleep', {'seconds': 6, 'steps': 6})
        wait_for(lambda: (api.job(job['id'])['progress'] or 0) > 0, 15, 0.1, 'the job to report progress')
        web.send_signal(signal.SIGINT)
        assert web.wait(15) == 0, web.log()
    finally:
        web.stop()
    assert 're-enqueue' in web.log()

    assert attempts_after_restart(env, tmp_path, job['id'], 'web-again', 30) == [
        (1, 'interrupted'), (2, 'succeeded')]


def test_a_locked_broker_gives_503_and_no_row(tmp_path):
    env = service_env(tmp_path)
    migrate(env, tmp_path)
    web, api = start_web(env, tmp_path, workers=1)
    try:
        api.wait_state(api.submit('noop')['id'], 'succeeded')
        blocker = sqlite3.connect(tmp_path / 'huey.db', isolation_level=None, timeout=30)
        blocker.execute('BEGIN EXCLUSIVE')
        try:
            # Huey's SQLite storage serializes its threads on one lock, and each
            # waits out the busy timeout (5 s): the answer may come after the
            # consumer threads' turns.
            status, body = api.post('/api/jobs', {'task': 'fail'}, timeout=90)
        finally:
            blocker.rollback()
            blocker.close()
        assert status == 503 and 'broker is unreachable' in body['error']
        assert [j['task'] for j in api.get('/api/jobs')[1]['jobs']] == ['noop']
        api.wait_state(api.submit('noop')['id'], 'succeeded')
    finally:
        web.stop()


def test_a_job_running_when_the_process_was_killed_is_recovered_after_restart(tmp_path):
    env = service_env(tmp_path, HEARTBEAT_INTERVAL=0.5, LOST_AFTER=2, REAP_INTERVAL=0.5)
    migrate(env, tmp_path)
    web, api = start_web(env, tmp_path, workers=1)
    try:
        job = api.submit('sleep', {'seconds': 4, 'steps': 8})
        wait_for(lambda: (api.job(job['id'])['progress'] or 0) > 0, 15, 0.1, 'the job to run')
    finally:
        web.kill()

    assert attempts_after_restart(env, tmp_path, job['id'], 'web-after-crash', 60) == [
        (1, 'lost'), (2, 'succeeded')]


def attempts_after_restart(env, tmp_path, job_id, name, timeout):
    """Start the web process again; the job's attempts once it has succeeded."""
    web, api = start_web(env, tmp_path, name=name, workers=1)
    try:
        done = api.wait_state(job_id, 'succeeded', timeout)
    finally:
        web.stop()
    return [(a['number'], a['state']) for a in done['attempts']]

"""No job lost: consumers killed at every moment of a job's life, clean stops, a soak.

Consumers renew their lease every 0.5 s here and count as gone 3 s after
the last renewal, so the leader (whichever consumer leads) acts within
seconds. Every test asserts the final states and the attempt rows exactly.
"""
import datetime as dt
import os
import signal
import socket
from pathlib import Path

import pytest
import redis
from helpers import Stack, wait_for

# Every test here starts real processes: the full suite only (make test).
pytestmark = pytest.mark.processes



@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


def consumer_id(stack, proc):
    """A consumer's name (``host:pid-start``), as it registered in Redis when it started."""
    prefix = f'{socket.gethostname()}:{proc.pid}-'.encode()
    return wait_for(lambda: next((m.decode() for m in stack.client.smembers(
        'qm:consumers:qm.default') if m.startswith(prefix)), None), 20, 0.05,
        f'{proc.name} to register')


def writer_of(proc):
    """The pid of a consumer's ledger-writer child process (started by a worker thread).

    Not multiprocessing's resource tracker, the consumer's other child.
    """
    def writers():
        found = []
        for path in Path(f'/proc/{proc.pid}/task').glob('*/children'):
            try:
                for pid in path.read_text().split():
                    if b'spawn_main' in Path(f'/proc/{pid}/cmdline').read_bytes():
                        found.append(int(pid))
            except OSError:  # a thread or child ended meanwhile
                pass
        return found
    return wait_for(writers, 20, 0.05, 'the ledger writer')[0]


def held_by(stack, proc):
    """Job ids in a consumer's in-flight record in Redis."""
    key = f'qm:inflight:qm.default:{consumer_id(stack, proc)}'
    ids = set()
    for member in stack.client.zrange(key, 0, -1):
        ids.add(member[8:].split(b' ')[1].decode())
    return ids


def broker_state(stack, done):
    """What the broker and ledger hold now, for a failure's message."""
    client = stack.client
    return {'succeeded': done(), 'queued': client.zcard('huey.redis.qm.default'),
            'scheduled': client.zcard('huey.schedule.qm.default'),
            'in flight': {key.decode(): client.zcard(key)
                          for key in client.scan_iter(match='qm:inflight:*')},
            'consumers': sorted(m.decode() for m in client.smembers('qm:consumers:qm.default')),
            'runs by worker': dict(stack.sql("SELECT substr(worker, 1, instr(worker, '/') - 1), "
                                             "count(*) FROM attempt GROUP BY 1"))}


def kill_machine(proc, *children):
    """SIGKILL a consumer's process group and the given children: the host died."""
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def test_jobs_taken_by_a_consumer_killed_before_it_recorded_anything_run_again(stack):
    # The first reproducer: taken from Redis, then the whole host
    # dies before the consumer's first ledger write or heartbeat.
    ids = [stack.api.submit('sleep', {'seconds': 2, 'steps': 2})['id'] for _ in range(6)]
    queue = 'huey.redis.qm.default'
    victim = stack.consumer(ready=False, LEDGER_FLUSH_INTERVAL=30)  # records nothing before the kill
    writer = writer_of(victim)
    wait_for(lambda: stack.client.zcard(queue) < 6, 20, 0.01, 'the consumer to take jobs')
    kill_machine(victim, writer)
    taken = held_by(stack, victim)  # what it held when it died, still in Redis
    assert taken and all(stack.api.job(i)['attempt_count'] == 0 for i in ids)
    stack.consumer()
    for job_id in ids:
        stack.api.wait_state(job_id, 'succeeded', 60)
    for job_id in ids:
        expected = ['lost', 'succeeded'] if job_id in taken else ['succeeded']
        assert stack.outcomes(job_id) == expected, (job_id, stack.api.job(job_id))
    assert stack.sql("SELECT count(*) FROM job WHERE state != 'succeeded'")[0][0] == 0


def test_a_job_whose_task_returned_before_the_ledger_wrote_it_runs_again(stack):
    victim = stack.consumer()
    writer = writer_of(victim)
    job = stack.api.submit('sleep', {'seconds': 4, 'steps': 4})
    stack.api.wait_state(job['id'], 'running', 20)
    os.kill(writer, signal.SIGSTOP)  # nothing more reaches the ledger
    wait_for(lambda: any(job['id'] in line and 'executed in' in line
                         for line in victim.log().splitlines()), 20, 0.05, 'the task to return')
    kill_machine(victim, writer)
    assert stack.api.job(job['id'])['state'] == 'running'
    stack.consumer()
    done = stack.api.wait_state(job['id'], 'succeeded', 60)
    assert [(a['number'], a['state']) for a in done['attempts']] == [(1, 'lost'),
                                                                     (2, 'succeeded')]
    assert 'died (its lease ran out)' in done['attempts'][0]['error']


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_whole_process_group_loses_no_ledger_write(stack, signum):
    # Ctrl-C signals the terminal's whole process group; systemd and some
    # supervisors signal every process of the service. The charge must be
    # recorded once, as it ran.
    a = stack.consumer(GRACE_PERIOD=20)
    payment = stack.api.submit('payment', {'latency': 2, 'failure_rate': 0})
    sleeper = stack.api.submit('sleep', {'seconds': 2, 'steps': 2})
    stack.api.wait_state(payment['id'], 'running', 20)
    stack.api.wait_state(sleeper['id'], 'running', 20)
    name = consumer_id(stack, a)
    os.killpg(a.pid, signum)
    assert a.wait(30) == 0, a.log()
    for job in (payment, sleeper):
        done = stack.api.job(job['id'])
        assert (done['state'], [x['state'] for x in done['attempts']]) == (
            'succeeded', ['succeeded']), done
    assert stack.client.keys('qm:inflight:*') == []
    assert not stack.client.exists(f'qm:alive:{name}')


def test_a_second_stop_signal_of_another_kind_stops_at_once(stack):
    a = stack.consumer(GRACE_PERIOD=60)
    job = stack.api.submit('sleep', {'seconds': 30, 'steps': 30})
    stack.api.wait_state(job['id'], 'running', 20)
    a.send_signal(signal.SIGINT)
    wait_for(lambda: 'Shutting down gracefully' in a.log(), 10, 0.05, 'the graceful stop')
    a.send_signal(signal.SIGTERM)
    assert a.wait(15) is not None, 'still waiting for its grace period'
    done = stack.api.wait_state(job['id'], 'queued', 20)
    assert [x['state'] for x in done['attempts']] == ['interrupted']


def test_a_ledger_writer_that_dies_is_started_again_and_nothing_goes_unrecorded(stack):
    a = stack.consumer()
    os.kill(writer_of(a), signal.SIGKILL)
    ids = [stack.api.submit('noop')['id'] for _ in range(10)]
    for job_id in ids:
        done = stack.api.wait_state(job_id, 'succeeded', 30)
        assert [x['state'] for x in done['attempts']] == ['succeeded']
    assert 'the writer process exited' in a.log()
    assert a.alive()


def test_a_consumer_frozen_past_its_lease_writes_no_retry_for_a_job_taken_back(stack):
    # SIGSTOP (a VM paused, a process starved) past LOST_AFTER: the leader
    # takes its message back and, for a charge, fails it rather than charge
    # twice. The frozen consumer wakes, its charge fails: no retry may follow.
    a = stack.consumer()
    b = stack.consumer()
    job = stack.api.submit('payment', {'latency': 8, 'failure_rate': 1})
    running = stack.api.wait_state(job['id'], 'running', 20)
    frozen = a if running['worker'].startswith(consumer_id(stack, a) + '/') else b
    frozen.send_signal(signal.SIGSTOP)
    try:
        failed = stack.api.wait_state(job['id'], 'failed', 40)
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert [x['state'] for x in failed['attempts']] == ['lost']
    wait_for(lambda: 'not retried here' in frozen.log(), 30, 0.1, 'the woken charge to fail')
    done = stack.api.job(job['id'])
    assert done['state'] == 'failed' and [x['state'] for x in done['attempts']] == ['lost']
    assert stack.client.zcard('huey.schedule.qm.default') == 0
    assert stack.client.zcard('huey.redis.qm.default') == 0


def test_delays_and_retries_happen_on_time(stack):
    a = stack.consumer()
    delayed = stack.api.submit('noop', delay=2)
    flaky = stack.api.submit('flaky', {'failures': 1}, retry_delay=1)
    done = stack.api.wait_state(delayed['id'], 'succeeded', 20)
    late = iso(done['started_at']) - iso(delayed['scheduled_for'])
    assert dt.timedelta(0) <= late <= dt.timedelta(seconds=1.5), late
    done = stack.api.wait_state(flaky['id'], 'succeeded', 20)
    first, second = done['attempts']
    gap = iso(second['started_at']) - iso(first['finished_at'])
    assert gap <= dt.timedelta(seconds=1 * 1.25 + 1), gap  # delay (+25% jitter) plus 1 s
    assert 'died' not in a.log()  # Huey's "Process Scheduler died!"


def iso(text):
    return dt.datetime.fromisoformat(text.rstrip('Z'))


def test_a_periodic_tick_starts_once_across_consumers_and_changes_of_leader(stack):
    env = dict(PERIODIC=1, PERIODIC_CATCH_UP=7200)
    consumers = [stack.consumer(**env), stack.consumer(**env)]
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    tick = now.replace(minute=0, second=0, microsecond=0)  # `report` runs at minute 0
    key = f'periodic:report:{tick:%Y-%m-%dT%H:%M}Z'

    def kill_the_leader():
        alive = {consumer_id(stack, c): c for c in consumers}
        leader = wait_for(lambda: (lambda v: v and v.decode() in alive and v.decode())(
            stack.client.get('queue-manager:leader')), 20, 0.1, 'a leader')
        proc = alive[leader]
        kill_machine(proc, writer_of(proc))
        consumers.remove(proc)
        # It died just before the tick: it had handled every minute before it.
        stack.execute("DELETE FROM control WHERE key = 'periodic.watermark'")
        stack.execute("INSERT INTO control (key, value, updated_at) VALUES "
                      "('periodic.watermark', :v, :at)",
                      v=f'"{(tick - dt.timedelta(minutes=1)).isoformat()}"', at=now)

    def started():
        return stack.sql('SELECT id FROM job WHERE idempotency_key = :k', k=key)

    kill_the_leader()
    [(job_id,)] = wait_for(started, 60, 0.2, 'the next leader to start the missed tick')
    consumers.append(stack.consumer(**env))
    kill_the_leader()  # and once more: the third leader sees the same tick
    wait_for(lambda: stack.sql("SELECT value FROM control WHERE key = 'periodic.watermark'")
             [0][0] > f'"{tick.isoformat()}"', 60, 0.2, 'the third leader to pass the tick')
    assert started() == [(job_id,)]
    stack.api.wait_state(job_id, 'succeeded', 30)


def test_killed_consumer_jobs_end_succeeded_with_lost_attempts(stack):
    a, b = stack.consumer(), stack.consumer()
    ids = [stack.api.submit('sleep', {'seconds': 3, 'steps': 6})['id'] for _ in range(6)]
    victim = consumer_id(stack, a)

    def running_on_victim():
        return [i for i in ids if (stack.api.job(i)['worker'] or '').startswith(victim + '/')
                and stack.api.job(i)['state'] == 'running']
    taken = wait_for(running_on_victim, 20, 0.1, 'jobs running on the first consumer')
    a.send_signal(signal.SIGKILL)
    a.wait(10)

    for job_id in ids:
        stack.api.wait_state(job_id, 'succeeded', 60)
    for job_id in taken:
        attempts = stack.api.job(job_id)['attempts']
        lost = [x for x in attempts if x['state'] == 'lost']
        assert lost and lost[0]['worker'].startswith(victim + '/'), attempts
        assert f'consumer {victim} died' in lost[0]['error']
        assert attempts[-1]['state'] == 'succeeded' and attempts[-1]['number'] == lost[0]['number'] + 1
    assert stack.sql("SELECT count(*) FROM job WHERE state = 'running'")[0][0] == 0
    assert b.alive()


def test_a_task_not_safe_to_rerun_fails_visibly_when_lost(stack):
    a = stack.consumer()
    job = stack.api.submit('payment', {'latency': 30, 'failure_rate': 0})
    stack.api.wait_state(job['id'], 'running', 20)
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    stack.consumer()  # someone must lead to reap
    failed = stack.api.wait_state(job['id'], 'failed', 30)
    assert [x['state'] for x in failed['attempts']] == ['lost']
    assert failed['error'].startswith('WorkerLost:') and 'not safe to run twice' in failed['error']


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_lets_running_jobs_finish(stack, signum):
    a = stack.consumer(GRACE_PERIOD=20)
    job = stack.api.submit('sleep', {'seconds': 2, 'steps': 4})
    stack.api.wait_state(job['id'], 'running', 20)
    name = consumer_id(stack, a)  # it leaves the registry when it stops
    a.send_signal(signum)
    assert a.wait(30) == 0, a.log()
    done = stack.api.wait_state(job['id'], 'succeeded', 10)
    assert [x['state'] for x in done['attempts']] == ['succeeded']
    [(stopped,)] = stack.sql('SELECT stopped_at FROM worker WHERE id = :id', id=name)
    assert stopped is not None


def test_jobs_cut_off_by_the_grace_period_are_requeued(stack):
    a = stack.consumer(GRACE_PERIOD=1)
    job = stack.api.submit('sleep', {'seconds': 8, 'steps': 8})
    stack.api.wait_state(job['id'], 'running', 20)
    a.send_signal(signal.SIGTERM)
    assert a.wait(15) == 0, a.log()
    assert stack.api.job(job['id'])['state'] == 'queued'
    stack.consumer()
    done = stack.api.wait_state(job['id'], 'succeeded', 30)
    assert [(x['number'], x['state']) for x in done['attempts']] == [(1, 'interrupted'),
                                                                      (2, 'succeeded')]


def test_workers_report_in_and_leave(stack):
    a = stack.consumer()
    wait_for(lambda: stack.api.get('/api/workers')[1]['workers'], 10, 0.1, 'a heartbeat')
    [worker] = stack.api.get('/api/workers')[1]['workers']
    assert worker['id'] == consumer_id(stack, a) and worker['online']
    assert worker['queues'] == ['default']
    assert worker['concurrency'] == 4 and worker['leader']
    stack.api.wait_state(stack.api.submit('fail', retries=0)['id'], 'failed')
    stack.api.wait_state(stack.api.submit('noop')['id'], 'succeeded')
    wait_for(lambda: stack.api.get('/api/workers')[1]['workers'][0]['processed'] >= 2, 10, 0.1,
             'the counts')
    worker = stack.api.get('/api/workers')[1]['workers'][0]
    assert (worker['processed'], worker['failed']) == (2, 1)
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    wait_for(lambda: not stack.api.get('/api/workers')[1]['workers'][0]['online'], 15, 0.2,
             'the worker to show offline')


def test_soak_ten_thousand_jobs_two_consumers_one_killed_twice(tmp_path):
    # 10 ms jobs, so each kill finds work in flight.
    stack = Stack(tmp_path)
    try:
        total = 10_000
        client = redis.Redis.from_url(stack.redis.url)
        # Submitted in bulk through the app's own service layer would take
        # minutes over HTTP; the API is exercised elsewhere.
        fill = f'''
import uuid
from app import broker, create_app
from app.extensions import db
from app.models import Job, utcnow
app = create_app()
with app.app_context():
    for _ in range({total} // 500):
        now = utcnow()
        rows = [Job(id=str(uuid.uuid4()), task='sleep', queue='default',
                    params={{'seconds': 0.01, 'steps': 1}}, state='queued',
                    priority=0, retries=2, retry_delay=0.0, attempts=0, created_at=now,
                    updated_at=now, version=1) for _ in range(500)]
        # As the API does: rows written, messages enqueued, then committed.
        db.session.add_all(rows)
        db.session.flush()
        for job in rows:
            broker.enqueue(job)
        db.session.commit()
'''
        import subprocess
        import sys
        subprocess.run([sys.executable, '-c', fill], env=stack.env, check=True,
                       cwd=str(__import__('helpers').ROOT), capture_output=True)
        # The whole backlog waits before any consumer starts: filling can be
        # slower than two consumers drain (a loaded machine), and then no
        # kill would find work left.
        assert client.zcard('huey.redis.qm.default') == total
        steady = stack.consumer()
        flaky = stack.consumer()
        done = lambda: stack.sql("SELECT count(*) FROM job WHERE state = 'succeeded'")[0][0]  # noqa: E731
        taken_back = set()
        for round_ in range(2):
            wait_for(lambda: done() >= total * (round_ + 1) // 3, 120, 0.05,
                     f'progress before kill {round_ + 1}')
            # Killed while it holds messages: its work in flight must come back.
            try:
                held = wait_for(lambda: held_by(stack, flaky), 30, 0.005, 'jobs in flight')
            except AssertionError as exc:
                raise AssertionError(f'{exc}; round {round_ + 1}; {broker_state(stack, done)}') from None
            flaky.send_signal(signal.SIGKILL)
            flaky.wait(10)
            taken_back |= held
            flaky = stack.consumer()
        wait_for(lambda: done() == total, 180, 0.2, 'every job to succeed')
        counts = dict(stack.sql('SELECT state, count(*) FROM job GROUP BY state'))
        assert counts == {'succeeded': total}
        assert client.zcard('huey.redis.qm.default') == 0
        assert client.zcard('huey.schedule.qm.default') == 0
        bad = stack.sql("SELECT count(*) FROM job j WHERE (SELECT count(*) FROM attempt a "
                        "WHERE a.job_id = j.id AND a.outcome = 'succeeded') < 1")[0][0]
        assert bad == 0
        assert steady.alive()
        outcomes = dict(stack.sql('SELECT outcome, count(*) FROM attempt GROUP BY outcome'))
        # the kills hit jobs in flight, and those were recovered, not lost:
        # each ended succeeded (its attempt on the dead consumer, if the
        # ledger had heard of it, ended lost)
        assert outcomes['succeeded'] == total and set(outcomes) <= {'succeeded', 'lost'}, outcomes
        assert taken_back
        finished = dict(stack.sql('SELECT id, state FROM job'))
        assert {finished[job_id] for job_id in taken_back} == {'succeeded'}
    finally:
        stack.close()

"""The reconciler: the ledger wins over a broker that lost messages.

In-process on the embedded broker (a SQLite file) and a real ledger; a
"wipe" deletes the broker's rows, as a Redis restart without persistence
deletes its keys.
"""
import datetime as dt
import time

import pytest
import sqlalchemy as sa

from app import broker, catalog, controls, jobs, reconcile, states
from app.extensions import db
from app.models import Job, JobEvent, utcnow
from helpers import Stack, wait_for


@pytest.fixture
def ctx(ctx):
    ctx.config.update(RECONCILE_GRACE=0.2, RECONCILE_INTERVAL=0)
    return ctx


def submit(app, task, **options):
    return jobs.submit(catalog.validate({'task': task, **options}, app.config)).orm()


def huey():
    return broker.hueys['default']


def wipe():
    """Everything the broker held is gone (queue, schedule, in-flight, marker)."""
    s = huey().storage
    for table in ('task', 'schedule', 'kv', 'qm_inflight'):
        s.sql(f'delete from {table}', commit=True)


def passes(ctx, reconciler, until, timeout=10):
    """Run passes until ``until()`` holds (each pass waits its grace), within ``timeout`` s."""
    restored = []
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f'not reconciled; restored so far {restored}'
        restored += reconciler.run(ctx.config)
        time.sleep(0.05)
    return restored


def test_waiting_jobs_the_broker_lost_are_enqueued_again_keeping_their_time(ctx):
    r = reconcile.Reconciler()
    queued = submit(ctx, 'noop')
    later = submit(ctx, 'noop', delay=3600)
    assert r.run(ctx.config) == []  # first pass: marks the broker, all held
    wipe()
    controls.put(controls.BROKER_EPOCH, 'e0')  # the ledger remembers the broker it knew
    db.session.commit()
    restored = passes(ctx, r, lambda: broker.message_ids('default') == {queued.id, later.id})
    assert sorted(restored) == sorted([queued.id, later.id])
    assert (huey().pending_count(), huey().scheduled_count()) == (1, 1)
    [task] = huey().scheduled()
    assert task.id == later.id and task.eta == db.session.get(Job, later.id).scheduled_for
    for job_id in (queued.id, later.id):
        [event] = db.session.scalars(sa.select(JobEvent).where(JobEvent.job_id == job_id))
        assert (event.kind, event.message) == ('restored', reconcile.RESTORED)
        assert db.session.get(Job, job_id).attempts == 0
    assert controls.get(controls.BROKER_REPAIRS) == 2
    loss = reconcile.loss_notice()
    assert loss is not None and loss['restored'] == 2


def test_a_job_due_while_the_broker_was_down_runs_now(ctx):
    r = reconcile.Reconciler()
    job = submit(ctx, 'noop', delay=3600)
    r.run(ctx.config)
    row = db.session.get(Job, job.id)
    row.scheduled_for = utcnow() - dt.timedelta(seconds=5)
    db.session.commit()
    wipe()
    passes(ctx, r, lambda: huey().pending_count() == 1)
    assert huey().scheduled_count() == 0


def test_a_retrying_job_keeps_its_attempt_count_and_retries_left(ctx):
    r = reconcile.Reconciler()
    job = submit(ctx, 'fail', retries=3, retry_delay=3600)
    r.run(ctx.config)
    row = db.session.get(Job, job.id)
    row.state, row.attempts = states.RETRYING, 2
    row.scheduled_for = utcnow() + dt.timedelta(seconds=3600)
    db.session.commit()
    wipe()
    passes(ctx, r, lambda: huey().scheduled_count() == 1)
    [task] = huey().scheduled()
    assert task.kwargs['meta'] == {'base': 2, 'retries': 1}


def test_a_held_or_moving_job_is_never_doubled(ctx):
    r = reconcile.Reconciler()
    held = submit(ctx, 'noop')
    taken = submit(ctx, 'noop')
    r.run(ctx.config)
    huey().storage.fetch('worker:1')  # in flight: held
    huey().storage.fetch('worker:1')
    gone = submit(ctx, 'noop')
    huey().storage.remove_waiting([gone.id])
    assert r.run(ctx.config) == []  # a suspect, not yet past its grace
    row = db.session.get(Job, gone.id)
    row.version += 1  # it moved on meanwhile (a worker recorded it): not lost
    db.session.commit()
    time.sleep(0.3)  # past the grace period: the condition under test
    assert r.run(ctx.config) == []
    time.sleep(0.3)
    assert r.run(ctx.config) == [gone.id]  # unchanged since, and still missing
    assert broker.message_ids('default') == {gone.id}
    assert huey().storage.inflight_job_ids() == {held.id, taken.id}


def test_a_regular_pass_compares_a_budget_of_rows_and_resumes(ctx, monkeypatch):
    monkeypatch.setattr(reconcile, 'BUDGET', 3)
    monkeypatch.setattr(reconcile, 'PAGE', 2)
    r = reconcile.Reconciler()
    ids = [submit(ctx, 'noop').id for _ in range(5)]
    r.run(ctx.config)  # the first pass compares everything
    huey().storage.remove_waiting(ids)
    r.run(ctx.config)
    assert len(r.suspects) == 4 and r.cursor is not None  # 2 pages of 2: the budget
    r.run(ctx.config)
    assert set(r.suspects) == set(ids) and r.cursor is None


def test_the_loss_shows_on_pages_and_in_healthz(ctx, client):
    r = reconcile.Reconciler()
    submit(ctx, 'noop')
    r.run(ctx.config)
    wipe()
    passes(ctx, r, lambda: huey().pending_count() == 1)
    page = client.get('/').get_data(as_text=True)
    assert 'id="broker-loss"' in page and '1 waiting job restored from the ledger' in page
    health = client.get('/healthz').get_json()
    assert health['status'] == 'ok' and health['broker_loss']['restored'] == 1


def test_pause_switches_an_older_version_kept_in_the_broker_move_to_the_ledger(ctx):
    huey().storage.put_data('qm:paused', b'1')
    huey().storage.put_data('qm:periodic-paused:report', b'1')
    reconcile.Reconciler().run(ctx.config)  # the first pass on this ledger
    assert controls.paused_queues() == {'default'}
    assert controls.paused_periodic() == {'report'}
    assert not huey().storage.has_data_for_key('qm:paused')


def test_a_paused_queue_stays_paused_across_a_wipe(ctx, client):
    assert client.post('/api/queues/default/pause').status_code == 200
    wipe()
    [row] = client.get('/api/queues').get_json()['queues']
    assert row['paused'] is True
    from app import consumer
    consumer.refresh_paused(ctx)
    assert huey().paused.is_set()
    client.post('/api/queues/default/resume')
    consumer.refresh_paused(ctx)
    assert not huey().paused.is_set()


# -- with real processes ---------------------------------------------------------

FAST = dict(HEARTBEAT_INTERVAL=0.5, LOST_AFTER=3, REAP_INTERVAL=1, RECONCILE_GRACE=1,
            RECONCILE_INTERVAL=2)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path, QUEUES='default,reports', **FAST)
    yield s
    s.close()


def _iso(text):
    return dt.datetime.fromisoformat(text.rstrip('Z'))


def test_jobs_waiting_when_redis_restarts_empty_all_run_once_on_time(stack):
    # The reproducer, with a retrying job, a paused queue and a
    # consumer running throughout as well.
    api = stack.api
    assert api.post('/api/queues/reports/pause')[0] == 200
    paused = api.submit('noop', queue='reports')
    runner = stack.consumer()
    retrying = api.submit('flaky', {'failures': 1}, retry_delay=8)
    running = api.submit('sleep', {'seconds': 4, 'steps': 4})
    api.wait_state(retrying['id'], 'retrying', 20)
    api.wait_state(running['id'], 'running', 20)
    runner.send_signal(9)  # no consumer from here until Redis is back
    runner.wait(10)
    queued = [api.submit('noop')['id'] for _ in range(5)]
    delayed = [api.submit('noop', delay=8) for _ in range(3)]
    stack.redis.stop()
    stack.redis.start()  # the same port, empty: no persistence
    stack.consumer()
    for job_id in queued + [running['id']]:
        api.wait_state(job_id, 'succeeded', 60)
    for job in delayed:
        done = api.wait_state(job['id'], 'succeeded', 60)
        assert _iso(done['started_at']) >= _iso(job['scheduled_for']), done  # not early
    done = api.wait_state(retrying['id'], 'succeeded', 60)
    assert [a['state'] for a in done['attempts']] == ['failed', 'succeeded']
    for job_id in queued + [j['id'] for j in delayed]:
        job = api.job(job_id)
        assert [a['state'] for a in job['attempts']] == ['succeeded'], job  # none ran twice
        assert [e['kind'] for e in job['events']] == ['restored'], job
    # The sleep was running on the killed consumer: lost, then run again.
    assert [a['state'] for a in api.job(running['id'])['attempts']] == ['lost', 'succeeded']
    # The paused queue is still paused, its job still waiting (and back in Redis).
    [reports] = [q for q in api.get('/api/queues')[1]['queues'] if q['name'] == 'reports']
    assert reports['paused'] is True and api.job(paused['id'])['state'] == 'queued'
    wait_for(lambda: api.get('/api/queues')[1]['queues'][1]['depth'] == 1, 20, 0.2,
             'the paused job to be back in its queue')
    health = api.get('/healthz')[1]
    assert health['broker_loss']['restored'] == 10, health  # 5 + 3 + retrying + paused
    assert 'The broker lost its data' in api.request('GET', '/')[1]


def test_a_flushall_while_consumers_run_loses_no_job_and_runs_none_twice(stack):
    api = stack.api
    stack.consumer()
    stack.consumer()
    ids = [api.submit('sleep', {'seconds': 0.2, 'steps': 1})['id'] for _ in range(40)]
    later = [api.submit('noop', delay=3)['id'] for _ in range(5)]
    wait_for(lambda: stack.sql("SELECT count(*) FROM job WHERE state = 'succeeded'")[0][0] >= 5,
             30, 0.05, 'some jobs to finish')
    stack.client.flushall()
    ids += [api.submit('noop')['id'] for _ in range(5)]
    for job_id in ids + later:
        api.wait_state(job_id, 'succeeded', 60)
    runs = dict(stack.sql("SELECT job_id, count(*) FROM attempt GROUP BY job_id"))
    assert {runs[j] for j in ids + later} == {1}, runs
    assert stack.sql("SELECT count(*) FROM attempt WHERE outcome != 'succeeded'")[0][0] == 0


def test_thousands_of_waiting_jobs_are_restored_once(stack):
    total = 3000
    fill = f'''
import uuid, datetime as dt
from app import broker, create_app
from app.extensions import db
from app.models import Job, utcnow
app = create_app()
with app.app_context():
    now = utcnow()
    rows = [Job(id=str(uuid.uuid4()), task='noop', queue='default', params={{}},
                state='scheduled', priority=0, retries=2, retry_delay=5.0, attempts=0,
                created_at=now, updated_at=now, scheduled_for=now + dt.timedelta(hours=1),
                version=1) for _ in range({total})]
    db.session.add_all(rows)
    db.session.flush()
    for job in rows:  # enqueued before the commit, as the API does
        broker.enqueue(job)
    db.session.commit()
'''
    import subprocess
    import sys
    from helpers import ROOT
    subprocess.run([sys.executable, '-c', fill], env=stack.env, cwd=ROOT, check=True)
    stack.consumer()
    schedule = 'huey.schedule.qm.default'
    assert stack.client.zcard(schedule) == total
    wait_for(lambda: stack.client.get('qm:epoch'), 20, 0.1, 'the leader to mark the broker')
    stack.client.flushall()
    # A batch's messages reach the broker just before its rows commit: wait for both.
    restored = "SELECT count(*) FROM job_event WHERE kind = 'restored'"
    wait_for(lambda: stack.client.zcard(schedule) == total and stack.sql(restored)[0][0] == total,
             120, 0.2, 'every job restored')
    assert stack.sql("SELECT count(*) FROM job WHERE state != 'scheduled'")[0][0] == 0
    assert stack.client.zcard(schedule) == total  # once each: nothing doubled


def test_a_broker_restored_from_an_older_copy_runs_nothing_again(ctx):
    # A failover to a replica that had not caught up, or a restore from an
    # old snapshot: the marker matches, but messages of jobs that ran since
    # are back.
    r = reconcile.Reconciler()
    ran, waits = submit(ctx, 'noop'), submit(ctx, 'noop', delay=3600)
    r.run(ctx.config)
    snapshot = {table: huey().storage.sql(f'select * from {table}', results=True)
                for table in ('task', 'schedule', 'kv')}
    r.run(ctx.config)  # the broker's pass counter moves on
    task = huey().dequeue()
    assert task.id == ran.id
    row = db.session.get(Job, ran.id)
    row.state, row.attempts = states.SUCCEEDED, 1  # it ran since the snapshot
    db.session.commit()
    s = huey().storage
    for table, rows in snapshot.items():  # the broker comes back as it was then
        s.sql(f'delete from {table}', commit=True)
        for values in rows:
            s.sql(f'insert into {table} values ({",".join("?" * len(values))})', values,
                  commit=True)
    r.run(ctx.config)
    assert broker.message_ids('default') == {waits.id}  # the finished job's message is gone
    assert reconcile.loss_notice() is not None


def test_a_payment_the_broker_lost_comes_back_with_its_real_card(ctx):
    card = '4111 1111 1111 1234'
    r = reconcile.Reconciler()
    job = submit(ctx, 'payment', params={'card': card})
    assert db.session.get(Job, job.id).params['card'] == '**** 1234'  # what pages show
    r.run(ctx.config)
    wipe()
    assert passes(ctx, r, lambda: broker.message_ids('default') == {job.id}) == [job.id]
    # Rebuilt from the ledger row: the message carries the real number again.
    [task] = huey().pending()
    assert task.kwargs['params']['card'] == card

"""The reaper's decisions, in-process on the embedded broker and a real ledger.

A consumer is simulated by its broker lease and in-flight record (what
``storage.fetch`` writes) and its ledger heartbeat row; "dead" means the
lease ran out and the heartbeat is stale.
"""
import datetime as dt

import pytest
import sqlalchemy as sa

import huey_tasks
from app import broker, catalog, jobs, message, reaper, states
from app.extensions import db
from app.models import Attempt, Job, Worker, utcnow


def submit(app, task, **options):
    return jobs.submit(catalog.validate({'task': task, **options}, app.config)).orm()


def storage():
    return broker.hueys['default'].storage


def heartbeat(worker_id, silent_for=0.0, stopped=False, current=()):
    seen = utcnow() - dt.timedelta(seconds=silent_for)
    db.session.add(Worker(id=worker_id, host=worker_id.split(':')[0], pid=1, queues=['default'],
                          concurrency=4, started_at=seen, last_seen=seen,
                          stopped_at=seen if stopped else None, processed=0, failed=0,
                          current=list(current), leader=False))
    db.session.commit()


def take(consumer):
    """``consumer`` fetches the next message, as its worker would."""
    delivery = storage().fetch(consumer)
    assert delivery is not None, 'nothing queued'
    return delivery


def expire(consumer):
    """``consumer``'s lease runs out: it is dead as far as the broker knows."""
    storage().sql('update qm_alive set expires = 0 where consumer = ?', (consumer,), commit=True)


def start(job, worker, ago):
    """Record that ``worker`` started the job's first attempt ``ago`` s ago."""
    at = utcnow() - dt.timedelta(seconds=ago)
    row = db.session.get(Job, job.id)
    row.state, row.attempts, row.started_at, row.worker = states.RUNNING, 1, at, worker
    db.session.add(Attempt(job_id=job.id, number=1, outcome='running', started_at=at,
                           worker=worker))
    db.session.commit()


def inflight_of(consumer):
    return [i.job_id for i in storage().inflight(consumer)]


def test_a_message_taken_by_a_consumer_that_died_before_recording_anything_runs_again(ctx):
    job = submit(ctx, 'noop')
    other = submit(ctx, 'noop')  # still in the queue: not lost
    take('gone:1')
    assert reaper.reap(ctx.config) == []  # its lease is current: alive
    expire('gone:1')
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts, row.error_type) == ('queued', 1, 'WorkerLost')
    [attempt] = row.attempt_rows
    assert attempt.outcome == 'lost' and 'consumer gone:1 died' in attempt.error_message
    assert inflight_of('gone:1') == []
    assert db.session.get(Job, other.id).attempts == 0
    assert broker.message_ids('default') == {job.id, other.id}
    task = broker.hueys['default'].dequeue()  # first in the queue: the other job
    task = broker.hueys['default'].dequeue() if task.id != job.id else task
    assert task.id == job.id and message.attempt_number(task) == 2
    assert 'gone:1' not in storage().consumers()  # forgotten once it holds nothing


def test_a_running_job_of_a_dead_consumer_runs_again_as_its_next_attempt(ctx):
    job = submit(ctx, 'noop')
    take('gone:1')
    heartbeat('gone:1', silent_for=100)
    start(job, 'gone:1/Worker-2', ago=90)
    expire('gone:1')
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts) == ('queued', 1)
    [attempt] = row.attempt_rows
    assert attempt.outcome == 'lost' and attempt.worker == 'gone:1/Worker-2'
    assert broker.message_ids('default') == {job.id}
    assert inflight_of('gone:1') == []


def test_a_message_whose_outcome_is_recorded_is_only_dropped(ctx):
    job = submit(ctx, 'noop')
    take('gone:1')
    row = db.session.get(Job, job.id)
    row.state, row.attempts = states.SUCCEEDED, 1
    db.session.add(Attempt(job_id=job.id, number=1, outcome='succeeded', worker='gone:1/W'))
    db.session.commit()
    expire('gone:1')
    assert reaper.reap(ctx.config) == []
    db.session.expire_all()
    assert [a.outcome for a in db.session.get(Job, job.id).attempt_rows] == ['succeeded']
    assert inflight_of('gone:1') == [] and broker.message_ids('default') == set()


def test_a_job_the_ledger_never_heard_of_gets_its_row_and_a_lost_attempt(ctx):
    task = huey_tasks.sleep.task_type.wrappers[broker.hueys['default'].name].s(
        params={'seconds': 1.0, 'steps': 1}, meta={'base': 0, 'retries': 2})
    task.retries = 2
    broker.hueys['default'].enqueue(task)  # around the API: no row
    take('gone:1')
    expire('gone:1')
    assert reaper.reap(ctx.config) == [task.id]
    db.session.expire_all()
    row = db.session.get(Job, task.id)
    assert (row.task, row.state, row.params, row.attempts) == (
        'sleep', 'queued', {'seconds': 1.0, 'steps': 1}, 1)
    assert [a.outcome for a in row.attempt_rows] == ['lost']
    assert broker.message_ids('default') == {task.id}


def test_a_retry_written_before_the_death_is_not_run_beside_the_recovery(ctx):
    job = submit(ctx, 'fail', retries=3, retry_delay=60)
    huey = broker.hueys['default']
    delivery = take('gone:1')
    task = huey.deserialize_task(delivery.data)
    huey._requeue_task(task, huey._get_timestamp())  # the retry, in the schedule
    assert huey.scheduled_count() == 1
    expire('gone:1')
    assert reaper.reap(ctx.config) == [job.id]
    assert (huey.scheduled_count(), huey.pending_count()) == (0, 1)


@pytest.mark.parametrize('task, options, why', [
    ('payment', {}, 'not safe to run twice'),
    ('noop', {'retries': 0}, 'no retries left'),
])
def test_a_lost_job_fails_saying_why_when_it_cannot_run_again(ctx, task, options, why):
    job = submit(ctx, task, **options)
    take('gone:1')
    expire('gone:1')
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert row.state == 'failed' and row.error.endswith(f'({why})')
    assert [a.outcome for a in row.attempt_rows] == ['lost']
    assert row.run_seconds is None  # it never started as far as the ledger knows
    assert broker.message_ids('default') == set() and inflight_of('gone:1') == []


@pytest.mark.parametrize('task, options, why', [
    ('payment', {}, 'not safe to run twice'),
    ('noop', {'retries': 0}, 'no retries left'),
])
def test_a_running_job_of_a_stopped_consumer_fails_when_it_cannot_run_again(ctx, task, options,
                                                                           why):
    job = submit(ctx, task, **options)
    heartbeat('gone:1', stopped=True)  # and its in-flight record went with the broker's data
    start(job, 'gone:1/Worker-1', ago=1)
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert row.state == 'failed' and row.error.endswith(f'({why})')
    assert [a.outcome for a in row.attempt_rows] == ['lost']
    assert 'stopped at' in row.attempt_rows[0].error_message
    # Its run time is the lost attempt's, from its start to when it was found lost.
    assert row.run_seconds == row.attempt_rows[0].duration >= 1


def test_jobs_of_live_consumers_are_left_alone(ctx):
    job = submit(ctx, 'noop')
    take('here:1')
    heartbeat('here:1', silent_for=0, current=[job.id])
    start(job, 'here:1/Worker-1', ago=120)
    assert reaper.reap(ctx.config) == []
    db.session.expire_all()
    assert db.session.get(Job, job.id).state == 'running'
    assert inflight_of('here:1') == [job.id]


def test_a_fresh_heartbeat_keeps_a_consumer_alive_whose_lease_is_gone(ctx):
    # A broker that lost its data lost the leases too: the ledger vouches
    # for the consumer until it renews its lease.
    job = submit(ctx, 'noop')
    take('here:1')
    heartbeat('here:1', silent_for=0, current=[job.id])
    start(job, 'here:1/Worker-1', ago=1)
    expire('here:1')
    assert reaper.reap(ctx.config) == []
    assert inflight_of('here:1') == [job.id]


def test_a_job_its_live_consumer_no_longer_runs_is_lost(ctx):
    job = submit(ctx, 'noop')
    heartbeat('here:1', silent_for=0, current=[])
    start(job, 'here:1/Worker-1', ago=ctx.config['LOST_AFTER'] + 5)
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    assert 'no longer runs this job' in db.session.get(Job, job.id).error


def test_a_second_look_at_a_recovered_attempt_changes_nothing(ctx):
    job = submit(ctx, 'noop')
    take('gone:1')
    heartbeat('gone:1', silent_for=100)
    start(job, 'gone:1/Worker-2', ago=90)
    expire('gone:1')
    assert reaper.recover(job.id, 1, 'first look') is True
    assert reaper.recover(job.id, 1, 'second look') is False
    assert reaper.reap(ctx.config) == []  # the in-flight message: its attempt is recorded
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert [a.outcome for a in row.attempt_rows] == ['lost'] and row.attempts == 1
    assert broker.message_ids('default') == {job.id}


def test_long_gone_consumers_are_forgotten(ctx):
    heartbeat('ancient:1', silent_for=ctx.config['WORKER_RETENTION'] + 60, stopped=True)
    heartbeat('recent:1', silent_for=60, stopped=True)
    reaper.reap(ctx.config)
    assert [w.id for w in db.session.query(Worker)] == ['recent:1']
    assert db.session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0


def test_a_lost_job_an_operator_asked_to_stop_ends_canceled(ctx):
    job = submit(ctx, 'sleep')
    take('gone:1')
    heartbeat('gone:1', silent_for=100)
    start(job, 'gone:1/Worker-2', ago=90)
    row = db.session.get(Job, job.id)
    row.cancel_requested_at = utcnow()
    db.session.commit()
    expire('gone:1')
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert row.state == 'canceled' and 'an operator had asked it to stop' in row.error
    assert broker.message_ids('default') == set()


def test_the_audit_log_and_resolved_alerts_are_kept_for_their_retention(ctx, monkeypatch):
    from app import alerts, audit
    from app.models import Alert, AuditEntry
    monkeypatch.setattr(reaper, 'COMPACT_EVERY', 1e-6)  # this pass prunes
    now = utcnow()
    year, quarter = ctx.config['AUDIT_RETENTION'], ctx.config['ALERT_RETENTION']
    assert (year, quarter) == (365 * 86400.0, 90 * 86400.0)

    def ago(seconds):
        return now - dt.timedelta(seconds=seconds)
    for i, at in enumerate((ago(year + 3600), ago(year + 60), ago(year - 3600), now)):
        db.session.add(AuditEntry(at=at, user='ann', role='admin', via='session',
                                  action='submit', target=f'job-{i}', outcome='done'))
    incident = dict(rule='failing', kind='failure_rate', scope='queue', value=60.0,
                    threshold=50.0, message='m', delivery='sent', delivery_attempts=1)
    for subject, state, resolved, delivery in (
            ('old', 'resolved', ago(quarter + 60), 'sent'),
            ('old-off', 'resolved', ago(quarter + 60), 'off'),
            ('old-unsent', 'resolved', ago(quarter + 60), 'pending'),  # its message is due
            ('recent', 'resolved', ago(quarter - 3600), 'sent'),
            ('firing', 'firing', None, 'sent')):
        db.session.add(Alert(**dict(incident, subject=subject, state=state,
                                    fired_at=ago(quarter + 7200), resolved_at=resolved,
                                    delivery=delivery)))
    db.session.commit()
    reaper.reap(ctx.config)
    db.session.expire_all()
    assert sorted(db.session.scalars(sa.select(AuditEntry.target))) == ['job-2', 'job-3']
    assert sorted(db.session.scalars(sa.select(Alert.subject))) == [
        'firing', 'old-unsent', 'recent']
    # A backlog goes a batch at a time, oldest first; 0 keeps everything.
    for i in range(5):
        db.session.add(AuditEntry(at=ago(year + 100 - i), user=None, role=None, via='local',
                                  action='cancel', target=f'old-{i}', outcome='done'))
    db.session.commit()
    assert audit.prune(ago(year), limit=2) == 2
    assert sorted(db.session.scalars(sa.select(AuditEntry.target)))[:3] == [
        'job-2', 'job-3', 'old-2']
    ctx.config.update(AUDIT_RETENTION=0.0, ALERT_RETENTION=0.0)
    reaper.reap(ctx.config)
    assert db.session.scalar(sa.select(sa.func.count()).select_from(AuditEntry)) == 5
    assert alerts.prune(now, reaper.PRUNE_BATCH) == 1  # "recent"; the firing and the unsent stay

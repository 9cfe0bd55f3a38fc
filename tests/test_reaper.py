"""The reaper's decisions, in-process on the embedded broker and a real ledger."""
import datetime as dt
import time

import pytest

from app import broker, catalog, jobs, reaper, states
from app.extensions import db
from app.models import Attempt, Job, Worker, utcnow


@pytest.fixture
def ctx(app):
    with app.app_context():
        reaper.sweep.__init__()
        yield app
        db.session.remove()


def submit(app, task, **options):
    return jobs.submit(catalog.validate({'task': task, **options}, app.config))


def consumer(worker_id, silent_for=0.0, stopped=False, current=()):
    seen = utcnow() - dt.timedelta(seconds=silent_for)
    db.session.add(Worker(id=worker_id, host=worker_id.split(':')[0], pid=1, queues=['default'],
                          concurrency=4, started_at=seen, last_seen=seen,
                          stopped_at=seen if stopped else None, processed=0, failed=0,
                          current=list(current), leader=False))
    db.session.commit()


def start(job, worker, ago):
    """Record that ``worker`` took ``job`` and started its first attempt ``ago`` s ago."""
    broker.hueys['default'].dequeue()
    at = utcnow() - dt.timedelta(seconds=ago)
    row = db.session.get(Job, job.id)
    row.state, row.attempts, row.started_at, row.worker = states.RUNNING, 1, at, worker
    db.session.add(Attempt(job_id=job.id, number=1, outcome='running', started_at=at,
                           worker=worker))
    db.session.commit()


def test_running_job_of_a_silent_consumer_runs_again(ctx):
    job = submit(ctx, 'noop')
    consumer('gone:1', silent_for=100)
    start(job, 'gone:1/Worker-2', ago=90)
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert (row.state, row.error_type, row.attempts) == ('queued', 'WorkerLost', 1)
    [attempt] = row.attempt_rows
    assert attempt.outcome == 'lost' and 'gone:1/Worker-2 stopped heartbeating' in attempt.error_message
    task = broker.hueys['default'].dequeue()  # back in the queue, as attempt 2
    assert task.id == job.id and task.kwargs['meta'] == {'base': 1, 'retries': 1}


def test_jobs_of_live_consumers_are_left_alone(ctx):
    job = submit(ctx, 'noop')
    consumer('here:1', silent_for=0, current=[job.id])
    start(job, 'here:1/Worker-1', ago=120)
    assert reaper.reap(ctx.config) == []
    db.session.expire_all()
    assert db.session.get(Job, job.id).state == 'running'


def test_a_job_its_live_consumer_no_longer_runs_is_lost(ctx):
    job = submit(ctx, 'noop')
    consumer('here:1', silent_for=0, current=[])
    start(job, 'here:1/Worker-1', ago=ctx.config['LOST_AFTER'] + 5)
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    assert 'no longer runs this job' in db.session.get(Job, job.id).error


@pytest.mark.parametrize('task, options, why', [
    ('payment', {}, 'not safe to run twice'),
    ('noop', {'retries': 0}, 'no retries left'),
])
def test_lost_job_fails_when_it_cannot_run_again(ctx, task, options, why):
    job = submit(ctx, task, **options)
    consumer('gone:1', stopped=True)
    start(job, 'gone:1/Worker-1', ago=1)
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert row.state == 'failed' and why in row.error
    assert broker.hueys['default'].pending_count() == 0


def test_a_message_taken_by_a_dead_consumer_before_it_recorded_anything(ctx):
    ctx.config['LOST_AFTER'] = 0.3
    job = submit(ctx, 'noop')
    other = submit(ctx, 'noop')  # still in the queue: not lost
    consumer('gone:1', silent_for=5)
    broker.hueys['default'].dequeue()  # taken by the dead consumer, never started
    assert reaper.reap(ctx.config) == []  # first sighting: only a suspect
    time.sleep(0.4)  # suspects must stay missing for LOST_AFTER: the condition under test
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts) == ('queued', 1)
    assert [a.outcome for a in row.attempt_rows] == ['lost']
    assert db.session.get(Job, other.id).attempts == 0
    ids = broker.message_ids('default')
    assert ids == {job.id, other.id}


@pytest.mark.parametrize('task, options, why', [
    ('payment', {}, 'not safe to run twice'),
    ('noop', {'retries': 0}, 'no retries left'),
])
def test_a_message_lost_before_it_started_fails_saying_why_it_cannot_run_again(
        ctx, task, options, why):
    ctx.config['LOST_AFTER'] = 0.3
    job = submit(ctx, task, **options)
    consumer('gone:1', silent_for=5)
    broker.hueys['default'].dequeue()  # taken by the dead consumer, never started
    assert reaper.reap(ctx.config) == []
    time.sleep(0.4)  # suspects must stay missing for LOST_AFTER: the condition under test
    assert reaper.reap(ctx.config) == [job.id]
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert row.state == 'failed' and row.error.endswith(f'({why})')
    assert broker.message_ids('default') == set()


def test_a_missing_job_that_moves_on_is_not_a_suspect_any_more(ctx):
    ctx.config['LOST_AFTER'] = 0.3
    job = submit(ctx, 'noop')
    consumer('gone:1', silent_for=5)
    broker.hueys['default'].dequeue()
    assert reaper.reap(ctx.config) == []
    # a live worker had it after all: the ledger hears it start
    consumer('here:1', current=[job.id])
    row = db.session.get(Job, job.id)
    row.state, row.attempts, row.version = 'running', 1, row.version + 1
    db.session.commit()
    time.sleep(0.4)
    assert reaper.reap(ctx.config) == []


def test_long_gone_consumers_are_forgotten(ctx):
    consumer('ancient:1', silent_for=ctx.config['WORKER_RETENTION'] + 60, stopped=True)
    consumer('recent:1', silent_for=60, stopped=True)
    reaper.reap(ctx.config)
    assert [w.id for w in db.session.query(Worker)] == ['recent:1']

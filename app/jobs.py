"""Service functions on jobs, shared by the pages and the JSON API."""
import base64
import binascii
import datetime as dt
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import defer
from werkzeug.exceptions import NotFound

from . import broker, catalog, events, states
from .extensions import db
from .models import Attempt, Job, Worker, utcnow


class BadQuery(ValueError):
    """A list filter or cursor that cannot be used (HTTP 400)."""


def _announce(*jobs, deleted=()):
    events.publish([{'id': j.id, 'version': j.version, 'state': j.state, 'queue': j.queue,
                     'task': j.task} for j in jobs], deleted)


def submit(sub):
    """Record and enqueue a validated :class:`~app.catalog.Submission`.

    The row is written before the message is enqueued and committed after,
    so a job the broker refuses leaves no row behind (``BrokerUnavailable``).
    """
    now = utcnow()
    job = Job(id=str(uuid.uuid4()), task=sub.task.name, queue=sub.queue, params=sub.params,
              state=states.SCHEDULED if sub.eta else states.QUEUED, priority=sub.priority,
              retries=sub.retries, retry_delay=sub.retry_delay, attempts=0,
              created_at=now, updated_at=now, scheduled_for=sub.eta, version=1)
    db.session.add(job)
    db.session.flush()
    return _commit_if_handed_over(job, lambda: broker.enqueue(job))


def _commit_if_handed_over(job, hand_over):
    """Commit the pending change to ``job`` once ``hand_over()`` reached the broker.

    The broker is told first and the row committed after: a refusal rolls
    the change back, so no row claims what the broker does not hold.
    """
    try:
        hand_over()
    except broker.BrokerUnavailable:
        db.session.rollback()
        raise
    db.session.commit()
    _announce(job)
    return job


def get(job_id):
    """The job with ``job_id``, or a 404."""
    job = db.session.get(Job, job_id) if isinstance(job_id, str) and len(job_id) <= 36 else None
    if job is None:
        raise NotFound(f'no job with id {job_id}')
    return job


def attempts(job):
    return db.session.scalars(
        sa.select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number)).all()


def _transition(job_id, action, values):
    """Move a job whose state allows ``action``; raises StateConflict or NotFound."""
    job = get(job_id)
    states.check(job.state, action)
    previous = job.state
    result = db.session.execute(
        sa.update(Job)
        .where(Job.id == job.id, Job.state.in_(states.ALLOWED[action]),
               Job.version == job.version)
        .values(version=Job.version + 1, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        # Changed under us (a worker picked it up): report what it is now.
        db.session.rollback()
        job = get(job_id)
        states.check(job.state, action)
        raise states.StateConflict(action, job.state)
    db.session.refresh(job)
    return job, previous


def retry(job_id):
    """Run a failed or canceled job again: a new attempt of the same job."""
    job, _ = _transition(job_id, 'retry', dict(
        state=states.QUEUED, finished_at=None, scheduled_for=None, result=None, error=None,
        progress=None, progress_message=None))

    def hand_over():
        broker.restore(job)
        broker.enqueue(job, base=job.attempts)
    return _commit_if_handed_over(job, hand_over)


def cancel(job_id):
    """Cancel a job that is waiting for a worker (queued, scheduled, retrying)."""
    job, previous = _transition(job_id, 'cancel', dict(
        state=states.CANCELED, finished_at=utcnow(), progress_message=None))
    # Committed first: if the web process dies before the broker hears of
    # it, the worker's own record of running the job corrects the row.
    db.session.commit()
    try:
        broker.withdraw(job)
    except broker.BrokerUnavailable:
        db.session.execute(
            sa.update(Job).where(Job.id == job.id, Job.version == job.version)
            .values(state=previous, finished_at=None, version=Job.version + 1,
                    updated_at=utcnow()))
        db.session.commit()
        raise
    _announce(job)
    return job


def delete(job_id):
    """Delete a finished job and its attempts."""
    job = get(job_id)
    states.check(job.state, 'delete')
    db.session.execute(sa.delete(Attempt).where(Attempt.job_id == job.id))
    result = db.session.execute(
        sa.delete(Job).where(Job.id == job.id, Job.state.in_(states.FINISHED)))
    if result.rowcount != 1:
        db.session.rollback()
        raise states.StateConflict('delete', get(job_id).state)
    db.session.commit()
    _announce(deleted=[job.id])


# -- listing ------------------------------------------------------------------

def encode_cursor(job):
    raw = f'{job.created_at.isoformat()}|{job.id}'.encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip('=')


def decode_cursor(cursor):
    try:
        raw = base64.urlsafe_b64decode(cursor + '=' * (-len(cursor) % 4)).decode()
        created, job_id = raw.split('|', 1)
        return dt.datetime.fromisoformat(created), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery('cursor is not one this server handed out') from None


def _like(text):
    escaped = text.replace('\\', '\\\\').replace('%', '\\%').replace('_', '\\_')
    return f'%{escaped}%'


def query_filters(state=None, queue=None, task=None, q=None):
    """Validated filters as SQL conditions; raises :class:`BadQuery`."""
    conditions = []
    if state:
        if state not in states.JOB_STATES:
            raise BadQuery(f'state must be one of {", ".join(states.JOB_STATES)}')
        conditions.append(Job.state == state)
    if queue:
        conditions.append(Job.queue == queue)
    if task:
        conditions.append(Job.task == task)
    if q:
        q = q.strip()[:200]
        text = [Job.id.startswith(q.lower(), autoescape=True),
                sa.cast(Job.params, sa.Text).like(_like(q), escape='\\'),
                Job.error.like(_like(q), escape='\\')]
        conditions.append(sa.or_(*text))
    return conditions


def list_jobs(state=None, queue=None, task=None, q=None, limit=50, cursor=None,
              with_result=False):
    """One page of jobs, newest first: ``(jobs, next_cursor)``.

    Keyset pagination on (created_at, id): each page is an index range scan,
    as fast on page 10,000 as on page 1. Results (up to 64 KiB each) are only
    loaded when asked for.
    """
    stmt = (sa.select(Job).options(*(() if with_result else (defer(Job.result, raiseload=True),)))
            .where(*query_filters(state, queue, task, q))
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(limit + 1))
    if cursor:
        created, job_id = decode_cursor(cursor)
        stmt = stmt.where(sa.tuple_(Job.created_at, Job.id) < sa.tuple_(created, job_id))
    rows = db.session.scalars(stmt).all()
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def stats():
    """Counts of jobs by state, overall and per queue."""
    rows = db.session.execute(
        sa.select(Job.queue, Job.state, sa.func.count()).group_by(Job.queue, Job.state)).all()
    by_state = dict.fromkeys(states.JOB_STATES, 0)
    by_queue = {}
    for queue, state, count in rows:
        by_state[state] = by_state.get(state, 0) + count
        by_queue.setdefault(queue, dict.fromkeys(states.JOB_STATES, 0))[state] = count
    return {'states': by_state, 'queues': by_queue, 'total': sum(by_state.values())}


def workers(lost_after):
    """Consumers as their heartbeats describe them: online first, newest first."""
    rows = db.session.scalars(sa.select(Worker).order_by(Worker.started_at.desc())).all()
    return sorted(rows, key=lambda w: not w.online(lost_after))


def task_names():
    return sorted(catalog.TASKS)

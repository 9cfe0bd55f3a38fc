"""Job commands: submit, retry, cancel, run now, delete, bulk, purge.

The write side of the jobs service, shared by the pages and the JSON API;
:mod:`app.queries` reads. Every change goes through :func:`change` and is
announced with :func:`announce`.
"""
import datetime as dt
import uuid

import sqlalchemy as sa

from . import broker, events, states
from .extensions import db
from .models import Job, utcnow
from .queries import BadQuery, get, query_filters


def announce(*jobs, deleted=()):
    """Tell the live pages that ``jobs`` (Job rows, committed) changed and ``deleted`` ids went."""
    events.publish([events.job_change(j.id, j.state, j.queue, j.task, j.version)
                    for j in jobs], deleted)


def _announce_ids(ids):
    announce(*db.session.scalars(sa.select(Job).where(Job.id.in_(list(ids)))))


def change(*where, returning=None, **values):
    """Set ``values`` on the job rows matching ``where``; the one way commands change jobs.

    Every change moves the row's ``version`` on (live pages and the guard
    below see it) and its ``updated_at``. ``where`` are SQLAlchemy
    conditions; a guard such as ``Job.version == job.version`` makes the
    change miss a row a worker changed meanwhile. Returns the rows of
    ``returning`` (columns) when given, else the number of rows changed.
    Not committed.
    """
    stmt = (sa.update(Job).where(*where)
            .values(version=Job.version + 1, updated_at=utcnow(), **values)
            .execution_options(synchronize_session=False))
    if returning is not None:
        return db.session.execute(stmt.returning(*returning)).all()
    return db.session.execute(stmt).rowcount


def _revert_cancel(before, canceled_at):
    """Put jobs canceled at ``canceled_at`` back in their ``before`` states (``{id: state}``).

    For a cancel the broker did not hear of: a job whose message is still in
    the queue must not be called canceled while a worker will run it. A job
    that changed since (its row no longer canceled at that time) is left.
    Commits.
    """
    for job_id, state in before.items():
        change(Job.id == job_id, Job.state == states.CANCELED, Job.finished_at == canceled_at,
               state=state, finished_at=None)
    db.session.commit()


def submit(sub):
    """Record and enqueue a validated :class:`~app.catalog.Submission`.

    The row is written before the message is enqueued and committed after,
    so a job the broker refuses leaves no row behind (``BrokerUnavailable``).
    A submission whose idempotency key was used before returns that job
    instead; ``job.created`` says which happened.
    """
    if sub.idempotency_key:
        existing = _by_key(sub.idempotency_key)
        if existing is not None:
            existing.created = False
            return existing
    now = utcnow()
    # The row shows secret parameters masked; their values are kept apart
    # for the broker (see Job.secret_params).
    shown, secret = sub.task.split(sub.params)
    job = Job(id=str(uuid.uuid4()), task=sub.task.name, queue=sub.queue, params=shown,
              secret_params=secret or None,
              state=states.SCHEDULED if sub.eta else states.QUEUED, priority=sub.priority,
              retries=sub.retries, retry_delay=sub.retry_delay, attempts=0, attempt_base=0,
              timeout=sub.timeout, idempotency_key=sub.idempotency_key,
              created_at=now, updated_at=now, scheduled_for=sub.eta, version=1)
    db.session.add(job)
    try:
        db.session.flush()
    except sa.exc.IntegrityError:
        # The same key, submitted at the same moment by someone else.
        db.session.rollback()
        existing = _by_key(sub.idempotency_key)
        if existing is None:
            raise
        existing.created = False
        return existing
    job.created = True
    return _commit_if_handed_over(job, lambda: broker.enqueue(job))


def _by_key(key):
    return db.session.scalars(sa.select(Job).where(Job.idempotency_key == key)).first()


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
    announce(job)
    return job


def _transition(job_id, action, values):
    """Move a job whose state allows ``action``; raises StateConflict or NotFound.

    Guarded by the row's version: when a worker changed the job meanwhile the
    move is tried again on what the job is now.
    """
    for _ in range(5):
        job = get(job_id)
        states.check(job.state, action)
        previous = job.state
        if change(Job.id == job.id, Job.state.in_(states.ALLOWED[action]),
                  Job.version == job.version, **values) == 1:
            db.session.refresh(job)
            return job, previous
        db.session.rollback()
        db.session.expire_all()
    raise states.StateConflict(action, get(job_id).state)


def retry(job_id):
    """Run a failed or canceled job again: a new attempt of the same job."""
    job, _ = _transition(job_id, 'retry', dict(
        state=states.QUEUED, finished_at=None, scheduled_for=None, result=None, error=None,
        error_type=None, progress=None, progress_message=None, cancel_requested_at=None,
        attempt_base=Job.attempts))

    def hand_over():
        broker.restore(job)
        broker.enqueue(job, base=job.attempts)
    return _commit_if_handed_over(job, hand_over)


def cancel(job_id):
    """Cancel a job: withdraw it if it waits, ask it to stop if it runs.

    A waiting job (queued, scheduled, retrying) is ``canceled`` at once. A
    running one is asked to stop (``cancel_requested_at``) and ends
    ``canceled`` at the task's next progress report, its partial progress
    kept; a task that finishes first ends as it finishes.
    """
    job = get(job_id)
    if job.state == states.RUNNING:
        return _request_cancel(job)
    job, previous = _transition(job_id, 'cancel', dict(
        state=states.CANCELED, finished_at=utcnow(), progress_message=None))
    # Committed first: if the web process dies before the broker hears of
    # it, the worker's own record of running the job corrects the row.
    db.session.commit()
    try:
        broker.withdraw(job)
    except broker.BrokerUnavailable:
        _revert_cancel({job.id: previous}, job.finished_at)
        raise
    announce(job)
    return job


def _request_cancel(job):
    if not change(Job.id == job.id, Job.state == states.RUNNING,
                  cancel_requested_at=utcnow()):
        db.session.rollback()
        raise states.StateConflict('cancel', get(job.id).state)
    db.session.refresh(job)
    return _commit_if_handed_over(job, lambda: broker.request_cancel(job))


def run_now(job_id):
    """Run a scheduled job (or a job waiting for its retry) at once."""
    job, previous = _transition(job_id, 'run_now', dict(state=states.QUEUED, scheduled_for=None))

    def hand_over():
        broker.withdraw(job)
        broker.restore(job)  # no revoke flag may stop the message we enqueue
        # What is left of the round's retries after the attempt about to run.
        broker.enqueue(job, base=job.attempts,
                       retries=job.retries_left(after=job.attempts))
    return _commit_if_handed_over(job, hand_over)


def delete(job_id):
    """Delete a finished job and its attempts."""
    job = get(job_id)
    states.check(job.state, 'delete')
    if not _delete_finished([job.id]):
        db.session.rollback()
        raise states.StateConflict('delete', get(job_id).state)
    db.session.commit()
    announce(deleted=[job.id])


def _delete_finished(ids):
    """Delete those of ``ids`` that are finished; return the ids deleted.

    Their attempts and log lines go with them (the schema's ON DELETE CASCADE).
    """
    return db.session.execute(
        sa.delete(Job).where(Job.id.in_(ids), Job.state.in_(states.FINISHED))
        .returning(Job.id)).scalars().all()


# -- bulk actions ---------------------------------------------------------------

MAX_BULK = 50_000
ACTIONS = ('retry', 'cancel', 'delete')


def bulk(action, ids=None, filters=None, spare_tasks=()):
    """Apply ``action`` to the jobs named, or to every job matching ``filters``.

    Jobs whose state does not allow the action are skipped and counted by
    state; jobs of the task types in ``spare_tasks`` (those the caller may
    not act on) are skipped as ``"not allowed"``. At most ``MAX_BULK`` jobs
    are handled per call (``truncated`` says there are more: call again).
    Returns a summary.
    """
    if action not in ACTIONS:
        raise BadQuery(f'action must be one of {", ".join(ACTIONS)}')
    if ids is not None:
        targets = list(dict.fromkeys(ids))
        if len(targets) > MAX_BULK:
            raise BadQuery(f'at most {MAX_BULK} ids at once')
    else:
        targets = db.session.scalars(
            sa.select(Job.id).where(*query_filters(**(filters or {})))
            .order_by(Job.created_at, Job.id).limit(MAX_BULK + 1)).all()
    summary = {'action': action, 'matched': min(len(targets), MAX_BULK), 'done': 0,
               'skipped': {}, 'truncated': len(targets) > MAX_BULK}
    targets = targets[:MAX_BULK]
    for start in range(0, len(targets), 500):
        chunk = targets[start:start + 500]
        rows = db.session.execute(
            sa.select(Job.id, Job.state, Job.queue, Job.task).where(Job.id.in_(chunk))).all()
        _skip(summary, 'missing', len(chunk) - len(rows))
        allowed = []
        for r in rows:
            if r.task in spare_tasks:
                _skip(summary, 'not allowed')
            elif states.allows(r.state, action):
                allowed.append(r)
            else:
                _skip(summary, r.state)
        summary['done'] += _BULK[action](allowed, summary)
    return summary


def _skip(summary, reason, n=1):
    """Count ``n`` jobs skipped for ``reason`` (a state, 'missing' or 'changed')."""
    if n:
        summary['skipped'][reason] = summary['skipped'].get(reason, 0) + n


def _bulk_retry(rows, summary):
    done = 0
    for r in rows:
        try:
            retry(r.id)
            done += 1
        except states.StateConflict as exc:
            _skip(summary, exc.state)
    return done


def _bulk_delete(rows, summary):
    deleted = _delete_finished([r.id for r in rows])
    db.session.commit()
    _skip(summary, 'changed', len(rows) - len(deleted))
    if deleted:
        announce(deleted=deleted)
    return len(deleted)


def _bulk_cancel(rows, summary):
    done = 0
    waiting = [r for r in rows if r.state != states.RUNNING]
    for r in rows:
        if r.state == states.RUNNING:
            try:
                cancel(r.id)
                done += 1
            except states.StateConflict as exc:
                _skip(summary, exc.state)
    if not waiting:
        return done
    now = utcnow()
    ids = [r.id for r in waiting]
    canceled = change(Job.id.in_(ids), Job.state.in_(states.WAITING),
                      state=states.CANCELED, finished_at=now, progress_message=None,
                      returning=(Job.id, Job.queue))
    # Committed before the broker hears of it, as a single cancel does.
    db.session.commit()
    _skip(summary, 'changed', len(ids) - len(canceled))
    by_queue = {}
    for job_id, queue in canceled:
        by_queue.setdefault(queue, []).append(job_id)
    withdrawn = set()
    try:
        for queue, job_ids in by_queue.items():
            broker.withdraw_many(queue, job_ids)
            withdrawn.update(job_ids)
    except broker.BrokerUnavailable as exc:
        # As a single cancel does: the jobs whose messages are still in the
        # queue go back to waiting, so the ledger never calls a job canceled
        # that a worker will still run. What was withdrawn stays canceled.
        withdrawn |= exc.done
        before = {r.id: r.state for r in waiting}
        _revert_cancel({job_id: before[job_id] for job_id, _queue in canceled
                        if job_id not in withdrawn}, now)
        _announce_ids(c[0] for c in canceled)
        raise
    _announce_ids(c[0] for c in canceled)
    return done + len(canceled)


_BULK = {'retry': _bulk_retry, 'delete': _bulk_delete, 'cancel': _bulk_cancel}


def purge_finished(days, report=None):
    """Delete jobs that finished more than ``days`` days ago, in chunks; return how many."""
    cutoff = utcnow() - dt.timedelta(days=days)
    total = db.session.scalar(sa.select(sa.func.count()).select_from(Job).where(
        Job.state.in_(states.FINISHED), Job.finished_at < cutoff))
    deleted = 0
    while True:
        ids = db.session.scalars(sa.select(Job.id).where(
            Job.state.in_(states.FINISHED), Job.finished_at < cutoff).limit(1000)).all()
        if not ids:
            return deleted
        gone = _delete_finished(ids)
        deleted += len(gone)
        db.session.commit()
        announce(deleted=gone)
        if report:
            report(deleted, total)

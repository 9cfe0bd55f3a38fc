"""Job commands: submit, retry, cancel, run now, delete, bulk, purge.

The write side of the jobs service, shared by the pages and the JSON API;
:mod:`app.queries` reads. Every change goes through :func:`change` and is
announced with :func:`announce`.
"""
import datetime as dt
import logging
import os
import threading
from typing import NamedTuple

import sqlalchemy as sa
from flask import current_app
from sqlalchemy.orm import make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from werkzeug.exceptions import NotFound

from . import audit as audit_log, broker, events, states
from .extensions import db
from .ledger import sql as ledger_sql
from .ledger.turns import write_turn
from .models import Job, JobEvent, utcnow
from .queries import BadQuery, get, query_filters

logger = logging.getLogger(__name__)


def announce(*jobs, deleted=(), audit=False):
    """Tell the live pages that ``jobs`` (Job rows, committed) changed, ``deleted`` ids went,
    and (``audit``) the audit log grew: one event."""
    events.publish([events.job_change(j.id, j.state, j.queue, j.task, j.version)
                    for j in jobs], deleted, audit=audit)


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


def submit(sub, audit=None):
    """Record and enqueue a validated :class:`~app.catalog.Submission`; the job.

    The job is a :class:`Written` when this call created it (its columns and
    :class:`Job`'s reads, outside the session: an ORM object would cost a
    third of a submission; ``.orm()`` gives one to act on), else the
    :class:`Job` its idempotency key named, in the session.

    The row is written before the message is enqueued and committed after,
    so a job the broker refuses leaves no row behind (``BrokerUnavailable``).
    A submission whose idempotency key was used before returns that job
    instead; ``job.created`` says which happened. ``audit`` (an unsaved
    :class:`~app.models.AuditEntry`) is committed in the same transaction.

    Submissions made at the same moment by other threads of this process
    (concurrent API requests) share that transaction and broker round trip
    (:class:`SubmitGroup`); each call still returns only once its own row
    is committed, and fails as its group does.
    """
    group = current_app.extensions.setdefault('queue_manager.submit_group', SubmitGroup())
    job, created = group.submit(sub, audit)
    if not created and (isinstance(job, Written) or job not in db.session):
        # Another call's job: the new one a call of the same group wrote (its
        # Written, which that call answers with), or one found by another
        # thread's session. Read in ours, as an object of this call's own.
        job = db.session.get(Job, job.id if isinstance(job, Written)
                             else sa.inspect(job).identity[0])  # no refresh of a detached job
    job.created = created
    return job


class Submitted(NamedTuple):
    """One slot of :func:`submit_many`'s answer: the job (a :class:`Job`, or a new one as
    :class:`Written`), and whether this call created it."""
    job: Job
    created: bool


MAX_BATCH = 1000  # submissions in one call of submit_many (one transaction)


def submit_many(subs, audit=None):
    """Record and enqueue validated submissions at once: a list of :class:`Submitted`, in order.

    ``subs`` are :class:`~app.catalog.Submission` objects, at most
    :data:`MAX_BATCH` (``ValueError`` otherwise). Their rows go into one
    transaction and their messages to the broker in one round trip per
    queue; the rows commit only once the broker holds every message. If it
    refuses (:class:`~app.broker.BrokerUnavailable`) nothing is committed and
    the messages it took are withdrawn again: no row claims a job the broker
    does not hold. When the broker cannot be reached to withdraw them, the
    error's ``unconfirmed`` lists the jobs (ids, in order) it may still
    hold. A submission whose idempotency key names a job already
    recorded gets that job (``created`` False); a key used twice in one call
    makes one job, the later slot getting the earlier one, as if submitted
    one after the other. ``audit`` (an unsaved
    :class:`~app.models.AuditEntry`) is committed with the jobs, or not at all.
    Announces the new jobs (and the audit entry) once committed. New jobs
    come back as written, outside the session (putting a thousand rows in it
    would cost more than writing them): read one with
    :func:`app.queries.get` to act on it.
    """
    subs = list(subs)
    if len(subs) > MAX_BATCH:
        raise ValueError(f'at most {MAX_BATCH} submissions at once')
    try:
        return _record(subs, [audit] if audit is not None else [])
    except broker.BrokerUnavailable as exc:
        exc.unconfirmed = [job_id for job_id in dict.fromkeys(exc.unconfirmed) if job_id]
        exc.recorded = [job_id for job_id in exc.unconfirmed if job_id in exc.recorded]
        raise


def _record(subs, audits):
    """Write ``subs`` and ``audits`` in one transaction, messages first; the slots.

    New jobs come back committed but outside the session (see :func:`_attach`).
    What needs no lock (planning the rows, building the messages) is done
    before the write turn; the turn covers the writing, from the INSERT to
    the commit, when SQLite holds its one writer's lock.

    Idempotency keys: a key taken by another submission between the
    planning and the INSERT fails the INSERT, and the submission is planned
    again inside the write turn, where on SQLite no other submission can
    take one first. On PostgreSQL, which has no write turn, a submission
    with keys first takes a lock per key for its transaction
    (:func:`_lock_keys`) and plans after it: submissions sharing keys then
    go one after the other, each seeing the jobs the one before committed.
    """
    keys = sorted({s.idempotency_key for s in subs if s.idempotency_key})
    d = ledger_sql.dialect(db.session.connection())
    locked = bool(keys) and not d.sqlite
    replan = False
    for attempt in range(_RECORD_ATTEMPTS):
        if not (replan or locked):
            slots, new, rows, messages = _prepared(subs, d)
        # On SQLite, the web processes take turns (app.ledger.turns) rather
        # than poll for the database's lock.
        with write_turn(db.engine):
            if locked:
                _lock_keys(keys)
            if replan or locked:
                slots, new, rows, messages = _prepared(subs, d)
            if rows:
                try:
                    d.insert_rows(db.session.connection(), 'job', ledger_sql.SUBMITTED, rows)
                except sa.exc.IntegrityError:
                    # A key taken meanwhile by another submission: plan again.
                    db.session.rollback()
                    if attempt == _RECORD_ATTEMPTS - 1:
                        raise
                    replan = True
                    continue
                except sa.exc.OperationalError as exc:
                    # PostgreSQL chose this transaction to end a deadlock (a
                    # submission of rows by another path): once more, from the start.
                    db.session.rollback()
                    if attempt == _RECORD_ATTEMPTS - 1 or \
                            getattr(exc.orig, 'sqlstate', None) != '40P01':
                        raise
                    replan = True
                    continue
            audit_log.insert(audits)
            try:
                _hand_over_new(messages)
            except broker.BrokerUnavailable as exc:
                exc.recorded = _record_unconfirmed(new, exc.unconfirmed, d)
                # In the order of subs, so a group hands each caller its own.
                exc.unconfirmed = [slot.job.id if slot.created and slot.job.id in exc.unconfirmed
                                   else None for slot in slots]
                raise
            db.session.commit()
        break
    if new or audits:
        announce(*new, audit=bool(audits))
    return slots


_RECORD_ATTEMPTS = 3

UNCONFIRMED = ('submitted while the broker was unreachable: recorded for its idempotency key, '
               'it runs once (its message if the broker kept it, else re-enqueued by the '
               'reconciler)')


def _record_unconfirmed(new, unconfirmed, d):
    """Commit the rows of the ``new`` jobs in ``unconfirmed`` that carry an idempotency key;
    the set of their ids (empty when none, or when the ledger refuses them too).

    Called once a submission's transaction is rolled back because the
    broker failed, and could not be reached to take back the messages it
    may have taken (``unconfirmed``, ids). A job with a key is one its
    caller retries with that key; without a row the retry would make a
    second job, and both would run if the broker kept the first message.
    With the row (waiting, as submitted, and an event saying why) the job
    runs once either way: from its message if the broker kept it, else
    re-enqueued by the reconciler (:mod:`app.reconcile`), which restores
    a waiting job the broker does not hold; and the retry gets it back. A
    job without a key keeps no row: its caller's retry makes a new job
    anyway, and a plain outage (the broker took nothing) then runs nothing
    twice. Runs in the caller's write turn (SQLite); on PostgreSQL takes
    the keys' locks again, since the rollback let them go.
    """
    kept = [job for job in new if job.idempotency_key and job.id in unconfirmed]
    if not kept:
        return set()
    try:
        if not d.sqlite:
            _lock_keys(sorted({job.idempotency_key for job in kept}))
        d.insert_rows(db.session.connection(), 'job', ledger_sql.SUBMITTED,
                      [d.submitted(job) for job in kept])
        db.session.execute(sa.insert(JobEvent), [
            {'job_id': job.id, 'at': job.created_at, 'kind': 'unconfirmed',
             'message': UNCONFIRMED} for job in kept])
        db.session.commit()
    except sa.exc.SQLAlchemyError as exc:
        # A key taken meanwhile by another submission (PostgreSQL: between
        # the rollback and the lock), or the ledger failing too: nothing
        # kept, and the caller is told so.
        db.session.rollback()
        logger.warning('submission: %d job(s) with keys not recorded after the broker failed: %s',
                       len(kept), exc)
        return set()
    announce(*kept)
    return {job.id for job in kept}


def _prepared(subs, d):
    """``(slots, new jobs, their rows, their messages)`` for ``subs`` (see :func:`_plan`).

    The driver's own INSERT over plain tuples (the ORM's unit of work, and
    even Core's per-value processing, cost more than the rows), in the
    order of the idempotency keys: two submissions sharing keys then wait
    for each other on PostgreSQL instead of each holding a key the other
    needs (a deadlock).
    """
    slots, new = _plan(subs)
    rows = [d.submitted(j) for j in sorted(
        new, key=lambda j: (j.idempotency_key is None, j.idempotency_key or ''))]
    return slots, new, rows, _messages(new)


def _lock_keys(keys):
    """PostgreSQL: lock each of the idempotency ``keys`` until the transaction ends.

    Transaction-level advisory locks, in the two-number key space (a
    namespace for idempotency keys, then the key's hash), taken in the
    order of their numbers so that two submissions sharing keys cannot
    each hold one the other waits for. Two keys of one hash share a lock:
    their submissions only wait for each other.
    """
    db.session.execute(sa.text(
        "SELECT pg_advisory_xact_lock(hashtext('job.idempotency_key'), h) "
        'FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(CAST(:keys AS text[])) AS k '
        'ORDER BY h) AS locks'), {'keys': keys})


class _Waiting:
    """One submission waiting in a :class:`SubmitGroup`."""
    __slots__ = ('sub', 'audit', 'woken', 'lead', 'slot', 'error')

    def __init__(self, sub, audit):
        self.sub, self.audit = sub, audit
        self.woken = threading.Event()
        self.lead, self.slot, self.error = False, None, None


class SubmitGroup:
    """Single submissions of one process written together (group commit).

    The first caller leads: it writes every submission waiting at that
    moment (its own among them) in one transaction with one broker round
    trip, wakes their callers with their jobs, and hands the lead to a
    caller that arrived meanwhile. Under load the rows and messages of many
    requests cost one commit; alone, a submission is written at once. One
    per app (``app.extensions``), so per process.
    """
    LIMIT = MAX_BATCH

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = []
        self._busy = False

    def submit(self, sub, audit=None):
        """``(job, created)`` for ``sub`` once committed; raises what writing its group raised.

        A new job comes back outside any session; an existing one (an
        idempotency key used before) as the leading thread's session read it.
        """
        me = _Waiting(sub, audit)
        with self._lock:
            self._waiting.append(me)
            me.lead = not self._busy
            self._busy = True
        while not me.lead:
            me.woken.wait()
            me.woken.clear()
            if me.slot is not None or me.error is not None:
                break
        if me.lead:
            self._lead()
        if me.error is not None:
            raise me.error
        return me.slot

    def _lead(self):
        with self._lock:
            batch, self._waiting = self._waiting[:self.LIMIT], self._waiting[self.LIMIT:]
        try:
            self._write(batch)
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting[0].lead = True
                    self._waiting[0].woken.set()
                else:
                    self._busy = False
            for waiting in batch:
                waiting.lead = False
                waiting.woken.set()

    @staticmethod
    def _write(batch):
        try:
            slots = _record([w.sub for w in batch], [w.audit for w in batch if w.audit])
        except broker.BrokerUnavailable as exc:
            # Each caller told of its own job only, if the broker may hold it.
            unconfirmed = exc.unconfirmed or [None] * len(batch)
            for waiting, job_id in zip(batch, unconfirmed):
                waiting.error = broker.BrokerUnavailable(
                    str(exc), exc.done, [job_id] if job_id else (),
                    [job_id] if job_id in exc.recorded else ())
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            # Something about one of them (not the broker): each on its own,
            # so that one submission's failure is not its neighbours'.
            db.session.rollback()
            for waiting in batch:
                SubmitGroup._write([waiting])
            return
        for waiting, slot in zip(batch, slots):
            waiting.slot = slot


def _plan(subs):
    """``(slots, new jobs)``: each submission's job, an existing one or a new row (not written)."""
    keys = list({s.idempotency_key for s in subs if s.idempotency_key})
    existing = {}
    for start in range(0, len(keys), 500):
        existing.update((j.idempotency_key, j) for j in db.session.scalars(
            sa.select(Job).where(Job.idempotency_key.in_(keys[start:start + 500]))))
    now = utcnow()
    ids = iter(new_ids(len(subs)))
    slots, new = [], []
    for sub in subs:
        key = sub.idempotency_key
        if key and key in existing:
            slots.append(Submitted(existing[key], False))
            continue
        job = _new_job(sub, now, next(ids))
        new.append(job)
        slots.append(Submitted(job, True))
        if key:
            existing[key] = job
    return slots, new


_COLUMNS = tuple(c.key for c in sa.inspect(Job).column_attrs)


class Written:
    """A new job as written: its columns as attributes, and :class:`Job`'s reads.

    What :func:`submit_many` hands back for the jobs it created: building a
    thousand ORM objects (with the bookkeeping of a session) costs more than
    writing their rows. ``to_dict`` and ``run_params`` are :class:`Job`'s;
    :meth:`orm` gives the ORM object for a caller that acts on the job.
    """
    to_dict = Job.to_dict
    run_params = Job.run_params
    event_rows = ()  # a job just written has no events yet

    def __init__(self, **columns):
        # ``columns`` names every column a new job is written with (those
        # of the ``submitted`` statement); the others are empty. One update
        # of the instance's dict: a thousand jobs' attributes set one by one
        # cost twice as much.
        self.__dict__.update(_EMPTY, **columns, created=True)

    def columns(self):
        """``{column: value}``, as the INSERT takes them."""
        return {name: getattr(self, name) for name in _COLUMNS}

    def orm(self):
        """The same job as a :class:`Job`, committed, in the session (see :func:`_attach`)."""
        job = Job(**self.columns())
        _attach(job)
        job.created = self.created
        return job


# The columns a new job's row leaves empty (_new_job fills the others).
_EMPTY = dict.fromkeys(name for name in _COLUMNS if name not in ledger_sql.SUBMITTED)

# The bits a version 4 UUID fixes (RFC 9562, section 5.4): version 4, variant 10.
_UUID4_CLEAR = ~((0xf000 << 64) | (0xc000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_ids(n):
    """``n`` random job ids: version 4 UUIDs (RFC 9562), as ``str(uuid.uuid4())`` writes them.

    One read of the system's random source for all of them: per id,
    ``uuid.uuid4()`` costs a read and a ``UUID`` object, more than half the
    time of planning a batch's rows.
    """
    raw = os.urandom(16 * n)
    ids = []
    for start in range(0, 16 * n, 16):
        h = '%032x' % (int.from_bytes(raw[start:start + 16], 'big') & _UUID4_CLEAR | _UUID4_SET)
        ids.append(f'{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}')
    return ids


def _new_job(sub, now, job_id):
    # The row shows secret parameters masked; their values are kept apart
    # for the broker (see Job.secret_params).
    shown, secret = sub.task.split(sub.params)
    return Written(id=job_id, task=sub.task.name, queue=sub.queue, params=shown,
                   secret_params=secret or None,
                   state=states.SCHEDULED if sub.eta else states.QUEUED, priority=sub.priority,
                   retries=sub.retries, retry_delay=sub.retry_delay, attempts=0, attempt_base=0,
                   timeout=sub.timeout, idempotency_key=sub.idempotency_key,
                   created_at=now, updated_at=now, scheduled_for=sub.eta, version=1)


def _messages(new):
    """The messages of ``new`` jobs by queue: ``{queue: [(job, prepared message or None)]}``.

    A queue's lone job is enqueued as it is (no pipeline to prepare); the
    others' messages are built here, before the write turn.
    """
    by_queue = {}
    for job in new:
        by_queue.setdefault(job.queue, []).append(job)
    return {queue: [(job, None if len(queued) == 1 else broker.prepare(job)) for job in queued]
            for queue, queued in by_queue.items()}


def _hand_over_new(messages):
    """Give the broker the ``messages`` of new jobs (see :func:`_messages`), one round trip
    per queue.

    On a refusal the transaction is rolled back and what the broker took is
    withdrawn again: every message of the queues handed over, the refused
    queue's too (a refusal part way through a round trip, such as Redis's
    maxmemory, may leave some of its messages in). If that fails too, such a
    message runs as a job enqueued around the API does: its consumer writes
    its row. Raises :class:`~app.broker.BrokerUnavailable`, whose
    ``unconfirmed`` then names those jobs (a set of ids).
    """
    handed = []
    try:
        for queue, queued in messages.items():
            handed.append(queue)
            if len(queued) == 1:
                broker.enqueue(queued[0][0])
            else:
                broker.put_prepared(queue, [prepared for _job, prepared in queued])
    except broker.BrokerUnavailable as exc:
        db.session.rollback()
        unconfirmed = set()
        for queue in handed:
            try:
                broker.remove_waiting(queue, [job.id for job, _prepared in messages[queue]])
            except broker.BrokerUnavailable:
                unconfirmed.update(job.id for job, _prepared in messages[queue])
        exc.unconfirmed = unconfirmed
        raise


def _attach(job):
    """Put a committed new ``job`` in the session as it was written (no reload)."""
    make_transient_to_detached(job)
    # A new job has no events yet: nothing to load when it is shown.
    set_committed_value(job, 'event_rows', [])
    db.session.add(job)


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
        raise BadQuery(f'action must be one of {", ".join(ACTIONS)}', 'action')
    if ids is not None:
        targets = list(dict.fromkeys(ids))
        if len(targets) > MAX_BULK:
            raise BadQuery(f'at most {MAX_BULK} ids at once', 'ids')
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


def _one_at_a_time(rows, act, summary):
    """``act(job_id)`` for each row, as the single action does; how many it moved.

    A job that changed since the rows were read is skipped by the state it
    is in now; one deleted since (a bulk delete meanwhile) as ``missing``.
    """
    done = 0
    for r in rows:
        try:
            act(r.id)
            done += 1
        except states.StateConflict as exc:
            _skip(summary, exc.state)
        except NotFound:
            db.session.rollback()
            _skip(summary, 'missing')
    return done


def _bulk_retry(rows, summary):
    return _one_at_a_time(rows, retry, summary)


def _bulk_delete(rows, summary):
    deleted = _delete_finished([r.id for r in rows])
    db.session.commit()
    _skip(summary, 'changed', len(rows) - len(deleted))
    if deleted:
        announce(deleted=deleted)
    return len(deleted)


def _bulk_cancel(rows, summary):
    waiting = [r for r in rows if r.state != states.RUNNING]
    done = _one_at_a_time([r for r in rows if r.state == states.RUNNING], cancel, summary)
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


def _finished_before(days):
    """Conditions: the job finished more than ``days`` days ago."""
    cutoff = utcnow() - dt.timedelta(days=days)
    return Job.state.in_(states.FINISHED), Job.finished_at < cutoff


def purgeable(days):
    """How many jobs finished more than ``days`` days ago: what :func:`purge_finished` deletes."""
    return db.session.scalar(sa.select(sa.func.count()).select_from(Job).where(
        *_finished_before(days)))


def purge_finished(days, report=None):
    """Delete jobs that finished more than ``days`` days ago, in chunks; return how many.

    ``report(deleted, total)`` is called after each chunk of 1,000.
    """
    old = _finished_before(days)
    total = db.session.scalar(sa.select(sa.func.count()).select_from(Job).where(*old))
    deleted = 0
    while True:
        ids = db.session.scalars(sa.select(Job.id).where(*old).limit(1000)).all()
        if not ids:
            return deleted
        gone = _delete_finished(ids)
        deleted += len(gone)
        db.session.commit()
        announce(deleted=gone)
        if report:
            report(deleted, total)

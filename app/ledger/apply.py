"""Applying a batch of recorded changes to the ledger, a few statements per kind."""
import json
import logging

import sqlalchemy as sa

from .. import message, states
from ..models import Job, utcnow
from . import history
from .ops import Finish, Heartbeat, Log, Progress, Queued, Scheduled, Start, Stopped
from .sql import dialect

logger = logging.getLogger(__name__)

WORKERS = object()  # key in a batch's changes: consumer heartbeats were written


def apply(conn, ops):
    """Apply a batch of recorded changes (:mod:`.ops` records) on ``conn``; return what changed.

    Returns ``{job id: (state, queue, task)}`` as this batch left them (a
    hint for the live pages, which re-read the ledger), with the key
    :data:`WORKERS` when consumer heartbeats were written. Raises what the
    database driver raises; a record of an unknown type is ignored.
    """
    d = dialect(conn)
    ts, now = d.ts, d.ts(utcnow())
    starts = {}      # (job, n) -> Start
    finishes = {}    # (job, n) -> Finish
    progress = {}    # job -> latest Progress
    queued, scheduled = {}, {}  # job -> latest Queued, Scheduled
    logs, beats = [], []  # every Log; every Heartbeat and Stopped, in order
    for op in ops:
        match op:
            case Log():
                logs.append(op)
            case Heartbeat() | Stopped():
                beats.append(op)
            case Start():
                starts[(op.job_id, op.number)] = op
            case Finish():
                finishes[(op.job_id, op.number)] = op
            case Progress():
                progress[op.job_id] = op
            case Queued():
                queued[op.job_id] = op
            case Scheduled():
                scheduled[op.job_id] = op

    changed = {}
    attempts, ended, start_rows, ran_rows, finish_rows = [], [], [], [], []
    # What the metric history learns from this batch (see .history).
    waited = _waits(conn, starts.values(), finishes, scheduled)
    done = []
    for key, s in starts.items():
        job_id, n, worker, at = s.job_id, s.number, s.worker, s.at
        f = finishes.pop(key, None)
        if f is None:
            attempts.append((job_id, n, worker, states.ATTEMPT_RUNNING, ts(at),
                             None, None, None, None, None))
            start_rows.append((n, ts(at), worker, now, job_id, n))
            changed[job_id] = (states.RUNNING, s.queue, s.task)
        else:
            attempts.append((job_id, n, worker, f.outcome, ts(at), ts(f.at), f.duration,
                             f.error_type, f.error_message, f.traceback))
            state, finished, result, error, prog = job_end(f)
            ran_rows.append((state, n, ts(at), ts(finished), f.duration, worker, d.json(result),
                             error, f.error_type, prog, now, job_id, n))
            changed[job_id] = (state, s.queue, s.task)
            done.append((job_id, _ended(f, s.queue)))
    for f in finishes.values():
        ended.append((f.outcome, ts(f.at), f.duration, f.error_type, f.error_message,
                      f.traceback, f.job_id, f.number))
        state, finished, result, error, prog = job_end(f)
        finish_rows.append((state, ts(finished), f.duration, d.json(result), error, f.error_type,
                            prog, now, f.job_id, f.number))
        changed[f.job_id] = (state, f.queue, f.task)
        done.append((f.job_id, _ended(f, f.queue)))

    # Job rows first: a start that matches no row means a job the ledger has
    # not seen, whose row the attempt needs.
    updated = 0
    if start_rows:
        updated += _executemany(conn, d.sql['start'], start_rows)
    if ran_rows:
        updated += _executemany(conn, d.sql['ran'], ran_rows)
    if updated < len(start_rows) + len(ran_rows):
        # Rows for jobs the ledger has not seen; then every update again. On
        # PostgreSQL a row the API inserted but had not committed when the
        # update ran was invisible to it (the insert waits for that commit,
        # then does nothing): the second update sees it. Updates that
        # already applied do not apply twice (they are guarded by attempt).
        _insert_missing_jobs(conn, d, starts.values(), now)
        _executemany(conn, d.sql['start'], start_rows)
        _executemany(conn, d.sql['ran'], ran_rows)
    if attempts:
        _insert_attempts(conn, d, attempts)
    if progress:
        _executemany(conn, d.sql['progress'], [(p.fraction, p.message, now, p.job_id, p.number)
                                               for p in progress.values()])
        for p in progress.values():
            changed.setdefault(p.job_id, (states.RUNNING, None, None))
    if logs:
        _executemany(conn, d.sql['log'], [(o.job_id, o.number, ts(o.at), o.level, o.message)
                                          for o in logs])
        for o in logs:
            changed.setdefault(o.job_id, (None, None, None))
    if ended:
        _executemany(conn, d.sql['end_attempt'], ended)
    if finish_rows:
        _executemany(conn, d.sql['finish'], finish_rows)
    succeeded = [(job_id,) for job_id, (state, _q, _t) in changed.items()
                 if state == states.SUCCEEDED]
    if succeeded:
        _executemany(conn, d.sql['forget_secrets'], succeeded)
    if queued:
        _executemany(conn, d.sql['queued'], [(now, i) for i in queued])
        for q in queued.values():
            changed.setdefault(q.job_id, (states.QUEUED, q.queue, q.task))
    if scheduled:
        _executemany(conn, d.sql['scheduled'], [(ts(s.eta), now, s.job_id)
                                                for s in scheduled.values()])
        for s in scheduled.values():
            changed.setdefault(s.job_id, (None, s.queue, s.task))
    for b in beats:
        if isinstance(b, Heartbeat):
            _executemany(conn, d.sql['heartbeat'], [(
                b.consumer, b.host, b.pid, json.dumps(b.queues), b.concurrency,
                ts(b.started_at), ts(b.seen), b.processed, b.failed, json.dumps(b.running),
                b.leader)])
        else:
            _executemany(conn, d.sql['stopped'], [(ts(b.at), ts(b.at), '[]', False, b.consumer)])
    if beats:
        changed[WORKERS] = (None, None, None)
    if done or waited:
        history.add(conn, _with_queues(conn, done), waited)
    return changed


def _ended(f, queue):
    """The :class:`.history.Ended` record of :class:`Finish` ``f`` (``queue`` None if unknown)."""
    return history.Ended(queue, message.task_name(f.task), f.outcome, f.at, f.final, f.duration)


def _with_queues(conn, done):
    """The :class:`.history.Ended` records of ``done`` (``(job id, Ended)`` pairs), each
    unknown queue (an attempt whose start this process did not see) read from its job's
    row; an attempt of a job the ledger has no row for is left out."""
    unknown = sorted({job_id for job_id, e in done if e.queue is None})
    queues = {}
    for i in range(0, len(unknown), 1000):
        queues.update(conn.execute(sa.select(Job.id, Job.queue)
                                   .where(Job.id.in_(unknown[i:i + 1000]))).all())
    return [e if e.queue is not None else e._replace(queue=queues[job_id])
            for job_id, e in done if e.queue is not None or job_id in queues]


def _waits(conn, start_ops, finishes, scheduled):
    """:class:`.history.Waited` records of the attempts ``start_ops`` start.

    The first attempt of a job the batch starts waited since its job became
    due, read from the job's row before this batch changes it (see
    :func:`.history.due_seconds`); a later one in the same batch (a quick
    retry) since its retry time (``scheduled``: the batch's
    :class:`Scheduled` records by job) or else the end of the attempt
    before it (``finishes``: the batch's :class:`Finish` records by
    ``(job, number)``). A start the ledger will not record (older than the
    row's attempt) or of a job it has no row for is left out.
    """
    by_job = {}
    for s in start_ops:
        by_job.setdefault(s.job_id, []).append(s)
    if not by_job:
        return []
    waited = []
    ids = sorted(by_job)
    d = dialect(conn)
    for i in range(0, len(ids), 1000):
        for job_id, attempts, scheduled_for, updated_at in d.due_rows(conn, ids[i:i + 1000]):
            first = True
            mine = by_job[job_id]
            for s in (mine if len(mine) == 1 else sorted(mine, key=lambda s: s.number)):
                if attempts >= s.number:
                    continue
                if first:
                    seconds = history.due_seconds(s.at, scheduled_for, updated_at)
                    first = False
                else:
                    eta = scheduled[job_id].eta if job_id in scheduled else None
                    before = finishes.get((job_id, s.number - 1))
                    seconds = history.due_seconds(
                        s.at, eta if eta is not None and eta <= s.at else None,
                        before.at if before is not None else None)
                if seconds is not None:
                    waited.append(history.Waited(s.queue, message.task_name(s.task), s.at,
                                                 seconds))
    return waited


def _executemany(conn, sql, rows):
    """Run ``sql`` once per row; return the number of rows it changed."""
    if not rows:
        return 0
    return conn.exec_driver_sql(sql, rows).rowcount


def job_end(f):
    """``(state, finished_at, result, error, progress)`` of a job after :class:`Finish` ``f``
    (an attempt that ended): the values its row takes."""
    outcome, at, etype, emsg, result, final = (f.outcome, f.at, f.error_type, f.error_message,
                                               f.result, f.final)
    if outcome == states.ATTEMPT_SUCCEEDED:
        return states.SUCCEEDED, at, result, None, 1.0
    if outcome == states.ATTEMPT_INTERRUPTED and not final:
        return states.QUEUED, None, None, None, None
    error = f'{etype}: {emsg}' if emsg else etype
    if not final:
        return states.RETRYING, None, None, error, None
    if outcome == states.ATTEMPT_CANCELED:
        return states.CANCELED, at, None, error, None
    return states.FAILED, at, None, error, None


def _insert_missing_jobs(conn, d, start_ops, now):
    """Create rows for jobs Huey runs that the ledger has not seen (an insert that does
    nothing where a row exists, or appears meanwhile).

    The API writes a row before it enqueues, so a row is missing only for
    jobs enqueued around the API (``huey_tasks.sleep(...)`` from a shell) or
    when a web process died between enqueue and commit.
    """
    rows = []
    for job_id, s in {s.job_id: s for s in start_ops}.items():
        rows.append((job_id, s.task, s.queue, d.json(s.params), d.json(s.secret_params or None),
                     s.priority, s.number - 1,
                     s.retries, s.retry_delay, d.ts(s.at), now))
    _executemany(conn, d.sql['job'], rows)


def _insert_attempts(conn, d, rows):
    try:
        with conn.begin_nested():
            _executemany(conn, d.sql['attempt'], rows)
    except sa.exc.IntegrityError:
        # An attempt number already taken (a message enqueued twice, or a job
        # deleted under a running attempt): insert one by one, skipping those.
        for row in rows:
            try:
                with conn.begin_nested():
                    _executemany(conn, d.sql['attempt'], [row])
            except sa.exc.IntegrityError:
                logger.warning('ledger: attempt %s of job %s not recorded (exists, or job deleted)',
                               row[1], row[0])

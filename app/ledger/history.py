"""The metric history: per-minute rollups of attempts and timings, their totals, queue depth.

What the ledger's writer adds with each batch, in the batch's transaction:
for every attempt that ended, one more in its minute's row of
``metric_minute`` (by queue, task and outcome) and of ``metric_total``,
and its duration in the run-time buckets of ``timing_minute`` and
``timing_total``; for every attempt that started, its wait in the
wait-time buckets. One upsert per key per batch, however many attempts the
batch holds, on SQLite and PostgreSQL alike. The reaper adds the attempts
it records lost the same way; the leader samples each queue's depth once a
minute (:func:`sample_depth`), deletes rows older than
``METRICS_RETENTION`` (:func:`prune`) and folds the totals' rows of ended
PostgreSQL sessions (:func:`fold`).

Definitions: an attempt's **run time** is its duration; its **wait time**
runs from the moment its job became due (when it was enqueued, or its
scheduled or retry time) to the attempt's start. A minute is the UTC
minute the attempt ended (run time, outcomes) or started (wait time).
"""
import bisect
import datetime as dt
from typing import NamedTuple

from ..models import RUN, TIMING_BUCKETS, WAIT
from .sql import dialect


class Ended(NamedTuple):
    """An attempt of a job of ``task`` in ``queue`` ended with ``outcome`` at ``at`` (naive UTC).

    ``finished``: it ended its job (no retry follows); ``duration``: its
    run time in seconds, None when unknown.
    """
    queue: str
    task: str
    outcome: str
    at: object
    finished: bool
    duration: float | None


class Waited(NamedTuple):
    """An attempt of a job of ``task`` in ``queue`` started at ``at`` after ``seconds`` due."""
    queue: str
    task: str
    at: object
    seconds: float


def bucket(seconds):
    """The index in :data:`~app.models.TIMING_BUCKETS` of the bucket ``seconds`` falls in.

    A time equal to a bound counts in that bound's bucket (Prometheus's
    ``le``); one above the last bound in bucket ``len(TIMING_BUCKETS)``.
    """
    return bisect.bisect_left(TIMING_BUCKETS, seconds)


def minute_of(at):
    """``at`` (a naive datetime) cut to its minute."""
    return at.replace(second=0, microsecond=0)


# {shard} is 0 on SQLite (one writer at a time), the session's backend pid
# on PostgreSQL: concurrent writers never wait on, or deadlock over, a row.
_UPSERT = {
    'metric_minute': (
        'INSERT INTO metric_minute (minute, queue, task, outcome, shard, attempts, finished) '
        'VALUES (?, ?, ?, ?, {shard}, ?, ?) ON CONFLICT (minute, queue, task, outcome, shard) '
        'DO UPDATE SET attempts = metric_minute.attempts + excluded.attempts, '
        'finished = metric_minute.finished + excluded.finished'),
    'metric_total': (
        'INSERT INTO metric_total (queue, task, outcome, shard, attempts, finished) '
        'VALUES (?, ?, ?, {shard}, ?, ?) ON CONFLICT (queue, task, outcome, shard) '
        'DO UPDATE SET attempts = metric_total.attempts + excluded.attempts, '
        'finished = metric_total.finished + excluded.finished'),
    'timing_minute': (
        'INSERT INTO timing_minute (minute, queue, task, timing, bucket, shard, n, seconds) '
        'VALUES (?, ?, ?, ?, ?, {shard}, ?, ?) '
        'ON CONFLICT (minute, queue, task, timing, bucket, shard) '
        'DO UPDATE SET n = timing_minute.n + excluded.n, '
        'seconds = timing_minute.seconds + excluded.seconds'),
    'timing_total': (
        'INSERT INTO timing_total (queue, task, timing, bucket, shard, n, seconds) '
        'VALUES (?, ?, ?, ?, {shard}, ?, ?) ON CONFLICT (queue, task, timing, bucket, shard) '
        'DO UPDATE SET n = timing_total.n + excluded.n, '
        'seconds = timing_total.seconds + excluded.seconds'),
    'depth_minute': (
        'INSERT INTO depth_minute (minute, queue, ready, scheduled) VALUES (?, ?, ?, ?) '
        'ON CONFLICT (minute, queue) DO NOTHING'),
}


def _sql(conn, name):
    postgres = conn.dialect.name == 'postgresql'
    sql = _UPSERT[name].replace('{shard}', 'pg_backend_pid()' if postgres else '0')
    return sql.replace('?', '%s') if conn.dialect.paramstyle != 'qmark' else sql


def _time(timings, totals, minute, queue, task, timing, seconds):
    """Count ``seconds`` (negative: 0) in its bucket of ``timings`` (per minute) and ``totals``."""
    seconds = max(0.0, float(seconds))
    k = bucket(seconds)
    for into, key in ((timings, (minute, queue, task, timing, k)),
                      (totals, (queue, task, timing, k))):
        held = into.get(key)
        into[key] = (1, seconds) if held is None else (held[0] + 1, held[1] + seconds)


def add(conn, ended=(), waited=()):
    """Add attempts that ended (:class:`Ended`) and started (:class:`Waited`) to the history.

    Runs on ``conn`` (a SQLAlchemy connection) in the caller's transaction:
    one statement per table, with one row per key (minute, queue, task,
    outcome or bucket) however many attempts share it, in key order
    (:func:`tally`, then :func:`write`). Negative times count as 0.
    Raises what the driver raises.
    """
    write(conn, tally(dialect(conn), ended, waited))


def tally(d, ended=(), waited=()):
    """The rows :func:`add` writes for ``ended`` and ``waited``: ``{table: [row]}``.

    ``d`` is the connection's :class:`~app.ledger.sql.Dialect` (its time
    format). Each row is a key (minute, queue, task, outcome or bucket)
    and the two values added to it; tables with nothing to add are left
    out. Needs no connection: rows can be made in another process.
    """
    counts, totals, timings, timing_totals = {}, {}, {}, {}
    # Dicts updated in place, few calls: the writer tallies every attempt it records.
    for e in ended:
        minute, done = minute_of(e.at), 1 if e.finished else 0
        for into, key in ((totals, (e.queue, e.task, e.outcome)),
                          (counts, (minute, e.queue, e.task, e.outcome))):
            held = into.get(key)
            into[key] = (1, done) if held is None else (held[0] + 1, held[1] + done)
        if e.duration is not None:
            _time(timings, timing_totals, minute, e.queue, e.task, RUN, e.duration)
    for w in waited:
        _time(timings, timing_totals, minute_of(w.at), w.queue, w.task, WAIT, w.seconds)
    tallied = {}
    for name, rows, timed in (('metric_minute', counts, True), ('metric_total', totals, False),
                              ('timing_minute', timings, True),
                              ('timing_total', timing_totals, False)):
        if rows:
            tallied[name] = [((d.ts(key[0]), *key[1:]) if timed else key) + values
                             for key, values in sorted(rows.items())]
    return tallied


def write(conn, tallied):
    """Add rows :func:`tally` made (``{table: [row]}``) to the history, on ``conn`` in
    the caller's transaction: one statement per table. Raises what the driver raises."""
    for name in ('metric_minute', 'metric_total', 'timing_minute', 'timing_total'):
        if tallied.get(name):
            conn.exec_driver_sql(_sql(conn, name), tallied[name])


def sample_depth(conn, at, depths):
    """Note each queue's depth for the minute of ``at``: ``depths`` is ``{queue: (ready,
    scheduled)}`` (messages). The first sample of a minute is kept; returns rows written."""
    if not depths:
        return 0
    minute = dialect(conn).ts(minute_of(at))
    return conn.exec_driver_sql(_sql(conn, 'depth_minute'), [
        (minute, queue, int(ready), int(scheduled))
        for queue, (ready, scheduled) in sorted(depths.items())]).rowcount


MINUTE_TABLES = ('metric_minute', 'timing_minute', 'depth_minute')


def prune(conn, before):
    """Delete the per-minute rows of minutes before ``before`` (naive UTC); return rows deleted.

    The totals are kept: a counter of ``/metrics`` never goes down.
    """
    cutoff = dialect(conn).ts(before)
    q = '?' if conn.dialect.paramstyle == 'qmark' else '%s'
    return sum(conn.exec_driver_sql(f'DELETE FROM {table} WHERE minute < {q}',
                                    (cutoff,)).rowcount for table in MINUTE_TABLES)


_TOTALS = {'metric_total': ('queue, task, outcome', 'attempts, finished'),
           'timing_total': ('queue, task, timing, bucket', 'n, seconds')}


def fold(conn):
    """Fold the totals' rows of ended PostgreSQL sessions into shard 0; return rows folded.

    Takes only rows no one holds (``SKIP LOCKED``), so it never waits on a
    writer; one folder at a time. Nothing to do on SQLite (0).
    """
    if conn.dialect.name != 'postgresql':
        return 0
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('metric_total.fold'))")
    folded = 0
    for table, (key, values) in _TOTALS.items():
        sums = ', '.join(f'sum({v})' for v in values.split(', '))
        adds = ', '.join(f'{v} = t.{v} + excluded.{v}' for v in values.split(', '))
        folded += conn.exec_driver_sql(
            f'WITH gone AS (DELETE FROM {table} WHERE ctid IN ('
            f'  SELECT ctid FROM {table} WHERE shard <> 0 AND shard NOT IN ('
            f'    SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL) '
            f'  FOR UPDATE SKIP LOCKED) RETURNING {key}, {values}) '
            f'INSERT INTO {table} AS t ({key}, shard, {values}) '
            f'SELECT {key}, 0, {sums} FROM gone GROUP BY {key} '
            f'ON CONFLICT ({key}, shard) DO UPDATE SET {adds}').rowcount
    return folded


def due_seconds(start_at, scheduled_for, updated_at):
    """Seconds from when a job became due to ``start_at``: from ``scheduled_for`` when it
    waited for a time (a delay, a retry), else from its row's last change before the
    start (its submission, or its return to the queue); never negative."""
    due = scheduled_for or updated_at
    if due is None or start_at is None:
        return None
    return max(0.0, (start_at - due) / dt.timedelta(seconds=1))

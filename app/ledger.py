"""Recording what Huey does in the ledger, in batches, off the worker threads.

Huey calls our signal handlers (and one post-execute hook, the only place that
sees a task's return value and exception together) on its worker threads.
They only append a small tuple to a queue. A writer thread drains the queue
every ``LEDGER_FLUSH_INTERVAL`` seconds and applies it in one transaction, a
few ``executemany`` statements per batch, then publishes one event naming
the changed jobs. This is huey's own ``contrib/stats.py`` pattern.

Ordering across processes: a job's attempts may run on different consumers,
whose writers flush independently. Every job update is guarded by the attempt
number (``job.attempts``), so a late write about attempt 1 never overwrites
attempt 2 that another consumer already recorded, and an attempt's ending
only lands while the attempt is still ``running`` (not once the leader has
recorded it ``lost``).

Acknowledgement: the message of an attempt stays in its consumer's in-flight
record in the broker until the writer has committed the attempt's outcome;
then the writer acknowledges it (see :mod:`app.storage`). A consumer that
dies before that leaves the message in flight, and the leader runs the job
again.
"""
import atexit
import collections
import json
import logging
import os
import signal
import threading
import time
import traceback as tb_module
from typing import NamedTuple

import sqlalchemy as sa
from huey import signals as S
from huey.exceptions import CancelExecution, TaskTimeout

from . import catalog, context, events, message, states, text
from .leader import leadership, parse_name, process_name
from .models import Job, utcnow

logger = logging.getLogger(__name__)

MAX_TRACEBACK = 64 * 1024
MAX_MESSAGE = 8 * 1024
MAX_RESULT = 64 * 1024
MAX_ERROR_TYPE = 200  # the column's length
MAX_LEVEL = 10


def transient(exc):
    """Whether ``exc`` means "the database is away", not "this change is bad"."""
    return (isinstance(exc, (sa.exc.OperationalError, sa.exc.DisconnectionError))
            or getattr(exc, 'connection_invalidated', False))


job_t = Job.__table__
WORKERS = object()  # key in a batch's changes: consumer heartbeats were written


def _jsonable(value):
    """The task's return value as stored: itself when it is JSON any ledger can hold.

    A value that is not JSON (a set, bytes, an object, NaN) is stored as
    ``{"repr": ...}`` (a repr that raises gives a placeholder); JSON longer
    than ``MAX_RESULT`` characters as ``{"truncated": true, "repr": <its
    head>}``; strings holding lone surrogates with them escaped as text.
    Never raises.
    """
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except Exception:  # not JSON; a dict subclass may raise anything
        try:
            shown = repr(value)
        except Exception:
            shown = text.safe_str(value)
        return {'repr': text.storable(shown, MAX_RESULT)}
    if len(encoded) > MAX_RESULT:
        return {'truncated': True, 'repr': text.storable(encoded, MAX_RESULT)}
    if text.problem(encoded):
        return json.loads(text.dumps(value))
    return value


def _error_type(exc):
    """The exception's type as ``module.Name`` (builtins without a module), storable."""
    cls = type(exc)
    module = getattr(cls, '__module__', None)
    name = getattr(cls, '__qualname__', None) or cls.__name__
    if module not in ('builtins', '__main__', None):
        name = f'{text.safe_str(module)}.{name}'
    return text.storable(name, MAX_ERROR_TYPE)


class Finish(NamedTuple):
    """A recorded change: attempt ``number`` of ``job_id`` ended with ``outcome``.

    ``at`` is naive UTC; ``duration`` seconds (None if the start was not
    seen); ``final`` says no attempt follows (the job ends); ``receipt``
    acknowledges the attempt's message once this is written (None when
    there is nothing to acknowledge).
    """
    kind: str  # always 'finish'
    job_id: str
    number: int
    outcome: str
    at: object
    duration: float | None
    error_type: str | None
    error_message: str | None
    traceback: str | None
    result: object
    final: bool
    task: str
    queue: str | None
    receipt: object = None


# Every job update is one statement run with executemany over the batch, in
# the driver's own SQL: at thousands of jobs a second the writer's time (and
# its hold on the GIL, which Huey's worker threads wait for) is the cost of
# recording, so rows go to the driver as plain tuples.
_SQL = {
    # attempt n started (a later attempt may already be recorded: guard)
    'start': 'UPDATE job SET state = {running}, attempts = ?, started_at = ?, finished_at = NULL, '
             'scheduled_for = NULL, worker = ?, progress = NULL, progress_message = NULL, '
             'version = version + 1, updated_at = ? WHERE id = ? AND attempts < ?',
    # attempt n started and ended within one batch (fast jobs)
    'ran': 'UPDATE job SET state = ?, attempts = ?, started_at = ?, finished_at = ?, '
           'scheduled_for = NULL, worker = ?, result = ?, error = ?, error_type = ?, progress = ?, '
           'progress_message = NULL, version = version + 1, updated_at = ? '
           'WHERE id = ? AND attempts < ?',
    # attempt n ended; the job moves only if no later attempt started meanwhile
    'finish': 'UPDATE job SET state = ?, finished_at = ?, result = ?, error = ?, error_type = ?, '
              'progress = COALESCE(?, progress), version = version + 1, updated_at = ? '
              'WHERE id = ? AND attempts = ? AND state = {running}',
    'progress': 'UPDATE job SET progress = ?, progress_message = ?, version = version + 1, '
                'updated_at = ? WHERE id = ? AND attempts = ? AND state = {running}',
    # the scheduler moved a due job into the queue
    'queued': 'UPDATE job SET state = {queued}, version = version + 1, updated_at = ? '
              'WHERE id = ? AND state = {scheduled}',
    # when a retry (or a scheduled job) is due
    'scheduled': 'UPDATE job SET scheduled_for = ?, version = version + 1, updated_at = ? '
                 'WHERE id = ? AND (state = {retrying} OR state = {scheduled})',
    'attempt': 'INSERT INTO attempt (job_id, number, worker, outcome, started_at, finished_at, '
               'duration, error_type, error_message, traceback) '
               'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
    'end_attempt': 'UPDATE attempt SET outcome = ?, finished_at = ?, duration = ?, '
                   'error_type = ?, error_message = ?, traceback = ? '
                   'WHERE job_id = ? AND number = ? AND outcome = {attempt_running}',
    'log': 'INSERT INTO attempt_log (job_id, number, at, level, message) VALUES (?, ?, ?, ?, ?)',
    # a consumer's heartbeat; counts arrive as increments since the last one
    'heartbeat': 'INSERT INTO worker (id, host, pid, queues, concurrency, started_at, last_seen, '
                 'stopped_at, processed, failed, current, leader) '
                 'VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET '
                 'last_seen = excluded.last_seen, stopped_at = NULL, '
                 'processed = worker.processed + excluded.processed, '
                 'failed = worker.failed + excluded.failed, current = excluded.current, '
                 'leader = excluded.leader, queues = excluded.queues, '
                 'concurrency = excluded.concurrency',
    'stopped': 'UPDATE worker SET stopped_at = ?, last_seen = ?, current = ?, leader = ? '
               'WHERE id = ?',
    # rows for jobs Huey runs that the ledger has not seen; the API's wins
    'job': 'INSERT INTO job (id, task, queue, params, state, priority, attempts, retries, '
           'retry_delay, created_at, updated_at, version) '
           'VALUES (?, ?, ?, ?, {queued}, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (id) DO NOTHING',
}


class _Dialect:
    """The statements and value conversions of one database driver."""

    def __init__(self, dialect):
        literals = {name: f"'{value}'" for name, value in (
            ('running', states.RUNNING), ('queued', states.QUEUED),
            ('scheduled', states.SCHEDULED), ('retrying', states.RETRYING),
            ('attempt_running', states.ATTEMPT_RUNNING))}
        self.sql = {k: v.format(**literals) for k, v in _SQL.items()}
        if dialect.paramstyle != 'qmark':
            self.sql = {k: v.replace('%', '%%').replace('?', '%s') for k, v in self.sql.items()}
        if dialect.name == 'sqlite':
            # SQLAlchemy's storage format for DateTime on SQLite, which
            # pages and keyset pagination compare as text.
            self.ts = lambda v: None if v is None else v.strftime('%Y-%m-%d %H:%M:%S.%f')
        else:
            self.ts = lambda v: v

    @staticmethod
    def json(value):
        # The same UTF-8 text as the ORM writes, storable whatever the task gave.
        return None if value is None else text.dumps(value)


_dialects = {}


def _dialect(conn):
    d = conn.dialect
    if d.name not in _dialects:
        _dialects[d.name] = _Dialect(d)
    return _dialects[d.name]


class Recorder:
    """Buffers ledger changes from Huey's threads and writes them in batches."""

    def __init__(self, writer, flush_interval=0.05, max_batch=5000, heartbeat_interval=5.0,
                 log_lines=1000):
        self.writer = writer if not isinstance(writer, sa.engine.Engine) else Writer(writer)
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.heartbeat_interval = heartbeat_interval
        self.log_lines = log_lines
        self.consumer = process_name()
        # What this consumer serves, for its heartbeats (set by whoever runs it).
        self.queues, self.concurrency = [], 0
        self.is_leader = lambda: False
        self.started_at = utcnow()
        self._next_beat = 0.0
        self._counts = [0, 0]  # attempts ended, and of those not succeeded, since the last beat
        self._log_counts = {}  # (job, attempt) -> lines captured
        self._ops = collections.deque()
        self._local = threading.local()
        # The Huey task of each running attempt (by identity, not job id: a
        # stale run of a job may overlap its next one) -> (monotonic start,
        # utc start, attempt number, queue).
        self._started = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._writer = None
        self._holding = False
        self.failures = 0  # consecutive failed flushes

    # -- the worker-thread side: tiny, never raises -------------------------

    def on_signal(self, huey, queue, signal, task, exc=None):
        try:
            if signal == S.SIGNAL_EXECUTING:
                now = utcnow()
                number = message.attempt_number(task)
                # Kept for the end of the attempt: a task may change its own
                # retries (no_retry), which the number is computed from.
                self._started[task] = (time.monotonic(), now, number, queue)
                meta = task.kwargs.get('meta') or {}
                self._ops.append(('start', task.id, number, self._worker_name(),
                                  now, (task.name, queue, task.kwargs.get('params') or {},
                                        task.priority or 0, meta.get('retries', task.retries),
                                        task.retry_delay or 0.0)))
            elif signal == S.SIGNAL_ENQUEUED:
                # The scheduler moving a due job into the queue.
                if task.eta is None or task.eta <= utcnow():
                    self._ops.append(('queued', task.id, task.name, queue))
            elif signal == S.SIGNAL_SCHEDULED:
                self._ops.append(('scheduled', task.id, task.eta, task.name, queue))
            # REVOKED needs nothing: the web process marked the job canceled
            # before it revoked the message.
            elif signal == S.SIGNAL_INTERRUPTED:
                self._interrupted(huey, task)
        except Exception:
            logger.exception('ledger: %s of %s not recorded', signal, getattr(task, 'id', task))

    def _worker_name(self):
        name = getattr(self._local, 'name', None)
        if name is None:
            name = self._local.name = f'{self.consumer}/{threading.current_thread().name}'
        return name

    def on_post_execute(self, task, value, exc):
        try:
            if exc is None:
                self._finish(task, states.ATTEMPT_SUCCEEDED, None, final=True,
                             result=None if value is None else _jsonable(value))
            else:
                if isinstance(exc, TaskTimeout):
                    outcome = states.ATTEMPT_TIMEOUT
                elif isinstance(exc, CancelExecution):
                    outcome = states.ATTEMPT_CANCELED
                else:
                    outcome = states.ATTEMPT_FAILED
                # When Huey retries it, the retry takes over the message's
                # claim (TrackedHuey._requeue_task), not this record.
                self._finish(task, outcome, exc, final=not task.retries,
                             acknowledges=not task.retries)
        except Exception:
            logger.exception('ledger: end of %s not recorded', getattr(task, 'id', task))

    def _interrupted(self, huey, task):
        # Huey drops a task cut off by a shutdown; we put it back as the next
        # attempt (at-least-once), or fail it visibly if it is not safe to
        # run twice or the broker is gone. A run whose claim the leader
        # already took back (this consumer was thought dead) is left to it.
        task_type = catalog.TASKS.get(message.task_name(task.name))
        if task_type is not None and not task_type.rerun:
            self._finish(task, states.ATTEMPT_INTERRUPTED,
                         RuntimeError('the consumer stopped during this attempt; not safe to '
                                      'run twice'), final=True)
            return
        claim_held = getattr(huey, 'claim_held', None)
        if claim_held is not None and not claim_held(task):
            logger.warning('ledger: interrupted job %s was already taken back by the leader',
                           task.id)
            return
        started = self._started.get(task)
        base = started[2] if started else message.attempt_number(task)
        again = type(task)((), message.kwargs(task.kwargs.get('params') or {}, base,
                                              task.retries),
                           id=task.id, retries=task.retries, retry_delay=task.retry_delay,
                           retry_backoff=task.retry_backoff, priority=task.priority,
                           timeout=task.timeout)
        try:
            huey.enqueue(again)
        except Exception as exc:
            logger.error('ledger: interrupted job %s not re-enqueued: %s', task.id, exc)
            self._finish(task, states.ATTEMPT_INTERRUPTED,
                         RuntimeError(f'the consumer stopped during this attempt and the job '
                                      f'could not be re-enqueued: {exc}'), final=True)
        else:
            self._finish(task, states.ATTEMPT_INTERRUPTED,
                         RuntimeError('the consumer stopped during this attempt; re-enqueued'),
                         final=False)

    def on_progress(self, running, fraction, message):
        self._ops.append(('progress', running.job_id, running.attempt, fraction, message))

    def on_log(self, running, level, message):
        """A line the running task logged; at most ``log_lines`` per attempt."""
        key = (running.job_id, running.attempt)
        count = self._log_counts.get(key, 0) + 1
        self._log_counts[key] = count
        if count < self.log_lines:
            self._ops.append(('log', running.job_id, running.attempt, utcnow(),
                              text.storable(level, MAX_LEVEL),
                              text.storable(message, MAX_MESSAGE)))
        elif count == self.log_lines:
            self._ops.append(('log', running.job_id, running.attempt, utcnow(), 'WARNING',
                              f'(more than {self.log_lines} lines: the rest are not kept)'))

    def _finish(self, task, outcome, exc, final, result=None, acknowledges=True):
        now = utcnow()
        started = self._started.pop(task, None)
        duration = time.monotonic() - started[0] if started else None
        number = started[2] if started else message.attempt_number(task)
        queue = started[3] if started else None
        etype = emsg = tb = None
        if exc is not None:
            # Whatever the task raised must become text the ledger accepts:
            # a change it refuses is dropped, and the job would then look lost.
            etype = _error_type(exc)
            emsg = text.storable(exc, MAX_MESSAGE)
            if exc.__traceback__ is not None:
                try:
                    tb = ''.join(tb_module.format_exception(exc))
                except Exception:
                    tb = 'the traceback could not be formatted'
                tb = text.storable(tb, MAX_TRACEBACK, keep_end=True)
        self._log_counts.pop((task.id, number), None)
        receipt = None
        if acknowledges:
            receipt = getattr(task, 'receipt', None)
            task.receipt = None  # this record acknowledges it, once written
        self._ops.append(Finish('finish', task.id, number, outcome, now, duration, etype, emsg,
                                tb, result, final, task.name, queue, receipt))
        if len(self._ops) >= self.max_batch:
            self._wake.set()

    # -- the writer side ---------------------------------------------------

    def start(self):
        if self._writer is None:
            self._writer = threading.Thread(target=self._run, name='ledger-writer', daemon=True)
            self._writer.start()
        return self

    def heartbeat(self):
        """Queue this consumer's heartbeat: alive, what it runs, counts since the last."""
        done, bad = self._counts
        self._counts = [0, 0]
        host, pid = parse_name(self.consumer)
        self._ops.append(('heartbeat', self.consumer, host, int(pid), self.queues,
                          self.concurrency, self.started_at, utcnow(), done, bad,
                          sorted({t.id for t in self._started.copy()}),
                          bool(self.is_leader())))

    def close(self, timeout=10):
        """Stop the writer and write everything still buffered."""
        self._stop.set()
        self._wake.set()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout)
        deadline = time.monotonic() + timeout
        self._drain(deadline)
        if self.queues:  # a last heartbeat with the final counts, then "stopped"
            self.heartbeat()
            self._ops.append(('stopped', self.consumer, utcnow()))
            self._drain(deadline)
        self.writer.close(max(0.0, deadline - time.monotonic()))

    def _drain(self, deadline):
        while self._ops and time.monotonic() < deadline:
            try:
                self.flush()
            except Exception:
                logger.exception('ledger: final flush failed; %d changes unwritten', len(self._ops))
                return

    @property
    def pending(self):
        return len(self._ops)

    # Changes buffered past which the consumer stops taking jobs (the ledger
    # cannot keep up, or is away), and below which it takes them again.
    HOLD_ABOVE, RESUME_BELOW = 20_000, 5_000

    def backlogged(self):
        """Whether the consumer should take no job for now (hysteresis on ``pending``)."""
        pending = len(self._ops)
        if self._holding and pending < self.RESUME_BELOW:
            self._holding = False
            logger.warning('ledger: %d changes waiting; taking jobs again', pending)
        elif not self._holding and pending > self.HOLD_ABOVE:
            self._holding = True
            logger.error('ledger: %d changes not written yet; taking no job until the ledger '
                         'catches up', pending)
        return self._holding

    def _run(self):
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            if self.queues and time.monotonic() >= self._next_beat:
                self._next_beat = time.monotonic() + self.heartbeat_interval
                self.heartbeat()
            try:
                # One batch per interval: under load batches grow, rather than
                # the writer flushing small ones back to back (holding the GIL
                # the worker threads need). Only a full batch waiting is
                # written at once.
                self.flush()
                while len(self._ops) >= self.max_batch and not self._stop.is_set():
                    self.flush()
                self.failures = 0
            except Exception:
                self.failures += 1
                # Keep the changes and try again, backing off up to 5 s.
                logger.exception('ledger: flush failed (%d in a row); %d changes kept',
                                 self.failures, len(self._ops))
                self._stop.wait(min(5.0, 0.1 * 2 ** self.failures))

    def flush(self):
        """Hand one batch to the writer; what it could not write is kept."""
        with self._flush_lock:
            ops = []
            while self._ops and len(ops) < self.max_batch:
                ops.append(self._ops.popleft())
            if not ops:
                return 0
            try:
                self.writer.write(ops)
            except Unwritten as exc:
                self._ops.extendleft(reversed(exc.ops))
                raise
            for op in ops:
                if op[0] == 'finish':
                    self._counts[0] += 1
                    self._counts[1] += op.outcome != states.ATTEMPT_SUCCEEDED
            return len(ops)


class Unwritten(Exception):
    """The database is unreachable; ``ops`` are the changes not yet written."""

    def __init__(self, ops, cause):
        super().__init__(f'{len(ops)} changes not written: {cause}')
        self.ops = ops


class Writer:
    """Writes batches of changes to the ledger, announces them, acknowledges their messages.

    ``acknowledge(receipts)`` is called with the receipts of the attempts a
    batch ended, after the batch is committed (never before: a message is
    acknowledged only once its outcome is durable). Receipts it fails to
    acknowledge are tried again with the next batch.
    """

    def __init__(self, engine, acknowledge=None):
        self.engine = engine
        self.acknowledge = acknowledge
        self._unacknowledged = []

    def write(self, ops):
        """Write ``ops`` in one transaction; raise :class:`Unwritten` if the database is away.

        Any other error is a bad change, not a bad database: the batch is
        then written change by change and only the changes that fail on
        their own are dropped (and logged), so one bad change cannot stop
        the recording of everything after it. A dropped ending is not
        acknowledged: its message stays in flight.
        """
        written = ops
        try:
            with self.engine.begin() as conn:
                changed = apply(conn, ops)
        except Exception as exc:
            if transient(exc):
                raise Unwritten(ops, exc) from exc
            logger.exception('ledger: batch of %d changes failed; writing them one by one',
                             len(ops))
            changed, written = {}, []
            for i, op in enumerate(ops):
                try:
                    with self.engine.begin() as conn:
                        changed.update(apply(conn, [op]))
                    written.append(op)
                except Exception as exc:
                    if transient(exc):
                        self._acknowledge(written)
                        raise Unwritten(ops[i:], exc) from exc
                    logger.exception('ledger: dropped a change it cannot write: %.300r', op)
        self._acknowledge(written)
        announce(changed)

    def _acknowledge(self, ops):
        if self.acknowledge is None:
            return
        receipts = self._unacknowledged + [op.receipt for op in ops
                                           if op[0] == 'finish' and op.receipt is not None]
        self._unacknowledged = []
        if not receipts:
            return
        try:
            self.acknowledge(receipts)
        except Exception as exc:
            # Kept for the next batch; if this process ends first, the
            # leader finds these outcomes recorded and drops the messages.
            logger.warning('ledger: %d messages not acknowledged yet: %s', len(receipts), exc)
            self._unacknowledged = receipts[-10000:]

    def close(self, timeout):
        if self._unacknowledged:
            self._acknowledge([])


class ProcessWriter:
    """Writes the ledger from a child process of its own.

    A consumer's worker threads share one GIL; writing thousands of rows a
    second in the same process starves them (the writer's database work
    releases and retakes the GIL row by row). Batches go over a pipe
    instead, and a child process writes them. If the consumer dies, the
    child still writes (and acknowledges) everything it was sent, then
    exits. Signals meant for the consumer (Ctrl-C reaches the whole process
    group, systemd signals the whole control group) do not stop it: it
    stops when the consumer closes the pipe, after its last write.
    """

    RESTART_AFTER = 1.0  # seconds between restarts of a writer process that died

    def __init__(self, acknowledge=None):
        self._acknowledge = acknowledge
        self._restarted = 0.0
        self._start()

    def _start(self):
        import multiprocessing
        ctx = multiprocessing.get_context('spawn')  # no fork of a threaded process
        receive, self._send = ctx.Pipe(duplex=False)
        # ``acknowledge`` is a module-level function, sent to the child by name.
        self._child = ctx.Process(target=_write_in_child, args=(receive, self._acknowledge),
                                  name='ledger-writer')
        # Born deaf to the stop signals: the child inherits this thread's
        # blocked set, so a Ctrl-C while it starts up stays pending until it
        # has set them to be ignored (it unblocks them then).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            self._child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        receive.close()

    @property
    def pid(self):
        return self._child.pid

    def write(self, ops):
        if not self._child.is_alive():
            # Whatever killed it, the changes it had not written are still
            # in flight in the broker; the ones here are not lost: start
            # another writer and hand them to it.
            if time.monotonic() - self._restarted < self.RESTART_AFTER:
                raise Unwritten(ops, f'the ledger writer process exited '
                                     f'({self._child.exitcode}); restarting it')
            logger.error('ledger: the writer process exited (%s); starting another',
                         self._child.exitcode)
            self._restarted = time.monotonic()
            self._start()
        try:
            self._send.send(ops)
        except OSError as exc:
            raise Unwritten(ops, exc) from exc

    def close(self, timeout):
        try:
            self._send.send(None)
            self._send.close()
        except OSError:
            pass
        self._child.join(timeout)
        if self._child.is_alive():
            logger.error('ledger: the writer process is still writing after %.0f s', timeout)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _write_in_child(receive, acknowledge):
    """The ledger writer process: write every batch received until told to stop."""
    # Out of the consumer's process group, deaf to the signals that stop
    # it: the consumer's last batches arrive after those signals.
    try:
        os.setsid()
    except OSError:
        pass
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    from . import create_app
    from .extensions import db
    app = create_app()
    with app.app_context():
        writer = Writer(db.engine, acknowledge=acknowledge)
    while True:
        try:
            ops = receive.recv()
        except EOFError:  # the consumer is gone; everything it sent is written
            break
        if ops is None:
            break
        failures = 0
        while ops:
            try:
                writer.write(ops)
                ops = None
            except Unwritten as exc:
                failures += 1
                logger.error('ledger: %s (%d failures in a row); retrying', exc, failures)
                ops = exc.ops
                time.sleep(min(5.0, 0.1 * 2 ** failures))
    writer.close(10)


def apply(conn, ops):
    """Apply a batch of recorded changes on ``conn``; return what changed.

    Returns ``{job id: (state, queue, task)}`` as this batch left them (a
    hint for the live pages, which re-read the ledger).
    """
    d = _dialect(conn)
    ts, now = d.ts, d.ts(utcnow())
    starts = {}      # (job, n) -> start op
    finishes = {}    # (job, n) -> finish op
    progress = {}    # job -> latest progress op
    queued, scheduled = {}, {}
    logs, beats = [], []
    for op in ops:
        kind = op[0]
        if kind == 'log':
            logs.append(op)
        elif kind in ('heartbeat', 'stopped'):
            beats.append(op)
        elif kind == 'start':
            starts[(op[1], op[2])] = op
        elif kind == 'finish':
            finishes[(op[1], op[2])] = op
        elif kind == 'progress':
            progress[op[1]] = op
        elif kind == 'queued':
            queued[op[1]] = op
        elif kind == 'scheduled':
            scheduled[op[1]] = op

    changed = {}
    attempts, ended, start_rows, ran_rows, finish_rows = [], [], [], [], []
    for key, s in starts.items():
        _, job_id, n, worker, at, info = s
        f = finishes.pop(key, None)
        if f is None:
            attempts.append((job_id, n, worker, states.ATTEMPT_RUNNING, ts(at),
                             None, None, None, None, None))
            start_rows.append((n, ts(at), worker, now, job_id, n))
            changed[job_id] = (states.RUNNING, info[1], info[0])
        else:
            attempts.append((job_id, n, worker, f.outcome, ts(at), ts(f.at), f.duration,
                             f.error_type, f.error_message, f.traceback))
            state, finished, result, error, prog = _job_end(f)
            ran_rows.append((state, n, ts(at), ts(finished), worker, d.json(result), error,
                             f.error_type, prog, now, job_id, n))
            changed[job_id] = (state, info[1], info[0])
    for f in finishes.values():
        ended.append((f.outcome, ts(f.at), f.duration, f.error_type, f.error_message,
                      f.traceback, f.job_id, f.number))
        state, finished, result, error, prog = _job_end(f)
        finish_rows.append((state, ts(finished), d.json(result), error, f.error_type, prog, now,
                            f.job_id, f.number))
        changed[f.job_id] = (state, f.queue, f.task)

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
        _executemany(conn, d.sql['progress'], [(p[3], p[4], now, p[1], p[2])
                                               for p in progress.values()])
        for p in progress.values():
            changed.setdefault(p[1], (states.RUNNING, None, None))
    if logs:
        _executemany(conn, d.sql['log'], [(o[1], o[2], ts(o[3]), o[4], o[5]) for o in logs])
        for o in logs:
            changed.setdefault(o[1], (None, None, None))
    if ended:
        _executemany(conn, d.sql['end_attempt'], ended)
    if finish_rows:
        _executemany(conn, d.sql['finish'], finish_rows)
    if queued:
        _executemany(conn, d.sql['queued'], [(now, i) for i in queued])
        for q in queued.values():
            changed.setdefault(q[1], (states.QUEUED, q[3], q[2]))
    if scheduled:
        _executemany(conn, d.sql['scheduled'], [(ts(s[2]), now, s[1])
                                                for s in scheduled.values()])
        for s in scheduled.values():
            changed.setdefault(s[1], (None, s[4], s[3]))
    for b in beats:
        if b[0] == 'heartbeat':
            _, wid, host, pid, queues, concurrency, started, seen, done, bad, current, lead = b
            _executemany(conn, d.sql['heartbeat'], [(
                wid, host, pid, json.dumps(queues), concurrency, ts(started), ts(seen), done, bad,
                json.dumps(current), lead)])
        else:
            _, wid, at = b
            _executemany(conn, d.sql['stopped'], [(ts(at), ts(at), '[]', False, wid)])
    if beats:
        changed[WORKERS] = (None, None, None)
    return changed


def _executemany(conn, sql, rows):
    """Run ``sql`` once per row; return the number of rows it changed."""
    if not rows:
        return 0
    return conn.exec_driver_sql(sql, rows).rowcount


def _job_end(f):
    """``(state, finished_at, result, error, progress)`` after :class:`Finish` ``f``."""
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
    for job_id, s in {s[1]: s for s in start_ops}.items():
        task, queue, params, priority, retries, retry_delay = s[5]
        rows.append((job_id, task, queue, d.json(params), priority, s[2] - 1, retries,
                     retry_delay, d.ts(s[4]), now))
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


def announce(changed):
    """Publish what a batch changed (ids with state, queue and task as written)."""
    workers = changed.pop(WORKERS, None) is not None
    events.publish([{'id': job_id, 'state': state, 'queue': queue, 'task': task}
                    for job_id, (state, queue, task) in changed.items()],
                   workers=workers)


# -- wiring -------------------------------------------------------------------

recorder = None
_recorder_lock = threading.Lock()
_serving = {'queues': [], 'concurrency': 0}
_capture = []  # the log handler feeding the recorder
_attached = set()


def start(app, acknowledge=None):
    """Start this process's recorder for ``app`` (once).

    ``acknowledge(receipts)`` acknowledges the messages of attempts whose
    outcome the writer committed (a module-level function: the child
    process writer receives it by name).
    """
    global recorder
    from .extensions import db
    with _recorder_lock:
        if recorder is None:
            if app.config['EMBEDDED']:
                # One process, in-process events: write from a thread.
                with app.app_context():
                    writer = Writer(db.engine, acknowledge=acknowledge)
            else:
                writer = ProcessWriter(acknowledge)
            recorder = Recorder(writer, app.config['LEDGER_FLUSH_INTERVAL'],
                                heartbeat_interval=app.config['HEARTBEAT_INTERVAL'],
                                log_lines=app.config['LOG_LINES'])
            recorder.queues = list(_serving['queues'])
            recorder.concurrency = _serving['concurrency']
            recorder.is_leader = lambda: leadership.leading
            recorder.start()
            context.sink = recorder.on_progress
            context.log_sink = recorder.on_log
            capture = context.LogCapture()
            capture.setFormatter(logging.Formatter('%(name)s: %(message)s'))
            logging.getLogger().addHandler(capture)
            _capture.append(capture)
            # Changes made as the process stops (interrupted jobs) still land.
            atexit.register(stop)
    return recorder


def serving(queue, workers):
    """Note that this process consumes ``queue`` with ``workers`` threads (heartbeats say so)."""
    if queue not in _serving['queues']:
        _serving['queues'].append(queue)
    _serving['concurrency'] += workers
    if recorder is not None:
        recorder.queues = list(_serving['queues'])
        recorder.concurrency = _serving['concurrency']


def served():
    """The queues this process consumes (as ``serving`` noted them)."""
    return list(_serving['queues'])


def backlogged():
    """Whether this process's recorder holds too many unwritten changes to take more jobs."""
    current = recorder
    return current is not None and current.backlogged()


def stop():
    """Flush and stop this process's recorder."""
    global recorder
    with _recorder_lock:
        if recorder is not None:
            recorder.close()
            recorder = None
            context.sink = context.log_sink = None
            _serving.update(queues=[], concurrency=0)
            while _capture:
                logging.getLogger().removeHandler(_capture.pop())


def _on_consumer_shutdown():
    if recorder is not None:
        try:
            recorder.flush()
        except Exception:
            logger.exception('ledger: flush at worker shutdown failed')


def attach(huey, queue):
    """Record ``huey``'s signals as changes to jobs of ``queue``."""
    if huey.name in _attached:
        return
    _attached.add(huey.name)

    def on_signal(signal, task, *args):
        if recorder is not None:
            recorder.on_signal(huey, queue, signal, task, *args)

    def on_post_execute(task, value, exc):
        if recorder is not None:
            recorder.on_post_execute(task, value, exc)

    # Only the signals the ledger uses: COMPLETE and ERROR come through
    # the post-execute hook, which also sees the result and the exception.
    huey.signal(S.SIGNAL_EXECUTING, S.SIGNAL_ENQUEUED, S.SIGNAL_SCHEDULED,
                S.SIGNAL_INTERRUPTED)(on_signal)
    huey.post_execute('qm_ledger')(on_post_execute)
    huey.on_shutdown('qm_ledger')(_on_consumer_shutdown)

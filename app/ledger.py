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
attempt 2 that another consumer already recorded.
"""
import collections
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import traceback as tb_module

import sqlalchemy as sa
from huey import signals as S
from huey.exceptions import CancelExecution, TaskTimeout

from . import context, events, states
from .models import Attempt, Job, utcnow

logger = logging.getLogger(__name__)

MAX_TRACEBACK = 64 * 1024
MAX_MESSAGE = 8 * 1024
MAX_RESULT = 64 * 1024



def transient(exc):
    """Whether ``exc`` means "the database is away", not "this change is bad"."""
    return (isinstance(exc, (sa.exc.OperationalError, sa.exc.DisconnectionError))
            or getattr(exc, 'connection_invalidated', False))

job_t = Job.__table__
attempt_t = Attempt.__table__
b = sa.bindparam


def consumer_id():
    """This consumer process as ``host:pid``."""
    return f'{socket.gethostname()}:{os.getpid()}'


def _jsonable(value):
    """The task's return value as JSON, or its repr when it is not JSON."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return {'repr': repr(value)[:MAX_RESULT]}
    if len(text) > MAX_RESULT:
        return {'truncated': True, 'repr': text[:MAX_RESULT]}
    return value


def _error_type(exc):
    cls = type(exc)
    if cls.__module__ in ('builtins', '__main__'):
        return cls.__qualname__
    return f'{cls.__module__}.{cls.__qualname__}'


def _chunks(items, size=500):
    items = list(items)
    for i in range(0, len(items), size):
        yield items[i:i + size]


# Statements, each run with executemany over a batch.
_START = job_t.update().where(
    job_t.c.id == b('j_id'), job_t.c.attempts < b('j_n')
).values(
    state=states.RUNNING, attempts=b('j_n'), started_at=b('j_at'), finished_at=None,
    scheduled_for=None, worker=b('j_worker'), progress=None, progress_message=None,
    version=job_t.c.version + 1, updated_at=b('j_now'))

_FINISH = job_t.update().where(
    job_t.c.id == b('j_id'), job_t.c.attempts == b('j_n')
).values(
    state=b('j_state'), finished_at=b('j_finished'), result=b('j_result'),
    error=b('j_error'), progress=sa.func.coalesce(b('j_progress', type_=sa.Float), job_t.c.progress),
    version=job_t.c.version + 1, updated_at=b('j_now'))

# Start and finish in one batch (fast jobs): one write instead of two.
_RAN = job_t.update().where(
    job_t.c.id == b('j_id'), job_t.c.attempts < b('j_n')
).values(
    state=b('j_state'), attempts=b('j_n'), started_at=b('j_at'),
    finished_at=b('j_finished'), scheduled_for=None, worker=b('j_worker'),
    result=b('j_result'), error=b('j_error'), progress=b('j_progress'),
    progress_message=None, version=job_t.c.version + 1, updated_at=b('j_now'))

_PROGRESS = job_t.update().where(
    job_t.c.id == b('j_id'), job_t.c.attempts == b('j_n'), job_t.c.state == states.RUNNING
).values(progress=b('j_progress'), progress_message=b('j_message'),
         version=job_t.c.version + 1, updated_at=b('j_now'))

_QUEUED = job_t.update().where(
    job_t.c.id == b('j_id'), job_t.c.state == states.SCHEDULED
).values(state=states.QUEUED, version=job_t.c.version + 1, updated_at=b('j_now'))

# No IN (...) here: executemany cannot expand a list parameter.
_SCHEDULED = job_t.update().where(
    job_t.c.id == b('j_id'),
    sa.or_(job_t.c.state == states.RETRYING, job_t.c.state == states.SCHEDULED)
).values(scheduled_for=b('j_eta'), version=job_t.c.version + 1, updated_at=b('j_now'))

_FINISH_ATTEMPT = attempt_t.update().where(
    attempt_t.c.job_id == b('a_job'), attempt_t.c.number == b('a_n')
).values(outcome=b('a_outcome'), finished_at=b('a_finished'), duration=b('a_duration'),
         error_type=b('a_etype'), error_message=b('a_emsg'), traceback=b('a_tb'))


class Recorder:
    """Buffers ledger changes from Huey's threads and writes them in batches."""

    def __init__(self, engine, flush_interval=0.05, max_batch=5000):
        self.engine = engine
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.consumer = consumer_id()
        self._ops = collections.deque()
        self._started = {}  # task id -> (monotonic start, utc start)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._writer = None
        self.failures = 0  # consecutive failed flushes

    # -- the worker-thread side: tiny, never raises -------------------------

    def on_signal(self, huey, queue, signal, task, exc=None):
        try:
            if signal == S.SIGNAL_EXECUTING:
                now = utcnow()
                number = context.attempt_number(task)
                # Kept for the end of the attempt: a task may change its own
                # retries (no_retry), which the number is computed from.
                self._started[task.id] = (time.monotonic(), now, number)
                meta = task.kwargs.get('meta') or {}
                self._ops.append(('start', task.id, number,
                                  f'{self.consumer}/{threading.current_thread().name}',
                                  now, (task.name, queue, task.kwargs.get('params') or {},
                                        task.priority or 0, meta.get('retries', task.retries),
                                        task.retry_delay or 0.0)))
            elif signal == S.SIGNAL_ENQUEUED:
                # The scheduler moving a due job into the queue.
                if task.eta is None or task.eta <= utcnow():
                    self._ops.append(('queued', task.id))
            elif signal == S.SIGNAL_SCHEDULED:
                self._ops.append(('scheduled', task.id, task.eta))
            # REVOKED needs nothing: the web process marked the job canceled
            # before it revoked the message.
            elif signal == S.SIGNAL_INTERRUPTED:
                self._interrupted(huey, task)
        except Exception:
            logger.exception('ledger: %s of %s not recorded', signal, getattr(task, 'id', task))

    def on_post_execute(self, task, value, exc):
        try:
            if exc is None:
                self._finish(task, states.ATTEMPT_SUCCEEDED, None, final=True,
                             result=_jsonable(value))
            else:
                if isinstance(exc, TaskTimeout):
                    outcome = states.ATTEMPT_TIMEOUT
                elif isinstance(exc, CancelExecution):
                    outcome = states.ATTEMPT_CANCELED
                else:
                    outcome = states.ATTEMPT_FAILED
                self._finish(task, outcome, exc, final=not task.retries)
        except Exception:
            logger.exception('ledger: end of %s not recorded', getattr(task, 'id', task))

    def _interrupted(self, huey, task):
        # Huey drops a task cut off by a shutdown; we put it back as the next
        # attempt (at-least-once), or fail it visibly if the broker is gone.
        started = self._started.get(task.id)
        meta = dict(task.kwargs.get('meta') or {})
        meta.update(base=started[2] if started else context.attempt_number(task),
                    retries=task.retries)
        again = type(task)((), {'params': task.kwargs.get('params') or {}, 'meta': meta},
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

    def _finish(self, task, outcome, exc, final, result=None):
        now = utcnow()
        started = self._started.pop(task.id, None)
        duration = time.monotonic() - started[0] if started else None
        number = started[2] if started else context.attempt_number(task)
        etype = emsg = tb = None
        if exc is not None:
            etype = _error_type(exc)
            emsg = str(exc)[:MAX_MESSAGE]
            if exc.__traceback__ is not None:
                tb = ''.join(tb_module.format_exception(exc))[-MAX_TRACEBACK:]
        self._ops.append(('finish', task.id, number, outcome, now,
                          duration, etype, emsg, tb, result, final))
        if len(self._ops) >= self.max_batch:
            self._wake.set()

    # -- the writer side ---------------------------------------------------

    def start(self):
        if self._writer is None:
            self._writer = threading.Thread(target=self._run, name='ledger-writer', daemon=True)
            self._writer.start()
        return self

    def close(self, timeout=10):
        """Stop the writer and write everything still buffered."""
        self._stop.set()
        self._wake.set()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout)
        deadline = time.monotonic() + timeout
        while self._ops and time.monotonic() < deadline:
            try:
                self.flush()
            except Exception:
                logger.exception('ledger: final flush failed; %d changes unwritten', len(self._ops))
                break

    @property
    def pending(self):
        return len(self._ops)

    def _run(self):
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                while self._ops and not self._stop.is_set():
                    self.flush()
                self.failures = 0
            except Exception:
                self.failures += 1
                # Keep the changes and try again, backing off up to 5 s.
                logger.exception('ledger: flush failed (%d in a row); %d changes kept',
                                 self.failures, len(self._ops))
                self._stop.wait(min(5.0, 0.1 * 2 ** self.failures))

    def flush(self):
        """Write one batch.

        When the database is unreachable the batch goes back to the front of
        the queue, to be retried. Any other error is a bad change, not a bad
        database: the batch is then written change by change and only the
        changes that fail on their own are dropped (and logged), so one bad
        change cannot stop the recording of everything after it.
        """
        with self._flush_lock:
            ops = []
            while self._ops and len(ops) < self.max_batch:
                ops.append(self._ops.popleft())
            if not ops:
                return 0
            try:
                with self.engine.begin() as conn:
                    changed = apply(conn, ops)
            except Exception as exc:
                if transient(exc):
                    self._ops.extendleft(reversed(ops))
                    raise
                logger.exception('ledger: batch of %d changes failed; writing them one by one',
                                 len(ops))
                changed = set()
                for i, op in enumerate(ops):
                    try:
                        with self.engine.begin() as conn:
                            changed |= apply(conn, [op])
                    except Exception as exc:
                        if transient(exc):
                            self._ops.extendleft(reversed(ops[i:]))
                            raise
                        logger.exception('ledger: dropped a change it cannot write: %.300r', op)
        announce(self.engine, changed)
        return len(ops)


def apply(conn, ops):
    """Apply a batch of recorded changes on ``conn``; return the touched job ids."""
    now = utcnow()
    starts = {}      # (job, n) -> start op
    finishes = {}    # (job, n) -> finish op
    progress = {}    # job -> latest progress op
    queued, scheduled = {}, {}
    for op in ops:
        kind = op[0]
        if kind == 'start':
            starts[(op[1], op[2])] = op
        elif kind == 'finish':
            finishes[(op[1], op[2])] = op
        elif kind == 'progress':
            progress[op[1]] = op
        elif kind == 'queued':
            queued[op[1]] = op
        elif kind == 'scheduled':
            scheduled[op[1]] = op

    if starts:
        _insert_missing_jobs(conn, starts.values(), now)

    attempt_rows, attempt_updates = [], []
    start_rows, ran_rows, finish_rows = [], [], []
    for key, s in starts.items():
        _, job_id, n, worker, at, _info = s
        row = {'job_id': job_id, 'number': n, 'worker': worker, 'outcome': states.ATTEMPT_RUNNING,
               'started_at': at, 'finished_at': None, 'duration': None,
               'error_type': None, 'error_message': None, 'traceback': None}
        f = finishes.pop(key, None)
        if f is None:
            start_rows.append({'j_id': job_id, 'j_n': n, 'j_at': at, 'j_worker': worker,
                               'j_now': now})
        else:
            row.update(outcome=f[3], finished_at=f[4], duration=f[5], error_type=f[6],
                       error_message=f[7], traceback=f[8])
            ran_rows.append(dict(_job_end(f, now), j_at=at, j_worker=worker))
        attempt_rows.append(row)
    for f in finishes.values():
        attempt_updates.append({'a_job': f[1], 'a_n': f[2], 'a_outcome': f[3], 'a_finished': f[4],
                                'a_duration': f[5], 'a_etype': f[6], 'a_emsg': f[7], 'a_tb': f[8]})
        finish_rows.append(_job_end(f, now))

    if attempt_rows:
        _insert_attempts(conn, attempt_rows)
    if start_rows:
        conn.execute(_START, start_rows)
    if ran_rows:
        conn.execute(_RAN, ran_rows)
    if progress:
        conn.execute(_PROGRESS, [{'j_id': p[1], 'j_n': p[2], 'j_progress': p[3],
                                  'j_message': p[4], 'j_now': now} for p in progress.values()])
    if attempt_updates:
        conn.execute(_FINISH_ATTEMPT, attempt_updates)
    if finish_rows:
        conn.execute(_FINISH, finish_rows)
    if queued:
        conn.execute(_QUEUED, [{'j_id': i, 'j_now': now} for i in queued])
    if scheduled:
        conn.execute(_SCHEDULED, [{'j_id': s[1], 'j_eta': s[2], 'j_now': now}
                                  for s in scheduled.values()])

    return ({s[1] for s in starts.values()} | {f[1] for f in finishes.values()}
            | set(progress) | set(queued) | set(scheduled)
            | {r['j_id'] for r in ran_rows})


def _job_end(f, now):
    """Job columns after attempt ``f`` ended."""
    _, job_id, n, outcome, at, _dur, etype, emsg, _tb, result, final = f
    if outcome == states.ATTEMPT_SUCCEEDED:
        state, error, prog = states.SUCCEEDED, None, 1.0
    elif outcome == states.ATTEMPT_INTERRUPTED and not final:
        state, error, prog = states.QUEUED, None, None
    else:
        error = f'{etype}: {emsg}' if emsg else etype
        prog = None
        if not final:
            state = states.RETRYING
        elif outcome == states.ATTEMPT_CANCELED:
            state = states.CANCELED
        else:
            state = states.FAILED
    return {'j_id': job_id, 'j_n': n, 'j_state': state,
            'j_finished': at if state in states.FINISHED else None,
            'j_result': result, 'j_error': error, 'j_progress': prog, 'j_now': now}


def _insert_missing_jobs(conn, start_ops, now):
    """Create rows for jobs Huey runs that the ledger has not seen.

    The API writes a row before it enqueues, so this only happens for jobs
    enqueued around the API (``huey_tasks.sleep(...)`` from a shell) or when
    a web process died between enqueue and commit.
    """
    by_id = {s[1]: s for s in start_ops}
    known = set()
    for chunk in _chunks(by_id):
        known.update(conn.execute(sa.select(job_t.c.id).where(job_t.c.id.in_(chunk))).scalars())
    rows = []
    for job_id, s in by_id.items():
        if job_id in known:
            continue
        task, queue, params, priority, retries, retry_delay = s[5]
        rows.append({'id': job_id, 'task': task, 'queue': queue, 'params': params,
                     'state': states.QUEUED, 'priority': priority, 'attempts': s[2] - 1,
                     'retries': retries, 'retry_delay': retry_delay, 'created_at': s[4],
                     'updated_at': now, 'version': 1})
    if rows:
        # The API may commit the same row meanwhile; its row wins.
        if conn.dialect.name == 'postgresql':
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        conn.execute(insert(job_t).on_conflict_do_nothing(index_elements=['id']), rows)


def _insert_attempts(conn, rows):
    try:
        with conn.begin_nested():
            conn.execute(attempt_t.insert(), rows)
    except sa.exc.IntegrityError:
        # An attempt number already taken (a message enqueued twice, or a job
        # deleted under a running attempt): insert one by one, skipping those.
        for row in rows:
            try:
                with conn.begin_nested():
                    conn.execute(attempt_t.insert(), row)
            except sa.exc.IntegrityError:
                logger.warning('ledger: attempt %s of job %s not recorded (exists, or job deleted)',
                               row['number'], row['job_id'])


def announce(engine, job_ids, deleted=()):
    """Publish the current version, state, queue and task of ``job_ids``."""
    if not job_ids and not deleted:
        return
    rows = []
    try:
        with engine.connect() as conn:
            for chunk in _chunks(job_ids):
                rows.extend(
                    {'id': r.id, 'version': r.version, 'state': r.state, 'queue': r.queue,
                     'task': r.task}
                    for r in conn.execute(sa.select(job_t.c.id, job_t.c.version, job_t.c.state,
                                                    job_t.c.queue, job_t.c.task)
                                          .where(job_t.c.id.in_(chunk))))
    except Exception:
        logger.exception('ledger: changes written but not announced')
        return
    events.publish(rows, deleted)


# -- wiring -------------------------------------------------------------------

recorder = None
_recorder_lock = threading.Lock()
_attached = set()
app_factory = None  # how a consumer builds its app; set by create_app's module


def start(app):
    """Start this process's recorder for ``app`` (once)."""
    global recorder
    from .extensions import db
    with _recorder_lock:
        if recorder is None:
            with app.app_context():
                engine = db.engine
            recorder = Recorder(engine, app.config['LEDGER_FLUSH_INTERVAL']).start()
            context.sink = recorder.on_progress
    return recorder


def stop():
    """Flush and stop this process's recorder."""
    global recorder
    with _recorder_lock:
        if recorder is not None:
            recorder.close()
            recorder = None
            context.sink = None


def _on_consumer_startup():
    # Runs in each consumer worker; the first one builds the app and recorder.
    if recorder is None:
        start(app_factory())


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

    huey.signal()(on_signal)
    huey.post_execute('qm_ledger')(on_post_execute)
    huey.on_startup('qm_ledger')(_on_consumer_startup)
    huey.on_shutdown('qm_ledger')(_on_consumer_shutdown)

"""The recorder: Huey's signals, on its worker threads, become buffered ledger changes.

Everything a task writes about its job (log lines, progress messages, error
messages, tracebacks, results) is stored with the values of its secret
parameters masked (:mod:`app.masking`): the task gets the real values, the
ledger never holds them outside the job's ``secret_params``.
"""
import collections
import json
import logging
import threading
import time
import traceback as tb_module
from typing import NamedTuple

import sqlalchemy as sa
from huey import signals as S
from huey.exceptions import CancelExecution, TaskTimeout

from .. import catalog, message, states, text
from ..leader import process_name
from ..models import utcnow
from . import interrupted
from .heartbeats import Heartbeats
from .ops import Finish, Log, Progress, Queued, Scheduled, Start
from .writers import Unwritten, Writer

logger = logging.getLogger(__name__)

# The longest text stored for each (characters); longer is cut, saying so.
MAX_TRACEBACK = 64 * 1024
MAX_MESSAGE = 8 * 1024
MAX_RESULT = 64 * 1024
MAX_ERROR_TYPE = 200  # the column's length
MAX_LEVEL = 10


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


class _Run(NamedTuple):
    """An attempt this process runs: since when (monotonic s, and naive UTC), which, where,
    and what masks its secret values in what it writes."""
    began: float
    at: object
    number: int
    queue: str
    redactor: object


def _redactor(task):
    """The :class:`~app.masking.Redactor` of the secret parameters ``task`` (a Huey Task) carries."""
    return catalog.redactor(message.task_name(task.name), message.params(task))


class Recorder:
    """Buffers ledger changes from Huey's threads and writes them in batches.

    ``writer`` writes a batch (a list of :mod:`.ops` records): a
    :class:`~.writers.Writer`, a :class:`~.writers.ProcessWriter`, or an
    SQLAlchemy engine (a ``Writer`` on it is made). A thread started by
    :meth:`start` hands it one batch of at most ``max_batch`` changes every
    ``flush_interval`` seconds and queues this consumer's heartbeat every
    ``heartbeat_interval`` seconds (see :attr:`heartbeats`). At most
    ``log_lines`` lines a task logs are kept per attempt. The ``on_*``
    methods, called on Huey's threads, never raise.
    """

    def __init__(self, writer, flush_interval=0.05, max_batch=5000, heartbeat_interval=5.0,
                 log_lines=1000):
        self.writer = writer if not isinstance(writer, sa.engine.Engine) else Writer(writer)
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.log_lines = log_lines
        self.consumer = process_name()
        # What this consumer serves goes in its heartbeats (set by whoever runs it).
        self.heartbeats = Heartbeats(self.consumer, heartbeat_interval)
        self._log_counts = {}  # (job, attempt) -> lines captured
        self._ops = collections.deque()
        self._local = threading.local()
        # The Huey task of each running attempt (by identity, not job id: a
        # stale run of a job may overlap its next one) -> its _Run.
        self._started = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._writer = None
        self._holding = False
        self.failures = 0  # consecutive failed flushes

    # -- the worker-thread side: tiny, never raises -------------------------

    def on_signal(self, huey, queue, signal, task, exc=None):
        """Record Huey ``signal`` about ``task`` of ``queue`` (executing, enqueued, scheduled,
        interrupted; others are ignored). An interrupted task is put back in ``huey``."""
        try:
            if signal == S.SIGNAL_EXECUTING:
                now = utcnow()
                number = message.attempt_number(task)
                # Kept for the end of the attempt: a task may change its own
                # retries (no_retry), which the number is computed from.
                shown, secret = catalog.split(message.task_name(task.name), message.params(task))
                self._started[task] = _Run(time.monotonic(), now, number, queue,
                                           _redactor(task))
                self._ops.append(Start(task.id, number, self._worker_name(), now, task.name,
                                       queue, shown, task.priority or 0,
                                       message.retries(task), task.retry_delay or 0.0, secret))
            elif signal == S.SIGNAL_ENQUEUED:
                # The scheduler moving a due job into the queue.
                if task.eta is None or task.eta <= utcnow():
                    self._ops.append(Queued(task.id, task.name, queue))
            elif signal == S.SIGNAL_SCHEDULED:
                self._ops.append(Scheduled(task.id, task.eta, task.name, queue))
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
        """Record the end of ``task``'s attempt: it returned ``value``, or raised ``exc``."""
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
        started = self._started.get(task)
        ending = interrupted.requeue(huey, task, started.number if started else None)
        if ending is not None:
            self._finish(task, states.ATTEMPT_INTERRUPTED, ending.error, final=ending.final)

    def _redactor_of(self, task):
        started = self._started.get(task)
        return started.redactor if started else _redactor(task)

    def on_progress(self, running, fraction, message):
        """The running attempt (a :class:`app.task_api.Running`) is ``fraction`` (0..1) done."""
        if message is not None:
            message = text.storable(self._redactor_of(running.task).text(message), 200)
        self._ops.append(Progress(running.job_id, running.attempt, fraction, message))

    def on_log(self, running, level, message):
        """A line the running task logged; at most ``log_lines`` per attempt."""
        key = (running.job_id, running.attempt)
        count = self._log_counts.get(key, 0) + 1
        self._log_counts[key] = count
        if count < self.log_lines:
            # Masked before it is cut: a cut must not leave part of a secret.
            line = self._redactor_of(running.task).text(text.safe_str(message))
            self._ops.append(Log(running.job_id, running.attempt, utcnow(),
                                 text.storable(level, MAX_LEVEL),
                                 text.storable(line, MAX_MESSAGE)))
        elif count == self.log_lines:
            self._ops.append(Log(running.job_id, running.attempt, utcnow(), 'WARNING',
                                 f'(more than {self.log_lines} lines: the rest are not kept)'))

    def _finish(self, task, outcome, exc, final, result=None, acknowledges=True):
        now = utcnow()
        redactor = self._redactor_of(task)
        started = self._started.pop(task, None)
        duration = time.monotonic() - started.began if started else None
        number = started.number if started else message.attempt_number(task)
        queue = started.queue if started else None
        etype = emsg = tb = None
        if exc is not None:
            # Whatever the task raised must become text the ledger accepts:
            # a change it refuses is dropped, and the job would then look lost.
            # Secrets masked before the text is cut (a cut must not leave a
            # part of one).
            etype = _error_type(exc)
            emsg = text.storable(redactor.text(text.safe_str(exc)), MAX_MESSAGE)
            if exc.__traceback__ is not None:
                try:
                    tb = ''.join(tb_module.format_exception(exc))
                except Exception:
                    tb = 'the traceback could not be formatted'
                tb = text.storable(redactor.text(tb), MAX_TRACEBACK, keep_end=True)
        if redactor and result is not None:
            result = redactor.value(result)
        self._log_counts.pop((task.id, number), None)
        receipt = None
        if acknowledges:
            receipt = getattr(task, 'receipt', None)
            task.receipt = None  # this record acknowledges it, once written
        self._ops.append(Finish(task.id, number, outcome, now, duration, etype, emsg, tb, result,
                                final, task.name, queue, receipt))
        if len(self._ops) >= self.max_batch:
            self._wake.set()

    # -- the writer side ---------------------------------------------------

    def start(self):
        """Start the thread that writes the buffered changes (once); return self."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._run, name='ledger-writer', daemon=True)
            self._writer.start()
        return self

    def heartbeat(self):
        """Queue this consumer's heartbeat: alive, what it runs, counts since the last."""
        self._ops.append(self.heartbeats.beat(sorted({t.id for t in self._started.copy()})))

    def close(self, timeout=10):
        """Stop the writer and write everything still buffered."""
        self._stop.set()
        self._wake.set()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout)
        deadline = time.monotonic() + timeout
        self._drain(deadline)
        if self.heartbeats.queues:  # a last heartbeat with the final counts, then "stopped"
            self.heartbeat()
            self._ops.append(self.heartbeats.stopped())
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
        """The number of changes buffered, not handed to the writer yet."""
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
            if self.heartbeats.due():
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
            self.heartbeats.written(ops)
            return len(ops)

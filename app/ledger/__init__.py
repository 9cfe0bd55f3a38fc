"""Recording what Huey does in the ledger, in batches, off the worker threads.

Huey calls our signal handlers (and one post-execute hook, the only place that
sees a task's return value and exception together) on its worker threads.
They only append a small record of the change (:mod:`.ops`) to a queue. A
writer thread drains the queue every ``LEDGER_FLUSH_INTERVAL`` seconds and
applies it in one transaction, a few ``executemany`` statements per batch,
then publishes one event naming the changed jobs. This is huey's own ``contrib/stats.py`` pattern.

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

The modules, each importing only those before it (and, outside the
package, only the leaves and adapters below it, never the application):
:mod:`.ops` (the records of changes), :mod:`.sql` (the statements in each
driver's dialect), :mod:`.apply` (a batch of changes becomes those
statements), :mod:`.writers` (a thread or a child process writes batches,
announces and acknowledges them), :mod:`.heartbeats` (a consumer's
heartbeat records), :mod:`.interrupted` (an attempt cut off by a shutdown
runs again), :mod:`.recorder` (Huey's signals become buffered changes).
This module wires them into the process: :class:`Recording`, one per
process, starts the recorder once and attaches it to each Huey.
"""
import atexit
import logging
import threading

from huey import signals as S

from .. import config as config_module, task_api
from ..extensions import db
from ..leader import leadership
from .apply import WORKERS, apply
from .ops import Finish, Heartbeat, Log, Progress, Queued, Scheduled, Start, Stopped
from .recorder import (MAX_ERROR_TYPE, MAX_LEVEL, MAX_MESSAGE, MAX_RESULT, MAX_TRACEBACK,
                       Recorder)
from .sql import Dialect
from .writers import ProcessWriter, Unwritten, Writer, announce, transient

logger = logging.getLogger(__name__)

__all__ = ['MAX_ERROR_TYPE', 'MAX_LEVEL', 'MAX_MESSAGE', 'MAX_RESULT', 'MAX_TRACEBACK', 'WORKERS',
           'Dialect', 'Finish', 'Heartbeat', 'Log', 'Progress', 'ProcessWriter', 'Queued',
           'Recorder', 'Recording', 'Scheduled', 'Start', 'Stopped', 'Unwritten', 'Writer',
           'announce', 'apply', 'transient']


class Recording:
    """Recording in the ledger for one process: its recorder, the queues it consumes, its hooks.

    One per consumer process (:class:`app.consumer.Process` holds it). The
    Hueys are attached first (:meth:`attach`), their consumers say what they
    serve (:meth:`serving`), and :meth:`start` starts the recorder; until
    then, and after :meth:`stop`, signals are ignored.
    """

    def __init__(self):
        self.recorder = None  # a Recorder while started
        self.queues = []  # the queues this process consumes, in the order noted
        self.concurrency = 0  # their worker threads, in all
        self._lock = threading.Lock()
        self._capture = None  # the log handler feeding the recorder
        self._attached = set()
        self._atexit = False

    def start(self, app, acknowledge=None, app_factory=None):
        """Start the recorder for ``app`` (once); return it (a :class:`Recorder`).

        ``acknowledge(receipts)`` acknowledges the messages of attempts whose
        outcome the writer committed. Out of the embedded mode the writer is
        a child process, which builds its own app with
        ``app_factory(config=app.config)`` (the caller's ``create_app``);
        there ``app_factory`` is required (else ``ValueError``), and both are
        module-level functions: the child receives them by name.
        """
        with self._lock:
            if self.recorder is None:
                if app.config['EMBEDDED']:
                    # One process, in-process events: write from a thread.
                    with app.app_context():
                        writer = Writer(db.engine, acknowledge=acknowledge)
                elif app_factory is None:
                    raise ValueError('the ledger writer process needs an app_factory')
                else:
                    writer = ProcessWriter(app_factory, acknowledge,
                                           config=config_module.of(app.config))
                recorder = Recorder(writer, app.config['LEDGER_FLUSH_INTERVAL'],
                                    heartbeat_interval=app.config['HEARTBEAT_INTERVAL'],
                                    log_lines=app.config['LOG_LINES'])
                recorder.heartbeats.queues = list(self.queues)
                recorder.heartbeats.concurrency = self.concurrency
                recorder.heartbeats.is_leader = lambda: leadership.leading
                recorder.start()
                self.recorder = recorder
                self._capture = task_api.LogCapture()
                self._capture.setFormatter(logging.Formatter('%(name)s: %(message)s'))
                logging.getLogger().addHandler(self._capture)
                if not self._atexit:
                    # Changes made as the process stops (interrupted jobs) still land.
                    atexit.register(self.stop)
                    self._atexit = True
            return self.recorder

    def stop(self):
        """Flush and stop the recorder; forget the queues served (idempotent)."""
        with self._lock:
            if self.recorder is not None:
                self.recorder.close()
                self.recorder = None
                self.queues, self.concurrency = [], 0
                logging.getLogger().removeHandler(self._capture)
                self._capture = None

    def serving(self, queue, workers):
        """Note that this process consumes ``queue`` with ``workers`` threads (heartbeats say so)."""
        if queue not in self.queues:
            self.queues.append(queue)
        self.concurrency += workers
        recorder = self.recorder
        if recorder is not None:
            recorder.heartbeats.queues = list(self.queues)
            recorder.heartbeats.concurrency = self.concurrency

    def backlogged(self):
        """Whether the recorder holds too many unwritten changes to take more jobs."""
        recorder = self.recorder
        return recorder is not None and recorder.backlogged()

    def attach(self, huey, queue):
        """Record ``huey``'s signals (and its jobs' progress and log) as changes to jobs of ``queue``."""
        if huey.name in self._attached:
            return
        self._attached.add(huey.name)

        def on_signal(signal, task, *args):
            recorder = self.recorder
            if recorder is not None:
                recorder.on_signal(huey, queue, signal, task, *args)

        def on_post_execute(task, value, exc):
            recorder = self.recorder
            if recorder is not None:
                recorder.on_post_execute(task, value, exc)

        def on_progress(running, fraction, message):
            recorder = self.recorder
            if recorder is not None:
                recorder.on_progress(running, fraction, message)

        def on_log(running, level, line):
            recorder = self.recorder
            if recorder is not None:
                recorder.on_log(running, level, line)

        def on_shutdown():
            recorder = self.recorder
            if recorder is not None:
                try:
                    recorder.flush()
                except Exception:
                    logger.exception('ledger: flush at worker shutdown failed')

        # Only the signals the ledger uses: COMPLETE and ERROR come through
        # the post-execute hook, which also sees the result and the exception.
        huey.signal(S.SIGNAL_EXECUTING, S.SIGNAL_ENQUEUED, S.SIGNAL_SCHEDULED,
                    S.SIGNAL_INTERRUPTED)(on_signal)
        huey.post_execute('qm_ledger')(on_post_execute)
        huey.on_shutdown('qm_ledger')(on_shutdown)
        huey.on_progress, huey.on_log = on_progress, on_log

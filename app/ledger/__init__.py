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
This module wires them into the process: one recorder per process,
started once, attached to each Huey.
"""
import atexit
import logging
import threading

from huey import signals as S

from .. import task_api
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
           'Recorder', 'Scheduled', 'Start', 'Stopped', 'Unwritten', 'Writer', 'announce',
           'apply', 'attach', 'backlogged', 'served', 'serving', 'start', 'stop', 'transient']

# This process's recorder, and what the wiring below remembers for it.
_recorder = None
_lock = threading.Lock()
_serving = {'queues': [], 'concurrency': 0}
_capture = []  # the log handler feeding the recorder
_attached = set()


def start(app, acknowledge=None, app_factory=None):
    """Start this process's recorder for ``app`` (once); return it (a :class:`Recorder`).

    ``acknowledge(receipts)`` acknowledges the messages of attempts whose
    outcome the writer committed. Out of the embedded mode the writer is a
    child process, which builds its own app with ``app_factory()`` (the
    caller's ``create_app``); there ``app_factory`` is required (else
    ``ValueError``), and both are module-level functions: the child
    receives them by name.
    """
    global _recorder
    with _lock:
        if _recorder is None:
            if app.config['EMBEDDED']:
                # One process, in-process events: write from a thread.
                with app.app_context():
                    writer = Writer(db.engine, acknowledge=acknowledge)
            elif app_factory is None:
                raise ValueError('the ledger writer process needs an app_factory')
            else:
                writer = ProcessWriter(app_factory, acknowledge)
            _recorder = Recorder(writer, app.config['LEDGER_FLUSH_INTERVAL'],
                                 heartbeat_interval=app.config['HEARTBEAT_INTERVAL'],
                                 log_lines=app.config['LOG_LINES'])
            _recorder.heartbeats.queues = list(_serving['queues'])
            _recorder.heartbeats.concurrency = _serving['concurrency']
            _recorder.heartbeats.is_leader = lambda: leadership.leading
            _recorder.start()
            task_api.sink = _recorder.on_progress
            task_api.log_sink = _recorder.on_log
            capture = task_api.LogCapture()
            capture.setFormatter(logging.Formatter('%(name)s: %(message)s'))
            logging.getLogger().addHandler(capture)
            _capture.append(capture)
            # Changes made as the process stops (interrupted jobs) still land.
            atexit.register(stop)
    return _recorder


def serving(queue, workers):
    """Note that this process consumes ``queue`` with ``workers`` threads (heartbeats say so)."""
    if queue not in _serving['queues']:
        _serving['queues'].append(queue)
    _serving['concurrency'] += workers
    if _recorder is not None:
        _recorder.heartbeats.queues = list(_serving['queues'])
        _recorder.heartbeats.concurrency = _serving['concurrency']


def served():
    """The queues this process consumes (as ``serving`` noted them)."""
    return list(_serving['queues'])


def backlogged():
    """Whether this process's recorder holds too many unwritten changes to take more jobs."""
    current = _recorder
    return current is not None and current.backlogged()


def stop():
    """Flush and stop this process's recorder."""
    global _recorder
    with _lock:
        if _recorder is not None:
            _recorder.close()
            _recorder = None
            task_api.sink = task_api.log_sink = None
            _serving.update(queues=[], concurrency=0)
            while _capture:
                logging.getLogger().removeHandler(_capture.pop())


def _on_consumer_shutdown():
    if _recorder is not None:
        try:
            _recorder.flush()
        except Exception:
            logger.exception('ledger: flush at worker shutdown failed')


def attach(huey, queue):
    """Record ``huey``'s signals as changes to jobs of ``queue``."""
    if huey.name in _attached:
        return
    _attached.add(huey.name)

    def on_signal(signal, task, *args):
        if _recorder is not None:
            _recorder.on_signal(huey, queue, signal, task, *args)

    def on_post_execute(task, value, exc):
        if _recorder is not None:
            _recorder.on_post_execute(task, value, exc)

    # Only the signals the ledger uses: COMPLETE and ERROR come through
    # the post-execute hook, which also sees the result and the exception.
    huey.signal(S.SIGNAL_EXECUTING, S.SIGNAL_ENQUEUED, S.SIGNAL_SCHEDULED,
                S.SIGNAL_INTERRUPTED)(on_signal)
    huey.post_execute('qm_ledger')(on_post_execute)
    huey.on_shutdown('qm_ledger')(_on_consumer_shutdown)

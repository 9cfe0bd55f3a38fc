"""Writing batches of changes: from a thread of the recording process, or a child process."""
import logging
import os
import signal
import time

import sqlalchemy as sa

from .. import events
from ..extensions import db
from . import tallies
from .apply import WORKERS, apply
from .ops import Finish

logger = logging.getLogger(__name__)


def transient(exc):
    """Whether ``exc`` means "the database is away", not "this change is bad"."""
    return (isinstance(exc, (sa.exc.OperationalError, sa.exc.DisconnectionError))
            or getattr(exc, 'connection_invalidated', False))


class Unwritten(Exception):
    """The database is unreachable; ``ops`` are the changes not yet written."""

    def __init__(self, ops, cause):
        super().__init__(f'{len(ops)} changes not written: {cause}')
        self.ops = ops


class Writer:
    """Writes batches of changes to the ledger, announces them, acknowledges their messages.

    Writes through ``engine`` (SQLAlchemy's, on the ledger), in the calling
    thread. ``acknowledge(receipts)`` is called with the receipts of the attempts a
    batch ended, after the batch is committed (never before: a message is
    acknowledged only once its outcome is durable). Receipts it fails to
    acknowledge are tried again with the next batch.
    """

    # Seconds between bringing the search index up to date (SQLite): in bulk
    # it costs a tenth of what it costs row by row.
    INDEX_EVERY = 1.0

    def __init__(self, engine, acknowledge=None):
        self.engine = engine
        self.acknowledge = acknowledge
        self._unacknowledged = []
        self._indexed_at = 0.0

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
        self.index()

    def index(self, force=False):
        """Bring the search index up to date (SQLite), at most every INDEX_EVERY seconds.

        Never raises: the notes stay for the next time, and a search reads
        the noted jobs meanwhile (see :func:`.tallies.index_pending`).
        """
        now = time.monotonic()
        if self.engine.dialect.name != 'sqlite' or (
                not force and now - self._indexed_at < self.INDEX_EVERY):
            return
        self._indexed_at = now
        try:
            with self.engine.begin() as conn:
                tallies.index_pending(conn)
        except Exception as exc:
            logger.warning('ledger: search index not brought up to date (%s); later', exc)

    def _acknowledge(self, ops):
        if self.acknowledge is None:
            return
        receipts = self._unacknowledged + [op.receipt for op in ops
                                           if isinstance(op, Finish) and op.receipt is not None]
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
        """Acknowledge what is still unacknowledged, index what is noted (``timeout`` is unused)."""
        if self._unacknowledged:
            self._acknowledge([])
        self.index(force=True)


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

    ``app_factory(config=config)`` builds, in the child, the Flask app whose
    database it writes (the caller passes ``create_app``: this package does
    not import the application), from the parent's loaded ``config`` (the
    environment's when None); ``acknowledge`` is as for :class:`Writer`.
    Both must be module-level functions: the child is spawned, and receives
    them by name.
    """

    RESTART_AFTER = 1.0  # seconds between restarts of a writer process that died

    def __init__(self, app_factory, acknowledge=None, config=None):
        self._app_factory = app_factory
        self._acknowledge = acknowledge
        self._config = config
        self._restarted = 0.0
        self._start()

    def _start(self):
        import multiprocessing
        ctx = multiprocessing.get_context('spawn')  # no fork of a threaded process
        receive, self._send = ctx.Pipe(duplex=False)
        # ``acknowledge`` and ``app_factory`` are module-level functions,
        # sent to the child by name.
        self._child = ctx.Process(target=_write_in_child,
                                  args=(receive, self._acknowledge, self._app_factory,
                                        self._config),
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
        """The writer process's pid."""
        return self._child.pid

    def write(self, ops):
        """Send ``ops`` to the writer process (which writes them in its own time).

        Raises :class:`Unwritten` if they cannot be sent, or the process
        died less than ``RESTART_AFTER`` s after the last restart; a
        process found dead otherwise is started again first.
        """
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
        """Tell the writer process to stop once it has written everything; wait ``timeout`` s."""
        try:
            self._send.send(None)
            self._send.close()
        except OSError:
            pass
        self._child.join(timeout)
        if self._child.is_alive():
            logger.error('ledger: the writer process is still writing after %.0f s', timeout)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _write_in_child(receive, acknowledge, app_factory, config=None):
    """The ledger writer process: write every batch received until told to stop.

    ``app_factory(config=config)`` builds the Flask app whose database it
    writes to (``app_factory()`` when ``config`` is None).
    """
    # Out of the consumer's process group, deaf to the signals that stop
    # it: the consumer's last batches arrive after those signals.
    try:
        os.setsid()
    except OSError:
        pass
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    app = app_factory() if config is None else app_factory(config=config)
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


def announce(changed):
    """Publish what a batch changed (ids with state, queue and task as written)."""
    workers = changed.pop(WORKERS, None) is not None
    events.publish([events.job_change(job_id, state, queue, task)
                    for job_id, (state, queue, task) in changed.items()],
                   workers=workers)

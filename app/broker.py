"""The Huey side: one Huey instance per named queue, task registration, enqueue.

Huey instances exist from import time (``huey_consumer`` loads them from
``huey_tasks``); :func:`configure` points their storage at the broker the
configuration names: Redis, or SQLite in the embedded mode, both with
reliable fetch (see :mod:`app.storage`): a message a worker takes stays in
the broker, in that consumer's in-flight record, until its outcome is in the
ledger.
"""
import collections
import contextlib
import datetime as dt
import functools
import logging
import os
import random
import signal
import sqlite3
import threading
import time
import traceback

import redis
from huey import Huey
from huey import signals as S
from huey.api import Task
from huey.constants import EmptyData
from huey.consumer import Consumer, Scheduler, Worker
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import catalog, config as config_module, message, task_api, text
from .leader import process_name
from .storage import ReliableRedisStorage, ReliableSqliteStorage

logger = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """Huey's storage (Redis, or SQLite when embedded) refused a request.

    ``done`` names the jobs a call for many had dealt with before the refusal.
    ``unconfirmed``: for a submission, the ids of its new jobs whose messages
    the broker may hold although the call failed (handed over before the
    refusal, and the broker unreachable to take them back): each such job
    runs if the broker kept its message, its row written by its consumer
    then. Empty when nothing can be left. ``recorded``: those of them
    submitted with an idempotency key, whose rows were kept: each runs
    once, and a retry with its key returns it (see
    :func:`app.jobs._record_unconfirmed`).
    """

    def __init__(self, message, done=(), unconfirmed=(), recorded=()):
        super().__init__(message)
        self.done = frozenset(done)
        self.unconfirmed = list(unconfirmed)
        self.recorded = list(recorded)


# What a broker call may raise when the broker, not our code, is at fault:
# any Redis error (unreachable, timed out, out of memory under maxmemory, a
# read-only replica, a reply that is not Redis's), and SQLite's (locked, disk
# full) in the embedded mode.
BROKER_ERRORS = (redis.exceptions.RedisError, sqlite3.OperationalError)


@contextlib.contextmanager
def _reaching(done=()):
    """Turn a broker error inside the block into :class:`BrokerUnavailable`.

    ``done`` (a collection the block fills) is what it had dealt with.
    """
    try:
        yield
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f'{_failure(exc)}: {exc}', done=done) from exc


def _failure(exc):
    """What a broker error means, in words: unreachable, or refused."""
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return 'the broker is unreachable'
    return 'the broker refused the request'


# Seconds a message that cannot be read (a task type this consumer does not
# know, say during a rolling upgrade) waits in the schedule before it is tried again.
UNREADABLE_RETRY = 60.0


class TrackedScheduler(Scheduler):
    """Huey's scheduler, moving due messages into the queue in one atomic step.

    The same loop as Huey 3.5's ``Scheduler.loop`` (its cadence, its skip of
    iterations missed during a stall, its once-a-minute periodic check)
    with one difference: due messages go from the schedule to the queue
    inside the broker (``TrackedHuey.enqueue_due``) instead of through this
    thread's memory.
    """

    # Seconds between the scheduler's notes that it is alive (see :func:`mark_seen`).
    SEEN_EVERY = 5.0

    def loop(self, now=None):
        if time.monotonic() >= getattr(self, '_seen_due', 0.0):
            self._seen_due = time.monotonic() + self.SEEN_EVERY
            try:
                self.huey.storage.mark_seen('scheduler', time.time())
            except BROKER_ERRORS as exc:
                self._logger.warning('scheduler: liveness not noted: %s', exc)
        current = self._next_loop
        self._next_loop += self.interval
        if self._next_loop < time.monotonic():
            self._logger.debug('scheduler skipping iteration to avoid race.')
            self._next_loop = time.monotonic()
            return
        try:
            self.huey.enqueue_due(now)
        except Exception:
            self._logger.exception('Error moving due messages into the queue.')
        if self.periodic and self._next_periodic <= time.monotonic():
            # Skip checks missed during a stall (e.g. suspend) to avoid dupes.
            while self._next_periodic <= time.monotonic():
                self._next_periodic += self.periodic_task_seconds
            self.enqueue_periodic_tasks(now)
        self.sleep_for_interval(current, self.interval)


class TrackedWorker(Worker):
    """Huey's worker thread, on which its :class:`TrackedHuey` clears a run task's
    revocation flag with the next fetch rather than at once (see
    ``TrackedHuey.delete``); it clears a flag still pending when it stops."""

    def initialize(self):
        self.huey._worker.defers = True
        super().initialize()

    def shutdown(self):
        try:
            self.huey.clear_deferred_flag()
        except Exception:
            self._logger.exception('a revocation flag was not cleared')
        super().shutdown()


class TrackedConsumer(Consumer):
    """``huey_consumer`` as we run it: SIGTERM and SIGINT both stop gracefully.

    Running jobs get ``GRACE_PERIOD`` seconds to finish (Huey's
    ``shutdown_timeout``); then the consumer stops and the jobs still running
    are put back in the queue (see the ledger's INTERRUPTED handling). A
    second stop signal stops at once. Docker's stop signal is SIGTERM, Ctrl-C
    is SIGINT, a closing terminal sends SIGHUP: all mean "finish up". Its
    scheduler is :class:`TrackedScheduler`, its workers :class:`TrackedWorker`.
    """
    scheduler_class = TrackedScheduler
    worker_class = TrackedWorker

    def __init__(self, huey, **options):
        if options.get('shutdown_timeout') is None:
            options['shutdown_timeout'] = huey.grace_period
        super().__init__(huey, **options)
        # SIGHUP (a closing terminal) stops gracefully too, rather than
        # Huey's restart in place, which would skip writing the ledger out.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._signal_actions[signum] = (False, True)
        if huey.on_consumer is not None:
            huey.on_consumer(queue_of(huey), self.workers)

    def stop(self, graceful=False):
        # From here no worker starts a job: one re-enqueued as this consumer
        # gives up its running jobs must go to another consumer, not to a
        # worker of this one that is about to die with the process.
        self.huey.stopping.set()
        super().stop(graceful)

    def _handle_signal(self, signum, frame):
        super()._handle_signal(signum, frame)
        if self._graceful:
            # A second stop signal, whichever, stops at once (Huey only
            # arms the same one again).
            for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(other, signal.default_int_handler)


class TrackedHuey(Huey):
    """Huey with reliable fetch, an atomic schedule, jittered retries, pausing, hooks.

    Every override accepts exactly what Huey passes (its scheduler calls
    ``read_periodic(None)``) and keeps Huey's contract, so Huey's own tests
    run against it.

    - ``dequeue`` fetches through the storage into this consumer's in-flight
      record and keeps the receipt on the task; ``execute`` acknowledges it
      unless the ledger took charge of the acknowledgement (it does, once
      the attempt's outcome is written; see :func:`take_receipt`).
    - The revocation flags Huey reads before running a message come with it
      from ``fetch`` (``is_revoked`` uses them once), and the flag Huey
      clears after a run is cleared by the worker's next fetch (``delete``):
      a run costs one broker round trip where Huey's costs three. Types
      revoked with ``revoke_all`` are noted in the broker for the fetch.
    - ``enqueue_due`` moves due messages into the queue in one step (our
      consumer's scheduler calls it instead of ``read_schedule``, whose
      contract is Huey's: pop and return).
    - Messages carry the header of :mod:`app.message`.
    - Huey grows ``retry_delay`` by ``retry_backoff`` on each retry; we spread
      each delay by +-``retry_jitter`` so jobs failing together do not come
      back together.
    - A paused queue keeps its messages: its workers take none.

    Hook slots, filled by the consumer process (:mod:`app.consumer`), never
    by this module:

    - ``on_periodic(timestamp)``: called with the scheduler's timestamp every
      minute (to start periodic jobs).
    - ``holding()``: whether to take nothing for now (the ledger cannot keep up).
    - ``on_consumer(queue, workers)``: a consumer of this Huey was built with
      ``workers`` worker threads.
    - ``task_context()``: a context manager each job runs inside (the app's).
    - ``on_progress(running, fraction, message)`` and ``on_log(running,
      level, line)``: a running job's progress report and log line (see
      :mod:`app.task_api`).

    Its settings (:func:`configure` sets them from the configuration):
    ``retry_jitter``, ``retry_backoff`` (each retry's delay is the last one
    times this), ``grace_period`` (seconds a stopping consumer lets running
    jobs finish) and ``spec`` (where its broker is: ``('redis', url)`` or
    ``('sqlite', path)``, and the lease in seconds).
    """
    retry_jitter = 0.25
    retry_backoff = 2.0
    grace_period = 25.0
    spec = None

    def __init__(self, *args, **kwargs):
        self.on_periodic = None
        self.holding = None
        self.on_consumer = None
        self.task_context = None
        self.on_progress = None
        self.on_log = None
        super().__init__(*args, **kwargs)
        self.paused = threading.Event()  # refreshed from the ledger by the consumer
        # Per worker thread: the task it runs (``running``) and the revocation
        # flag its next fetch clears (``unflag``); see ``delete``.
        self._worker = threading.local()
        # Revocations changed through this instance: flags fetched before a
        # change made here are not used (another process's change is seen as
        # if made just after the fetch).
        self._revocation_changes = 0
        self.stopping = threading.Event()  # its consumer is stopping: take nothing more
        # Retries written while the broker was away: (claim, bytes, priority, eta).
        self.deferred = collections.deque()

    def create_storage(self):
        storage = super().create_storage()
        if hasattr(storage, 'legacy_id'):
            storage.legacy_id = self._legacy_id
        return storage

    def _legacy_id(self, body):
        try:
            return self.serializer.deserialize(body).id
        except Exception:
            return None

    def create_consumer(self, **options):
        return TrackedConsumer(self, **options)

    def serialize_task(self, task):
        return message.header(task.id, task.priority) + super().serialize_task(task)

    def deserialize_task(self, data):
        return super().deserialize_task(message.split(data)[1])

    def dequeue(self):
        unflag = getattr(self._worker, 'unflag', None)
        self._worker.unflag = None
        if self.stopping.is_set() or self.paused.is_set() or (
                self.holding is not None and self.holding()):
            self._clear_flag(unflag)
            if not self.stopping.is_set():
                # Idle like an empty queue; resuming is seen within a second.
                time.sleep(0.5)
            return None
        fetch = getattr(self.storage, 'fetch', None)
        if fetch is None:
            self._clear_flag(unflag)
            return super().dequeue()
        try:
            delivery = fetch(process_name(), unflag=unflag)
        except BaseException:
            self._worker.unflag = unflag  # cleared by the next fetch, then
            raise
        if delivery is None:
            return None
        try:
            task = self.deserialize_task(delivery.data)
        except Exception:
            logger.exception('a message in %s cannot be read; trying it again in %.0f s',
                             self.name, UNREADABLE_RETRY)
            self.storage.add_to_schedule(delivery.data, self._get_timestamp()
                                         + dt.timedelta(seconds=UNREADABLE_RETRY))
            self.storage.ack([delivery.receipt])
            return None
        if self.paused.is_set() or self.stopping.is_set():
            # Taken by a worker already waiting when the pause (or the stop)
            # came: put it back.
            self.storage.nack(delivery.receipt)
            return None
        task.receipt = task.claim = delivery.receipt
        task.fetched_at = time.monotonic()
        task.revocations = (self._revocation_changes, delivery.revocations)
        return task

    def clear_deferred_flag(self):
        """Clear the revocation flag this thread's next fetch was to clear, if any.

        Raises the broker's errors (the flag is then kept for the next try)."""
        key = getattr(self._worker, 'unflag', None)
        self._worker.unflag = None
        self._clear_flag(key)

    def _clear_flag(self, key):
        if key is not None:
            try:
                self.storage.delete_data(key)
            except BROKER_ERRORS:
                self._worker.unflag = key  # the next fetch tries again
                raise

    def is_revoked(self, task, timestamp=None, peek=True):
        """As Huey's, but the first call after a fetch reads the flags fetched with the task."""
        changes, known = (task.__dict__.pop('revocations', (None, None))
                          if isinstance(task, Task) else (None, None))
        if (not known or task.revoke_id not in known
                or changes != self._revocation_changes):
            return super().is_revoked(task, timestamp, peek)
        for key in self._revoke_keys(task):
            flag = known.get(key)
            revoked, restore = self._check_revoked(EmptyData if flag is None else flag,
                                                   timestamp, peek)
            if restore:
                self.delete(key)
            if revoked:
                return True
        return False

    def delete(self, key):
        """As Huey's, except on a consumer's worker thread (:class:`TrackedWorker`) for
        the running task's own revocation flag once it has run (or was found
        revoked): the worker's next fetch clears it, in the same round trip, or
        the worker as it stops (returns None). The next fetch follows at once:
        the flag outlives the run by the worker's own bookkeeping."""
        running = getattr(self._worker, 'running', None)
        if (running is not None and getattr(self._worker, 'defers', False)
                and key == running.revoke_id
                and running not in self._tasks_in_flight
                and getattr(self.storage, 'fetch', None) is not None):
            previous = getattr(self._worker, 'unflag', None)
            if previous is not None and previous != key:
                self._clear_flag(previous)
            self._worker.unflag = key
            return None
        return super().delete(key)

    def revoke_all(self, task_class, revoke_until=None, revoke_once=False):
        self._revocation_changes += 1
        note = getattr(self.storage, 'note_revoked_type', None)
        if note is not None:
            note(self._task_key(task_class, 'rt'))  # before the flag: no fetch misses it
        super().revoke_all(task_class, revoke_until, revoke_once)

    def restore_all(self, task_class):
        self._revocation_changes += 1
        return super().restore_all(task_class)

    def revoke(self, task, revoke_until=None, revoke_once=False):
        self._revocation_changes += 1
        super().revoke(task, revoke_until, revoke_once)

    def restore(self, task):
        self._revocation_changes += 1
        return super().restore(task)

    def claim_held(self, task):
        """Whether this consumer still holds ``task``'s message (the leader did not take
        it back, thinking this consumer dead). True for a task fetched without a
        claim, or when the broker cannot say."""
        claim = getattr(task, 'claim', None)
        if claim is None:
            return True
        try:
            return self.storage.holds(claim)
        except BROKER_ERRORS:
            return True

    def execute(self, task, timestamp=None):
        fetched = getattr(task, 'fetched_at', None)
        lease = getattr(self.storage, 'lease', None)
        if (fetched is not None and lease is not None
                and time.monotonic() - fetched > lease / 2 and not self.claim_held(task)):
            # Fetched long ago (the process was stopped or starved): the
            # leader has taken it back and another consumer runs it.
            logger.warning('%s: not run here: the leader took it back while this consumer '
                           'was unresponsive', task.id)
            task.receipt = None
            return None
        self._worker.running = task
        try:
            value = super().execute(task, timestamp)
        finally:
            self._worker.running = None
        receipt = take_receipt(task)
        if receipt is not None:
            # Nobody took charge of it (revoked, not due yet, or no ledger
            # records this process): the message is dealt with.
            self.storage.ack([receipt])
        return value

    def build_error_result(self, task, exception):
        """Huey's record of a failed attempt, which here never raises.

        Huey's own calls ``repr(exception)``; an exception whose ``repr``
        raises would escape Huey's bookkeeping and leave the job running
        for ever (its outcome never recorded, its message never acknowledged).
        """
        try:
            return super().build_error_result(task, exception)
        except Exception:
            return {'error': text.safe_str(exception), 'retries': task.retries,
                    'traceback': ''.join(traceback.format_exception(exception)),
                    'task_id': task.id}

    def enqueue_due(self, timestamp=None):
        """Move every message due at ``timestamp`` from the schedule into the queue.

        One atomic step per batch (Huey's ``read_schedule`` pops them into
        the scheduler's memory and enqueues them one by one, losing them if
        the process dies between the two). Emits ``SIGNAL_ENQUEUED`` for
        each, as Huey's scheduler does by enqueueing. Returns how many moved.
        """
        if timestamp is None:
            timestamp = self._get_timestamp()
        moved_total = 0
        while True:
            moved = self.storage.move_due(timestamp)
            for data in moved:
                try:
                    task = self.deserialize_task(data)
                except Exception:
                    continue  # the worker that takes it logs and defers it
                self._emit(S.SIGNAL_ENQUEUED, task)
            moved_total += len(moved)
            if len(moved) < 1000:
                return moved_total

    def read_periodic(self, timestamp):
        if timestamp is None:
            timestamp = self._get_timestamp()
        if self.on_periodic is not None:
            try:
                self.on_periodic(timestamp)
            except Exception:
                logger.exception('periodic hook failed at %s', timestamp)
        return super().read_periodic(timestamp)

    def _requeue_task(self, task, timestamp, retry_eta=None):
        if retry_eta is None and task.retry_delay:
            spread = random.uniform(1 - self.retry_jitter, 1 + self.retry_jitter)
            retry_eta = timestamp + dt.timedelta(seconds=task.retry_delay * spread)
            if task.retry_backoff:
                task.retry_delay *= task.retry_backoff
        # The retry must not meet the flag Huey cleared after this run.
        if getattr(self._worker, 'unflag', None) == task.revoke_id:
            try:
                self.clear_deferred_flag()
            except BROKER_ERRORS as exc:  # kept for the next fetch; the retry goes on
                logger.warning('%s: revocation flag not cleared yet (%s)', task.id, exc)
        claim = getattr(task, 'claim', None)
        if claim is None or not hasattr(self.storage, 'requeue'):
            return super()._requeue_task(task, timestamp, retry_eta)
        # As Huey's, but the retry replaces the claim in one step, and only
        # while the claim holds (see the storage's ``requeue``).
        task.retries -= 1
        logger.info('Requeueing %s, %s retries', task.id, task.retries)
        if retry_eta is not None:
            task.eta = retry_eta
        due_later = retry_eta is not None
        data = self.serialize_task(task)
        eta = (task.eta or dt.datetime.fromtimestamp(0)) if due_later else None
        task.claim = task.receipt = None
        try:
            written = self.storage.requeue(claim, data, task.priority, eta)
        except BROKER_ERRORS as exc:
            # Kept for later: the message stays in flight meanwhile, and
            # returns to the queue if this process dies first.
            logger.warning('%s: retry not written yet (%s); trying again', task.id, exc)
            self.deferred.append((claim, data, task.priority, eta))
            written = True
        if not written:
            logger.warning('%s: not retried here: the leader took it back while this consumer '
                           'was unresponsive', task.id)
            return
        self._emit(S.SIGNAL_SCHEDULED if due_later else S.SIGNAL_ENQUEUED, task)

    def write_deferred(self):
        """Write the retries the broker refused earlier; returns how many are left."""
        while self.deferred:
            claim, data, priority, eta = self.deferred[0]
            try:
                self.storage.requeue(claim, data, priority, eta)
            except BROKER_ERRORS:
                break
            self.deferred.popleft()
        return len(self.deferred)


def take_receipt(task):
    """Take charge of acknowledging ``task``'s message: return its receipt (or None).

    Whoever takes it must acknowledge it (``ack``) once the attempt's
    outcome is durable; until then the message stays in flight, and returns
    to the queue if this consumer dies.
    """
    receipt = getattr(task, 'receipt', None)
    task.receipt = None
    return receipt


# queue name -> Huey instance, in this process (Huey's own pattern: the
# instances live at module level, so tasks can be declared on them at import).
hueys: dict[str, TrackedHuey] = {}


def queue_of(huey):
    """The queue name of one of our Huey instances (named ``qm.<queue>``)."""
    return huey.name.split('.', 1)[-1]


def _storage_spec(config):
    if config['EMBEDDED']:
        return ('sqlite', config['HUEY_SQLITE_PATH'])
    return ('redis', config['REDIS_URL'])


@functools.lru_cache(maxsize=1)
def _redis_pool_for(url):
    # One pool per process for the configured Redis; a new URL (tests) a new pool.
    return redis.ConnectionPool.from_url(
        url,
        # Fail fast when Redis is away, so the API can answer 503 at once;
        # one quick retry covers a pooled connection that went stale.
        socket_connect_timeout=2, socket_timeout=10, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
    )


def _storage_args(spec, lease):
    kind, where = spec
    if kind == 'sqlite':
        os.makedirs(os.path.dirname(where) or '.', exist_ok=True)
        return ReliableSqliteStorage, {'filename': where, 'lease': lease}
    return ReliableRedisStorage, {'connection_pool': _redis_pool_for(where),
                                  'clean_name': False, 'lease': lease}


def configure(config):
    """Point every queue's Huey at the configured broker, with its settings (idempotent).

    ``config`` is a loaded configuration (:func:`app.config.load`). Raises
    :class:`BrokerUnavailable` when the embedded queue's SQLite file cannot
    be opened (not a database, a folder, a path through a file).
    """
    spec = (*_storage_spec(config), config['LOST_AFTER'])
    try:
        _configure(config, spec)
    except (sqlite3.Error, OSError) as exc:
        if spec[0] != 'sqlite':
            raise
        raise BrokerUnavailable(f'the embedded queue {spec[1]} cannot be opened: {exc} '
                                f'(HUEY_SQLITE_PATH)') from exc


def _configure(config, spec):
    storage_class, storage_kwargs = _storage_args(spec[:2], spec[2])
    for name in config['QUEUES']:
        huey = hueys.get(name)
        if huey is None:
            huey = hueys[name] = TrackedHuey(
                f'qm.{name}', results=False, storage_class=storage_class,
                **storage_kwargs)
            for task_type in catalog.TASKS.values():
                _register(huey, task_type)
        elif spec != huey.spec:
            huey.storage_class, huey.storage_kwargs = storage_class, storage_kwargs
            huey.storage = huey.create_storage()
        huey.spec = spec
        huey.retry_jitter = config['RETRY_JITTER']
        huey.retry_backoff = config['RETRY_BACKOFF']
        huey.grace_period = config['GRACE_PERIOD']


def consumer_huey():
    """The Huey instance ``huey_consumer huey_tasks.huey`` runs: ``$QUEUE``."""
    name = os.environ.get('QUEUE') or 'default'
    if name not in hueys:
        raise config_module.ConfigError(
            f'QUEUE={name!r} is not one of QUEUES ({", ".join(hueys)})')
    return hueys[name]


def _declared(task_type):
    for huey in hueys.values():
        _register(huey, task_type)


catalog.on_declare.append(_declared)


def _register(huey, task_type):
    def run(params, meta=None, task=None):
        around = huey.task_context() if huey.task_context else contextlib.nullcontext()
        with around, task_api.running(task, huey, message.attempt_number(task)):
            try:
                return task_type.func(**params)
            except task_type.no_retry:
                task.retries = 0  # Huey reads this to decide: no retry
                raise

    # Huey names tasks module.name; keep the declaring module's name.
    run.__module__ = task_type.func.__module__
    run.__name__ = run.__qualname__ = task_type.name
    run.__doc__ = task_type.func.__doc__
    wrapper = huey.task(name=task_type.name, context=True, timeout=task_type.timeout)(run)
    task_type.wrappers[huey.name] = wrapper


def build(job, base=0, retries=None):
    """The Huey task (a message, not yet sent) for the next run of ``job`` (a ledger row).

    ``base`` is the number of attempts already made, so attempt numbers keep
    counting up across manual retries and recoveries; ``retries`` overrides
    the job's (what is left of them, for a job run again after its worker
    was lost).
    """
    huey = hueys[job.queue]
    task_type = catalog.TASKS[job.task]
    task_class = task_type.wrappers[huey.name].task_class
    retries = job.retries if retries is None else retries
    return task_class(
        # The message carries the real secret values: the task needs them.
        (), message.kwargs(job.run_params, base, retries),
        id=job.id, eta=job.scheduled_for, retries=retries,
        retry_delay=job.retry_delay, retry_backoff=huey.retry_backoff,
        priority=job.priority or None,
        timeout=job.timeout if job.timeout is not None else task_type.timeout)


def enqueue(job, base=0, retries=None):
    """Hand ``job`` (a ledger row) to Huey as a new message (see :func:`build`).

    A job due in the future goes straight to Huey's schedule, one due now
    to its queue. Raises :class:`BrokerUnavailable`.
    """
    huey = hueys[job.queue]
    task = build(job, base, retries)
    with _reaching():
        if task.eta is not None and task.eta > huey._get_timestamp():
            huey.add_schedule(task)
        else:
            huey.enqueue(task)


def prepare(job, base=0, retries=None):
    """``job``'s next message, ready for :func:`put_prepared` (see :func:`build`).

    Returns ``(data, priority, eta)``, ``eta`` None when it is due now.
    """
    huey = hueys[job.queue]
    task = build(job, base, retries)
    due_later = task.eta is not None and task.eta > huey._get_timestamp()
    return huey.serialize_task(task), task.priority, task.eta if due_later else None


def put_prepared(queue, entries):
    """Hand many prepared messages of ``queue`` to Huey in one round trip.

    Jobs due later go to the schedule for their time. No Huey signals are
    sent (the caller records what it did). Raises :class:`BrokerUnavailable`.
    """
    with _reaching():
        hueys[queue].storage.put_many(entries)


def withdraw(job):
    """Take the job's pending message out of Huey's queue or schedule.

    Returns True when a message was removed. When none is found a worker may
    hold it between dequeue and execution, so it is also revoked once: Huey
    checks that flag just before running, and clears it after a run.
    """
    huey = hueys[job.queue]
    with _reaching():
        removed = bool(huey.storage.remove_waiting([job.id]))
        if not removed:
            huey.revoke_by_id(job.id, revoke_once=True)
    return removed


def withdraw_many(queue, job_ids):
    """:func:`withdraw` for many jobs of one queue, in one pass over its messages.

    Returns the ids whose message was removed; the others are revoked once.
    If the broker fails part way, :class:`BrokerUnavailable` says in ``done``
    which jobs it had already withdrawn or revoked.
    """
    huey = hueys[queue]
    wanted = set(job_ids)
    removed, done = set(), set()
    with _reaching(done):
        for job_id, _data, remove in huey.storage.waiting_messages():
            if job_id in wanted and remove():
                removed.add(job_id)
                done.add(job_id)
        for job_id in wanted - removed:
            huey.revoke_by_id(job_id, revoke_once=True)
            done.add(job_id)
    return removed


def remove_waiting(queue, job_ids):
    """Take every waiting message of ``job_ids`` out of ``queue`` (no revoking); the ids removed."""
    with _reaching():
        return hueys[queue].storage.remove_waiting(job_ids)


def restore(job):
    """Clear what :func:`withdraw` or a cancel request may have left for the job."""
    huey = hueys[job.queue]
    with _reaching():
        huey.restore_by_id(job.id)
    _flag(huey, task_api.CANCEL_KEY.format(job.id), False)


def request_cancel(job):
    """Ask the running job to stop at its next progress report."""
    _flag(hueys[job.queue], task_api.CANCEL_KEY.format(job.id), True)


def _flag(huey, key, on):
    with _reaching():
        if on:
            huey.storage.put_data(key, b'1')
        else:
            huey.storage.delete_data(key)


def _has(huey, key):
    with _reaching():
        return huey.storage.has_data_for_key(key)


def message_ids(queue):
    """Ids of every job Huey holds a waiting message for in ``queue`` (queued or scheduled)."""
    with _reaching():
        return {job_id for job_id, _data, _remove in hueys[queue].storage.waiting_messages()}


def depth(queue):
    """Messages Huey holds for ``queue``: ``(queued, scheduled)``."""
    huey = hueys[queue]
    with _reaching():
        return huey.pending_count(), huey.scheduled_count()


# -- reliable fetch: acknowledgements, leases, in-flight messages -----------------

def ack(receipts):
    """Acknowledge fetched messages (:class:`~app.storage.Receipt`), whatever their queue.

    Raises :class:`BrokerUnavailable`; an acknowledgement that does not
    arrive only leaves the message in flight, where the leader finds its
    outcome already recorded once the consumer has gone.
    """
    by_storage = {}
    for receipt in receipts:
        by_storage.setdefault(receipt.storage, []).append(receipt)
    with _reaching():
        for name, batch in by_storage.items():
            huey = hueys.get(name.split('.', 1)[-1])
            if huey is not None:
                huey.storage.ack(batch)


def keep_alive(queues):
    """Renew this process's lease as a consumer of ``queues``; raises :class:`BrokerUnavailable`."""
    me = process_name()
    with _reaching():
        for queue in queues:
            hueys[queue].storage.keep_alive(me)


def release(queues):
    """End this process's lease now: it has stopped and holds nothing."""
    me = process_name()
    with _reaching():
        for queue in queues:
            hueys[queue].storage.release(me)


def consumers(queue):
    """``{consumer: alive}`` for every consumer that fetched from ``queue`` and holds a lease or messages."""
    with _reaching():
        return hueys[queue].storage.consumers()


def alive(consumer_ids):
    """The subset of ``consumer_ids`` (``host:pid``) whose lease is current."""
    ids = set(consumer_ids)
    found = set()
    with _reaching():
        for huey in hueys.values():
            found |= huey.storage.alive(ids - found)
            if isinstance(huey.storage, ReliableRedisStorage):
                break  # leases are global in Redis
    return found


def inflight(queue, consumer):
    """What ``consumer`` holds in ``queue``: :class:`~app.storage.InFlight` items."""
    with _reaching():
        return hueys[queue].storage.inflight(consumer)


def read(queue, data):
    """The Huey Message (a namedtuple: id, name, retries, kwargs...) in raw message bytes.

    Read without the task registry, so a message of an unknown task type is
    readable too. Raises ValueError when the bytes are not a message.
    """
    try:
        return hueys[queue].serializer.deserialize(message.split(data)[1])
    except Exception as exc:
        raise ValueError(f'not a message: {exc}') from exc


def drop(receipts):
    """Take dealt-with messages out of a dead consumer's in-flight record."""
    ack(receipts)


def retire(queue, consumer):
    """Forget ``consumer`` in ``queue`` once its lease is gone and it holds nothing."""
    with _reaching():
        return hueys[queue].storage.retire(consumer)


def held(queue, job_ids):
    """The subset of ``job_ids`` with a message waiting in ``queue`` (queued or scheduled)."""
    with _reaching():
        return hueys[queue].storage.held(job_ids)


def inflight_ids(queue):
    """Ids of the jobs whose message some consumer holds in ``queue``."""
    with _reaching():
        return hueys[queue].storage.inflight_job_ids()


def restore_cancel_requests(jobs):
    """Ask each of ``jobs`` (running ledger rows with a cancel requested) to stop, again."""
    for job in jobs:
        request_cancel(job)


def check_index(queue):
    """Rebuild ``queue``'s index of waiting messages if it no longer adds up; True if rebuilt."""
    storage = hueys[queue].storage
    with _reaching():
        if storage.index_ok():
            return False
        storage.rebuild_index()
        return True


def take_legacy_switches(periodic_names):
    """Pause switches an older version kept in the broker: ``(queues, periodic names)``.

    They are removed from the broker once read; the ledger keeps them now.
    """
    queues, periodic = set(), set()
    with _reaching():
        for name, huey in hueys.items():
            if huey.storage.pop_data('qm:paused') is not EmptyData:
                queues.add(name)
        for name in periodic_names:
            if hueys['default'].storage.pop_data(f'qm:periodic-paused:{name}') is not EmptyData:
                periodic.add(name)
    return queues, periodic


def epoch():
    """The broker's identity marker (None when the broker has none: new, or wiped)."""
    with _reaching():
        return hueys['default'].storage.get_epoch()


def set_epoch(value):
    with _reaching():
        hueys['default'].storage.set_epoch(value)


def tick():
    """Advance the broker's pass counter (kept beside the epoch); its new value."""
    with _reaching():
        return hueys['default'].storage.tick()


def stale_messages(queue, is_stale):
    """Remove the waiting messages of ``queue`` that ``is_stale(job id, attempt)`` condemns.

    ``is_stale`` gets ``{job id: [attempt numbers of its waiting messages]}`` a
    page at a time and returns the ids whose messages must go (all of them).
    Returns how many jobs lost their messages. Reads every waiting message:
    for the rare pass after the broker went back in time.
    """
    huey = hueys[queue]
    removed = 0
    with _reaching():
        page = {}
        for job_id, data, _remove in huey.storage.waiting_messages():
            if job_id is None:
                continue
            try:
                page.setdefault(job_id, []).append(message.attempt_number(read(queue, data)))
            except ValueError:
                continue
            if len(page) >= 1000:
                removed += len(huey.storage.remove_waiting(is_stale(page)))
                page = {}
        if page:
            removed += len(huey.storage.remove_waiting(is_stale(page)))
    return removed


def mark_seen(component):
    """Note in the broker that ``component`` (``'scheduler'``, ``'reaper'``) did its work now.

    A record every process can read (:func:`components_seen`): how
    ``/metrics`` tells whether the component is alive. Raises
    :class:`BrokerUnavailable`.
    """
    with _reaching():
        hueys['default'].storage.mark_seen(component, time.time())


def components_seen():
    """``{component: Unix seconds}``: when each component last noted it did its work.

    Raises :class:`BrokerUnavailable`.
    """
    with _reaching():
        return hueys['default'].storage.seen()


def ping():
    """Raise :class:`BrokerUnavailable` unless the broker answers."""
    huey = hueys['default']
    try:
        if isinstance(huey.storage, ReliableSqliteStorage):
            huey.storage.sql('select 1', results=True)
        else:
            huey.storage.conn.ping()
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(str(exc)) from exc


def redis_client():
    """A Redis client on the shared pool, or None in the embedded mode."""
    spec = hueys['default'].spec if 'default' in hueys else None
    if spec is None or spec[0] != 'redis':
        return None
    return redis.Redis(connection_pool=_redis_pool_for(spec[1]))

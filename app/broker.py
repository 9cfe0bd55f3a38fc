"""The Huey side: one Huey instance per named queue, task registration, enqueue.

Huey instances exist from import time (``huey_consumer`` loads them from
``huey_tasks``); :func:`configure` points their storage at the broker the
configuration names: Redis, or SQLite in the embedded mode.
"""
import contextlib
import datetime as dt
import os
import random
import signal
import sqlite3
import threading
import time

import redis
from huey import Huey
from huey.consumer import Consumer
from huey.storage import PriorityRedisStorage, SqliteStorage
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import catalog, config as config_module, context, ledger
from .leader import leadership


class BrokerUnavailable(Exception):
    """Huey's storage (Redis, or SQLite when embedded) refused a request.

    ``done`` names the jobs a call for many had dealt with before the refusal.
    """

    def __init__(self, message, done=()):
        super().__init__(message)
        self.done = frozenset(done)


BROKER_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                 sqlite3.OperationalError)


@contextlib.contextmanager
def _reaching(done=()):
    """Turn a broker error inside the block into :class:`BrokerUnavailable`.

    ``done`` (a collection the block fills) is what it had dealt with.
    """
    try:
        yield
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f'the broker is unreachable: {exc}', done=done) from exc


PAUSED_KEY = 'qm:paused'


class TrackedConsumer(Consumer):
    """``huey_consumer`` as we run it: SIGTERM and SIGINT both stop gracefully.

    Running jobs get ``GRACE_PERIOD`` seconds to finish (Huey's
    ``shutdown_timeout``); then the consumer stops and the jobs still running
    are put back in the queue (see the ledger's INTERRUPTED handling). A
    second signal stops at once. Docker's stop signal is SIGTERM, Ctrl-C is
    SIGINT: both mean "finish up".
    """

    def __init__(self, huey, **options):
        if options.get('shutdown_timeout') is None:
            options['shutdown_timeout'] = _settings['grace']
        super().__init__(huey, **options)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._signal_actions[signum] = (False, True)
        ledger.serving(queue_of(huey), self.workers)


class TrackedHuey(Huey):
    """Huey with jittered exponential retry delays, pausing, and one periodic scheduler.

    Huey grows ``retry_delay`` by ``retry_backoff`` on each retry; we spread
    each delay by +-``retry_jitter`` so a burst of jobs failing together does
    not come back together. A paused queue keeps its messages: its workers
    take none. Periodic tasks are enqueued by the leading consumer only.
    """
    retry_jitter = 0.25

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paused = threading.Event()  # refreshed from the broker by the consumer

    def create_consumer(self, **options):
        return TrackedConsumer(self, **options)

    def dequeue(self):
        if self.paused.is_set():
            # Idle like an empty queue; resuming is seen within a second.
            time.sleep(0.5)
            return None
        task = super().dequeue()
        if task is not None and self.paused.is_set():
            # Taken by a worker already waiting when the pause came: put it back.
            self.storage.enqueue(self.serialize_task(task), task.priority)
            return None
        return task

    def read_periodic(self, timestamp):
        # Huey's scheduler asks every minute. Periodic jobs are started as
        # ordinary, tracked jobs (row first, then message), by the leader.
        if leadership.leading and self is hueys.get('default'):
            from . import periodic
            periodic.launch_due(timestamp)
        return []

    def _requeue_task(self, task, timestamp, retry_eta=None):
        if retry_eta is None and task.retry_delay:
            spread = random.uniform(1 - self.retry_jitter, 1 + self.retry_jitter)
            retry_eta = timestamp + dt.timedelta(seconds=task.retry_delay * spread)
            if task.retry_backoff:
                task.retry_delay *= task.retry_backoff
        super()._requeue_task(task, timestamp, retry_eta)


# queue name -> Huey instance, in this process.
hueys: dict[str, TrackedHuey] = {}
_settings = {'backoff': 2.0, 'spec': None, 'grace': 25.0}
_pool = {'url': None, 'pool': None}


def queue_of(huey):
    return huey.name.split('.', 1)[1]


def _storage_spec(config):
    if config['EMBEDDED']:
        return ('sqlite', config['HUEY_SQLITE_PATH'])
    return ('redis', config['REDIS_URL'])


def _redis_pool_for(url):
    if _pool['url'] != url:
        _pool['url'] = url
        _pool['pool'] = redis.ConnectionPool.from_url(
            url,
            # Fail fast when Redis is away, so the API can answer 503 at once;
            # one quick retry covers a pooled connection that went stale.
            socket_connect_timeout=2, socket_timeout=10, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        )
    return _pool['pool']


def _storage_args(spec):
    kind, where = spec
    if kind == 'sqlite':
        os.makedirs(os.path.dirname(where) or '.', exist_ok=True)
        return SqliteStorage, {'filename': where}
    return PriorityRedisStorage, {'connection_pool': _redis_pool_for(where),
                                  'clean_name': False}


def configure(config):
    """Point every queue's Huey at the configured broker (idempotent)."""
    _settings['backoff'] = config['RETRY_BACKOFF']
    _settings['grace'] = config['GRACE_PERIOD']
    spec = _storage_spec(config)
    changed = spec != _settings['spec']
    _settings['spec'] = spec
    storage_class, storage_kwargs = _storage_args(spec)
    for name in config['QUEUES']:
        huey = hueys.get(name)
        if huey is None:
            huey = hueys[name] = TrackedHuey(
                f'qm.{name}', results=False, storage_class=storage_class,
                **storage_kwargs)
            for task_type in catalog.TASKS.values():
                _register(huey, task_type)
            ledger.attach(huey, name)
            huey.on_startup('qm_consumer')(_on_worker_startup)
        elif changed:
            huey.storage_class, huey.storage_kwargs = storage_class, storage_kwargs
            huey.storage = huey.create_storage()
        huey.retry_jitter = config['RETRY_JITTER']


def _on_worker_startup():
    from . import consumer
    consumer.on_worker_startup()


def consumer_huey():
    """The Huey instance ``huey_consumer huey_tasks.huey`` runs: ``$QUEUE``."""
    name = os.environ.get('QUEUE') or 'default'
    if name not in hueys:
        raise config_module.ConfigError(
            f'QUEUE={name!r} is not one of QUEUES ({", ".join(hueys)})')
    return hueys[name]


def task(params=(), retries=None, retry_delay=None, priority=0, timeout=None,
         no_retry=(), rerun=True):
    """Declare a task type and register it on every queue's Huey.

    ``retries`` and ``retry_delay`` default to the configured policy; a
    submission may override both. ``no_retry`` lists exceptions that retrying
    cannot fix: the job fails on the spot. ``timeout`` (seconds) stops an
    attempt at its next ``progress()`` once it is over time. ``rerun=False``
    marks a task that must not run twice: if its worker is lost mid-run the
    job fails instead of running again.
    """
    def decorator(func):
        doc = (func.__doc__ or '').strip().splitlines()
        task_type = catalog.register(catalog.TaskType(
            name=func.__name__, func=func, params=tuple(params),
            description=doc[0] if doc else '', retries=retries,
            retry_delay=retry_delay, priority=priority, timeout=timeout,
            no_retry=tuple(no_retry), rerun=rerun))
        for huey in hueys.values():
            _register(huey, task_type)
        func.task_type = task_type
        return func
    return decorator


def periodic(minute='*', hour='*', day='*', month='*', day_of_week='*', run_with=None,
             **options):
    """Declare a task type (as :func:`task` does) that also runs on a crontab schedule.

    ``run_with`` gives the parameters of the scheduled runs.
    """
    from huey import crontab

    def decorator(func):
        func = task(**options)(func)
        schedule = ' '.join(map(str, (minute, hour, day, month, day_of_week)))
        catalog.PERIODIC[func.task_type.name] = catalog.Periodic(
            func.task_type, schedule, crontab(minute, hour, day, month, day_of_week),
            dict(run_with or {}))
        return func
    return decorator


def _register(huey, task_type):
    def run(params, meta=None, task=None):
        with context.running(task, huey):
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


def enqueue(job, base=0, retries=None):
    """Hand ``job`` (a ledger row) to Huey as a new message.

    ``base`` is the number of attempts already made, so attempt numbers keep
    counting up across manual retries; ``retries`` overrides the job's (what
    is left of them, for a job put back after its worker was lost). Raises
    :class:`BrokerUnavailable`.
    """
    huey = hueys[job.queue]
    task_type = catalog.TASKS[job.task]
    task_class = task_type.wrappers[huey.name].task_class
    retries = job.retries if retries is None else retries
    message = task_class(
        (), {'params': job.params, 'meta': {'base': base, 'retries': retries}},
        id=job.id, eta=job.scheduled_for, retries=retries,
        retry_delay=job.retry_delay, retry_backoff=_settings['backoff'],
        priority=job.priority or None,
        timeout=job.timeout if job.timeout is not None else task_type.timeout)
    try:
        huey.enqueue(message)
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f'the broker refused the job: {exc}') from exc


def _messages(huey, match=None):
    """Every message Huey holds for ``huey``'s queue, queued or scheduled.

    Yields ``(job id, remove)``; ``remove()`` takes that message out and says
    whether it was still there. ``match`` (a job id) narrows the scan to the
    messages that contain it. Huey has no "remove" call; we find messages in
    its storage, as Sidekiq's UI deletes from a queue.
    """
    storage = huey.storage
    if isinstance(storage, SqliteStorage):
        where, args = 'queue = ?', (storage.name,)
        if match:
            where, args = where + ' and instr(data, ?) > 0', args + (match.encode(),)
        for table in ('task', 'schedule'):
            rows = storage.sql(f'select id, data from {table} where {where}', args, results=True)
            for row_id, data in rows:
                yield (huey.serializer.deserialize(bytes(data)).id,
                       lambda table=table, row_id=row_id: _delete_row(storage, table, row_id))
    else:
        conn = storage.conn
        # Queue members carry an 8-byte ordering prefix; schedule members don't.
        for key, skip in ((storage.queue_key, 8), (storage.schedule_key, 0)):
            for member, _score in conn.zscan_iter(key, match=f'*{match}*' if match else None,
                                                  count=1000):
                yield (huey.serializer.deserialize(member[skip:]).id,
                       lambda key=key, member=member: bool(conn.zrem(key, member)))


def _delete_row(storage, table, row_id):
    with storage.db(commit=True) as curs:
        curs.execute(f'delete from {table} where id = ?', (row_id,))
        return curs.rowcount == 1


def withdraw(job):
    """Take the job's pending message out of Huey's queue or schedule.

    Returns True when a message was removed. When none is found a worker may
    hold it between dequeue and execution, so it is also revoked once: Huey
    checks that flag just before running, and clears it after a run.
    """
    huey = hueys[job.queue]
    removed = False
    with _reaching():
        for job_id, remove in _messages(huey, match=job.id):
            if job_id == job.id:
                removed = remove() or removed
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
        for job_id, remove in _messages(huey):
            if job_id in wanted and remove():
                removed.add(job_id)
                done.add(job_id)
        for job_id in wanted - removed:
            huey.revoke_by_id(job_id, revoke_once=True)
            done.add(job_id)
    return removed


def restore(job):
    """Clear what :func:`withdraw` or a cancel request may have left for the job."""
    huey = hueys[job.queue]
    with _reaching():
        huey.restore_by_id(job.id)
    _flag(huey, context.CANCEL_KEY.format(job.id), False)


def request_cancel(job):
    """Ask the running job to stop at its next progress report."""
    _flag(hueys[job.queue], context.CANCEL_KEY.format(job.id), True)


def _flag(huey, key, on):
    with _reaching():
        if on:
            huey.storage.put_data(key, b'1')
        else:
            huey.storage.delete_data(key)


def _has(huey, key):
    with _reaching():
        return huey.storage.has_data_for_key(key)


def set_paused(queue, paused):
    """Pause or resume a queue: its messages stay, no worker takes one."""
    _flag(hueys[queue], PAUSED_KEY, paused)


def is_paused(queue):
    return _has(hueys[queue], PAUSED_KEY)


def set_periodic_paused(name, paused):
    _flag(hueys['default'], f'qm:periodic-paused:{name}', paused)


def is_periodic_paused(name):
    return _has(hueys['default'], f'qm:periodic-paused:{name}')


def refresh_paused():
    """Copy each queue's paused flag from the broker into this process."""
    for name, huey in hueys.items():
        try:
            paused = is_paused(name)
        except BrokerUnavailable:
            continue
        if paused:
            huey.paused.set()
        else:
            huey.paused.clear()


def message_ids(queue):
    """Ids of every job Huey holds a message for in ``queue`` (queued or scheduled)."""
    with _reaching():
        return {job_id for job_id, _remove in _messages(hueys[queue])}


def depth(queue):
    """Messages waiting in Huey for ``queue``: ``(queued, scheduled)``."""
    huey = hueys[queue]
    with _reaching():
        return huey.pending_count(), huey.scheduled_count()


def ping():
    """Raise :class:`BrokerUnavailable` unless the broker answers."""
    huey = hueys['default']
    try:
        if isinstance(huey.storage, SqliteStorage):
            huey.storage.sql('select 1', results=True)
        else:
            huey.storage.conn.ping()
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(str(exc)) from exc


def redis_client():
    """A Redis client on the shared pool, or None in the embedded mode."""
    if _settings['spec'] is None or _settings['spec'][0] != 'redis':
        return None
    return redis.Redis(connection_pool=_redis_pool_for(_settings['spec'][1]))

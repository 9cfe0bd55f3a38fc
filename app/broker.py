"""The Huey side: one Huey instance per named queue, task registration, enqueue.

Huey instances exist from import time (``huey_consumer`` loads them from
``huey_tasks``); :func:`configure` points their storage at the broker the
configuration names: Redis, or SQLite in the embedded mode.
"""
import datetime as dt
import os
import random
import sqlite3

import redis
from huey import Huey
from huey.storage import PriorityRedisStorage, SqliteStorage
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import catalog, config as config_module, context, ledger


class BrokerUnavailable(Exception):
    """Huey's storage (Redis, or SQLite when embedded) refused a request."""


BROKER_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                 sqlite3.OperationalError)


class TrackedHuey(Huey):
    """Huey with jittered exponential retry delays.

    Huey grows ``retry_delay`` by ``retry_backoff`` on each retry; we spread
    each delay by +-``retry_jitter`` so a burst of jobs failing together does
    not come back together.
    """
    retry_jitter = 0.25

    def _requeue_task(self, task, timestamp, retry_eta=None):
        if retry_eta is None and task.retry_delay:
            spread = random.uniform(1 - self.retry_jitter, 1 + self.retry_jitter)
            retry_eta = timestamp + dt.timedelta(seconds=task.retry_delay * spread)
            if task.retry_backoff:
                task.retry_delay *= task.retry_backoff
        super()._requeue_task(task, timestamp, retry_eta)


# queue name -> Huey instance, in this process.
hueys: dict[str, TrackedHuey] = {}
_settings = {'backoff': 2.0, 'spec': None}
_pool = {'url': None, 'pool': None}


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
        elif changed:
            huey.storage_class, huey.storage_kwargs = storage_class, storage_kwargs
            huey.storage = huey.create_storage()
        huey.retry_jitter = config['RETRY_JITTER']


def consumer_huey():
    """The Huey instance ``huey_consumer huey_tasks.huey`` runs: ``$QUEUE``."""
    name = os.environ.get('QUEUE') or 'default'
    if name not in hueys:
        raise config_module.ConfigError(
            f'QUEUE={name!r} is not one of QUEUES ({", ".join(hueys)})')
    return hueys[name]


def task(params=(), retries=None, retry_delay=None, priority=0, timeout=None,
         no_retry=()):
    """Declare a task type and register it on every queue's Huey.

    ``retries`` and ``retry_delay`` default to the configured policy; a
    submission may override both. ``no_retry`` lists exceptions that retrying
    cannot fix: the job fails on the spot.
    """
    def decorator(func):
        doc = (func.__doc__ or '').strip().splitlines()
        task_type = catalog.register(catalog.TaskType(
            name=func.__name__, func=func, params=tuple(params),
            description=doc[0] if doc else '', retries=retries,
            retry_delay=retry_delay, priority=priority, timeout=timeout,
            no_retry=tuple(no_retry)))
        for huey in hueys.values():
            _register(huey, task_type)
        func.task_type = task_type
        return func
    return decorator


def _register(huey, task_type):
    def run(params, meta=None, task=None):
        with context.running(task):
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


def enqueue(job, base=0):
    """Hand ``job`` (a ledger row) to Huey as a new message.

    ``base`` is the number of attempts already made, so attempt numbers keep
    counting up across manual retries. Raises :class:`BrokerUnavailable`.
    """
    huey = hueys[job.queue]
    task_type = catalog.TASKS[job.task]
    task_class = task_type.wrappers[huey.name].task_class
    message = task_class(
        (), {'params': job.params, 'meta': {'base': base, 'retries': job.retries}},
        id=job.id, eta=job.scheduled_for, retries=job.retries,
        retry_delay=job.retry_delay, retry_backoff=_settings['backoff'],
        priority=job.priority or None)
    try:
        huey.enqueue(message)
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f'the broker refused the job: {exc}') from exc


def withdraw(job):
    """Take the job's pending message out of Huey's queue or schedule.

    Returns True when a message was removed. When none is found a worker may
    hold it between dequeue and execution, so it is also revoked once: Huey
    checks that flag just before running, and clears it after a run.
    Huey has no "remove" call; we match the message by id in its storage,
    as Sidekiq's UI deletes from a queue.
    """
    huey = hueys[job.queue]
    storage = huey.storage
    needle = job.id.encode()
    removed = False
    try:
        if isinstance(storage, SqliteStorage):
            for table in ('task', 'schedule'):
                rows = storage.sql(f'select id, data from {table} where queue = ? '
                                   f'and instr(data, ?) > 0', (storage.name, needle),
                                   results=True)
                for row_id, data in rows:
                    if huey.deserialize_task(bytes(data)).id == job.id:
                        with storage.db(commit=True) as curs:
                            curs.execute(f'delete from {table} where id = ?', (row_id,))
                            removed = removed or curs.rowcount == 1
        else:
            conn = storage.conn
            # Queue members carry an 8-byte ordering prefix; schedule members don't.
            for key, skip in ((storage.queue_key, 8), (storage.schedule_key, 0)):
                for member, _score in conn.zscan_iter(key, match=f'*{job.id}*'):
                    if huey.deserialize_task(member[skip:]).id == job.id:
                        removed = bool(conn.zrem(key, member)) or removed
        if not removed:
            huey.revoke_by_id(job.id, revoke_once=True)
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f'the broker is unreachable: {exc}') from exc
    return removed


def restore(job):
    """Clear a revoke flag :func:`withdraw` may have left for the job."""
    try:
        hueys[job.queue].restore_by_id(job.id)
    except BROKER_ERRORS as exc:
        raise BrokerUnavailable(f'the broker is unreachable: {exc}') from exc


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

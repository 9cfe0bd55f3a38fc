"""TrackedHuey, TrackedConsumer and TrackedScheduler: Huey's own tests, then ours.

Huey's suite (``huey/tests``) is written against ``BaseTestCase.get_huey()``
and ``consumer_class``; every test class of its API, consumer, signal and
priority modules runs here against a ``TrackedHuey`` on
``ReliableRedisStorage`` (a private redis-server) and our consumer class.
Where our behaviour differs on purpose, the test is replaced by one that
states ours:

- retry delays are spread by +-``retry_jitter``: off for Huey's suite
  (tests/test_ledger.py tests it);
- SIGTERM stops gracefully like SIGINT, with ``GRACE_PERIOD`` as the default
  shutdown timeout;
- ``test_chord_bookkeeping_cleared`` reads ``MemoryStorage``'s private
  counters, which a Redis storage does not have; it is not run.

On a consumer's worker thread a run costs one round trip to the broker
(Huey's costs three: take, read the revocation flags, clear its flag); the
tests at the end check the count and that revocation means what it means
in Huey.
"""
import contextlib
import datetime as dt
import os
import queue
import signal
import sqlite3
import threading
import time
import uuid

import pytest

os.environ['HUEY_SLOW_TESTS'] = '1'  # read when huey.tests.base is imported
from huey.consumer import ConsumerStopped, Scheduler  # noqa: E402
from huey.constants import EmptyData  # noqa: E402
from huey.consumer_options import ConsumerConfig  # noqa: E402
from huey.tests import test_api, test_consumer, test_priority, test_signals  # noqa: E402

from huey import signals as S  # noqa: E402

import huey_tasks  # noqa: E402
from app import broker, catalog, jobs, message  # noqa: E402
from app.broker import TrackedConsumer, TrackedHuey, TrackedScheduler  # noqa: E402
from app.extensions import db  # noqa: E402
from app.storage import ReliableRedisStorage  # noqa: E402


class HueySuiteConsumer(TrackedConsumer):
    """Our consumer with the scheduler Huey's consumer tests drive (no sleeping)."""
    scheduler_class = test_consumer.TestConsumer._Scheduler


class OnTrackedHuey:
    """Runs a Huey test class against a TrackedHuey on a private Redis."""
    huey_options = {}
    consumer_class = HueySuiteConsumer

    def get_huey(self):
        huey = TrackedHuey(f'qm.suite{uuid.uuid4().hex[:8]}', utc=False, results=True,
                           storage_class=ReliableRedisStorage, url=self.redis_url,
                           clean_name=False, **self.huey_options)
        huey.retry_jitter = 0  # Huey's tests expect its exact delays; test_ledger tests jitter
        return huey

    def tearDown(self):
        super().tearDown()
        self.huey.storage.flush_all()


@pytest.fixture(scope='class')
def private_redis(request, redis_server):
    request.cls.redis_url = redis_server.url


def _suite(module, skip=()):
    """A TrackedHuey subclass of every test class ``module`` defines."""
    made = {}
    for name, cls in vars(module).items():
        if (isinstance(cls, type) and name.startswith('Test') and cls.__module__ == module.__name__
                and issubclass(cls, test_api.BaseTestCase) and 'get_huey' not in vars(cls)):
            attrs = {name: None for name in skip if hasattr(cls, name)}
            made[f'{name}OnTrackedHuey'] = pytest.mark.usefixtures('private_redis')(
                type(f'{name}OnTrackedHuey', (OnTrackedHuey, cls), attrs))
    return made


globals().update(_suite(test_api, skip=('test_chord_bookkeeping_cleared',)))
globals().update(_suite(test_signals))
globals().update(_suite(test_priority))
globals().update({k: v for k, v in _suite(test_consumer).items()
                  if k not in ('TestConsumerConfigOnTrackedHuey',
                               'TestConsumerShutdownOnTrackedHuey')})


# Huey's test classes that configure their own Huey, with the same options.
@pytest.mark.usefixtures('private_redis')
class TestDisableResultStoreOnTrackedHuey(OnTrackedHuey, test_api.TestDisableResultStore):
    huey_options = {}

    def get_huey(self):
        return TrackedHuey(f'qm.suite{uuid.uuid4().hex[:8]}', utc=False, results=False,
                           storage_class=ReliableRedisStorage, url=self.redis_url,
                           clean_name=False)


@pytest.mark.usefixtures('private_redis')
class TestStoreIntermediateErrorsOnTrackedHuey(OnTrackedHuey,
                                               test_api.TestStoreIntermediateErrors):
    huey_options = {'store_intermediate_errors': False}


class _CustomErrorHuey(TrackedHuey):
    def build_error_result(self, task, exc):
        err = super().build_error_result(task, exc)
        err.update(name=task.name, args=task.args)
        return err


@pytest.mark.usefixtures('private_redis')
class TestCustomErrorMetadataOnTrackedHuey(OnTrackedHuey, test_api.TestCustomErrorMetadata):
    def get_huey(self):
        return _CustomErrorHuey(f'qm.suite{uuid.uuid4().hex[:8]}', utc=False,
                                storage_class=ReliableRedisStorage, url=self.redis_url,
                                clean_name=False)


@pytest.mark.usefixtures('private_redis')
class TestConsumerConfigOnTrackedHuey(OnTrackedHuey, test_consumer.TestConsumerConfig):
    def test_shutdown_options(self):
        # Ours: the configured GRACE_PERIOD unless the command line says otherwise.
        consumer = self.huey.create_consumer(**ConsumerConfig(shutdown_timeout=5).values)
        self.assertEqual(consumer.shutdown_timeout, 5)
        self.huey.grace_period = 7.5
        consumer = self.huey.create_consumer(**ConsumerConfig().values)
        self.assertEqual(consumer.shutdown_timeout, 7.5)


@pytest.mark.usefixtures('private_redis')
class TestConsumerShutdownOnTrackedHuey(OnTrackedHuey, test_consumer.TestConsumerShutdown):
    def test_signal_handlers(self):
        # Ours: SIGINT (Ctrl-C), SIGTERM (docker stop, systemd) and SIGHUP (a
        # closing terminal) all stop gracefully; a second one of any stops at once.
        hup = signal.getsignal(signal.SIGHUP)
        try:
            consumer = self.huey.create_consumer()
            consumer._set_signal_handlers()
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self.assertEqual(signal.getsignal(signum), consumer._handle_signal)
            self.assertEqual(consumer._signal_actions, {
                signal.SIGINT: (False, True), signal.SIGTERM: (False, True),
                signal.SIGHUP: (False, True)})
            consumer._handle_signal(signal.SIGINT, None)
            self.assertTrue(consumer._graceful)
            self.assertFalse(consumer._restart)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self.assertEqual(signal.getsignal(signum), signal.default_int_handler)
        finally:
            signal.signal(signal.SIGHUP, hup)

    def test_immediate_stop_ignores_stop_flag(self):
        consumer = self.huey.create_consumer()
        consumer._interrupt_workers = lambda: setattr(consumer, 'stop_flag', None)
        consumer._signum, consumer._graceful, consumer._restart = signal.SIGTERM, False, False
        self.assertRaises(ConsumerStopped, consumer.loop)


# -- ours ------------------------------------------------------------------------

def submit(app, task, **options):
    return jobs.submit(catalog.validate({'task': task, **options}, app.config)).orm()


def test_huey_scheduler_asks_for_periodic_tasks_with_no_timestamp_and_gets_the_clock(ctx):
    # Huey 3.5's scheduler calls read_periodic(None) (huey_consumer passes no
    # clock); every minute of it must reach the hook with a real timestamp.
    huey = broker.hueys['default']
    seen = []
    huey.on_periodic = seen.append
    try:
        for scheduler_class in (Scheduler, TrackedScheduler):
            scheduler = scheduler_class(huey, huey_stop_flag(), interval=1, periodic=True)
            for _ in range(3):  # three "minutes" of the real loop, now=None as in production
                scheduler._next_loop = time.monotonic()
                scheduler._next_periodic = time.monotonic() - 1
                scheduler.sleep_for_interval = lambda *a: None
                scheduler.loop()
    finally:
        huey.on_periodic = None
    assert len(seen) == 6 and all(isinstance(t, dt.datetime) for t in seen)


def huey_stop_flag():
    import threading
    return threading.Event()


def test_the_scheduler_moves_due_jobs_into_the_queue_on_a_controlled_clock(ctx):
    huey = broker.hueys['default']
    job = submit(ctx, 'noop', delay=120)
    assert (huey.scheduled_count(), huey.pending_count()) == (1, 0)
    scheduler = TrackedScheduler(huey, huey_stop_flag(), interval=1, periodic=True)
    scheduler.sleep_for_interval = lambda *a: None
    due = db.session.get(type(job), job.id).scheduled_for
    for minute in range(5):  # the scheduler has been up for minutes
        scheduler._next_loop = time.monotonic()
        scheduler._next_periodic = time.monotonic() - 1
        scheduler.loop(due - dt.timedelta(seconds=1))
    assert (huey.scheduled_count(), huey.pending_count()) == (1, 0)
    scheduler._next_loop = time.monotonic()
    scheduler.loop(due)
    assert (huey.scheduled_count(), huey.pending_count()) == (0, 1)
    assert huey.dequeue().id == job.id


def test_messages_carry_the_job_id_and_priority_in_their_header(ctx):
    job = submit(ctx, 'noop', priority=7)
    [data] = broker.hueys['default'].storage.enqueued_items()
    head, _body = message.split(data)
    assert head == message.Header(job.id, 7)
    assert broker.hueys['default'].deserialize_task(data).id == job.id


def test_a_message_without_a_header_is_still_run(ctx):
    huey = broker.hueys['default']
    task = huey_tasks.noop.task_type.wrappers[huey.name].s(params={}, meta={'base': 0,
                                                                              'retries': 0})
    huey.storage.enqueue(super(TrackedHuey, huey).serialize_task(task))
    assert huey.dequeue().id == task.id


def test_a_message_of_an_unknown_task_type_waits_in_the_schedule_instead_of_vanishing(ctx):
    huey = broker.hueys['default']
    huey.storage.enqueue(message.header('0' * 8, 0) + b'not a pickle')
    assert huey.dequeue() is None
    assert (huey.pending_count(), huey.scheduled_count()) == (0, 1)
    assert huey.storage.inflight(broker.process_name()) == []


def test_a_paused_queue_puts_a_taken_message_back_where_it_was(ctx):
    huey = broker.hueys['default']
    first, second = submit(ctx, 'noop'), submit(ctx, 'noop')
    real_fetch = huey.storage.fetch

    def fetch(consumer, **kw):  # the pause arrives while the worker waits
        huey.paused.set()
        return real_fetch(consumer, **kw)
    huey.storage.fetch = fetch
    try:
        assert huey.dequeue() is None
    finally:
        del huey.storage.fetch
        huey.paused.clear()
    assert huey.pending_count() == 2
    assert [huey.dequeue().id, huey.dequeue().id] == [first.id, second.id]


def test_execute_acknowledges_a_message_nobody_took_charge_of(ctx):
    huey = broker.hueys['default']
    submit(ctx, 'noop')
    task = huey.dequeue()
    assert len(huey.storage.inflight(broker.process_name())) == 1
    huey.execute(task)  # no ledger recorder runs here
    assert huey.storage.inflight(broker.process_name()) == []


@pytest.mark.parametrize('ours', [TrackedHuey, TrackedConsumer, TrackedScheduler,
                                  ReliableRedisStorage, broker.ReliableSqliteStorage])
def test_every_override_of_a_huey_method_accepts_what_huey_passes(ours):
    # Huey calls these with its own arguments (its scheduler passes
    # read_periodic(None), say): an override must take every parameter the
    # method it replaces takes, by the same name, with the same default.
    import inspect
    checked = 0
    for name, method in vars(ours).items():
        if not callable(method) or name.startswith('__') and name != '__init__':
            continue
        for base in ours.__mro__[1:]:
            if not base.__module__.startswith('huey.') or name not in vars(base):
                continue
            theirs = inspect.signature(vars(base)[name]).parameters
            mine = inspect.signature(method).parameters
            takes_rest = any(p.kind is p.VAR_KEYWORD for p in mine.values())
            for param in theirs.values():
                if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                assert param.name in mine or takes_rest, (ours.__name__, name, param.name)
                if param.name in mine and param.default is not param.empty:
                    assert mine[param.name].default == param.default, (ours.__name__, name,
                                                                       param.name)
            checked += 1
            break
    assert checked >= 1  # the test saw an override to check


def test_a_retry_is_not_written_once_the_leader_took_the_message_back(ctx):
    huey = broker.hueys['default']
    submit(ctx, 'fail', retries=2, retry_delay=0)
    task = huey.dequeue()
    huey.storage.ack([task.claim])  # the leader thought this consumer dead and took it back
    huey.execute(task)
    assert (huey.pending_count(), huey.scheduled_count()) == (0, 0)


def test_a_retry_replaces_the_claim_of_the_attempt_it_follows(ctx):
    huey = broker.hueys['default']
    submit(ctx, 'fail', retries=2, retry_delay=60)
    task = huey.dequeue()
    huey.execute(task)
    assert (huey.pending_count(), huey.scheduled_count()) == (0, 1)
    assert huey.storage.inflight(broker.process_name()) == []


def test_a_message_fetched_long_ago_and_taken_back_is_not_run(ctx):
    huey = broker.hueys['default']
    submit(ctx, 'noop')
    task = huey.dequeue()
    task.fetched_at -= huey.storage.lease  # the process was stopped for that long
    huey.storage.ack([task.claim])
    ran = []

    def executing(signal, t, *args):
        ran.append(t.id)
    huey.signal(S.SIGNAL_EXECUTING)(executing)
    try:
        assert huey.execute(task) is None
    finally:
        huey.disconnect_signal(executing, S.SIGNAL_EXECUTING)
    assert ran == []


def test_a_retry_the_broker_refused_is_written_when_it_answers_again(ctx):
    huey = broker.hueys['default']
    submit(ctx, 'fail', retries=2, retry_delay=0)
    task = huey.dequeue()
    real = huey.storage.requeue

    def refuse(*args):
        raise sqlite3.OperationalError('database is locked')
    huey.storage.requeue = refuse
    try:
        huey.execute(task)
    finally:
        huey.storage.requeue = real
    assert len(huey.deferred) == 1 and huey.pending_count() == 0
    assert len(huey.storage.inflight(broker.process_name())) == 1  # still claimed meanwhile
    assert huey.write_deferred() == 0
    assert huey.pending_count() == 1 and huey.storage.inflight(broker.process_name()) == []


def test_a_consumer_takes_nothing_until_it_has_read_the_pause_switches(app, monkeypatch):
    from app import consumer, controls

    def unreachable():
        raise RuntimeError('the ledger is away')
    monkeypatch.setattr(controls, 'paused_queues', unreachable)
    consumer.start(app)
    try:
        assert all(h.paused.is_set() for h in broker.hueys.values())
        monkeypatch.undo()
        consumer.refresh_paused(app)
        assert not any(h.paused.is_set() for h in broker.hueys.values())
    finally:
        consumer.stop()


def test_a_process_that_comes_back_with_the_same_pid_has_another_name():
    from app import leader
    first = leader.process_name()
    leader._name[:] = [None, None]  # as a new process with the same host and pid
    second = leader.process_name()
    assert first != second and first.split('-')[0] == second.split('-')[0]
    assert leader.parse_name(second) == (second.split(':')[0], os.getpid())


# -- a worker thread's round trips ----------------------------------------------

@pytest.fixture
def lone_huey(redis_server):
    """A TrackedHuey of its own on the private Redis (no hooks), its tasks, and a way to
    count the commands Redis has run."""
    import redis
    huey = TrackedHuey(f'qm.w{uuid.uuid4().hex[:8]}', utc=False, results=False,
                       storage_class=ReliableRedisStorage, url=redis_server.url,
                       clean_name=False)
    ran = []

    def put(task):
        huey.enqueue(task)
        return task

    @huey.task(context=True)
    def job(n, task=None):
        ran.append(n)
        if n == 'revokes itself':
            huey.revoke(task, revoke_once=True)  # as a cancel while it runs

    client = redis.Redis.from_url(redis_server.url)

    @contextlib.contextmanager
    def calls():
        """The names of the commands clients send Redis meanwhile (not those scripts run)."""
        seen, end = [], f'end-{uuid.uuid4().hex}'
        ready = threading.Event()
        marker = redis.Redis.from_url(redis_server.url)
        marker.ping()  # connected before: the end marker goes alone

        def watch():
            with client.monitor() as monitor:
                ready.set()
                for command in monitor.listen():
                    if end in command['command']:
                        return
                    if command.get('client_type') != 'lua':
                        seen.append(command['command'].split()[0].upper())
        watcher = threading.Thread(target=watch)
        watcher.start()
        assert ready.wait(5)
        time.sleep(0.05)  # MONITOR is in effect once Redis has answered it
        yield seen
        marker.echo(end)
        watcher.join(10)
        marker.close()
    yield huey, job, ran, calls, put
    huey.storage.flush_all()
    client.close()


class _WorkerThread:
    """A consumer's worker (TrackedWorker) on a thread of its own, taking turns on request."""

    def __init__(self, huey):
        self.worker = broker.TrackedWorker(huey, threading.Event(), 0.01, 0.1, 1.15)
        self.orders, self.done = queue.Queue(), queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.done.get(timeout=10) == 'ready'

    def _run(self):
        try:
            self.worker.initialize()
            self.done.put('ready')
            while self.orders.get() == 'turn':
                self.worker.loop()
                self.done.put('turned')
            self.worker.shutdown()
            self.done.put('stopped')
        except BaseException as exc:  # reported to the test
            self.done.put(exc)

    def turns(self, count=1):
        for _ in range(count):
            self.orders.put('turn')
            assert self.done.get(timeout=10) == 'turned'

    def stop(self):
        self.orders.put('stop')
        assert self.done.get(timeout=10) == 'stopped'
        self.thread.join(10)


def _on_a_worker_thread(huey, turns):
    """``turns`` turns of a new worker thread, then its shutdown."""
    worker = _WorkerThread(huey)
    worker.turns(turns)
    worker.stop()


def test_a_worker_takes_and_runs_a_message_in_one_round_trip(lone_huey):
    huey, job, ran, calls, put = lone_huey
    tasks = [put(job.s(n)) for n in range(4)]
    worker = _WorkerThread(huey)
    worker.turns(1)  # the first also loads the script into Redis
    with calls() as sent:
        worker.turns(3)
    assert ran == [0, 1, 2, 3]
    # One script per message: it takes it, reads its flags and clears the
    # flag of the run before; no HMGET (Huey's flag read) nor HDEL (its
    # clear). The acknowledgement is the ledger's, after the outcome is
    # written, in batches: here, with no ledger, each run's own (ZREM).
    assert sent == ['EVALSHA', 'ZREM'] * 3
    worker.stop()
    assert huey.storage.inflight(broker.process_name()) == []  # acknowledged
    assert not any(huey.is_revoked(task) for task in tasks)


def test_a_flag_set_while_a_job_ran_is_cleared_after_it_on_a_worker(lone_huey):
    huey, job, ran, _calls, put = lone_huey
    revoking = put(job.s('revokes itself'))
    worker = _WorkerThread(huey)
    worker.turns(1)
    # Cleared by the worker's next fetch (Huey clears it as the run ends)...
    assert huey.storage.peek_data(revoking.revoke_id) is not EmptyData
    worker.turns(1)  # finds the queue empty
    assert huey.storage.peek_data(revoking.revoke_id) is EmptyData
    # ...or by the worker as it stops.
    again = put(job.s('revokes itself'))
    worker.turns(1)
    assert huey.storage.peek_data(again.revoke_id) is not EmptyData
    worker.stop()
    assert ran == ['revokes itself'] * 2
    assert huey.storage.peek_data(again.revoke_id) is EmptyData


def test_a_worker_honours_flags_read_with_the_message(lone_huey):
    huey, job, ran, _calls, put = lone_huey
    once = put(job.s('revoked once'))
    huey.revoke(once, revoke_once=True)
    kept = put(job.s('revoked'))
    huey.revoke(kept)
    job.revoke()  # the whole task type, after the two above were queued
    typed = put(job.s('type revoked'))
    _on_a_worker_thread(huey, 3)
    assert ran == []
    assert huey.storage.peek_data(once.revoke_id) is EmptyData  # used up
    assert huey.is_revoked(kept)
    job.restore()
    huey.restore(kept)
    for task in (once, kept, typed):
        huey.enqueue(task)
    _on_a_worker_thread(huey, 3)
    assert ran == ['revoked once', 'revoked', 'type revoked']
    assert huey.pending_count() == 0 and huey.storage.inflight(broker.process_name()) == []


def test_a_retry_does_not_meet_the_flag_its_attempt_cleared(lone_huey):
    huey, _job, _ran, _calls, _put = lone_huey
    runs = []

    @huey.task(context=True, retries=1)
    def flaky(task=None):
        runs.append(task.retries)
        if task.retries:
            huey.revoke(task, revoke_once=True)  # canceled while it runs, then fails
            raise RuntimeError('boom')
    huey.enqueue(flaky.s())
    _on_a_worker_thread(huey, 2)
    assert runs == [1, 0]  # the retry ran: Huey clears the flag as the attempt ends

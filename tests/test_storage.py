"""Our Huey storages: Huey's own storage tests, then reliable fetch, leases and the index.

Huey ships its test-suite; ``StorageTests`` is written to be pointed at any
storage, so it runs here against ``ReliableRedisStorage`` (on a private
redis-server) and ``ReliableSqliteStorage``, through a ``TrackedHuey``.
"""
import datetime as dt
import os
import threading
import time
import uuid

import pytest

# Huey's suite skips its slower tests (a consumer running a chord end to end,
# TTLs) unless asked; here they run. Read when huey.tests.base is imported.
os.environ['HUEY_SLOW_TESTS'] = '1'
from huey.constants import EmptyData  # noqa: E402
from huey.tests.base import BaseTestCase  # noqa: E402
from huey.tests.test_storage import StorageTests  # noqa: E402

from app import message  # noqa: E402
from app.broker import TrackedHuey  # noqa: E402
from app.storage import ReliableRedisStorage, ReliableSqliteStorage  # noqa: E402


@pytest.fixture(scope='class')
def private_redis(request, redis_server):
    request.cls.redis_url = redis_server.url


@pytest.fixture(scope='class')
def sqlite_file(request, tmp_path_factory):
    request.cls.sqlite_path = str(tmp_path_factory.mktemp('huey') / 'huey.db')


@pytest.mark.usefixtures('private_redis')
class TestHueyStorageTestsOnReliableRedis(StorageTests, BaseTestCase):
    @property
    def supports_ttl(self):  # as Huey's own TestRedisStorage: Redis 7.4 and later
        return self.s.supports_hash_ttl

    def get_huey(self):
        return TrackedHuey('qm.huey-tests', utc=False, storage_class=ReliableRedisStorage,
                           url=self.redis_url, clean_name=False)


@pytest.mark.usefixtures('sqlite_file')
class TestHueyStorageTestsOnReliableSqlite(StorageTests, BaseTestCase):
    supports_ttl = False

    def get_huey(self):
        return TrackedHuey('qm.huey-tests', utc=False, storage_class=ReliableSqliteStorage,
                           filename=self.sqlite_path, timeout=3)


# -- reliable fetch, on both storages -------------------------------------------

@pytest.fixture(params=[pytest.param('redis', marks=pytest.mark.processes), 'sqlite'])
def store(request, tmp_path):
    """A fresh storage of each kind, with a 0.5 s lease."""
    if request.param == 'redis':
        url = request.getfixturevalue('redis_server').url
        s = ReliableRedisStorage(f'qm.t{uuid.uuid4().hex[:8]}', url=url, clean_name=False,
                                 lease=0.5, read_timeout=0.2)
    else:
        s = ReliableSqliteStorage('qm.t', filename=str(tmp_path / 'huey.db'), lease=0.5)
    yield s
    s.flush_all()


def msg(job_id, priority=0, body=b'body'):
    return message.header(job_id, priority) + body


def test_a_fetched_message_stays_in_flight_until_acknowledged(store):
    store.enqueue(msg('j1'))
    delivery = store.fetch('c:1')
    assert delivery.data == msg('j1')
    assert store.queue_size() == 0
    assert [i.job_id for i in store.inflight('c:1')] == ['j1']
    assert store.inflight_job_ids() == {'j1'}
    store.ack([delivery.receipt])
    assert store.inflight('c:1') == [] and store.inflight_job_ids() == set()


def test_a_put_back_message_is_taken_again(store):
    store.enqueue(msg('j1'))
    delivery = store.fetch('c:1')
    assert store.nack(delivery.receipt) is True
    assert store.inflight('c:1') == [] and store.queue_size() == 1
    assert store.fetch('c:2').data == msg('j1')
    assert store.nack(delivery.receipt) is False  # already back


def test_a_lease_runs_out_unless_renewed(store):
    store.enqueue(msg('j1'))
    store.fetch('c:1')
    store.keep_alive('c:2')
    assert store.consumers() == {'c:1': True, 'c:2': True}
    deadline = time.monotonic() + 5
    while store.consumers().get('c:1') and time.monotonic() < deadline:
        store.keep_alive('c:2')
        time.sleep(0.05)
    assert store.consumers() == {'c:1': False, 'c:2': True}
    assert store.retire('c:1') is False  # it still holds a message
    store.ack([i.receipt for i in store.inflight('c:1')])
    assert store.retire('c:1') is True and 'c:1' not in store.consumers()


def test_released_lease_ends_at_once(store):
    store.keep_alive('c:1')
    assert store.alive(['c:1', 'c:9']) == {'c:1'}
    store.release('c:1')
    assert store.alive(['c:1']) == set()


def test_due_messages_move_into_the_queue_by_priority(store):
    now = dt.datetime.now()
    store.add_to_schedule(msg('low', 1), now - dt.timedelta(seconds=2))
    store.add_to_schedule(msg('high', 9), now - dt.timedelta(seconds=1))
    store.add_to_schedule(msg('later', 5), now + dt.timedelta(hours=1))
    store.enqueue(msg('mid', 5), 5)
    moved = store.move_due(now)
    assert sorted(moved) == sorted([msg('low', 1), msg('high', 9)])
    assert store.schedule_size() == 1 and store.queue_size() == 3
    assert [store.fetch('c:1').data for _ in range(3)] == [msg('high', 9), msg('mid', 5),
                                                           msg('low', 1)]


def test_the_index_knows_which_jobs_wait(store):
    now = dt.datetime.now()
    store.enqueue(msg('a'))
    store.enqueue(msg('a'))  # a second message of the same job counts twice
    store.add_to_schedule(msg('b'), now + dt.timedelta(hours=1))
    assert store.held(['a', 'b', 'c']) == {'a', 'b'}
    assert store.index_ok()
    store.fetch('c:1')
    assert store.held(['a']) == {'a'}
    store.fetch('c:1')
    assert store.held(['a', 'b']) == {'b'}
    assert store.remove_waiting(['b']) == {'b'}
    assert store.held(['b']) == set() and store.schedule_size() == 0
    assert store.index_ok()


def test_a_lost_index_is_noticed_and_rebuilt(redis_server):
    # Redis only: SQLite indexes its own tables, there is nothing to lose.
    store = ReliableRedisStorage('qm.index', url=redis_server.url, clean_name=False)
    store.flush_all()
    store.enqueue(msg('a'))
    store.add_to_schedule(msg('b'), dt.datetime.now() + dt.timedelta(hours=1))
    store.conn.delete(store.index_key)  # evicted under maxmemory, say
    assert not store.index_ok()
    store.rebuild_index()
    assert store.index_ok() and store.held(['a', 'b']) == {'a', 'b'}
    store.flush_all()


def test_a_message_without_a_header_is_read_but_not_indexed(store):
    store.enqueue(b'older message')
    assert store.fetch('c:1').data == b'older message'
    assert store.held(['older message']) == set()


def test_the_epoch_marker_is_kept_and_read_back(store):
    store.set_epoch('e1')
    assert store.get_epoch() == 'e1'


def test_an_idle_fetch_waits_for_a_wake_token_not_a_poll(redis_server):
    store = ReliableRedisStorage('qm.wake', url=redis_server.url, clean_name=False,
                                 read_timeout=5)
    try:
        got = []
        reader = threading.Thread(target=lambda: got.append(store.fetch('c:1')))
        reader.start()
        time.sleep(0.2)  # let the reader block on the wake list: the condition under test
        started = time.monotonic()
        store.enqueue(msg('w1'))
        reader.join(5)
        assert got and got[0].data == msg('w1')
        assert time.monotonic() - started < 1.0  # not the 5 s read timeout
    finally:
        store.flush_all()


def test_a_retry_replaces_its_claim_only_while_the_claim_holds(store):
    store.enqueue(msg('j1'))
    delivery = store.fetch('c:1')
    assert store.holds(delivery.receipt)
    assert store.requeue(delivery.receipt, msg('j1'), 0, dt.datetime.now() + dt.timedelta(hours=1))
    assert not store.holds(delivery.receipt) and store.inflight('c:1') == []
    assert store.schedule_size() == 1 and store.held(['j1']) == {'j1'}
    store.enqueue(msg('j2'))
    taken = store.fetch('c:1')
    store.ack([taken.receipt])  # the leader took it back meanwhile
    assert store.requeue(taken.receipt, msg('j2'), 0, None) is False
    assert store.queue_size() == 0 and store.held(['j2']) == set()


@pytest.mark.parametrize('entries', [
    [('due', None)], [('later', 3600)], [('due', None), ('later', 3600)]], ids=str)
def test_a_few_messages_put_at_once_arrive_even_after_the_server_forgot_its_scripts(
        store, entries):
    # One script call goes without a pipeline: it must still find its
    # script after a restart of Redis (or SCRIPT FLUSH) emptied the cache.
    if isinstance(store, ReliableRedisStorage):
        store.conn.script_flush()
    now = dt.datetime.now()
    store.put_many([(msg(job_id), 0, None if delay is None else now + dt.timedelta(seconds=delay))
                    for job_id, delay in entries])
    assert store.held([job_id for job_id, _ in entries]) == {job_id for job_id, _ in entries}
    assert store.queue_size() == sum(delay is None for _, delay in entries)
    assert store.schedule_size() == sum(delay is not None for _, delay in entries)
    assert store.index_ok()


def test_many_messages_put_at_once_are_indexed_waiting_and_taken_by_priority(store):
    now = dt.datetime.now()
    entries = [(msg(f'j{n}', n % 3), n % 3, None) for n in range(1200)]
    entries += [(msg('later'), 0, now + dt.timedelta(hours=1))]
    store.put_many(entries)
    assert store.queue_size() == 1200 and store.schedule_size() == 1
    assert store.held(['j0', 'j599', 'j1199', 'later', 'other']) == {
        'j0', 'j599', 'j1199', 'later'}
    assert store.index_ok()
    taken = [store.fetch('c:1').data for _ in range(401)]
    assert all(m.startswith(b'qm1 j') and m.endswith(b'body') for m in taken)
    # Priority 2 first (every n with n % 3 == 2), then priority 1.
    priorities = [int(m.split(b'\n', 1)[0].rsplit(b' ', 1)[1]) for m in taken]
    assert priorities == [2] * 400 + [1]


@pytest.mark.processes
def test_a_fetch_reads_the_revocation_flags_that_could_stop_its_message(redis_server):
    s = ReliableRedisStorage(f'qm.t{uuid.uuid4().hex[:8]}', url=redis_server.url,
                             clean_name=False, read_timeout=0.2)
    try:
        for data in (msg('j1'), msg('j2'), b'no header'):
            s.enqueue(data)
        s.put_data('r:j2', b'flag of j2')
        s.note_revoked_type('rt:tasks.kind')
        s.put_data('rt:tasks.kind', b'flag of the type')
        s.note_revoked_type('rt:tasks.restored')  # noted, its flag since removed
        assert s.fetch('c:1').revocations == {'r:j1': None, 'rt:tasks.kind': b'flag of the type'}
        assert s.fetch('c:1').revocations == {'r:j2': b'flag of j2',
                                              'rt:tasks.kind': b'flag of the type'}
        assert s.fetch('c:1').revocations is None  # no job id to look a flag up by
    finally:
        s.flush_all()
    assert not s.conn.exists(s.revoked_types_key)


def test_a_fetch_first_clears_the_flag_it_is_given(store):
    store.put_data('r:j1', b'flag')
    store.put_data('r:j2', b'another')
    assert store.fetch('c:1', unflag='r:j1') is None  # even with nothing to take
    assert store.peek_data('r:j1') is EmptyData and store.peek_data('r:j2') == b'another'
    store.enqueue(msg('j3'))
    assert store.fetch('c:1', unflag='r:j2').data == msg('j3')
    assert store.peek_data('r:j2') is EmptyData


@pytest.mark.processes
def test_a_storage_name_of_any_characters_fetches_into_its_own_keys(redis_server):
    name = f'qm.t{uuid.uuid4().hex[:6]} "quoted" \\ é\n5'
    s = ReliableRedisStorage(name, url=redis_server.url, clean_name=False, read_timeout=0.2)
    try:
        s.enqueue(msg('j1'))
        delivery = s.fetch('host:1')
        assert delivery.data == msg('j1')
        assert s.conn.zcard(f'qm:inflight:{name}:host:1') == 1
        assert s.conn.hget(f'qm:index:{name}', '*') == b'0'
        assert s.consumers() == {'host:1': True}
        s.ack([delivery.receipt])
        assert s.inflight('host:1') == []
    finally:
        s.flush_all()


def test_a_call_resent_after_its_reply_was_lost_adds_no_message_twice(redis_server, monkeypatch):
    # The broker's pool retries a command once when the connection fails. A
    # reply lost after Redis ran the call (a cut connection, a proxy
    # restarting) makes it resend a call that already happened; if a worker
    # took the message meanwhile, the resent one would run the job again.
    import redis
    from app.broker import _redis_pool_for
    store = ReliableRedisStorage('qm.once', connection_pool=_redis_pool_for(redis_server.url),
                                 clean_name=False)
    store.flush_all()
    worker = ReliableRedisStorage('qm.once', url=redis_server.url, clean_name=False,
                                  blocking=False)
    real = redis.connection.Connection.read_response
    cuts = []

    def reply_lost(self, *args, **kwargs):
        if cuts:
            cuts.pop()
            # Redis ran the call; workers take what it added, then the reply is lost.
            while worker.fetch('c:2'):
                pass
            worker.read_schedule(dt.datetime.now() + dt.timedelta(days=1))
            self.disconnect()
            raise redis.exceptions.ConnectionError('Connection closed by server.')
        return real(self, *args, **kwargs)
    monkeypatch.setattr(redis.connection.Connection, 'read_response', reply_lost)
    later = dt.datetime.now() + dt.timedelta(hours=1)
    try:
        cuts.append(1)
        store.enqueue(msg('one'))
        cuts.append(1)
        store.add_to_schedule(msg('later'), later)
        cuts.append(1)  # a pipeline: two schedule calls and one for the queue
        store.put_many([(msg('m1'), 0, None), (msg('m2'), 0, later), (msg('m3'), 0, later)])
        cuts.append(1)  # one call alone: a batch of messages due now
        store.put_many([(msg('n1'), 0, None), (msg('n2'), 0, None)])
        assert not cuts  # each was cut, then resent by the pool
        assert store.queue_size() == 0 and store.schedule_size() == 0
        assert store.held(['one', 'later', 'm1', 'm2', 'm3', 'n1', 'n2']) == set()
        assert len(store.inflight('c:2')) == 4  # each message due now taken once
        assert store.index_ok()
        # A call of its own is a new call: it adds its message.
        store.enqueue(msg('one'))
        assert store.held(['one']) == {'one'} and store.queue_size() == 1
    finally:
        monkeypatch.undo()
        store.flush_all()

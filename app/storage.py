"""Huey's storage with reliable fetch: a taken message is never only in memory.

Huey's own storages remove a message from the queue when a worker takes it,
so a consumer that dies mid-run (or between taking a message and recording
anything) loses it. These subclasses keep Huey's layout and contract (every
test of huey's ``StorageTests`` passes against them) and add:

- **fetch**: one atomic step moves the next message from the queue into an
  in-flight record owned by the consumer that took it, and refreshes that
  consumer's liveness lease. The consumer acknowledges the message (``ack``)
  once the attempt's outcome is durable, or puts it back (``nack``).
- **liveness**: a consumer holds a lease (a Redis key with a time to live, a
  row with an expiry in SQLite) that its heartbeat renews. A consumer whose
  lease ran out is dead, even one that died in its first millisecond, and
  whoever leads returns its in-flight messages.
- **an atomic schedule**: due messages move from the schedule into the queue
  in one step (Huey pops them, then enqueues them one by one from the
  scheduler's memory).
- **an index** of waiting messages per job id, so the reconciler can ask "does
  the broker still hold this job?" for a page of ids at a time.

The ideas come from Sidekiq Pro's super_fetch (a private queue per process),
RQ's intermediate queue and StartedJobRegistry, Dramatiq's per-worker ack
sets and BullMQ's stalled-job checker. Message bytes carry the header of
:mod:`app.message`; messages without one still work but are not indexed.
"""
import os
import string
import struct
import time
from typing import NamedTuple

from huey.storage import PriorityRedisStorage, SqliteStorage

from . import message

# Global Redis keys (not per queue).
ALIVE = 'qm:alive:{}'
EPOCH = 'qm:epoch'
CLOCK = 'qm:clock'  # counts the leader's passes: a broker restored from an old copy is behind
# When each of the deployment's components (scheduler, reaper) last did its
# work: a hash of component -> Unix seconds.
COMPONENTS = 'qm:components'
# A message read back into the queue is woken for this many waiting workers at most.
WAKE_TOKENS = 64
# Messages due now put into the queue by one script call (the API's largest
# batch); each call holds Redis for about a millisecond.
ENQUEUE_MANY = 1000


class Receipt(NamedTuple):
    """Proof of a fetch, needed to acknowledge it.

    ``storage`` is the storage's name (``qm.<queue>``), ``consumer`` the
    process that took the message (``host:pid``), ``token`` the in-flight
    entry (Redis: the queue member, bytes; SQLite: the row id).
    """
    storage: str
    consumer: str
    token: object


class Delivery(NamedTuple):
    """A fetched message: its bytes as Huey wrote them, and its receipt.

    ``revocations`` are the revocation flags that could stop it, read with
    it (Huey's revoke keys, ``'r:<job id>'`` always among them, -> the stored
    flag, or None where there is none), or None when they were not read.
    """
    data: bytes
    receipt: Receipt
    revocations: dict | None = None


class InFlight(NamedTuple):
    """A message a consumer holds: its receipt, bytes, and job id (None if unknown)."""
    receipt: Receipt
    data: bytes
    job_id: str | None


def _prefix(now=None):
    # Huey's ordering prefix for queue members: microseconds, big-endian.
    return struct.pack('>Q', int((time.time() if now is None else now) * 1e6))


class _ByJobId:
    """What both storages do the same way, given ``waiting_messages``."""

    def dequeue(self):
        # Huey's contract: the next message's bytes. Taken reliably all the same.
        from .leader import process_name
        delivery = self.fetch(process_name())
        return None if delivery is None else delivery.data

    def _job_id(self, data):
        head, body = message.split(data)
        return head.job_id if head.job_id is not None else self.legacy_id(body)

    def remove_waiting(self, job_ids):
        """Take every waiting message of ``job_ids`` out; return the ids removed."""
        wanted, removed = set(job_ids), set()
        match = next(iter(wanted)) if len(wanted) == 1 else None
        for job_id, _data, remove in self.waiting_messages(match):
            if job_id in wanted and remove():
                removed.add(job_id)
        return removed


# -- Redis --------------------------------------------------------------------

# Index upkeep shared by the scripts: KEYS[idx] counts waiting messages per
# job id (field '*' counts them all), so a page of ids is checked with one
# HMGET and a lost index is noticed by comparing '*' with the queues' sizes.
_LUA_INDEX = """
local function job_of(data)
  return string.match(data, '^qm1 ([^ \\n]+) %-?%d+\\n')
end
local function count_job(idx, id, by)
  if id then
    if redis.call('HINCRBY', idx, id, by) <= 0 then redis.call('HDEL', idx, id) end
    redis.call('HINCRBY', idx, '*', by)
  end
end
local function count(idx, data, by)
  count_job(idx, job_of(data), by)
end
"""

# Milliseconds a call's once-key lives: far longer than the client's one quick
# retry takes (see app.broker's connection pool).
ONCE_TTL_MS = 60_000

# A script that adds messages runs once per call. Its last key, a once-key
# made for the call (see _once_key), is set first; a resend of the same call
# (redis-py retries a command once when the connection fails, and the reply
# may have been lost after Redis ran it) finds it set and changes nothing.
# Without it the resent message would be added again after a worker took the
# first one: the job would run twice. Under maxmemory the SET is refused
# before anything is written.
_LUA_ONCE = """
if not redis.call('SET', KEYS[#KEYS], '', 'NX', 'PX', ONCE_TTL_MS) then return end
""".replace('ONCE_TTL_MS', str(ONCE_TTL_MS))


def _once_key():
    """A new once-key for one call of a script that adds messages (see _LUA_ONCE)."""
    return 'qm:once:' + os.urandom(12).hex()


# KEYS: queue, index, wake, once-key. ARGV: member (prefix .. data), score.
_ENQUEUE = _LUA_INDEX + _LUA_ONCE + """
if redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) == 1 then
  count(KEYS[2], string.sub(ARGV[1], 9), 1)
end
redis.call('LPUSH', KEYS[3], '1')
redis.call('LTRIM', KEYS[3], 0, LAST_TOKEN)
"""

# The hot path: one call per message a worker takes, so as few arguments as
# can be (each costs the client time to encode). KEYS: queue. ARGV: consumer,
# lease (ms), a revocation flag to clear first ('' for none). The storage's
# other keys are written into the script (see _fetch_script); the consumer's
# in-flight and liveness keys are made from its name. (Redis Cluster would
# want every key in KEYS; the broker is one Redis.) Returns false, or
# {member} for a message without a job id in its header, or {member,
# 'r:<job id>', its flag or false, ['rt:<type>', its flag]...}: the flags
# Huey reads before running it (see TrackedHuey.is_revoked), read in the
# same step instead of a round trip of their own.
_FETCH = _LUA_INDEX + """
if ARGV[3] ~= '' then redis.call('HDEL', RESULTS, ARGV[3]) end
redis.call('SET', ALIVE .. ARGV[1], '1', 'PX', ARGV[2])
local r = redis.call('ZPOPMIN', KEYS[1])
if #r == 0 then return false end
redis.call('SADD', CONSUMERS, ARGV[1])
redis.call('ZADD', INFLIGHT .. ARGV[1], r[2], r[1])
local id = job_of(string.sub(r[1], 9))
count_job(INDEX, id, -1)
if not id then return {r[1]} end
local out = {r[1], 'r:' .. id, redis.call('HGET', RESULTS, 'r:' .. id)}
for _, field in ipairs(redis.call('SMEMBERS', REVOKED)) do
  local flag = redis.call('HGET', RESULTS, field)
  if flag then
    out[#out + 1] = field
    out[#out + 1] = flag
  end
end
return out
"""


_LUA_PLAIN = frozenset(string.ascii_letters + string.digits + '._:-')


def _lua_string(text):
    """``text`` as a Lua string literal: its UTF-8 bytes, all but ASCII letters, digits
    and ``._:-`` written as decimal escapes."""
    return '"' + ''.join(chr(b) if chr(b) in _LUA_PLAIN else f'\\{b:03d}'
                         for b in text.encode()) + '"'


def _fetch_script(storage):
    """The text of :data:`_FETCH` for ``storage``: its keys written in as constants."""
    constants = {'INDEX': storage.index_key, 'CONSUMERS': storage.consumers_key,
                 'RESULTS': storage.result_key, 'REVOKED': storage.revoked_types_key,
                 'INFLIGHT': storage.inflight_key(''), 'ALIVE': ALIVE.format('')}
    return ''.join(f'local {name} = {_lua_string(value)}\n'
                   for name, value in constants.items()) + _FETCH


# Many messages at once. KEYS: queue, index, wake, once-key. ARGV: member, score, member, score...
_ENQUEUE_MANY = _LUA_INDEX + _LUA_ONCE + """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i]) == 1 then
    count(KEYS[2], string.sub(ARGV[i], 9), 1)
  end
  n = n + 1
end
for _ = 1, math.min(n, LAST_TOKEN + 1) do redis.call('LPUSH', KEYS[3], '1') end
redis.call('LTRIM', KEYS[3], 0, LAST_TOKEN)
"""

# KEYS: in-flight, queue, index, wake. ARGV: member.
_NACK = _LUA_INDEX + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('ZADD', KEYS[2], score, ARGV[1]) == 1 then
  count(KEYS[3], string.sub(ARGV[1], 9), 1)
end
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, LAST_TOKEN)
return 1
"""

# KEYS: schedule, index, once-key. ARGV: data, score.
_SCHEDULE = _LUA_INDEX + _LUA_ONCE + """
if redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) == 1 then count(KEYS[2], ARGV[1], 1) end
"""

# Huey's read_schedule: pop what is due and hand it over. KEYS: schedule, index. ARGV: ts.
_POP_DUE = _LUA_INDEX + """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, data in ipairs(items) do
  redis.call('ZREM', KEYS[1], data)
  count(KEYS[2], data, -1)
end
return items
"""

# Move what is due into the queue, by priority, in one step.
# KEYS: schedule, queue, wake. ARGV: ts, limit.
_MOVE_DUE = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #items == 0 then return items end
local t = redis.call('TIME')
local base = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, data in ipairs(items) do
  redis.call('ZREM', KEYS[1], data)
  local priority = tonumber(string.match(data, '^qm1 [^ \\n]+ (%-?%d+)\\n') or '0')
  local n, prefix = base + i, ''
  for _ = 1, 8 do
    prefix = string.char(n % 256) .. prefix
    n = math.floor(n / 256)
  end
  redis.call('ZADD', KEYS[2], -priority, prefix .. data)
  if i <= LAST_TOKEN + 1 then redis.call('LPUSH', KEYS[3], '1') end
end
redis.call('LTRIM', KEYS[3], 0, LAST_TOKEN)
return items
"""

# The retry of a failed attempt replaces its claim in one step, and only while
# the claim holds: if the leader took the message back (it thought this
# consumer dead), no retry is written beside the one it made.
# KEYS: in-flight, queue, schedule, index, wake. ARGV: member, data, -priority, eta or ''.
_REQUEUE = _LUA_INDEX + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[4] == '' then
  local t = redis.call('TIME')
  local n, prefix = tonumber(t[1]) * 1000000 + tonumber(t[2]), ''
  for _ = 1, 8 do
    prefix = string.char(n % 256) .. prefix
    n = math.floor(n / 256)
  end
  redis.call('ZADD', KEYS[2], ARGV[3], prefix .. ARGV[2])
  redis.call('LPUSH', KEYS[5], '1')
  redis.call('LTRIM', KEYS[5], 0, LAST_TOKEN)
else
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
end
count(KEYS[4], ARGV[2], 1)
return 1
"""

# Take one waiting message out. KEYS: queue or schedule, index. ARGV: member, offset.
_REMOVE = _LUA_INDEX + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
count(KEYS[2], string.sub(ARGV[1], tonumber(ARGV[2]) + 1), -1)
return 1
"""

# Forget a consumer whose lease is gone and who holds nothing any more.
# KEYS: alive, consumers, in-flight. ARGV: consumer.
_RETIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('ZCARD', KEYS[3]) > 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""


class ReliableRedisStorage(_ByJobId, PriorityRedisStorage):
    """Huey's ``PriorityRedisStorage`` with reliable fetch, leases and an index.

    Keys beside Huey's queue and schedule sorted sets, for a storage named
    ``qm.default``: ``qm:inflight:qm.default:<consumer>`` (a sorted set of
    the queue members the consumer holds, scored as they were queued),
    ``qm:consumers:qm.default`` (who has ever fetched here),
    ``qm:index:qm.default`` (waiting messages per job id) and
    ``qm:wake:qm.default`` (a list idle workers block on, since a sorted set
    cannot be popped into another key while blocking). Liveness is
    ``qm:alive:<consumer>``, with a time to live of ``lease`` seconds. Each
    call that adds messages leaves ``qm:once:<random>`` for a minute, so a
    resent call adds nothing twice (see ``_LUA_ONCE``).
    """

    def __init__(self, name='huey', lease=30.0, **kwargs):
        super().__init__(name, **kwargs)
        self.lease = lease
        self.index_key = f'qm:index:{self.name}'
        self.wake_key = f'qm:wake:{self.name}'
        self.consumers_key = f'qm:consumers:{self.name}'
        self.revoked_types_key = f'qm:revoked-types:{self.name}'
        self._inflight_prefix = f'qm:inflight:{self.name}:'
        script = lambda lua: self.conn.register_script(  # noqa: E731
            lua.replace('LAST_TOKEN', str(WAKE_TOKENS - 1)))
        self._enqueue, self._nack = script(_ENQUEUE), script(_NACK)
        self._fetch = script(_fetch_script(self))
        self._schedule, self._pop_due = script(_SCHEDULE), script(_POP_DUE)
        self._move_due, self._remove = script(_MOVE_DUE), script(_REMOVE)
        self._retire = script(_RETIRE)
        self._enqueue_many = script(_ENQUEUE_MANY)
        self._requeue = script(_REQUEUE)
        # Set by the Huey that owns this storage: the job id of a message
        # without a header (an older message), or None.
        self.legacy_id = lambda body: None

    def inflight_key(self, consumer):
        return self._inflight_prefix + consumer

    # -- Huey's contract ----------------------------------------------------

    def enqueue(self, data, priority=None):
        self._enqueue(keys=[self.queue_key, self.index_key, self.wake_key, _once_key()],
                      args=[_prefix() + bytes(data), 0 if priority is None else -priority])

    def flush_queue(self):
        self.conn.delete(self.queue_key)
        self.rebuild_index()

    def put_many(self, entries):
        """Add many messages in one round trip: ``(data, priority, eta or None)`` each.

        A message with an ``eta`` (naive, Huey's clock) goes to the schedule,
        one without to the queue, as ``add_to_schedule`` and ``enqueue`` do.
        """
        calls, due = [], []
        for data, priority, eta in entries:
            if eta is None:
                due += (_prefix() + bytes(data), -(priority or 0))
            else:
                calls.append((self._schedule, [self.schedule_key, self.index_key, _once_key()],
                              [bytes(data), self.convert_ts(eta)]))
        # Messages due now in scripts of ENQUEUE_MANY (one call each, not one
        # per message): a batch of the API's largest is one call, so one
        # EVALSHA (see below).
        step = 2 * ENQUEUE_MANY  # two arguments a message
        for start in range(0, len(due), step):
            calls.append((self._enqueue_many, [self.queue_key, self.index_key, self.wake_key,
                                               _once_key()],
                          due[start:start + step]))
        if len(calls) == 1:
            # One script: called alone it is one EVALSHA, where a pipeline
            # first asks the server whether its scripts exist (a round trip).
            script, keys, args = calls[0]
            script(keys=keys, args=args)
            return
        pipe = self.conn.pipeline(transaction=False)
        for script, keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        pipe.execute()

    def add_to_schedule(self, data, ts):
        self._schedule(keys=[self.schedule_key, self.index_key, _once_key()],
                       args=[bytes(data), self.convert_ts(ts)])

    def read_schedule(self, ts):
        return self._pop_due(keys=[self.schedule_key, self.index_key],
                             args=[self.convert_ts(ts)]) or []

    def flush_schedule(self):
        self.conn.delete(self.schedule_key)
        self.rebuild_index()

    def flush_all(self):
        super().flush_all()
        keys = [self.wake_key, self.index_key, self.consumers_key, self.revoked_types_key,
                *self.conn.scan_iter(match=self._inflight_prefix + '*', count=1000)]
        self.conn.delete(*keys)

    # -- reliable fetch -----------------------------------------------------

    def fetch(self, consumer, unflag=None):
        """Move the next message into ``consumer``'s in-flight record.

        Returns a :class:`Delivery` (with the revocation flags that could
        stop it, when its header names its job), or None when the queue stays
        empty for ``read_timeout`` seconds. Also renews the consumer's lease.
        ``unflag`` is a revocation flag (a key of Huey's results hash) to
        delete first, in the same round trip. Raises redis errors (Huey's
        worker backs off on them).
        """
        keys = [self.queue_key]
        args = [consumer, int(self.lease * 1000), unflag or '']
        reply = self._fetch(keys=keys, args=args)
        if reply is None and self.blocking:
            # Idle: block on the wake list (each enqueue leaves a token), with
            # the fetch pipelined behind it, so Redis runs it the moment the
            # token arrives: one round trip, as Huey's BZPOPMIN.
            args[2] = ''
            pipe = self.conn.pipeline(transaction=False)
            pipe.blpop([self.wake_key], timeout=self.read_timeout)
            self._fetch(keys=keys, args=args, client=pipe)
            try:
                _token, reply = pipe.execute()
            except (TimeoutError, TypeError, IndexError):
                return None
        if not reply:
            return None
        member, revocations = reply[0], None
        if len(reply) > 1:
            revocations = {reply[i].decode(): reply[i + 1] for i in range(1, len(reply), 2)}
        return Delivery(member[8:], Receipt(self.name, consumer, member), revocations)

    def note_revoked_type(self, key):
        """Note that ``key`` (Huey's ``rt:<task type>`` key) may hold a revocation flag.

        :meth:`fetch` reads the flags of the noted types with each message.
        Notes are never removed: a type whose flag is gone costs a lookup.
        """
        self.conn.sadd(self.revoked_types_key, key)

    def ack(self, receipts):
        """Drop acknowledged messages from their consumers' in-flight records."""
        by_key = {}
        for r in receipts:
            by_key.setdefault(self.inflight_key(r.consumer), []).append(r.token)
        if by_key:
            pipe = self.conn.pipeline(transaction=False)
            for key, members in by_key.items():
                pipe.zrem(key, *members)
            pipe.execute()

    def nack(self, receipt):
        """Put a fetched message back at its place in the queue; True if it was in flight."""
        return bool(self._nack(keys=[self.inflight_key(receipt.consumer), self.queue_key,
                                     self.index_key, self.wake_key], args=[receipt.token]))

    def holds(self, receipt):
        """Whether the fetch ``receipt`` stands for is still in its consumer's in-flight record."""
        return self.conn.zscore(self.inflight_key(receipt.consumer), receipt.token) is not None

    def requeue(self, receipt, data, priority=None, eta=None):
        """Replace a claim by a new message (a retry), only while the claim holds.

        ``eta`` (naive, Huey's clock) schedules it, None queues it now.
        Returns False, writing nothing, when the claim was taken back.
        """
        return bool(self._requeue(
            keys=[self.inflight_key(receipt.consumer), self.queue_key, self.schedule_key,
                  self.index_key, self.wake_key],
            args=[receipt.token, bytes(data), -(priority or 0),
                  '' if eta is None else self.convert_ts(eta)]))

    def keep_alive(self, consumer):
        """Renew ``consumer``'s lease for ``lease`` seconds."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.set(ALIVE.format(consumer), b'1', px=int(self.lease * 1000))
        pipe.sadd(self.consumers_key, consumer)
        pipe.execute()

    def release(self, consumer):
        """End ``consumer``'s lease now (it stopped); forget it if it holds nothing."""
        self.conn.delete(ALIVE.format(consumer))
        self.retire(consumer)

    def retire(self, consumer):
        """Forget a consumer whose lease ended and who holds nothing; True if forgotten."""
        return bool(self._retire(keys=[ALIVE.format(consumer), self.consumers_key,
                                       self.inflight_key(consumer)], args=[consumer]))

    def consumers(self):
        """``{consumer: alive}`` for every consumer that fetched here and is not forgotten."""
        names = sorted(n.decode() for n in self.conn.smembers(self.consumers_key))
        if not names:
            return {}
        pipe = self.conn.pipeline(transaction=False)
        for name in names:
            pipe.exists(ALIVE.format(name))
        return dict(zip(names, (bool(x) for x in pipe.execute())))

    def alive(self, consumers):
        """The subset of ``consumers`` whose lease is current."""
        consumers = list(consumers)
        if not consumers:
            return set()
        pipe = self.conn.pipeline(transaction=False)
        for name in consumers:
            pipe.exists(ALIVE.format(name))
        return {c for c, x in zip(consumers, pipe.execute()) if x}

    def inflight(self, consumer):
        """What ``consumer`` holds: a list of :class:`InFlight`, oldest first."""
        return [InFlight(Receipt(self.name, consumer, member), member[8:],
                         self._job_id(member[8:]))
                for member in self.conn.zrange(self.inflight_key(consumer), 0, -1)]

    def inflight_job_ids(self):
        """Job ids of every message any consumer holds here."""
        ids = set()
        for consumer in self.conn.smembers(self.consumers_key):
            for item in self.inflight(consumer.decode()):
                ids.add(item.job_id)
        ids.discard(None)
        return ids

    # -- the schedule -------------------------------------------------------

    def move_due(self, ts, limit=1000):
        """Move up to ``limit`` messages due at ``ts`` into the queue; return their bytes."""
        return self._move_due(keys=[self.schedule_key, self.queue_key, self.wake_key],
                              args=[self.convert_ts(ts), limit]) or []

    # -- by job id ----------------------------------------------------------

    def held(self, job_ids):
        """The subset of ``job_ids`` with a message waiting in the queue or schedule."""
        job_ids = list(job_ids)
        if not job_ids:
            return set()
        counts = self.conn.hmget(self.index_key, job_ids)
        return {j for j, n in zip(job_ids, counts) if n is not None and int(n) > 0}

    def waiting_messages(self, match=None):
        """Every waiting message, as ``(job id, bytes, remove)``; ``remove()`` says if it was there.

        ``match`` (a job id) narrows the scan to messages containing it.
        """
        pattern = f'*{match}*' if match else None
        for key, skip in ((self.queue_key, 8), (self.schedule_key, 0)):
            for member, _score in self.conn.zscan_iter(key, match=pattern, count=1000):
                data = member[skip:]
                yield (self._job_id(data), data,
                       lambda key=key, member=member, skip=skip: bool(self._remove(
                           keys=[key, self.index_key], args=[member, skip])))

    def index_ok(self):
        """Whether the index counts exactly the messages the queue and schedule hold."""
        pipe = self.conn.pipeline(transaction=True)  # one snapshot: fetches run meanwhile
        pipe.hget(self.index_key, '*')
        pipe.zcard(self.queue_key)
        pipe.zcard(self.schedule_key)
        total, queued, scheduled = pipe.execute()
        return int(total or 0) == queued + scheduled

    def rebuild_index(self):
        """Count the waiting messages again, from the queue and schedule themselves."""
        counts = {}
        for job_id, _data, _remove in self.waiting_messages():
            if job_id is not None:
                counts[job_id] = counts.get(job_id, 0) + 1
        temp = self.index_key + ':rebuild'
        pipe = self.conn.pipeline(transaction=True)
        pipe.delete(temp)
        items = list(counts.items())
        for i in range(0, len(items), 1000):
            pipe.hset(temp, mapping=dict(items[i:i + 1000]))
        pipe.hset(temp, '*', sum(counts.values()))
        pipe.rename(temp, self.index_key)
        pipe.execute()

    # -- the broker's identity ---------------------------------------------

    def get_epoch(self):
        value = self.conn.get(EPOCH)
        return None if value is None else value.decode()

    def set_epoch(self, value):
        self.conn.set(EPOCH, value)

    def tick(self):
        """Advance the broker's pass counter; return its new value (1 when it had none)."""
        return int(self.conn.incr(CLOCK))

    # -- components' liveness ---------------------------------------------

    def mark_seen(self, component, at):
        """Note that ``component`` did its work at ``at`` (Unix seconds)."""
        self.conn.hset(COMPONENTS, component, repr(float(at)))

    def seen(self):
        """``{component: Unix seconds}`` of each component's last :meth:`mark_seen`."""
        return {k.decode(): float(v) for k, v in self.conn.hgetall(COMPONENTS).items()}


# -- SQLite (the embedded mode) --------------------------------------------------

# The job id in a message's header (b'qm1 <id> <priority>\n'), as SQL: indexed,
# so lookups by job id do not scan the queue.
_JOB_SQL = "substr(data, 5, instr(substr(data, 5, 80), X'20') - 1)"


class ReliableSqliteStorage(_ByJobId, SqliteStorage):
    """Huey's ``SqliteStorage`` with the same reliable fetch, for the embedded mode.

    Extra tables in the same file: ``qm_inflight`` (one row per message a
    consumer holds) and ``qm_alive`` (each consumer's lease expiry, in Unix
    seconds). Indexes on the job id in each message's header make lookups by
    job id cheap.
    """
    ddl = SqliteStorage.ddl + [
        # AUTOINCREMENT: a receipt (the row id) must never name a later row.
        'create table if not exists qm_inflight (id integer not null primary key autoincrement, '
        'queue text not null, consumer text not null, data blob not null, '
        'priority real not null default 0.0, taken_at real not null, task_id integer)',
        'create index if not exists qm_inflight_consumer on qm_inflight (queue, consumer)',
        'create table if not exists qm_alive (consumer text not null primary key, '
        'expires real not null)',
        'create table if not exists qm_component (name text not null primary key, '
        'seen real not null)',
        f'create index if not exists qm_task_job on task (queue, {_JOB_SQL})',
        f'create index if not exists qm_schedule_job on schedule (queue, {_JOB_SQL})',
    ]

    def __init__(self, name='huey', filename='huey.db', lease=30.0, **kwargs):
        self.lease = lease
        self.legacy_id = lambda body: None
        super().__init__(name, filename, **kwargs)

    def flush_all(self):
        super().flush_all()
        self.sql('delete from qm_inflight where queue = ?', (self.name,), commit=True)

    def fetch(self, consumer, unflag=None):
        """As :meth:`ReliableRedisStorage.fetch`; never blocks (the worker polls), and
        reads no revocation flags (Huey reads them before running the message)."""
        if unflag:
            self.delete_data(unflag)
        if not self.sql('select 1 from task where queue = ? limit 1', (self.name,),
                        results=True):
            self.keep_alive(consumer)
            return None
        now = time.time()
        with self.db(commit=True) as curs:
            curs.execute('select id, data, priority from task where queue = ? '
                         'order by priority desc, id limit 1', (self.name,))
            row = curs.fetchone()
            self._lease(curs, consumer, now)
            if row is None:
                return None
            curs.execute('delete from task where id = ?', (row[0],))
            curs.execute('insert into qm_inflight (queue, consumer, data, priority, taken_at, '
                         'task_id) values (?, ?, ?, ?, ?, ?)',
                         (self.name, consumer, row[1], row[2], now, row[0]))
            token = curs.lastrowid
        return Delivery(bytes(row[1]), Receipt(self.name, consumer, token))

    def put_many(self, entries):
        """As :meth:`ReliableRedisStorage.put_many`, in one transaction."""
        with self.db(commit=True) as curs:
            for data, priority, eta in entries:
                self._put(curs, data, priority, eta)

    def _put(self, curs, data, priority, eta):
        # The queue when due now, the schedule for later.
        if eta is None:
            curs.execute('insert into task (queue, data, priority) values (?, ?, ?)',
                         (self.name, self.to_blob(data), priority or 0))
        else:
            curs.execute('insert into schedule (queue, data, timestamp) values (?, ?, ?)',
                         (self.name, self.to_blob(data), eta.timestamp()))

    def _lease(self, curs, consumer, now):
        curs.execute('insert into qm_alive (consumer, expires) values (?, ?) '
                     'on conflict (consumer) do update set expires = excluded.expires',
                     (consumer, now + self.lease))

    def ack(self, receipts):
        tokens = [r.token for r in receipts]
        for i in range(0, len(tokens), 500):
            chunk = tokens[i:i + 500]
            self.sql(f'delete from qm_inflight where id in ({",".join("?" * len(chunk))})',
                     chunk, commit=True)

    def nack(self, receipt):
        with self.db(commit=True) as curs:
            curs.execute('select data, priority, task_id from qm_inflight where id = ?',
                         (receipt.token,))
            row = curs.fetchone()
            if row is None:
                return False
            curs.execute('delete from qm_inflight where id = ?', (receipt.token,))
            # Back at its place (its old row id orders it), unless that id was reused.
            curs.execute('insert into task (id, queue, data, priority) select ?, ?, ?, ? '
                         'where not exists (select 1 from task where id = ?)',
                         (row[2], self.name, row[0], row[1], row[2]))
            if curs.rowcount == 0:
                curs.execute('insert into task (queue, data, priority) values (?, ?, ?)',
                             (self.name, row[0], row[1]))
        return True

    def holds(self, receipt):
        return bool(self.sql('select 1 from qm_inflight where id = ?', (receipt.token,),
                             results=True))

    def requeue(self, receipt, data, priority=None, eta=None):
        with self.db(commit=True) as curs:
            curs.execute('delete from qm_inflight where id = ?', (receipt.token,))
            if curs.rowcount == 0:
                return False
            self._put(curs, data, priority, eta)
        return True

    def keep_alive(self, consumer):
        with self.db(commit=True) as curs:
            self._lease(curs, consumer, time.time())

    def release(self, consumer):
        self.sql('delete from qm_alive where consumer = ?', (consumer,), commit=True)

    def retire(self, consumer):
        with self.db(commit=True) as curs:
            curs.execute('select 1 from qm_inflight where consumer = ? limit 1', (consumer,))
            if curs.fetchone() is not None:
                return False
            curs.execute('delete from qm_alive where consumer = ? and expires <= ?',
                         (consumer, time.time()))
            return True

    def consumers(self):
        rows = self.sql('select consumer from qm_inflight where queue = ? '
                        'union select consumer from qm_alive', (self.name,), results=True)
        names = sorted(c for c, in rows)
        alive = self.alive(names)
        return {c: c in alive for c in names}

    def alive(self, consumers):
        consumers = list(consumers)
        if not consumers:
            return set()
        rows = self.sql(f'select consumer from qm_alive where expires > ? and consumer in '
                        f'({",".join("?" * len(consumers))})', [time.time(), *consumers],
                        results=True)
        return {c for c, in rows}

    def inflight(self, consumer):
        rows = self.sql('select id, data from qm_inflight where queue = ? and consumer = ? '
                        'order by id', (self.name, consumer), results=True)
        return [InFlight(Receipt(self.name, consumer, row_id), bytes(data),
                         self._job_id(bytes(data))) for row_id, data in rows]

    def inflight_job_ids(self):
        rows = self.sql('select data from qm_inflight where queue = ?', (self.name,),
                        results=True)
        return {j for j in (self._job_id(bytes(d)) for d, in rows) if j is not None}

    def move_due(self, ts, limit=1000):
        with self.db(commit=True) as curs:
            curs.execute('select id, data from schedule where queue = ? and timestamp <= ? '
                         'order by timestamp, id limit ?', (self.name, ts.timestamp(), limit))
            rows = curs.fetchall()
            for row_id, data in rows:
                curs.execute('delete from schedule where id = ?', (row_id,))
                curs.execute('insert into task (queue, data, priority) values (?, ?, ?)',
                             (self.name, data, message.split(data)[0].priority))
        return [bytes(data) for _id, data in rows]

    def held(self, job_ids):
        job_ids = [j for j in job_ids if isinstance(j, str)]
        found = set()
        for i in range(0, len(job_ids), 500):
            chunk = [j.encode() for j in job_ids[i:i + 500]]
            marks = ','.join('?' * len(chunk))
            for table in ('task', 'schedule'):
                for raw, in self.sql(f'select {_JOB_SQL} from {table} '
                                     f'where queue = ? and {_JOB_SQL} in ({marks})',
                                     [self.name, *chunk], results=True):
                    found.add(bytes(raw).decode())
        return found

    def waiting_messages(self, match=None):
        where, args = 'queue = ?', (self.name,)
        if match:
            where, args = where + ' and instr(data, ?) > 0', args + (match.encode(),)
        for table in ('task', 'schedule'):
            rows = self.sql(f'select id, data from {table} where {where}', args, results=True)
            for row_id, data in rows:
                yield (self._job_id(bytes(data)), bytes(data),
                       lambda table=table, row_id=row_id: self._delete_row(table, row_id))

    def _delete_row(self, table, row_id):
        with self.db(commit=True) as curs:
            curs.execute(f'delete from {table} where id = ?', (row_id,))
            return curs.rowcount == 1

    def index_ok(self):
        return True  # the indexes are SQLite's own

    def rebuild_index(self):
        pass

    def get_epoch(self):
        rows = self.sql("select value from kv where queue = 'qm' and key = ?", (EPOCH,),
                        results=True)
        return bytes(rows[0][0]).decode() if rows else None

    def set_epoch(self, value):
        self.sql("insert or replace into kv (queue, key, value) values ('qm', ?, ?)",
                 (EPOCH, value.encode()), commit=True)

    def tick(self):
        with self.db(commit=True) as curs:
            curs.execute("select value from kv where queue = 'qm' and key = ?", (CLOCK,))
            row = curs.fetchone()
            value = (int(bytes(row[0])) if row else 0) + 1
            curs.execute("insert or replace into kv (queue, key, value) values ('qm', ?, ?)",
                         (CLOCK, str(value).encode()))
        return value

    def mark_seen(self, component, at):
        """As :meth:`ReliableRedisStorage.mark_seen`."""
        self.sql('insert into qm_component (name, seen) values (?, ?) on conflict (name) '
                 'do update set seen = excluded.seen', (component, float(at)), commit=True)

    def seen(self):
        """As :meth:`ReliableRedisStorage.seen`."""
        return dict(self.sql('select name, seen from qm_component', results=True))

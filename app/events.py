"""The event channel: small "these jobs changed" notes after each ledger write.

Consumers and web processes publish; each web process listens and re-reads
the ledger for what its clients show. Redis pub/sub carries the notes between
processes and hosts; the embedded mode uses an in-process bus instead.
An event is a dict: ``{"jobs": [{"id", "state", "queue", "task"}],
"deleted": [ids], "workers": true, "queues": true, "periodic": true}`` (keys
left out when empty). Events are hints, never the truth: a lost one only
delays a refresh, so publishing never raises.
"""
import json
import logging
import threading
import time

logger = logging.getLogger(__name__)

CHANNEL = 'queue-manager:events'


class LocalBus:
    """Delivers events to callbacks in this process (the embedded mode)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers = []
        self.connected = False  # whether events from other processes are heard now

    def publish(self, event):
        """Hand ``event`` (a dict) to every subscriber; one that raises is logged."""
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                logger.exception('event subscriber failed')

    def subscribe(self, callback):
        """Call ``callback(event)`` for every event; returns an unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe():
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    def listen(self, stop, every=1.0, on_tick=None, on_reconnect=None):
        """Hear events from every process until ``stop`` (an Event) is set; blocks.

        Events reach this process's subscribers (:meth:`subscribe`).
        ``on_tick()`` is called about every ``every`` seconds whatever the
        traffic; ``on_reconnect()`` when the channel is back after it was
        lost (events published meanwhile were missed). In one process every
        event is delivered as it is published, so this only ticks.
        """
        self.connected = True
        while not stop.wait(every):
            if on_tick is not None:
                on_tick()


class RedisBus(LocalBus):
    """Publishes to a Redis channel; subscribers in this process hear all hosts."""

    def __init__(self, client):
        super().__init__()
        self.client = client

    def publish(self, event):
        """Send ``event`` to every process on the channel; never raises (the ledger has it)."""
        try:
            self.client.publish(CHANNEL, json.dumps(event, separators=(',', ':')))
        except Exception as exc:  # the ledger has it; a refresh heals the miss
            logger.warning('event not published: %s', exc)

    def listen(self, stop, every=1.0, on_tick=None, on_reconnect=None):
        """The one loop that reads the Redis channel (see :meth:`LocalBus.listen`).

        A lost connection is retried with backoff (0.4 s doubling to 5 s);
        ``connected`` says whether the channel is reachable now.
        """
        failures = 0
        next_tick = time.monotonic() + every
        while not stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                if failures:
                    logger.info('event channel back after %d failed attempts', failures)
                    if on_reconnect is not None:
                        on_reconnect()
                failures = 0
                self.connected = True
                while not stop.is_set():
                    message = pubsub.get_message(timeout=max(0.0, next_tick - time.monotonic()))
                    if message and message['type'] == 'message':
                        self.deliver(message['data'])
                    if time.monotonic() >= next_tick:
                        next_tick = time.monotonic() + every
                        if on_tick is not None:
                            on_tick()
            except Exception as exc:
                failures += 1
                if self.connected:
                    logger.warning('event channel lost (%s); retrying', exc)
                self.connected = False
                stop.wait(min(5.0, 0.2 * 2 ** min(failures, 5)))
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def deliver(self, raw):
        """Hand a message received from the channel to local subscribers."""
        try:
            event = json.loads(raw)
        except ValueError:
            logger.warning('ignored a malformed event: %.200r', raw)
            return
        super().publish(event)


bus = LocalBus()


def configure(redis_client):
    """Use Redis pub/sub when a client is given, else the in-process bus."""
    global bus
    if redis_client is None:
        if not isinstance(bus, LocalBus) or isinstance(bus, RedisBus):
            bus = LocalBus()
    elif not isinstance(bus, RedisBus) or bus.client.connection_pool is not redis_client.connection_pool:
        bus = RedisBus(redis_client)
    return bus


def job_change(job_id, state, queue, task, version=None):
    """One changed job as an event carries it: ``{"id", "state", "queue", "task"[, "version"]}``.

    ``version`` is the row's version once the change is committed, when
    the publisher knows it (live pages skip a render they already did).
    """
    change = {'id': job_id, 'state': state, 'queue': queue, 'task': task}
    if version is not None:
        change['version'] = version
    return change


def publish(jobs=(), deleted=(), workers=False, queues=False, periodic=False, audit=False,
            sessions=(), alerts=False):
    """Announce changed jobs (:func:`job_change` dicts), deleted job ids, whether
    consumers, queues, periodic tasks, the audit log or the alerts changed, and the
    users whose sessions ended (names)."""
    event = {}
    if jobs:
        event['jobs'] = list(jobs)
    if deleted:
        event['deleted'] = list(deleted)
    if workers:
        event['workers'] = True
    if queues:
        event['queues'] = True
    if periodic:
        event['periodic'] = True
    if audit:
        event['audit'] = True
    if sessions:
        event['sessions'] = list(sessions)
    if alerts:
        event['alerts'] = True
    if event:
        bus.publish(event)

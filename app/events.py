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

logger = logging.getLogger(__name__)

CHANNEL = 'queue-manager:events'


class LocalBus:
    """Delivers events to callbacks in this process (the embedded mode)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers = []

    def publish(self, event):
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


class RedisBus(LocalBus):
    """Publishes to a Redis channel; subscribers in this process hear all hosts."""

    def __init__(self, client):
        super().__init__()
        self.client = client

    def publish(self, event):
        try:
            self.client.publish(CHANNEL, json.dumps(event, separators=(',', ':')))
        except Exception as exc:  # the ledger has it; a refresh heals the miss
            logger.warning('event not published: %s', exc)

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


def publish(jobs=(), deleted=(), workers=False, queues=False, periodic=False):
    """Announce changed job rows (dicts with id, state, queue, task and maybe
    version), deleted job ids, and whether consumers, queues or periodic tasks changed."""
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
    if event:
        bus.publish(event)

"""The event bus: publish, subscribe, and the one loop that listens."""
import threading

import redis
from helpers import wait_for

from app import events


def listening(bus, **kwargs):
    """Run ``bus.listen`` in a thread; returns (stop event, thread)."""
    stop = threading.Event()
    thread = threading.Thread(target=bus.listen, args=(stop,), kwargs=kwargs, daemon=True)
    thread.start()
    return stop, thread


def test_in_one_process_events_reach_subscribers_at_once_and_listen_only_ticks():
    bus = events.LocalBus()
    heard, ticks = [], []
    unsubscribe = bus.subscribe(heard.append)
    stop, thread = listening(bus, every=0.02, on_tick=lambda: ticks.append(1))
    bus.publish({'queues': True})
    assert heard == [{'queues': True}]
    wait_for(lambda: len(ticks) >= 3, 5, message='ticks')
    unsubscribe()
    bus.publish({'workers': True})
    assert heard == [{'queues': True}]
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_a_failing_subscriber_costs_only_itself():
    bus = events.LocalBus()
    heard = []
    bus.subscribe(lambda event: 1 / 0)
    bus.subscribe(heard.append)
    bus.publish({'jobs': [{'id': 'a'}]})
    assert heard == [{'jobs': [{'id': 'a'}]}]


def test_over_redis_every_process_hears_and_ticks_go_on_under_traffic(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    bus = events.RedisBus(client)
    heard, ticks = [], []
    bus.subscribe(heard.append)
    stop, thread = listening(bus, every=0.1, on_tick=lambda: ticks.append(1))
    try:
        wait_for(lambda: bus.connected and client.pubsub_numsub(events.CHANNEL)[0][1], 10,
                 message='the listener to subscribe')
        other = events.RedisBus(redis.Redis.from_url(redis_server.url))  # another process's
        for n in range(30):
            other.publish({'jobs': [{'id': str(n)}]})
            stop.wait(0.02)
        wait_for(lambda: len(heard) == 30, 10, message='every event')
        assert [e['jobs'][0]['id'] for e in heard] == [str(n) for n in range(30)]
        assert len(ticks) >= 3  # 0.6 s of steady traffic, a tick every 0.1 s
        client.publish(events.CHANNEL, b'{not json')  # ignored, not fatal
        other.publish({'queues': True})
        wait_for(lambda: heard[-1] == {'queues': True}, 10, message='the event after junk')
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_job_change_carries_its_version_only_when_known():
    assert events.job_change('j1', 'queued', 'default', 'noop') == {
        'id': 'j1', 'state': 'queued', 'queue': 'default', 'task': 'noop'}
    assert events.job_change('j1', 'running', 'default', 'noop', 3)['version'] == 3

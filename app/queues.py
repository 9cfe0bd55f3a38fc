"""Queues: what waits, runs and fails in each, how fast they drain, pausing."""
from . import broker, controls, events, queries, states
from .extensions import db


def overview(config):
    """Every configured queue, with its broker depth and its ledger counts."""
    counts = queries.stats()['queues']
    recent = queries.finished_per_queue()
    result = []
    paused_queues = controls.paused_queues()
    for name in config['QUEUES']:
        by_state = counts.get(name, dict.fromkeys(states.JOB_STATES, 0))
        paused = name in paused_queues
        try:
            waiting, scheduled = broker.depth(name)
        except broker.BrokerUnavailable:
            waiting = scheduled = None
        done = recent.get(name, {})
        result.append({
            'name': name, 'paused': paused,
            # messages Huey holds: ready to run, and due later (delays, retries)
            'depth': waiting, 'scheduled_messages': scheduled,
            'queued': by_state['queued'], 'scheduled': by_state['scheduled'],
            'running': by_state['running'], 'retrying': by_state['retrying'],
            'failed': by_state['failed'], 'succeeded': by_state['succeeded'],
            # jobs finished per minute, over the last minute and the last 15
            'per_minute': done.get(60, 0), 'per_minute_15': round(done.get(900, 0) / 15, 1),
        })
    return result


def find(config, name):
    from werkzeug.exceptions import NotFound
    if name not in config['QUEUES']:
        raise NotFound(f'no queue named {name}')
    return name


def pause(config, name):
    """Pause queue ``name``: its jobs stay queued, no worker takes one; its overview row.

    The switch is kept in the ledger (a broker that loses its data must not
    resume a paused queue); consumers hear of it on the event channel at
    once, and re-read it every second in case they missed that. Raises
    NotFound for a name not in ``QUEUES``.
    """
    return _switch(config, name, True)


def resume(config, name):
    """Let workers take queue ``name``'s jobs again; its overview row (see :func:`pause`)."""
    return _switch(config, name, False)


def _switch(config, name, paused):
    controls.put(controls.QUEUE_PAUSED.format(find(config, name)), paused)
    db.session.commit()
    events.publish(queues=True)
    return next(q for q in overview(config) if q['name'] == name)

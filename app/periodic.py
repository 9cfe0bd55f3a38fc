"""Periodic jobs: declared with a crontab in huey_tasks, started by the leading consumer."""
import datetime as dt
import logging

import sqlalchemy as sa
from werkzeug.exceptions import NotFound

from . import broker, catalog, events, jobs
from .extensions import db
from .models import Job, utcnow

logger = logging.getLogger(__name__)

LOOKAHEAD = dt.timedelta(days=8)  # how far ahead the next run is searched for


def launch_due(timestamp):
    """Start every periodic job due at ``timestamp`` (naive UTC), unless paused."""
    from . import consumer
    app = consumer.current_app()
    if app is None:
        return
    with app.app_context():
        for entry in catalog.PERIODIC.values():
            if not entry.validate(timestamp):
                continue
            try:
                if broker.is_periodic_paused(entry.name):
                    continue
                job = trigger(entry.name, app.config)
                logger.info('periodic: started %s as job %s', entry.name, job.id)
            except Exception:
                db.session.rollback()
                logger.exception('periodic: %s not started', entry.name)


def find(name):
    """The periodic task ``name``; 404 if none is declared."""
    if name not in catalog.PERIODIC:
        raise NotFound(f'no periodic task named {name}')
    return catalog.PERIODIC[name]


def trigger(name, config):
    """Start the periodic task ``name`` now, as an ordinary job."""
    entry = find(name)
    return jobs.submit(catalog.validate({'task': name, 'params': entry.params}, config))


def pause(name, paused):
    """Stop (or resume) starting ``name`` on its schedule; return its overview row."""
    broker.set_periodic_paused(find(name).name, paused)
    events.publish(periodic=True)
    return next(r for r in overview() if r['name'] == name)


def next_run(entry, now=None):
    """The next minute the schedule is due, or None if not within ``LOOKAHEAD``."""
    at = (now or utcnow()).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    end = at + LOOKAHEAD
    while at < end:
        if entry.validate(at):
            return at
        at += dt.timedelta(minutes=1)
    return None


def overview():
    """Every periodic task: schedule, paused, last job, next run."""
    rows = []
    for entry in catalog.PERIODIC.values():
        last = db.session.scalars(
            sa.select(Job).where(Job.task == entry.name)
            .order_by(Job.created_at.desc(), Job.id.desc()).limit(1)).first()
        try:
            paused = broker.is_periodic_paused(entry.name)
        except broker.BrokerUnavailable:
            paused = None
        rows.append({'name': entry.name, 'description': entry.task.description,
                     'schedule': entry.schedule, 'params': entry.params, 'paused': paused,
                     'last': last, 'next_run': None if paused else next_run(entry)})
    return rows

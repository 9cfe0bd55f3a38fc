"""Periodic jobs: declared with a crontab in huey_tasks, started by the leading consumer.

Huey's scheduler asks for periodic tasks once a minute (``read_periodic``);
the consumer process passes that timestamp to its :class:`Launcher`, which,
while the process leads, starts every periodic job due in the minutes since
the last one handled. That minute (the watermark) is kept in the ledger, so
a new leader takes over where the old one stopped: a tick the old leader
was killed just before is started by the next, within ``PERIODIC_CATCH_UP``
seconds. Each tick's job carries the idempotency key
``periodic:<name>:<minute>``, so it starts exactly once however many
consumers, leaders or retries see that minute.
"""
import datetime as dt
import logging
import threading
import time

import sqlalchemy as sa
from werkzeug.exceptions import NotFound

from . import catalog, controls, events, jobs
from .extensions import db
from .models import Job, utcnow

logger = logging.getLogger(__name__)

LOOKAHEAD = dt.timedelta(days=8)  # how far ahead the next run is searched for
MINUTE = dt.timedelta(minutes=1)


def tick_key(name, minute):
    """The idempotency key of the job ``name`` started for ``minute`` (naive UTC)."""
    return f'periodic:{name}:{minute:%Y-%m-%dT%H:%M}Z'


def launch_due(now, config):
    """Start every periodic job due from the watermark up to ``now`` (naive UTC).

    Looks back at most ``PERIODIC_CATCH_UP`` seconds; paused tasks are
    skipped. Returns the jobs started (or found already started). Needs an
    app context; commits.
    """
    minute = now.replace(second=0, microsecond=0)
    mark = controls.get(controls.PERIODIC_WATERMARK)
    earliest = minute - dt.timedelta(seconds=config['PERIODIC_CATCH_UP'])
    start = minute if mark is None else max(dt.datetime.fromisoformat(mark) + MINUTE, earliest)
    paused = controls.paused_periodic()
    started, failed_at = [], None
    at = start
    while at <= minute:
        for entry in catalog.PERIODIC.values():
            if entry.name in paused or not entry.validate(at):
                continue
            try:
                job = trigger(entry.name, config, tick=at)
                started.append(job)
                if job.created:
                    logger.info('periodic: started %s for %s as job %s', entry.name,
                                f'{at:%Y-%m-%d %H:%M}', job.id)
            except Exception:
                db.session.rollback()
                logger.exception('periodic: %s for %s not started', entry.name, at)
                failed_at = at if failed_at is None else min(failed_at, at)
        at += MINUTE
    if start <= minute:
        # Ticks that failed are tried again by the next pass.
        done = minute if failed_at is None else failed_at - MINUTE
        if mark is None or done > dt.datetime.fromisoformat(mark):
            controls.put(controls.PERIODIC_WATERMARK, done.isoformat())
            db.session.commit()
    return started


class Launcher:
    """Starts periodic jobs from this process while it leads.

    ``tick(timestamp)`` (Huey's scheduler's minute, through the Huey's
    ``on_periodic`` hook) and ``poke()`` (leadership was just taken) wake
    it; it also wakes on its own just after each minute begins, so ticks
    start on time, and a consumer started without Huey's periodic
    scheduling still starts them when it leads.
    """

    def __init__(self, app, leading):
        self.app = app
        self.leading = leading  # () -> bool
        self._wake = threading.Event()
        self._latest = None
        self._lock = threading.Lock()

    def tick(self, timestamp):
        with self._lock:
            self._latest = timestamp
        self._wake.set()

    def poke(self):
        self._wake.set()

    def run(self, stop):
        """Launch until ``stop`` (an Event) is set."""
        while not stop.is_set():
            # Wake just after each minute begins, so a tick starts on time
            # whatever the phase of Huey's once-a-minute scheduler check.
            self._wake.wait(60.5 - time.time() % 60)
            self._wake.clear()
            if stop.is_set():
                return
            self.step()

    def step(self):
        """One pass: start what is due at the latest tick (or now), if leading."""
        with self._lock:
            now, self._latest = self._latest or utcnow(), None
        if not self.leading() or not self.app.config['PERIODIC']:
            return []
        with self.app.app_context():
            try:
                return [job.id for job in launch_due(now, self.app.config)]
            except Exception:
                db.session.rollback()
                logger.exception('periodic: launch pass failed')
                return []
            finally:
                db.session.remove()


def find(name):
    """The periodic task ``name``; 404 if none is declared."""
    if name not in catalog.PERIODIC:
        raise NotFound(f'no periodic task named {name}')
    return catalog.PERIODIC[name]


def trigger(name, config, tick=None):
    """Start the periodic task ``name`` as an ordinary job; for ``tick`` (a minute), once."""
    entry = find(name)
    data = {'task': name, 'params': entry.params}
    if tick is not None:
        data['idempotency_key'] = tick_key(name, tick)
    return jobs.submit(catalog.validate(data, config))


def pause(name):
    """Stop starting periodic task ``name`` on its schedule; its overview row.

    Kept in the ledger, which the leader reads at every tick. Raises
    NotFound for a name that is not a periodic task.
    """
    return _switch(name, True)


def resume(name):
    """Start periodic task ``name`` on its schedule again; its overview row."""
    return _switch(name, False)


def _switch(name, paused):
    controls.put(controls.PERIODIC_PAUSED.format(find(name).name), paused)
    db.session.commit()
    events.publish(periodic=True)
    return next(r for r in overview() if r['name'] == name)


def next_run(entry, now=None):
    """The next minute the schedule is due, or None if not within ``LOOKAHEAD``."""
    at = (now or utcnow()).replace(second=0, microsecond=0) + MINUTE
    end = at + LOOKAHEAD
    while at < end:
        if entry.validate(at):
            return at
        at += MINUTE
    return None


def overview():
    """Every periodic task: schedule, paused, last job, next run."""
    rows = []
    paused_names = controls.paused_periodic()
    for entry in catalog.PERIODIC.values():
        last = db.session.scalars(
            sa.select(Job).where(Job.task == entry.name)
            .order_by(Job.created_at.desc(), Job.id.desc()).limit(1)).first()
        paused = entry.name in paused_names
        rows.append({'name': entry.name, 'description': entry.task.description,
                     'schedule': entry.schedule, 'params': entry.task.split(entry.params)[0],
                     'paused': paused,
                     'last': last, 'next_run': None if paused else next_run(entry)})
    return rows

"""Lost jobs: what a consumer that died mid-run left behind.

Huey drops a message once a worker takes it, so a consumer killed outright
(SIGKILL, OOM, a lost host) loses the jobs it was running. Consumers
heartbeat (see the ledger); the leading consumer runs this reaper, which

- finds jobs still ``running`` on a consumer that went silent, records their
  attempt as ``lost`` and runs them again as their next attempt, or fails
  them when no retries remain or the task is not safe to run twice;
- after a consumer is found dead, sweeps for jobs the ledger shows waiting
  (queued, scheduled, retrying) whose message Huey no longer holds: taken by
  the dead consumer before the ledger heard it start. A job counts as lost
  only when sweeps ``LOST_AFTER`` seconds apart both miss it, unchanged: a
  message a live worker just took shows up as started long before that.
"""
import datetime as dt
import logging

import sqlalchemy as sa

from . import broker, catalog, events, states
from .extensions import db
from .jobs import _announce
from .leader import leadership
from .models import Attempt, Job, Worker, utcnow

logger = logging.getLogger(__name__)


class Sweep:
    """The reaper's memory between passes: jobs missing from the broker once."""

    def __init__(self):
        self.passes_due = 0  # sweeps still to run (two after each death)
        self.suspects = {}   # job id -> (version, when first found missing)
        self.dead = set()    # consumers already found dead

    def due(self):
        self.passes_due = max(self.passes_due, 2)


sweep = Sweep()


def reap(config):
    """One pass: recover lost jobs, forget long-gone consumers. Returns the jobs handled."""
    now = utcnow()
    lost_after = config['LOST_AFTER']
    running = db.session.execute(
        sa.select(Job.id, Job.worker, Job.started_at).where(Job.state == states.RUNNING)).all()
    workers = {w.id: w for w in db.session.scalars(sa.select(Worker))}
    handled = []
    for job_id, worker, started_at in running:
        reason = _lost(workers.get((worker or '').split('/')[0]), job_id, worker, started_at,
                       now, lost_after)
        if reason:
            sweep.due()  # whatever else that consumer had taken is lost too
            try:
                if _recover(job_id, reason, now):
                    handled.append(job_id)
            except broker.BrokerUnavailable as exc:
                db.session.rollback()
                logger.warning('reaper: lost job %s not re-enqueued yet: %s', job_id, exc)
    for w in workers.values():
        if (w.stopped_at is None and (now - w.last_seen).total_seconds() > lost_after
                and w.id not in sweep.dead):
            sweep.dead.add(w.id)
            sweep.due()
            events.publish(workers=True)  # the workers page shows it offline
    sweep.dead &= set(workers)
    if sweep.passes_due:
        handled.extend(_sweep(config, now, lost_after))
    db.session.execute(sa.delete(Worker).where(
        Worker.last_seen < now - dt.timedelta(seconds=config['WORKER_RETENTION'])))
    db.session.commit()
    if handled:
        logger.warning('reaper: recovered %d lost jobs', len(handled))
    return handled


def _lost(consumer, job_id, worker, started_at, now, lost_after):
    """Why a running job is lost, or None while its consumer still runs it."""
    if consumer is None:
        if started_at and (now - started_at).total_seconds() > lost_after:
            return f'worker {worker} never reported in'
        return None
    if consumer.stopped_at is not None:
        return f'worker {worker} stopped at {consumer.stopped_at:%Y-%m-%d %H:%M:%S} UTC'
    silent = (now - consumer.last_seen).total_seconds()
    if silent > lost_after:
        return (f'worker {worker} stopped heartbeating (last seen '
                f'{consumer.last_seen:%Y-%m-%d %H:%M:%S} UTC, {silent:.0f} s before)')
    # Heartbeats list the jobs a consumer runs; one it started long ago and
    # no longer lists ended without the ledger hearing of it.
    if (started_at and (now - started_at).total_seconds() > lost_after
            and job_id not in (consumer.current or [])):
        return f'worker {worker} is alive but no longer runs this job'
    return None


def _recover(job_id, reason, now):
    job = db.session.get(Job, job_id)
    if job is None or job.state != states.RUNNING:
        return False
    n = job.attempts
    left, why_not = _rerun(job, n)
    rerun = why_not is None
    error = f'WorkerLost: {reason}'
    db.session.execute(
        sa.update(Attempt)
        .where(Attempt.job_id == job.id, Attempt.number == n,
               Attempt.outcome == states.ATTEMPT_RUNNING)
        .values(outcome=states.ATTEMPT_LOST, finished_at=now, error_type='WorkerLost',
                error_message=reason,
                duration=(now - job.started_at).total_seconds() if job.started_at else None))
    if rerun:
        values = dict(state=states.QUEUED, finished_at=None, progress=None,
                      progress_message=None)
    else:
        error = f'{error} ({why_not})'
        values = dict(state=states.FAILED, finished_at=now)
    moved = db.session.execute(
        sa.update(Job)
        .where(Job.id == job.id, Job.state == states.RUNNING, Job.attempts == n)
        .values(error=error, error_type='WorkerLost', version=Job.version + 1,
                updated_at=now, **values)
        .execution_options(synchronize_session=False)).rowcount
    if not moved:  # its consumer wrote an ending meanwhile
        db.session.rollback()
        return False
    db.session.flush()
    if rerun:
        broker.enqueue(job, base=n, retries=left)
    db.session.commit()
    db.session.refresh(job)
    _announce(job)
    logger.warning('reaper: job %s attempt %d lost (%s); %s', job.id, n, reason,
                   'running it again' if rerun else 'failed')
    return True


def _rerun(job, n):
    """``(retries left, why not)`` for lost attempt ``n``; why not is None if it runs again."""
    task_type = catalog.TASKS.get(job.task)
    left = job.retries_left(after=n)
    if task_type is not None and not task_type.rerun:
        return left, 'not safe to run twice'
    if task_type is None or left < 0:
        return left, 'no retries left'
    return left, None


def _sweep(config, now, lost_after):
    """Jobs waiting in the ledger that Huey has not held for a while: run them again."""
    sweep.passes_due -= 1
    waiting = db.session.execute(
        sa.select(Job.id, Job.queue, Job.version).where(Job.state.in_(states.WAITING))).all()
    held = {}
    missing = {}
    for job_id, queue, version in waiting:
        if queue not in broker.hueys:
            continue
        if queue not in held:
            held[queue] = broker.message_ids(queue)
        if job_id not in held[queue]:
            missing[job_id] = version
    seen = {j: sweep.suspects.get(j, (None, now)) for j in missing}
    confirmed = [j for j, v in missing.items()
                 if seen[j][0] == v and (now - seen[j][1]).total_seconds() >= lost_after]
    sweep.suspects = {j: (v, seen[j][1]) for j, v in missing.items() if j not in confirmed}
    if sweep.suspects:
        sweep.passes_due = max(sweep.passes_due, 1)  # look again next pass
    recovered = []
    for job_id in confirmed:
        job = db.session.get(Job, job_id)
        try:
            if job is not None and _requeue_missing(job, now):
                recovered.append(job_id)
        except broker.BrokerUnavailable as exc:
            db.session.rollback()
            logger.warning('reaper: missing job %s not re-enqueued yet: %s', job_id, exc)
    return recovered


def _requeue_missing(job, now):
    """A waiting job whose message was taken by a consumer that died: a lost attempt."""
    n = job.attempts + 1
    reason = 'its message was taken by a consumer that stopped before recording the attempt'
    left, why_not = _rerun(job, n)
    rerun = why_not is None
    error = f'WorkerLost: {reason}' + ('' if rerun else f' ({why_not})')
    moved = db.session.execute(
        sa.update(Job)
        .where(Job.id == job.id, Job.version == job.version)
        .values(attempts=n, error=error, error_type='WorkerLost',
                version=Job.version + 1, updated_at=now, scheduled_for=None,
                state=states.QUEUED if rerun else states.FAILED,
                finished_at=None if rerun else now)
        .execution_options(synchronize_session=False)).rowcount
    if not moved:
        db.session.rollback()
        return False
    db.session.add(Attempt(job_id=job.id, number=n, outcome=states.ATTEMPT_LOST,
                           finished_at=now, error_type='WorkerLost', error_message=reason))
    db.session.flush()
    db.session.refresh(job)
    if rerun:
        broker.enqueue(job, base=n, retries=left)
    db.session.commit()
    _announce(job)
    logger.warning('reaper: job %s was lost before it started (attempt %d); %s', job.id, n,
                   'running it again' if rerun else 'failed')
    return True


def claim_and_reap(app):
    """What the leading consumer does every REAP_INTERVAL seconds."""
    config = app.config
    if not leadership.claim(ttl=3 * config['REAP_INTERVAL']):
        return []
    with app.app_context():
        try:
            return reap(config)
        except Exception:
            db.session.rollback()
            logger.exception('reaper: pass failed')
            return []

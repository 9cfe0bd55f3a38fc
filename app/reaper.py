"""Lost jobs: what a consumer that died left behind.

A consumer takes a message by moving it into an in-flight record of its own
in the broker, and acknowledges it once the attempt's outcome is in the
ledger (see :mod:`app.storage`). Consumers hold a lease in the broker,
renewed by their heartbeat, and write a heartbeat row to the ledger. The
leading consumer runs :func:`reap` every ``REAP_INTERVAL`` seconds:

- **in-flight messages of dead consumers** (lease gone, ledger heartbeat
  stale or never written: a consumer killed in its first millisecond
  counts too). For each, the attempt the message ran: if the ledger
  recorded its outcome, the message was only unacknowledged and is
  dropped; otherwise the attempt is recorded ``lost`` (its job's row
  created if the ledger never heard of it) and the job runs again as its
  next attempt, or fails visibly when it is not safe to run twice or no
  retries remain;
- **jobs the ledger shows running** on a consumer that is gone (its
  in-flight record lost too, say with the broker's data), or that a live
  consumer no longer lists: the same.

Both paths share :func:`recover`, which is idempotent: a second look at the
same attempt finds it recorded and does nothing. Delivery is at least
once, and every second run shows as a second attempt with its reason.
"""
import datetime as dt
import logging
import time
import uuid

import sqlalchemy as sa

from . import alerts, audit, broker, catalog, events, jobs, message, states
from .extensions import db
from .leader import leadership
from .ledger import history, tallies
from .models import Attempt, Job, Worker, utcnow

logger = logging.getLogger(__name__)

COMPACT_EVERY = 300  # seconds between foldings of the counters' session rows (PostgreSQL)
# Audit entries and resolved alerts deleted per pass, at most, each: a backlog
# (a retention shortened, a long-stopped leader) is cleared over several
# passes, each transaction short.
PRUNE_BATCH = 10_000


def reap(config, reconciler=None):
    """One pass: recover lost jobs, reconcile, forget long-gone consumers, sample the
    queues' depth; about every COMPACT_EVERY seconds, fold counters and prune the metric
    history, the audit log and resolved alerts past their retention. Notes in the broker
    that the reaper ran (``reaper``).

    Returns the ids of the jobs whose ledger row changed. Raises
    :class:`~app.broker.BrokerUnavailable` when the broker does not answer
    (nothing is half-done: each recovery commits on its own).
    """
    now = utcnow()
    workers = {w.id: w for w in db.session.scalars(sa.select(Worker))}
    handled = _recover_inflight(config, now, workers)
    handled += _recover_running(config, now, workers)
    for w in workers.values():
        if w.stopped_at is None and (now - w.last_seen).total_seconds() > config['LOST_AFTER']:
            events.publish(workers=True)  # the workers page shows it offline
            break
    db.session.execute(sa.delete(Worker).where(
        Worker.last_seen < now - dt.timedelta(seconds=config['WORKER_RETENTION'])))
    sample_depth(config, now)
    if time.time() % COMPACT_EVERY < config['REAP_INTERVAL']:
        # About once per COMPACT_EVERY seconds: fold ended sessions' counter
        # rows, and forget the metric history past its retention.
        tallies.compact(db.session.connection())
        history.fold(db.session.connection())
        history.prune(db.session.connection(),
                      now - dt.timedelta(seconds=config['METRICS_RETENTION']))
        # The audit log and resolved alerts past theirs (0: kept for ever).
        if config['AUDIT_RETENTION']:
            audit.prune(now - dt.timedelta(seconds=config['AUDIT_RETENTION']), PRUNE_BATCH)
        if config['ALERT_RETENTION']:
            alerts.prune(now - dt.timedelta(seconds=config['ALERT_RETENTION']), PRUNE_BATCH)
    db.session.commit()
    broker.mark_seen('reaper')
    if handled:
        logger.warning('reaper: recovered %d lost jobs', len(handled))
    if reconciler is not None:
        handled += reconciler.run(config)  # it says what it restored itself
    return handled


def sample_depth(config, now):
    """Note each queue's depth in the broker for the minute of ``now`` (the first sample of
    a minute is kept, so the leader's passes sample each queue once a minute).

    In the caller's transaction; raises :class:`~app.broker.BrokerUnavailable`.
    """
    depths = {queue: broker.depth(queue) for queue in config['QUEUES']}
    return history.sample_depth(db.session.connection(), now, depths)


def _fresh(worker, now, lost_after):
    """Whether a consumer's ledger heartbeat says it is alive."""
    return (worker is not None and worker.stopped_at is None
            and (now - worker.last_seen).total_seconds() <= lost_after)


def _recover_inflight(config, now, workers):
    """Return the messages held by dead consumers; the ids of the jobs recovered."""
    handled = []
    for queue in config['QUEUES']:
        for consumer, alive in broker.consumers(queue).items():
            if alive or _fresh(workers.get(consumer), now, config['LOST_AFTER']):
                continue
            for item in broker.inflight(queue, consumer):
                try:
                    msg = broker.read(queue, item.data)
                except ValueError as exc:
                    logger.error('reaper: dropped an unreadable message held by %s: %s',
                                 consumer, exc)
                    broker.drop([item.receipt])
                    continue
                reason = (f'its consumer {consumer} died (its lease ran out) before the outcome '
                          f'was recorded')
                done = recover(msg.id, message.attempt_number(msg), reason, queue=queue,
                               msg=msg, worker=consumer, now=now)
                if done is None:
                    continue  # the job changed meanwhile: look again next pass
                if done:
                    handled.append(msg.id)
                broker.drop([item.receipt])
            broker.retire(queue, consumer)
    return handled


def _recover_running(config, now, workers):
    """Jobs the ledger shows running on a consumer that is gone; the ids recovered."""
    lost_after = config['LOST_AFTER']
    running = db.session.execute(
        sa.select(Job.id, Job.worker, Job.started_at, Job.attempts)
        .where(Job.state == states.RUNNING)).all()
    if not running:
        return []
    consumers = {(w or '').split('/')[0] for _, w, _, _ in running}
    leased = broker.alive(consumers)
    handled = []
    for job_id, worker, started_at, attempts in running:
        consumer = (worker or '').split('/')[0]
        reason = _lost(workers.get(consumer), consumer in leased, job_id, worker, started_at,
                       now, lost_after)
        if reason and recover(job_id, attempts, reason, now=now):
            handled.append(job_id)
    return handled


def _lost(row, leased, job_id, worker, started_at, now, lost_after):
    """Why a running job is lost, or None while its consumer still runs it."""
    fresh = _fresh(row, now, lost_after)
    if fresh:
        # Heartbeats list the jobs a consumer runs; one it started long ago and
        # no longer lists ended without the ledger hearing of it.
        if (started_at and (now - started_at).total_seconds() > lost_after
                and job_id not in (row.current or [])):
            return f'worker {worker} is alive but no longer runs this job'
        return None
    if leased:
        return None
    if row is None:
        if started_at and (now - started_at).total_seconds() > lost_after:
            return f'worker {worker} never reported in'
        return None
    if row.stopped_at is not None:
        return f'worker {worker} stopped at {row.stopped_at:%Y-%m-%d %H:%M:%S} UTC'
    silent = (now - row.last_seen).total_seconds()
    return (f'worker {worker} stopped heartbeating (last seen '
            f'{row.last_seen:%Y-%m-%d %H:%M:%S} UTC, {silent:.0f} s before)')


def recover(job_id, number, reason, queue=None, msg=None, worker=None, now=None):
    """Record attempt ``number`` of ``job_id`` as lost; run the job again or fail it.

    ``msg`` is the Huey message the attempt ran (from a dead consumer's
    in-flight record), or None (from the ledger's running jobs). Does
    nothing when the attempt's outcome is already recorded, or a later
    attempt exists. Returns True when the ledger changed, False when there
    was nothing to do, None when the job changed while it looked (look
    again later); commits. Raises :class:`~app.broker.BrokerUnavailable`
    (the change is rolled back).
    """
    now = now or utcnow()
    job = db.session.get(Job, job_id)
    if job is None:
        if msg is None:
            return False
        job = _job_from_message(msg, queue, number, now)
        if job is None:
            return False
    attempt = db.session.get(Attempt, (job.id, number))
    if attempt is not None and attempt.outcome != states.ATTEMPT_RUNNING:
        return False  # the outcome is recorded; the message was only unacknowledged
    if job.attempts > number:
        if attempt is not None:  # a later attempt runs; this one's end was never heard
            _mark_lost(attempt, reason, now)
            _count_lost(job, attempt, now, finished=False)
            db.session.commit()
            return True
        return False
    starting = job.state in states.WAITING and job.attempts == number - 1
    if not (starting or (job.state == states.RUNNING and job.attempts == number)):
        if attempt is not None:
            _mark_lost(attempt, reason, now)
            _count_lost(job, attempt, now, finished=False)
            db.session.commit()
            return True
        return False  # canceled or finished meanwhile: nothing ran that we know of

    left, why_not = _rerun(job, number)
    if job.cancel_requested_at is not None:
        why_not = 'an operator had asked it to stop'
    error = f'WorkerLost: {reason}' + ('' if why_not is None else f' ({why_not})')
    if attempt is None:
        db.session.add(Attempt(job_id=job.id, number=number, outcome=states.ATTEMPT_LOST,
                               worker=worker, finished_at=now, error_type='WorkerLost',
                               error_message=reason))
    else:
        _mark_lost(attempt, reason, now)
    if why_not is None:
        values = dict(state=states.QUEUED, finished_at=None)
    elif job.cancel_requested_at is not None:
        values = dict(state=states.CANCELED, finished_at=now)
    else:
        values = dict(state=states.FAILED, finished_at=now)
    moved = jobs.change(Job.id == job.id, Job.version == job.version,
                        attempts=number, error=error, error_type='WorkerLost',
                        run_seconds=attempt.duration if attempt is not None else None,
                        scheduled_for=None, progress=None, progress_message=None, **values)
    if not moved:  # changed meanwhile (its consumer wrote an ending): look again next pass
        db.session.rollback()
        return None
    db.session.flush()
    _count_lost(job, attempt, now, finished=why_not is not None)
    db.session.refresh(job)
    try:
        if why_not is None:
            # No other message of the job may run beside this one (a retry the
            # dead consumer wrote before the ledger heard of its failure).
            broker.remove_waiting(job.queue, [job.id])
            broker.enqueue(job, base=number, retries=left)
    except broker.BrokerUnavailable:
        db.session.rollback()
        raise
    db.session.commit()
    jobs.announce(job)
    logger.warning('reaper: job %s attempt %d lost (%s); %s', job.id, number, reason,
                   'running it again' if why_not is None else f'failed: {why_not}')
    return True


def _count_lost(job, attempt, now, finished):
    """Add a lost attempt of ``job`` to the metric history (``attempt`` None: it never
    started as far as the ledger knows, so its run time is unknown)."""
    duration = attempt.duration if attempt is not None else None
    history.add(db.session.connection(), [history.Ended(
        job.queue, job.task, states.ATTEMPT_LOST, now, finished, duration)])


def _mark_lost(attempt, reason, now):
    attempt.outcome = states.ATTEMPT_LOST
    attempt.finished_at = now
    attempt.error_type = 'WorkerLost'
    attempt.error_message = reason
    if attempt.started_at is not None:
        attempt.duration = (now - attempt.started_at).total_seconds()


def _job_from_message(msg, queue, number, now):
    """A row for a job the ledger never heard of (enqueued around the API), from its message."""
    name = message.task_name(msg.name)
    try:
        uuid.UUID(str(msg.id))
    except ValueError:
        logger.error('reaper: a lost message has an id no job can have: %.80r', msg.id)
        return None
    shown, secret = catalog.split(name, message.params(msg))
    job = Job(id=msg.id, task=name, queue=queue, params=shown, secret_params=secret or None,
              state=states.QUEUED, priority=msg.priority or 0,
              attempts=number - 1, attempt_base=message.base(msg),
              retries=message.retries(msg) or 0, retry_delay=msg.retry_delay or 0.0,
              timeout=msg.timeout, created_at=now, updated_at=now, version=1)
    db.session.add(job)
    db.session.flush()
    return job


def _rerun(job, n):
    """``(retries left, why not)`` for lost attempt ``n``; why not is None if it runs again."""
    task_type = catalog.TASKS.get(job.task)
    left = job.retries_left(after=n)
    if task_type is not None and not task_type.rerun:
        return left, 'not safe to run twice'
    if task_type is None or left < 0:
        return left, 'no retries left'
    return left, None


def claim_and_reap(app, reconciler=None):
    """What every consumer does every REAP_INTERVAL seconds: lead if it can, then reap.

    Returns ``(leading, handled ids)``.
    """
    config = app.config
    if not leadership.claim(ttl=3 * config['REAP_INTERVAL']):
        return False, []
    with app.app_context():
        try:
            return True, reap(config, reconciler)
        except broker.BrokerUnavailable as exc:
            db.session.rollback()
            logger.warning('reaper: the broker is unreachable (%s); trying again', exc)
            return True, []
        except Exception:
            db.session.rollback()
            logger.exception('reaper: pass failed')
            return True, []
        finally:
            db.session.remove()

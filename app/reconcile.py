"""The ledger is the truth: put back what the broker lost.

Huey keeps queued and scheduled messages only in the broker; a Redis that
restarts without persistence, fails over to a replica that had not caught
up, is flushed or evicts keys under ``maxmemory`` loses them, while the
ledger still says the jobs wait. The leading consumer's :class:`Reconciler`
compares the two on every reaper pass:

- **Pages, not everything.** Every ``RECONCILE_INTERVAL`` seconds, waiting
  jobs (queued, scheduled, retrying) are read from the ledger a page at a
  time, in index order (state, created_at, id), at most ``BUDGET`` rows,
  resuming where the last comparison stopped; the broker answers "does it
  hold these ids?" from its index of waiting messages (one round trip a
  page) and the in-flight records. The leader shares its process with
  worker threads, so this is kept rare and bounded.
- **A grace period.** A job found missing becomes a suspect; it is
  re-enqueued only when a look at least ``RECONCILE_GRACE`` seconds later
  finds it still missing and unchanged (same version), so a message just
  taken or just written is never doubled. Its repair is recorded on the
  job (an event) and counted.
- **Its own time.** A restored job due in the future goes back to the
  schedule for its original time; one already due runs now.
- **A wiped broker is noticed at once.** The leader keeps a marker (epoch)
  in the broker and the same value in the ledger. When the broker's is gone
  (or another), the broker lost its data: the leader rebuilds the broker's
  index, asks running jobs with a pending cancel to stop again, then
  compares everything with a short grace, and records when this happened
  and how many jobs it restored (shown in a banner and in ``/healthz``).
  Pause switches live in the ledger, so a wipe does not resume a paused
  queue.
"""
import datetime as dt
import logging
import time
import uuid

import sqlalchemy as sa

from . import broker, catalog, controls, events, states
from . import jobs as jobs_service
from .extensions import db
from .models import Job, JobEvent, isoformat, utcnow

logger = logging.getLogger(__name__)

PAGE = 1000             # ledger rows per look at the broker
BUDGET = 20_000         # rows compared per regular pass
AFTER_LOSS_GRACE = 2.0  # seconds a suspect waits after the broker lost its data
RESTORED = 're-enqueued: the broker no longer held its message'
_WAITING = (states.QUEUED, states.SCHEDULED, states.RETRYING)


class Reconciler:
    """The leader's comparison of the ledger with the broker (one per process)."""

    def __init__(self, still_leading=lambda: True):
        # job id -> (version, monotonic time first found missing, when it is due)
        self.suspects = {}
        self.cursor = None    # (state, created_at, id) the next regular pass starts after
        self.full = True      # compare everything next pass (first pass, after a loss)
        self.next_compare = 0.0  # monotonic: when the next regular comparison is due
        self.grace = None     # seconds; None: the configured grace
        self.lost = False     # the broker lost its data: the next full comparison counts
        self.loss_ids = set()  # the jobs missing after the latest loss, not yet restored
        # Renews the leader's lease between pages of a long pass, and says
        # whether this process still leads (the pass stops when it does not).
        self.still_leading = still_leading

    def run(self, config):
        """One pass; returns the ids of the jobs re-enqueued. Needs an app context; commits.

        Every pass checks the broker's marker and index (cheap) and looks
        again at suspects past their grace; the ledger is compared with the
        broker every ``RECONCILE_INTERVAL`` seconds (``BUDGET`` rows), and
        in full at once when the broker lost its data.
        """
        if self._check_epoch(config) or self._check_clock(config):
            self.full = True
        for queue in config['QUEUES']:
            if broker.check_index(queue):
                logger.warning('reconcile: the index of waiting messages in %s did not add up; '
                               'rebuilt it', queue)
                self.full = True
        if self.full or time.monotonic() >= self.next_compare:
            inflight = {q: broker.inflight_ids(q) for q in config['QUEUES']}
            full, self.full = self.full, False
            self._compare(config, inflight, budget=None if full else BUDGET)
            self.next_compare = time.monotonic() + config['RECONCILE_INTERVAL']
            if full and self.lost:
                self.loss_ids, self.lost = set(self.suspects), False
        return self._repair(config)

    # -- the broker's identity ------------------------------------------------

    def _check_epoch(self, config):
        """Notice a broker that lost its data; True when it did (or is new to this ledger)."""
        current = broker.epoch()
        known = controls.get(controls.BROKER_EPOCH)
        if current is not None and current == known:
            return False
        fresh = uuid.uuid4().hex
        if known is None:
            # A new deployment, or one from before the marker: count what the
            # broker holds (older messages included), take over the pause
            # switches an older version kept there, then mark it.
            for queue in config['QUEUES']:
                broker.check_index(queue)
            queues, periodic = broker.take_legacy_switches(catalog.PERIODIC)
            for name in queues:
                controls.put(controls.QUEUE_PAUSED.format(name), True)
            for name in periodic:
                controls.put(controls.PERIODIC_PAUSED.format(name), True)
            value = current or fresh
            broker.set_epoch(value)
            controls.put(controls.BROKER_EPOCH, value)
            controls.put(controls.BROKER_CLOCK, broker.tick())
            db.session.commit()
            return True
        now = utcnow()
        logger.error('reconcile: the broker lost its data (its marker is %s); restoring '
                     'waiting jobs from the ledger', 'gone' if current is None else 'another')
        for queue in config['QUEUES']:
            broker.check_index(queue)
        cancels = db.session.scalars(sa.select(Job).where(
            Job.state == states.RUNNING, Job.cancel_requested_at.is_not(None))).all()
        broker.restore_cancel_requests(cancels)
        broker.set_epoch(fresh)
        controls.put(controls.BROKER_EPOCH, fresh)
        controls.put(controls.BROKER_CLOCK, broker.tick())  # counting starts again
        controls.put(controls.BROKER_LOSS, {'at': isoformat(now), 'restored': 0})
        db.session.commit()
        self.grace = AFTER_LOSS_GRACE
        self.lost = True
        events.publish(queues=True)
        return True

    def _check_clock(self, config):
        """Notice a broker restored from an older copy of itself; True when it was.

        The leader advances a counter in the broker every pass and keeps the
        value in the ledger. A broker behind the ledger went back in time
        (a failover to a replica that had not caught up, a restore from an
        old snapshot): its marker is there, but it may hold messages of jobs
        that have run since. Those are removed (a job that finished, or a
        message for an attempt the ledger already has), then everything is
        compared, as after a loss.
        """
        theirs = broker.tick()
        ours = controls.get(controls.BROKER_CLOCK) or 0
        controls.put(controls.BROKER_CLOCK, theirs)
        db.session.commit()
        if theirs > ours or ours == 0:
            return False
        logger.error('reconcile: the broker went back in time (pass %d, the ledger saw %d); '
                     'removing what ran since, restoring what it lost', theirs, ours)
        removed = sum(broker.stale_messages(queue, self._stale) for queue in config['QUEUES'])
        if removed:
            logger.warning('reconcile: removed the stale messages of %d jobs', removed)
        controls.put(controls.BROKER_LOSS, {'at': isoformat(utcnow()), 'restored': 0})
        db.session.commit()
        self.grace, self.lost = AFTER_LOSS_GRACE, True
        events.publish(queues=True)
        return True

    @staticmethod
    def _stale(page):
        """The job ids of ``page`` ({id: [message attempts]}) whose messages already ran."""
        rows = db.session.execute(sa.select(Job.id, Job.state, Job.attempts)
                                  .where(Job.id.in_(list(page)))).all()
        db.session.rollback()
        return {job_id for job_id, state, attempts in rows
                if state in states.FINISHED or min(page[job_id]) <= attempts}

    # -- comparing ----------------------------------------------------------

    def _compare(self, config, inflight, budget):
        """Walk waiting jobs a page at a time; note the missing ones as suspects.

        ``budget`` rows at most (None: all), resuming after ``self.cursor``.
        """
        first, resume = 0, None
        if budget is not None and self.cursor is not None:
            first, resume = _WAITING.index(self.cursor[0]), self.cursor[1:]
        seen = 0
        for i in range(first, len(_WAITING)):
            state, after = _WAITING[i], (resume if i == first else None)
            while True:
                if not self.still_leading():
                    return
                stmt = (sa.select(Job.id, Job.queue, Job.version, Job.created_at,
                                  Job.scheduled_for)
                        .where(Job.state == state).order_by(Job.created_at, Job.id).limit(PAGE))
                if after is not None:
                    stmt = stmt.where(sa.tuple_(Job.created_at, Job.id) > sa.tuple_(*after))
                with db.engine.connect() as conn:  # a fresh snapshot per page, no ORM state
                    rows = conn.execute(stmt).all()
                if not rows:
                    break
                self._look(config, rows, inflight)
                seen += len(rows)
                after = (rows[-1].created_at, rows[-1].id)
                if budget is not None and seen >= budget:
                    self.cursor = (state, *after)
                    return
                if len(rows) < PAGE:
                    break
                time.sleep(0.005)  # leave the consumer's workers the interpreter
        self.cursor = None

    def _look(self, config, rows, inflight):
        by_queue = {}
        for row in rows:
            by_queue.setdefault(row.queue, []).append(row)
        now = time.monotonic()
        for queue, batch in by_queue.items():
            if queue not in config['QUEUES']:
                continue
            ids = [r.id for r in batch]
            present = broker.held(queue, ids) | (inflight.get(queue, set()) & set(ids))
            for r in batch:
                if r.id in present:
                    self.suspects.pop(r.id, None)
                    continue
                known = self.suspects.get(r.id)
                if known is None or known[0] != r.version:
                    self.suspects[r.id] = (r.version, now, r.scheduled_for or r.created_at)

    # -- repairing ----------------------------------------------------------

    def _repair(self, config):
        """Re-enqueue suspects still missing and unchanged after the grace period."""
        grace = config['RECONCILE_GRACE'] if self.grace is None else self.grace
        now = time.monotonic()
        # Soonest due first: after a wipe, the jobs that should run now come back first.
        due = sorted((j for j, (_v, since, _at) in self.suspects.items() if now - since >= grace),
                     key=lambda j: self.suspects[j][2])
        restored = []
        for start in range(0, len(due), PAGE):
            if not self.still_leading():
                break
            chunk = due[start:start + PAGE]
            rows = {j.id: j for j in db.session.scalars(
                sa.select(Job).where(Job.id.in_(chunk), Job.state.in_(_WAITING)))}
            by_queue = {}
            for job in rows.values():
                if job.version == self.suspects[job.id][0] and job.queue in config['QUEUES']:
                    by_queue.setdefault(job.queue, []).append(job)
            for job_id in chunk:
                if job_id not in rows or rows[job_id].version != self.suspects[job_id][0]:
                    self.suspects.pop(job_id, None)  # it moved on: not lost
            for queue, jobs in by_queue.items():
                ids = [j.id for j in jobs]
                present = broker.held(queue, ids) | (broker.inflight_ids(queue) & set(ids))
                for job in jobs:
                    self.suspects.pop(job.id, None)
                restored += self._restore([j for j in jobs if j.id not in present])
            time.sleep(0.005)  # leave the consumer's workers the interpreter
        if not self.suspects:
            self.grace = None
        if restored:
            logger.warning('reconcile: re-enqueued %d jobs the broker no longer held',
                           len(restored))
        return restored

    def _restore(self, jobs):
        """Hand ``jobs`` (still waiting, unchanged, of one queue) to the broker again.

        One transaction for the lot: each job's version moves on (a job that
        changed meanwhile is left alone; a scheduled job now due becomes
        queued), each gets its event, then their messages go to the broker in
        one round trip and the transaction commits. Returns the ids
        restored; raises :class:`~app.broker.BrokerUnavailable` with nothing
        committed (messages already written are then found held).
        """
        if not jobs:
            return []
        now = utcnow()
        by_key = {(j.id, j.version): j for j in jobs}
        # Prepared before the update, which leaves these rows stale.
        prepared = {j.id: broker.prepare(j, base=j.attempts, retries=j.retries_left(after=j.attempts))
                    for j in jobs}
        queue, tasks = jobs[0].queue, {j.id: j.task for j in jobs}
        due = sa.and_(Job.state == states.SCHEDULED,
                      sa.or_(Job.scheduled_for.is_(None), Job.scheduled_for <= now))
        moved = {job_id: (state, version) for job_id, state, version in jobs_service.change(
            Job.state.in_(_WAITING), sa.tuple_(Job.id, Job.version).in_(list(by_key)),
            state=sa.case((due, states.QUEUED), else_=Job.state),
            returning=(Job.id, Job.state, Job.version))}
        if not moved:
            db.session.rollback()
            return []
        db.session.execute(sa.insert(JobEvent), [
            {'job_id': job_id, 'at': now, 'kind': 'restored', 'message': RESTORED}
            for job_id in moved])
        controls.add(controls.BROKER_REPAIRS, len(moved))
        after_loss = self.loss_ids & moved.keys()
        if after_loss:
            self.loss_ids -= after_loss
            loss = dict(controls.get(controls.BROKER_LOSS) or {})
            loss['restored'] = loss.get('restored', 0) + len(after_loss)
            controls.put(controls.BROKER_LOSS, loss)
        try:
            # Due later: back to the schedule for its own time; due now: the queue.
            broker.put_prepared(queue, [prepared[job_id] for job_id in moved])
        except broker.BrokerUnavailable:
            db.session.rollback()
            raise
        db.session.commit()
        events.publish([events.job_change(job_id, state, queue, tasks[job_id], version)
                        for job_id, (state, version) in moved.items()])
        return list(moved)


def loss_notice(max_age=dt.timedelta(hours=24)):
    """The latest broker data loss, if within ``max_age``: ``{"at", "restored"}`` or None.

    Never raises: pages show it in their banner, and a page must not fail
    for it.
    """
    try:
        loss = controls.get(controls.BROKER_LOSS)
        if not loss:
            return None
        at = dt.datetime.fromisoformat(loss['at'].rstrip('Z'))
    except Exception:
        db.session.rollback()
        return None
    return loss if utcnow() - at <= max_age else None

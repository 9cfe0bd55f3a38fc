"""The ledger: one ``Job`` row per job, one ``Attempt`` row per execution."""
import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from . import text
from .extensions import db


class _Lenient:
    """Reads a text column whatever SQLite holds in it.

    SQLite keeps a BLOB written into a text column as bytes and hands them
    back as such; they read as text (invalid UTF-8 replaced), so one row
    written around the application cannot break the pages that show it.
    """

    def process_result_value(self, value, dialect):
        return text.decode_lossy(value) if isinstance(value, bytes) else value


class String(_Lenient, sa.types.TypeDecorator):
    """``VARCHAR(n)``, read leniently."""
    impl = sa.String
    cache_ok = True


class Text(_Lenient, sa.types.TypeDecorator):
    """``TEXT``, read leniently."""
    impl = sa.Text
    cache_ok = True


def utcnow():
    """Naive UTC, the form every timestamp in the ledger takes."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


_last_isoformat = (None, None)  # (datetime, its text): replaced whole, so safe across threads


def isoformat(value):
    """A ledger timestamp as ISO 8601 with an explicit UTC offset (``None`` for None)."""
    global _last_isoformat
    if value is None:
        return None
    # The jobs of one batch share their times (one datetime object): a
    # thousand of them written out once, not a thousand times.
    last = _last_isoformat
    if last[0] is value:
        return last[1]
    text = value.isoformat(timespec='milliseconds') + 'Z'
    _last_isoformat = (value, text)
    return text


# The conditions of the partial indexes of jobs waiting to run, written the
# same in the queries that use them (app.queries.oldest_waiting).
WAITING = "state = 'queued'"
DUE = "state IN ('scheduled', 'retrying')"
RAN = 'finished_at IS NOT NULL AND run_seconds IS NOT NULL'


class Job(db.Model):
    __tablename__ = 'job'

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # the Huey task id
    task: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(32))
    # The parameters as every page, the API and search show them: a secret
    # parameter's value masked (``**** 4242``).
    params: Mapped[dict] = mapped_column(sa.JSON(none_as_null=True))
    # The real values of the secret parameters, by name, which only the
    # broker reads (``run_params``) to enqueue the job again (a retry, a job
    # recovered by the reaper or the reconciler). Never serialized, loaded
    # only when asked for, and cleared once the job has succeeded.
    secret_params: Mapped[dict | None] = mapped_column(sa.JSON(none_as_null=True),
                                                       deferred=True)
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(default=0)
    # Fraction done (0..1) of the current attempt, and what the task said about it.
    progress: Mapped[float | None]
    progress_message: Mapped[str | None] = mapped_column(String(200))
    result: Mapped[object | None] = mapped_column(sa.JSON(none_as_null=True))
    # The latest failed attempt's "Type: message", and its type for grouping.
    error: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(200))
    # Number of the latest attempt (0 before the first one starts), and the
    # attempts made before the current round of retries (a manual retry
    # starts a new round with the job's full retries).
    attempts: Mapped[int] = mapped_column(default=0)
    attempt_base: Mapped[int] = mapped_column(default=0, server_default='0')
    # Retries allowed after an attempt fails, and the first retry's delay (s).
    retries: Mapped[int]
    retry_delay: Mapped[float]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    scheduled_for: Mapped[dt.datetime | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    # Seconds the latest attempt that ended ran (its ``attempt.duration``),
    # kept by the ledger's writer: the run-time order's key, which an index
    # walks (a job canceled while it waited for a retry keeps its last
    # attempt's, which ``finished_at - started_at`` would not give).
    run_seconds: Mapped[float | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    worker: Mapped[str | None] = mapped_column(String(200))
    # Seconds an attempt may run before it is stopped as timed out.
    timeout: Mapped[float | None]
    # An operator asked a running job to stop; the task sees it at its next
    # progress report.
    cancel_requested_at: Mapped[dt.datetime | None]
    # A submission carrying a key already used returns that job instead.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # Grows with every change, so a reader can tell a newer row from an older one.
    version: Mapped[int] = mapped_column(default=1)

    attempt_rows: Mapped[list['Attempt']] = relationship(
        back_populates='job', order_by='Attempt.number',
        cascade='all, delete-orphan', passive_deletes=True)
    event_rows: Mapped[list['JobEvent']] = relationship(
        order_by='JobEvent.id', cascade='all, delete-orphan', passive_deletes=True)

    __table_args__ = (
        # Keyset pagination walks (created_at, id) newest first, alone or
        # within one state, queue or task.
        sa.Index('ix_job_created', 'created_at', 'id'),
        sa.Index('ix_job_state_created', 'state', 'created_at', 'id'),
        sa.Index('ix_job_queue_created', 'queue', 'created_at', 'id'),
        sa.Index('ix_job_task_created', 'task', 'created_at', 'id'),
        # Throughput per queue: jobs finished in the last minutes.
        sa.Index('ix_job_queue_finished', 'queue', 'finished_at'),
        # The latest failed job of each failure group (task, error type), per queue.
        sa.Index('ix_job_failed', 'queue', 'task', 'error_type', 'finished_at', 'id',
                 sqlite_where=sa.text("state = 'failed'"),
                 postgresql_where=sa.text("state = 'failed'")),
        # An index, not a table constraint: SQLite adds it without copying the table.
        sa.Index('uq_job_idempotency_key', 'idempotency_key', unique=True),
        # The oldest job waiting to run, per queue (alerts): since it was
        # queued, or since it was due (a retry or scheduled job the broker
        # holds ready; the ledger moves it on when it starts). Partial, so
        # they hold only the jobs waiting.
        sa.Index('ix_job_waiting', 'queue', 'updated_at',
                 sqlite_where=sa.text(WAITING), postgresql_where=sa.text(WAITING)),
        sa.Index('ix_job_due', 'queue', 'scheduled_for',
                 sqlite_where=sa.text(DUE), postgresql_where=sa.text(DUE)),
        # The run-time order (longest last attempt first) of the finished
        # jobs, alone or within one state, queue or task, as the created
        # order's: partial, so they hold only those.
        sa.Index('ix_job_run', 'run_seconds', 'id',
                 sqlite_where=sa.text(RAN), postgresql_where=sa.text(RAN)),
        sa.Index('ix_job_state_run', 'state', 'run_seconds', 'id',
                 sqlite_where=sa.text(RAN), postgresql_where=sa.text(RAN)),
        sa.Index('ix_job_queue_run', 'queue', 'run_seconds', 'id',
                 sqlite_where=sa.text(RAN), postgresql_where=sa.text(RAN)),
        sa.Index('ix_job_task_run', 'task', 'run_seconds', 'id',
                 sqlite_where=sa.text(RAN), postgresql_where=sa.text(RAN)),
    )

    @property
    def run_params(self):
        """The parameters the task runs with: ``params`` with the real secret values."""
        return {**(self.params or {}), **(self.secret_params or {})}

    def retries_left(self, after):
        """Retries the current round still allows once attempt ``after`` has ended."""
        return self.retries - (after - self.attempt_base)

    def orm(self):
        """This job: what :meth:`app.jobs.Written.orm` gives for a job just written, so
        that a caller of ``jobs.submit`` gets the ORM object either way."""
        return self

    def to_dict(self, attempts=None):
        data = {
            'id': self.id,
            'task': self.task,
            'queue': self.queue,
            'params': self.params,
            'state': self.state,
            'priority': self.priority,
            'progress': self.progress,
            'progress_message': self.progress_message,
            'result': self.result,
            'error': self.error,
            'retries': self.retries,
            'retry_delay': self.retry_delay,
            'attempt_count': self.attempts,
            'worker': self.worker,
            'error_type': self.error_type,
            'timeout': self.timeout,
            'cancel_requested_at': isoformat(self.cancel_requested_at),
            'idempotency_key': self.idempotency_key,
            'created_at': isoformat(self.created_at),
            'scheduled_for': isoformat(self.scheduled_for),
            'started_at': isoformat(self.started_at),
            'finished_at': isoformat(self.finished_at),
            'run_seconds': self.run_seconds,
            'updated_at': isoformat(self.updated_at),
            'version': self.version,
        }
        if attempts is not None:
            data['attempts'] = [a.to_dict() for a in attempts]
            data['events'] = [e.to_dict() for e in self.event_rows]
        return data


class Attempt(db.Model):
    __tablename__ = 'attempt'

    job_id: Mapped[str] = mapped_column(
        sa.ForeignKey('job.id', ondelete='CASCADE'), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    duration: Mapped[float | None]  # seconds
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates='attempt_rows')

    @property
    def error(self):
        if not self.error_type:
            return None
        return f'{self.error_type}: {self.error_message}' if self.error_message else self.error_type

    def to_dict(self):
        return {
            'number': self.number,
            'state': self.outcome,
            'worker': self.worker,
            'started_at': isoformat(self.started_at),
            'finished_at': isoformat(self.finished_at),
            'duration': self.duration,
            'error': self.error,
            'error_type': self.error_type,
            'error_message': self.error_message,
            'traceback': self.traceback,
        }


class AttemptLog(db.Model):
    """One line a task logged during an attempt."""
    __tablename__ = 'attempt_log'

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey('job.id', ondelete='CASCADE'))
    number: Mapped[int]
    at: Mapped[dt.datetime]
    level: Mapped[str] = mapped_column(String(10))
    message: Mapped[str] = mapped_column(Text)

    __table_args__ = (sa.Index('ix_attempt_log_job', 'job_id', 'number', 'id'),)

    def to_dict(self):
        return {'at': isoformat(self.at), 'level': self.level, 'message': self.message}


class Worker(db.Model):
    """A consumer process, as its heartbeats describe it."""
    __tablename__ = 'worker'

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int]
    queues: Mapped[list] = mapped_column(sa.JSON)
    concurrency: Mapped[int]
    started_at: Mapped[dt.datetime]
    last_seen: Mapped[dt.datetime]
    stopped_at: Mapped[dt.datetime | None]
    processed: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    current: Mapped[list] = mapped_column(sa.JSON)  # ids of the jobs it runs now
    leader: Mapped[bool] = mapped_column(default=False)

    def to_dict(self, lost_after):
        return {
            'id': self.id, 'host': self.host, 'pid': self.pid, 'queues': self.queues,
            'concurrency': self.concurrency, 'started_at': isoformat(self.started_at),
            'last_seen': isoformat(self.last_seen), 'stopped_at': isoformat(self.stopped_at),
            'processed': self.processed, 'failed': self.failed, 'current': self.current,
            # A consumer that died leading keeps its last heartbeat's flag.
            'leader': self.leader and self.online(lost_after), 'online': self.online(lost_after),
        }

    def online(self, lost_after):
        return self.stopped_at is None and (utcnow() - self.last_seen).total_seconds() < lost_after


class JobEvent(db.Model):
    """Something that happened to a job outside its attempts (a repair, say)."""
    __tablename__ = 'job_event'

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey('job.id', ondelete='CASCADE'))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)

    __table_args__ = (sa.Index('ix_job_event_job', 'job_id', 'id'),)

    def to_dict(self):
        return {'at': isoformat(self.at), 'kind': self.kind, 'message': self.message}


class Control(db.Model):
    """A value the deployment keeps in the ledger, not in the broker.

    Operators' switches (a paused queue, a paused periodic task) and what
    the leader knows about the broker (its identity marker, its last loss),
    so that a broker that loses its data loses none of these.
    """
    __tablename__ = 'control'

    key: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    value: Mapped[object] = mapped_column(sa.JSON)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class User(db.Model):
    """Someone who logs in to the dashboard: a name, a password hash and a role.

    ``session_epoch`` is part of every session's user id (see
    :meth:`get_id`): moving it on ends every session of the user at once (a
    new password, a new role, logging out). It starts at a random number,
    so a session can fit no other user even if ids were reused.
    """
    __tablename__ = 'app_user'  # "user" is a reserved word in PostgreSQL
    # Ids are never given again (SQLite reuses the highest freed one
    # otherwise): a session or token of a deleted user must not fit a new one.
    __table_args__ = {'sqlite_autoincrement': True}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    session_epoch: Mapped[int] = mapped_column(sa.BigInteger, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[dt.datetime | None]

    # What Flask-Login asks of a user object.
    is_authenticated = True
    is_active = True
    is_anonymous = False

    def get_id(self):
        """The id a session keeps: ``"<id>:<session_epoch>"``."""
        return f'{self.id}:{self.session_epoch}'

    def to_dict(self):
        return {'id': self.id, 'name': self.name, 'role': self.role,
                'created_at': isoformat(self.created_at),
                'last_login_at': isoformat(self.last_login_at)}


class ApiToken(db.Model):
    """A bearer token for programs, bound to a user (and so to a role); only its hash is kept.

    Tokens are 256-bit random strings, so a SHA-256 of the token is as good
    as a slow password hash and can be looked up by index (GitHub's scheme).
    """
    __tablename__ = 'api_token'
    __table_args__ = {'sqlite_autoincrement': True}  # a revoked id is never another token's

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey('app_user.id', ondelete='CASCADE'))
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None]

    user: Mapped['User'] = relationship()

    def to_dict(self):
        return {'id': self.id, 'name': self.name, 'user': self.user.name,
                'role': self.user.role, 'created_at': isoformat(self.created_at),
                'last_used_at': isoformat(self.last_used_at)}


class LoginFailure(db.Model):
    """Failed logins lately, per account (``account:<name>``) or per address (``address:<ip>``)."""
    __tablename__ = 'login_failure'

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    failures: Mapped[int] = mapped_column(default=0)
    last_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEntry(db.Model):
    """One action someone took (or was refused): who, as what role, what, on what, from where, when."""
    __tablename__ = 'audit_entry'

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    user: Mapped[str | None] = mapped_column(String(64))  # None: the local user (no login)
    role: Mapped[str | None] = mapped_column(String(16))
    via: Mapped[str] = mapped_column(String(16))  # session, token, local; anonymous
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(Text)  # a job id, a queue, a filter...
    count: Mapped[int | None]  # jobs it concerned, when known
    address: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(64))  # "done", or why it was refused

    __table_args__ = (sa.Index('ix_audit_entry_at', 'at'),)

    def to_dict(self):
        return {'id': self.id, 'at': isoformat(self.at), 'user': self.user, 'role': self.role,
                'via': self.via, 'action': self.action, 'target': self.target,
                'count': self.count, 'address': self.address, 'outcome': self.outcome}


class JobCount(db.Model):
    """How many jobs are in each (queue, task, state): a counter the database keeps.

    Triggers on ``job`` (migration 0008) add and subtract in the same
    transaction as every insert, update and delete, whoever writes it, so
    counts and failure groups are read from a few rows instead of a scan of
    the ledger. ``error_type`` is the failed jobs' error type ('' for every
    other state, and for a failure without a type), which makes the failed
    rows the failure groups. ``shard`` is 0 on SQLite (one writer at a
    time); on PostgreSQL each database session adds to its own rows (its
    backend pid), so concurrent writers never wait on, or deadlock over, a
    counter row; :func:`app.ledger.tallies.compact` folds the rows of
    sessions that have ended into shard 0. A count is the sum over shards.
    """
    __tablename__ = 'job_count'

    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    error_type: Mapped[str] = mapped_column(String(200), primary_key=True)
    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(sa.BigInteger)


class JobMinute(db.Model):
    """How many jobs finished in each minute, per queue, task and final state.

    Kept by triggers like :class:`JobCount`, keyed by the minute of
    ``finished_at`` (UTC, truncated): it always equals a count of the rows
    as they are now (a job retried and finished again counts in its new
    minute; a deleted job counts nowhere). Throughput reads a few recent
    rows instead of scanning the ledger.
    """
    __tablename__ = 'job_minute'

    minute: Mapped[dt.datetime] = mapped_column(primary_key=True)
    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(sa.BigInteger)


class Alert(db.Model):
    """One incident of an alert rule (:mod:`app.rules`) on one subject: fired, then resolved.

    At most one row per rule and subject is ``firing`` (a unique partial
    index), so a pass of a second leader cannot fire it again. ``value`` is
    what crossed ``threshold`` (percent, messages, seconds, consumers);
    ``message`` says so, ``resolution`` what was seen when it resolved.
    Delivery to the webhook: ``delivery`` is ``pending`` while a message is
    due (the firing one, then the resolving one), ``sent`` once both that
    are due went out, ``off`` when no webhook was configured; ``notified``
    is the last state delivered; a failed try counts in ``delivery_attempts``
    and leaves its reason in ``delivery_error`` until the next try.
    """
    __tablename__ = 'alert'

    id: Mapped[int] = mapped_column(primary_key=True)
    rule: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(32))
    scope: Mapped[str] = mapped_column(String(8))  # queue, task
    subject: Mapped[str] = mapped_column(String(100))  # the queue's or task's name
    state: Mapped[str] = mapped_column(String(16))  # firing, resolved
    fired_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[dt.datetime | None]
    value: Mapped[float]
    threshold: Mapped[float]
    message: Mapped[str] = mapped_column(Text)
    resolution: Mapped[str | None] = mapped_column(Text)
    delivery: Mapped[str] = mapped_column(String(16))  # pending, sent, off
    notified: Mapped[str | None] = mapped_column(String(16))
    delivered_at: Mapped[dt.datetime | None]
    delivery_attempts: Mapped[int] = mapped_column(default=0)
    delivery_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        sa.Index('uq_alert_firing', 'rule', 'subject', unique=True,
                 sqlite_where=sa.text("state = 'firing'"),
                 postgresql_where=sa.text("state = 'firing'")),
        sa.Index('ix_alert_state', 'state', 'id'),
        sa.Index('ix_alert_delivery', 'delivery', 'id'),
    )

    def to_dict(self):
        return {'id': self.id, 'rule': self.rule, 'kind': self.kind, 'scope': self.scope,
                'subject': self.subject, 'state': self.state,
                'fired_at': isoformat(self.fired_at), 'resolved_at': isoformat(self.resolved_at),
                'value': self.value, 'threshold': self.threshold, 'message': self.message,
                'resolution': self.resolution, 'delivery': self.delivery,
                'notified': self.notified, 'delivered_at': isoformat(self.delivered_at),
                'delivery_attempts': self.delivery_attempts,
                'delivery_error': self.delivery_error}


# Upper bounds (seconds) of the run-time and wait-time buckets the metric
# history counts in: bucket ``i`` holds times ``<= TIMING_BUCKETS[i]`` (and
# above the bound before), bucket ``len(TIMING_BUCKETS)`` the longer ones.
# Fixed by migration 0009: stored rows name buckets by index.
TIMING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                  60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# The kinds of time measured: an attempt's duration, and the time from the
# moment its job became due (enqueued, or its scheduled or retry time) to the
# attempt's start.
RUN, WAIT = 'run', 'wait'


class MetricMinute(db.Model):
    """Attempts that ended in each minute, per queue, task and attempt outcome.

    Written by the ledger's writer with each batch (one upsert per key per
    batch; :mod:`app.ledger.history`), and by the reaper for lost attempts.
    ``attempts`` counts the attempts that ended with ``outcome``;
    ``finished`` those of them that ended their job (no retry follows).
    Unlike :class:`JobMinute` it records what happened, whatever becomes of
    the jobs later (a purge or a retry changes nothing here). ``shard`` is
    0 on SQLite; on PostgreSQL each database session writes rows of its own
    (its backend pid), so writers never wait on one another's rows; a value
    is the sum over shards. Kept ``METRICS_RETENTION`` seconds.
    """
    __tablename__ = 'metric_minute'

    minute: Mapped[dt.datetime] = mapped_column(primary_key=True)
    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    attempts: Mapped[int] = mapped_column(sa.BigInteger)
    finished: Mapped[int] = mapped_column(sa.BigInteger)


class TimingMinute(db.Model):
    """Run times and wait times per minute, queue and task, counted in fixed buckets.

    ``timing`` is :data:`RUN` (an attempt's duration, in the minute it
    ended) or :data:`WAIT` (from the moment the job became due to the
    attempt's start, in the minute it started); ``bucket`` indexes
    :data:`TIMING_BUCKETS`; ``n`` is how many times fell in it and
    ``seconds`` their sum. Percentiles over any window, and the histograms
    of ``/metrics``, are read from these. Written like :class:`MetricMinute`.
    """
    __tablename__ = 'timing_minute'

    minute: Mapped[dt.datetime] = mapped_column(primary_key=True)
    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    timing: Mapped[str] = mapped_column(String(8), primary_key=True)
    bucket: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True, autoincrement=False)
    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(sa.BigInteger)
    seconds: Mapped[float] = mapped_column(sa.Float)


class MetricTotal(db.Model):
    """:class:`MetricMinute` summed over all time: counters that never go down.

    Written in the same statements' transaction as the minute rows, never
    pruned, untouched by purges: what ``queue_manager_jobs_finished_total``
    reads. The leader folds ended PostgreSQL sessions' rows into shard 0.
    """
    __tablename__ = 'metric_total'

    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    attempts: Mapped[int] = mapped_column(sa.BigInteger)
    finished: Mapped[int] = mapped_column(sa.BigInteger)


class TimingTotal(db.Model):
    """:class:`TimingMinute` summed over all time (the histograms of ``/metrics``)."""
    __tablename__ = 'timing_total'

    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), primary_key=True)
    timing: Mapped[str] = mapped_column(String(8), primary_key=True)
    bucket: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True, autoincrement=False)
    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(sa.BigInteger)
    seconds: Mapped[float] = mapped_column(sa.Float)


class DepthMinute(db.Model):
    """The broker's depth of each queue, sampled by the leader once a minute.

    ``ready``: messages due now, waiting for a worker (the queue's depth);
    ``scheduled``: messages due later (delays, retries). The first sample
    of a minute is kept. Kept ``METRICS_RETENTION`` seconds.
    """
    __tablename__ = 'depth_minute'

    minute: Mapped[dt.datetime] = mapped_column(primary_key=True)
    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    ready: Mapped[int] = mapped_column(sa.BigInteger)
    scheduled: Mapped[int] = mapped_column(sa.BigInteger)

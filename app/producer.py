"""Submitting jobs from Python: ``sleep.submit(seconds=1, delay=5)`` and :func:`submit_many`.

For any Python process started with the deployment's environment (the
same ``DATABASE_URL``, ``REDIS_URL`` and ``.env`` as its consumers): a
script, a cron job, another service, a task submitting follow-up jobs. The
caller sets nothing up: the first submission builds this process's app
once, from the environment (``create_app()``); inside an app context (a
running task, a view) that app is used instead, with its session.

Each task function declared with ``@task`` has:

- ``sleep.submit(**fields)``: submit one job now; ``fields`` are the
  task's parameters (``seconds=1``) and the job options of ``POST /api/jobs``
  (``delay``, ``eta``, ``queue``, ``priority``, ``retries``, ``retry_delay``,
  ``timeout``, ``idempotency_key``), told apart by name;
- ``sleep.job(**fields)``: the same submission as a dict, exactly what
  ``POST /api/jobs`` takes, for :func:`submit_many`.

Both go through the same service as the API (:func:`app.jobs.submit`,
:func:`app.jobs.submit_many`): the same validation, idempotency keys,
masking of secret parameters and recording, and an audit entry ``via
'python'`` with this process (``host:pid-start``) as its address. A
process that can reach the ledger and the broker is trusted as the
consumers are: admin-only task types may be submitted too.

``eta`` may also be a ``datetime`` (naive means UTC, as for an ISO time
without an offset). Text no ledger can store (NUL, a lone surrogate) is
refused as the API refuses it at its edge.

Errors leave nothing written: :class:`InvalidJob` (a ``ValueError``) for
bad parameters or options, :class:`BrokerUnavailable` when the broker
cannot be reached, :class:`LedgerUnavailable` when the ledger database
cannot be (or holds no ledger yet); all are :class:`SubmitError`.
"""
import datetime as dt
import os
import threading
from dataclasses import dataclass

from flask import current_app, has_app_context
from sqlalchemy import exc as sa_exc

from . import audit, broker, catalog, jobs, text
from .extensions import db
from .leader import process_name


class SubmitError(Exception):
    """Nothing was submitted (see the subclasses)."""


class InvalidJob(SubmitError, ValueError):
    """A submission the API would refuse with a 400; nothing was written.

    ``fields`` maps each bad field to what is wrong (``{"params.seconds":
    "must be a number"}``; ``jobs[3].params.seconds`` from
    :func:`submit_many`), ``errors`` lists them by index for
    :func:`submit_many` (``[{"index": 3, "field": "params.seconds",
    "message": "..."}]``).
    """

    def __init__(self, message, fields, errors=()):
        self.fields = dict(fields)
        self.errors = list(errors)
        super().__init__(f'{message}: ' + '; '.join(f'{k} {v}' for k, v in self.fields.items()))


class BrokerUnavailable(SubmitError):
    """The broker (Redis, or the embedded SQLite queue) could not be reached.

    No row was written, except those named in ``recorded``.
    ``unconfirmed``: ids of jobs whose messages the broker may still hold
    (handed over before it failed, and not taken back): such a job runs if
    it kept the message, and its row is written then. Usually empty.
    ``recorded``: those of them submitted with an idempotency key, whose
    rows were kept: each runs once when the broker is back (its message,
    or the reconciler's re-enqueue), and submitting again with its key
    returns it.
    """

    def __init__(self, message, unconfirmed=(), recorded=()):
        super().__init__(message)
        self.unconfirmed = list(unconfirmed)
        self.recorded = list(recorded)


class LedgerUnavailable(SubmitError):
    """The ledger database could not be reached, was busy past its timeout, or has no
    ledger in it yet (not migrated: ``flask --app wsgi db upgrade``); nothing was written.
    What the API answers with a 503."""


# PostgreSQL's SQLSTATE for a table that does not exist (its manual, Appendix A):
# a database the migrations never ran on. SQLite says so as an OperationalError.
_UNDEFINED_TABLE = '42P01'


@dataclass(frozen=True)
class Job:
    """A submitted job as the API shows it: read-only, taken when it was submitted.

    ``params`` shows secret parameters masked; ``scheduled_for`` and
    ``created_at`` are ISO 8601 UTC (``...Z``); ``created`` is False when an
    idempotency key named a job already recorded (this is that job).
    ``data`` is the whole job (``GET /api/jobs/<id>`` without its attempts).
    """
    id: str
    task: str
    queue: str
    state: str
    params: dict
    priority: int
    created_at: str
    scheduled_for: str | None
    idempotency_key: str | None
    created: bool
    data: dict

    @classmethod
    def of(cls, row, created):
        data = row.to_dict()
        return cls(id=data['id'], task=data['task'], queue=data['queue'], state=data['state'],
                   params=data['params'], priority=data['priority'],
                   created_at=data['created_at'], scheduled_for=data['scheduled_for'],
                   idempotency_key=data['idempotency_key'], created=created, data=data)


class Producer:
    """This process's way in: its app, built once on first use. One per process (:data:`producer`)."""

    def __init__(self):
        self._app = None
        self._lock = threading.Lock()
        # Builds the app from the environment: create_app, which the app
        # package puts here (this module is below it and cannot import it).
        self.app_factory = None

    def forked(self):
        """In a child just forked (``os.fork``, multiprocessing's fork start): leave the
        parent's database connections to it.

        Pooled connections are sockets the child shares with the parent; two
        processes talking over one corrupt each other's conversation (seen on
        PostgreSQL as "server closed the connection unexpectedly"). As
        SQLAlchemy's pooling guide says, the child drops them from its pool
        without closing them (``dispose(close=False)``) and opens its own.
        """
        self._lock = threading.Lock()  # another thread may have held it at the fork
        if self._app is not None:
            self._app.extensions.pop('queue_manager.submit_group', None)
            with self._app.app_context():
                db.engine.dispose(close=False)

    def app(self):
        """The app to submit with: the current one, else this process's (built once)."""
        if has_app_context():
            return current_app._get_current_object()
        with self._lock:
            if self._app is None:
                self._app = self.app_factory()
            return self._app

    def submit(self, item):
        """:func:`submit` for one submission dict."""
        return self._run(lambda config: self._one(item, config))

    def submit_many(self, items):
        """:func:`submit_many`."""
        if not isinstance(items, (str, bytes, dict)) and hasattr(items, '__iter__'):
            items = list(items)  # a tuple or a generator as a list
        # Anything else is no list of jobs: validate_many says so (InvalidJob).
        return self._run(lambda config: self._many(items, config))

    def _run(self, work):
        # Building the app counts too: an embedded queue that cannot be
        # opened is BrokerUnavailable there.
        try:
            app = self.app()
            if has_app_context():
                return work(app.config)
            with app.app_context():
                return work(app.config)
        except catalog.ValidationError as exc:
            raise InvalidJob(exc.message, exc.fields, exc.errors) from None
        except broker.BrokerUnavailable as exc:
            raise BrokerUnavailable(str(exc), exc.unconfirmed, exc.recorded) from exc
        except (sa_exc.OperationalError, sa_exc.DisconnectionError, sa_exc.ProgrammingError) as exc:
            if isinstance(exc, sa_exc.ProgrammingError) and \
                    getattr(getattr(exc, 'orig', None), 'sqlstate', None) != _UNDEFINED_TABLE:
                raise  # a bad statement: a bug, not the database away
            _rollback()
            first = (str(getattr(exc, 'orig', None) or exc).splitlines() or ['?'])[0][:300]
            raise LedgerUnavailable(f'the ledger database could not be used: {first}') from exc

    @staticmethod
    def _one(item, config):
        item = _as_sent(item)
        bad = text.problems(item) if isinstance(item, dict) else {}
        if bad:
            raise catalog.ValidationError(bad)
        sub = catalog.validate(item, config)
        row = jobs.submit(sub, audit=_entry([sub]))
        return Job.of(row, row.created)

    @staticmethod
    def _many(items, config):
        if not isinstance(items, list):
            catalog.validate_many(items, config, jobs.MAX_BATCH)  # raises: not a list of jobs
        items = [_as_sent(item) for item in items]
        errors = [{'index': i, 'field': field, 'message': message}
                  for i, item in enumerate(items) if isinstance(item, dict)
                  for field, message in text.problems(item).items()]
        if errors:
            raise catalog.ValidationError.of_jobs(errors)
        subs = catalog.validate_many(items, config, jobs.MAX_BATCH)
        return [Job.of(row, created) for row, created in jobs.submit_many(subs, audit=_entry(subs))]


def _rollback():
    try:
        if has_app_context():
            db.session.rollback()
    except Exception:  # the connection is gone: nothing of this call is left to undo
        pass


def _as_sent(item):
    # A submission as the API would receive it: an ``eta`` given as a
    # datetime becomes its ISO text (naive: UTC), and values of JSON's types
    # are of those types exactly (see _plain).
    if isinstance(item, dict) and isinstance(item.get('eta'), dt.datetime):
        item = {**item, 'eta': item['eta'].isoformat()}
    return _plain(item)


def _plain(value, depth=0):
    """``value`` with JSON's types exact: a subclass of int, float or str (an ``IntEnum``,
    a ``StrEnum``) as its plain value, a tuple as a list; anything else as it is, for the
    checks to refuse by field.

    The row keeps the parameters as JSON, but the broker's message is a
    pickle of what was given: an enum there is its class, which a consumer
    that cannot import its module cannot read, so the job would wait in the
    queue for ever.
    """
    kind = type(value)
    if kind in (str, int, float, bool) or value is None:
        return value
    if isinstance(value, int):  # bool has no subclasses: this is no bool
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if depth > text.MAX_DEPTH:
        return value  # nested too deep: the checks say so
    if isinstance(value, dict):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return value


def _entry(subs):
    names = sorted({sub.task.name for sub in subs})
    return audit.entry(user=None, role=None, via='python', action='submit',
                       target=('task ' if len(names) == 1 else 'tasks ') + ', '.join(names),
                       count=len(subs), address=process_name())


producer = Producer()
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=producer.forked)


def submit(item):
    """Submit one job: ``item`` is what ``POST /api/jobs`` takes (``sleep.job(seconds=1)``
    makes one); returns its :class:`Job` once its row is committed and its message queued.

    Raises :class:`InvalidJob`, :class:`BrokerUnavailable` or :class:`LedgerUnavailable`,
    writing nothing. ``sleep.submit(seconds=1)`` is ``submit(sleep.job(seconds=1))``.
    """
    return producer.submit(item)


def submit_many(items):
    """Submit up to 1,000 jobs in one transaction: all of them, or none.

    ``items`` are dicts as ``POST /api/jobs`` takes them (``sleep.job(...)``,
    or written out: ``{"task": "sleep", "params": {"seconds": 1}}``);
    returns their :class:`Job` objects in order. An idempotency key already
    used gives that job (``created`` False); one used twice in ``items``
    gives one job. Raises :class:`InvalidJob` (every bad field, by index in
    ``errors``; also for more than 1,000 items), :class:`BrokerUnavailable` or
    :class:`LedgerUnavailable`, writing nothing.
    """
    return producer.submit_many(items)


catalog.on_submit.append(submit)

"""Reading jobs: lists with filters and cursors, stats, failures, scheduled, logs, workers.

The read side of the jobs service (:mod:`app.jobs` changes them): what the
pages, the fragments, the API and the periodic report show. Nothing here
writes.
"""
import base64
import binascii
import datetime as dt
import json
import string

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import defer
from werkzeug.exceptions import NotFound

from . import catalog, states, text
from .extensions import db
from .models import Attempt, AttemptLog, Job, Worker, utcnow


class BadQuery(ValueError):
    """A list filter or cursor that cannot be used (HTTP 400)."""


def get(job_id):
    """The job with ``job_id``, or a 404."""
    job = db.session.get(Job, job_id) if isinstance(job_id, str) and len(job_id) <= 36 else None
    if job is None:
        raise NotFound(f'no job with id {job_id}')
    return job


def attempts(job):
    """``job``'s Attempt rows, first first."""
    return db.session.scalars(
        sa.select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number)).all()


# -- listing ------------------------------------------------------------------

def encode_cursor(job):
    """The opaque ``next`` cursor of a list page that ends with ``job`` (see :func:`decode_cursor`)."""
    raw = f'{job.created_at.isoformat()}|{job.id}'.encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip('=')


def decode_cursor(cursor):
    """``(created_at, id)`` of the last job of the previous page; raises :class:`BadQuery`.

    A cursor is decoded from whatever the client sends, so what it holds is
    checked as any input would be before it reaches SQL.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + '=' * (-len(cursor) % 4)).decode()
        created, job_id = raw.split('|', 1)
        created = dt.datetime.fromisoformat(created)
        if created.tzinfo is not None or len(job_id) > 36 or text.problem(job_id):
            raise ValueError(raw)
        return created, job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery('cursor is not one this server handed out') from None


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class _fold(sa.sql.functions.FunctionElement):
    """Text with its ASCII letters lowercased and every other character as it is.

    SQLite's lower() does exactly that; PostgreSQL's also folds É to é (by
    locale), so there the fold is spelled out, and a search means the same
    on both: ASCII letters in any case, anything else as typed.
    """
    type = sa.Text()
    name = 'fold'
    inherit_cache = True


@compiles(_fold)
def _fold_lower(element, compiler, **kw):
    return f'lower({compiler.process(element.clauses, **kw)})'


@compiles(_fold, 'postgresql')
def _fold_translate(element, compiler, **kw):
    return (f"translate({compiler.process(element.clauses, **kw)}, "
            f"'{string.ascii_uppercase}', '{string.ascii_lowercase}')")


class _position(sa.sql.functions.FunctionElement):
    """1-based position of the second text in the first, 0 when absent (no wildcards)."""
    type = sa.Integer()
    name = 'position'
    inherit_cache = True


@compiles(_position)
def _position_instr(element, compiler, **kw):
    return f'instr({compiler.process(element.clauses, **kw)})'


@compiles(_position, 'postgresql')
def _position_strpos(element, compiler, **kw):
    return f'strpos({compiler.process(element.clauses, **kw)})'


# Characters of each column searched: more than the ledger ever writes (a
# result is cut at 64 Ki characters), so a row written around it with
# megabytes of text costs a search no more than any other row.
SEARCHED = 100_000


def _contains(column, needles):
    """``column`` (its first SEARCHED characters, folded) contains one of ``needles`` (folded)."""
    folded = _fold(sa.func.substr(column, 1, SEARCHED))
    return sa.or_(*(_position(folded, n) > 0 for n in dict.fromkeys(needles)))


def search_condition(q):
    """Jobs whose id starts with ``q``, or whose parameters, error or result contain it.

    Any text: accented, CJK, emoji. ASCII letters match in either case.
    Parameters and results are searched in their stored JSON, both as typed
    (``"n": 2`` finds ``{"n": 2}``) and as a JSON string holds it (``a"b``
    is stored ``a\\"b``).
    """
    q = q.strip()[:200]
    typed = q.translate(_ASCII_LOWER)
    in_json = json.dumps(q, ensure_ascii=False)[1:-1].translate(_ASCII_LOWER)
    return sa.or_(Job.id.startswith(typed, autoescape=True),
                  _contains(sa.cast(Job.params, sa.Text), (typed, in_json)),
                  _contains(Job.error, (typed,)),
                  _contains(sa.cast(Job.result, sa.Text), (typed, in_json)))


FILTER_KEYS = ('state', 'queue', 'task', 'q')  # the jobs list's filters, in its query string
MAX_FILTER = 1000  # characters in a filter value, for pages and API alike


def parse_filters(args, prefix=''):
    """``{key: str or None}`` for each of :data:`FILTER_KEYS` in ``args``.

    ``args`` is any mapping with ``get`` (a query string, a form, a JSON
    object already checked); each key is looked up as ``prefix + key`` (the
    bulk form sends ``f.state``...). Empty or absent is None. Values are not
    checked here: :func:`check_filters` does that, and so does every query
    that uses them.
    """
    return {k: args.get(prefix + k) or None for k in FILTER_KEYS}


def check_filters(filters):
    """Raise :class:`BadQuery` if ``filters`` (as :func:`parse_filters` returns) cannot be used.

    The API's query declarations (``app.api.FILTERS``) say the same; this
    is the check for every other way in (the pages, bulk actions).
    """
    state = filters.get('state')
    if state and state not in states.JOB_STATES:
        raise BadQuery(f'state must be one of {", ".join(states.JOB_STATES)}')
    for key in FILTER_KEYS:
        value = filters.get(key)
        if value is not None and len(value) > MAX_FILTER:
            raise BadQuery(f'{key} must be at most {MAX_FILTER} characters')


def query_filters(state=None, queue=None, task=None, q=None):
    """Validated filters as SQL conditions; raises :class:`BadQuery`."""
    check_filters({'state': state, 'queue': queue, 'task': task, 'q': q})
    conditions = []
    if state:
        conditions.append(Job.state == state)
    if queue:
        conditions.append(Job.queue == queue)
    if task:
        conditions.append(Job.task == task)
    if q and q.strip():
        conditions.append(search_condition(q))
    return conditions


def list_jobs(state=None, queue=None, task=None, q=None, limit=50, cursor=None,
              with_result=False):
    """One page of jobs, newest first: ``(jobs, next_cursor)``.

    Keyset pagination on (created_at, id): each page is an index range scan,
    as fast on page 10,000 as on page 1. Results (up to 64 KiB each) are only
    loaded when asked for.
    """
    stmt = (sa.select(Job).options(*(() if with_result else (defer(Job.result, raiseload=True),)))
            .where(*query_filters(state, queue, task, q))
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(limit + 1))
    if cursor:
        created, job_id = decode_cursor(cursor)
        stmt = stmt.where(sa.tuple_(Job.created_at, Job.id) < sa.tuple_(created, job_id))
    rows = db.session.scalars(stmt).all()
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def stats():
    """Counts of jobs by state, overall and per queue."""
    rows = db.session.execute(
        sa.select(Job.queue, Job.state, sa.func.count()).group_by(Job.queue, Job.state)).all()
    by_state = dict.fromkeys(states.JOB_STATES, 0)
    by_queue = {}
    for queue, state, count in rows:
        by_state[state] = by_state.get(state, 0) + count
        by_queue.setdefault(queue, dict.fromkeys(states.JOB_STATES, 0))[state] = count
    return {'states': by_state, 'queues': by_queue, 'total': sum(by_state.values())}


def logs(job):
    """What the job's attempts logged: ``{attempt number: [lines]}``."""
    rows = db.session.scalars(sa.select(AttemptLog).where(AttemptLog.job_id == job.id)
                              .order_by(AttemptLog.number, AttemptLog.id)).all()
    by_attempt = {}
    for row in rows:
        by_attempt.setdefault(row.number, []).append(row)
    return by_attempt


def count_matching(filters, limit):
    """How many jobs match ``filters``, counting no further than ``limit`` (a bulk's size)."""
    ids = sa.select(Job.id).where(*query_filters(**filters)).limit(limit + 1).subquery()
    return min(db.session.scalar(sa.select(sa.func.count()).select_from(ids)), limit)


def failures(queue=None):
    """Failed jobs grouped by task and error type: count, and the latest of each group."""
    latest = (sa.select(Job.id, Job.task, Job.error_type,
                        sa.func.row_number().over(
                            partition_by=(Job.task, Job.error_type),
                            order_by=(Job.finished_at.desc(), Job.id.desc())).label('rank'),
                        sa.func.count().over(partition_by=(Job.task, Job.error_type)).label('n'))
              .where(Job.state == states.FAILED, *([Job.queue == queue] if queue else []))
              .subquery())
    rows = db.session.execute(
        sa.select(latest.c.id, latest.c.n).where(latest.c.rank == 1)).all()
    by_id = {j.id: j for j in db.session.scalars(
        sa.select(Job).where(Job.id.in_([r.id for r in rows])))} if rows else {}
    groups = [{'task': by_id[r.id].task, 'error_type': by_id[r.id].error_type, 'count': r.n,
               'latest': by_id[r.id]} for r in rows]
    return sorted(groups, key=lambda g: (-g['count'], g['task'], g['error_type'] or ''))


def scheduled(queue=None, limit=50):
    """Jobs waiting for a time: scheduled ones and retries, soonest first."""
    stmt = (sa.select(Job)
            .where(Job.state.in_([states.SCHEDULED, states.RETRYING]),
                   Job.scheduled_for.is_not(None),
                   *([Job.queue == queue] if queue else []))
            .order_by(Job.scheduled_for, Job.id).limit(limit))
    return db.session.scalars(stmt).all()


def finished_counts(hours):
    """``{(task, state): count}`` of jobs finished in the last ``hours`` hours."""
    since = utcnow() - dt.timedelta(hours=hours)
    rows = db.session.execute(
        sa.select(Job.task, Job.state, sa.func.count())
        .where(Job.finished_at >= since).group_by(Job.task, Job.state)).all()
    return {(task, state): n for task, state, n in rows}


def workers(lost_after):
    """Consumers as their heartbeats describe them: online first, newest first."""
    rows = db.session.scalars(sa.select(Worker).order_by(Worker.started_at.desc())).all()
    return sorted(rows, key=lambda w: not w.online(lost_after))


def task_names():
    """Every declared task type's name, sorted."""
    return sorted(catalog.TASKS)

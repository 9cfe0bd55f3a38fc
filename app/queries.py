"""Reading jobs: lists with filters and cursors, stats, failures, scheduled, logs, workers.

The read side of the jobs service (:mod:`app.jobs` changes them): what the
pages, the fragments, the API and the periodic report show. Nothing here
writes.
"""
import base64
import binascii
import calendar
import datetime as dt
import math
import json
import re
import string
from typing import NamedTuple

import sqlalchemy as sa
from flask import g, has_request_context
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import defer
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import UnaryExpression
from werkzeug.exceptions import NotFound

from . import catalog, states, text
from .extensions import db
from .models import (DUE, RUN, TIMING_BUCKETS, WAIT, WAITING, Attempt, AttemptLog, DepthMinute, Job,
                     JobCount, JobMinute, MetricMinute, MetricTotal, TimingMinute, TimingTotal,
                     Worker, utcnow)


class BadQuery(ValueError):
    """A list filter or cursor that cannot be used (HTTP 400); ``field`` names the query
    parameter at fault, when one is (the API's 400 lists it under ``fields``)."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


def get(job_id):
    """The job with ``job_id``, or a 404."""
    job = db.session.get(Job, job_id) if isinstance(job_id, str) and len(job_id) <= 36 else None
    if job is None:
        raise NotFound(f'no job with id {job_id}')
    return job


def jobs_by_id(ids):
    """The jobs of ``ids`` that exist, in that order (their results not loaded)."""
    ids = [i for i in ids if isinstance(i, str) and len(i) <= 36]
    return _rows_of(ids, with_result=False)


def attempts(job):
    """``job``'s Attempt rows, first first."""
    return db.session.scalars(
        sa.select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number)).all()


# -- listing ------------------------------------------------------------------

def _pack(key, job_id):
    """A cursor holding ``key`` (text without ``|``) and ``job_id``: opaque to the client."""
    return base64.urlsafe_b64encode(f'{key}|{job_id}'.encode()).decode().rstrip('=')


def _unpack(cursor):
    """``(key, job id)`` of a :func:`_pack` cursor; ValueError (or binascii's, Unicode's) if not one."""
    raw = base64.urlsafe_b64decode(cursor + '=' * (-len(cursor) % 4)).decode()
    key, job_id = raw.split('|', 1)
    if len(job_id) > 36 or text.problem(job_id):
        raise ValueError(raw)
    return key, job_id


_OLDEST_CURSOR = '^'  # marks a cursor of the oldest-first order


def encode_cursor(job, sort='newest'):
    """The opaque ``next`` cursor of a list page in ``sort`` order (``newest`` or
    ``oldest``) that ends with ``job`` (see :func:`decode_cursor`)."""
    mark = _OLDEST_CURSOR if sort == 'oldest' else ''
    return _pack(mark + job.created_at.isoformat(), job.id)


def decode_cursor(cursor, sort='newest'):
    """``(created_at, id)`` of the last job of the previous page in ``sort`` order (``newest``
    or ``oldest``); raises :class:`BadQuery`, saying so when the cursor belongs to another
    order.

    A cursor is decoded from whatever the client sends, so what it holds is
    checked as any input would be before it reaches SQL.
    """
    try:
        created, job_id = _unpack(cursor)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery('cursor is not one this server handed out', 'cursor') from None
    if created.startswith(_RUNTIME_CURSOR):
        raise BadQuery('cursor belongs to the runtime order: give sort=runtime', 'cursor')
    oldest = created.startswith(_OLDEST_CURSOR)
    if oldest != (sort == 'oldest'):
        raise BadQuery(f'cursor belongs to the {"oldest" if oldest else "newest"} order: '
                       f'give sort={"oldest" if oldest else "newest"}', 'cursor')
    try:
        created = dt.datetime.fromisoformat(created.removeprefix(_OLDEST_CURSOR))
        if created.tzinfo is not None:
            raise ValueError(cursor)
        return created, job_id
    except ValueError:
        raise BadQuery('cursor is not one this server handed out', 'cursor') from None


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


# A search whose index finds at most this many candidates reads them all
# and lists them from the whole ledger at once (a rare text, found in one
# page however old). One that finds more is answered a window at a time:
# each page reads only the candidates among the next SEARCH_WINDOW jobs of
# the list, so its cost follows the page, not how many match in all.
CANDIDATES = 500
# SQLite: jobs written since the search index was last brought up to date
# are candidates whatever they hold; a burst of writes may leave thousands
# for the second until the writer indexes them, and a rare text should not
# be read a window at a time meanwhile: they have a cap of their own.
PENDING_CANDIDATES = 5000
# SQLite: the candidates read for one window of a list, at most. Only their
# rowids are read (a millisecond or two for thousands); past this many, the
# window's rows are tested one by one.
WINDOW_CANDIDATES = 5000
# SQLite: the candidates read from the whole ledger for a search in the
# run-time order, at most. That order's windows cannot be narrowed by the
# index (their rowids are scattered over the ledger), so each of their rows
# is read and tested (SCAN_WINDOW of them: 12 ms at a million jobs), and a
# window may hold no match. Up to this many candidates are read instead (7 ms for
# the 2,357 index rows of "gateway" among bench/history.py's million jobs)
# and the page is the longest runs among them. (On PostgreSQL the windows stay: its
# trigram index answers as a bitmap, so even the first few thousand
# candidates of a common text cost a read of each of their rows.)
RUN_CANDIDATES = 5000
# The trigram index finds substrings of this many characters or more.
TRIGRAM = 3


def _search_variants(q):
    """The folded texts a search for ``q`` looks for: as typed, and as stored in JSON."""
    typed = q.translate(_ASCII_LOWER)
    in_json = json.dumps(q, ensure_ascii=False)[1:-1].translate(_ASCII_LOWER)
    return typed, in_json


def _id_prefix(typed, dialect):
    """Jobs whose id starts with ``typed`` (ids are lowercase), as an index can answer it.

    SQLite compares text by code point, so the prefix is a range of the
    primary key. PostgreSQL may compare by locale, where a prefix is no
    range: there a LIKE, which the ``text_pattern_ops`` index answers.
    """
    if dialect == 'sqlite':
        return sa.and_(Job.id >= typed, Job.id < typed + '\U0010ffff')
    return Job.id.startswith(typed, autoescape=True)


class _Index(NamedTuple):
    """What the search index can do for one search (see :func:`_indexed`).

    ``needles``: the folded texts looked for, each of :data:`TRIGRAM`
    characters or more. ``prefixed``: the jobs whose id starts with the
    search (SQLite: rowids; PostgreSQL: ids), when no more than
    :data:`CANDIDATES`, else None. ``few``: a condition naming every job the
    search can match (the index's candidates and ``prefixed``), when the
    candidates are no more than :data:`CANDIDATES`; None when there are
    more (the search is then answered a window at a time, and
    :func:`_candidates_between` narrows each window).
    """
    dialect: str
    needles: tuple
    prefixed: object
    few: object


def _sqlite_candidates(needles, lo=None, hi=None, cap=None):
    """Job rowids that may match (SQLite), those in ``lo``..``hi`` if given; None if over the caps.

    At most ``cap`` rows of the index (by default :data:`CANDIDATES`, or
    :data:`WINDOW_CANDIDATES` in a range) and :data:`PENDING_CANDIDATES`
    jobs not yet indexed, or None.

    One index row per job column, numbered job rowid * 4 + column; and the
    jobs written since the index was last brought up to date. One
    statement, so both parts see the same moment (the writer indexing in
    between would otherwise hide jobs from both).
    """
    phrase = ' OR '.join('"' + n.replace('"', '""') + '"' for n in needles)
    if cap is None:
        cap = CANDIDATES if lo is None else WINDOW_CANDIDATES
    params = {'q': phrase, 'n': cap + 1, 'p': PENDING_CANDIDATES + 1}
    search_range = pending_range = ''
    if lo is not None:
        search_range = ' AND rowid BETWEEN :lo * 4 AND :hi * 4 + 3'
        pending_range = ' WHERE job_rowid BETWEEN :lo AND :hi'
        params.update(lo=lo, hi=hi)
    found = db.session.execute(
        sa.text(f'SELECT 0, r FROM (SELECT rowid / 4 AS r FROM job_search '
                f'WHERE job_search MATCH :q{search_range} LIMIT :n) UNION ALL '
                f'SELECT 1, r FROM (SELECT job_rowid AS r FROM job_search_pending{pending_range} '
                f'LIMIT :p)'), params).all()
    # Over the limit in either part (index rows, not jobs: a job matching
    # in two columns is two rows) means the candidates are not all read.
    if (sum(1 for part, _r in found if part == 0) > cap
            or sum(1 for part, _r in found if part == 1) > PENDING_CANDIDATES):
        return None
    return {r for _part, r in found}


def _rowid_in(rowids):
    """SQLite: the job's rowid is one of ``rowids``, as one parameter (a JSON array)."""
    return sa.literal_column('job.rowid').in_(
        sa.select(sa.literal_column('value')).select_from(
            sa.func.json_each(json.dumps(sorted(rowids)))).scalar_subquery())


def _trigram_match(needles, unseen=False, scan=False):
    """PostgreSQL: an ILIKE the pg_trgm GIN index over ``job_search_text`` answers.

    ``unseen``: each pattern is given as a subquery's value, which the
    planner does not see when it plans, so it estimates the ILIKE to match
    a fixed share of the rows (0.5%) instead of what its statistics say of
    the text: those say a few dozen for a word thousands of jobs hold.
    ``scan``: the same test in a form the index does not answer, for rows
    read another way: about a sixth of the cost of the exact condition per
    row (whose ASCII-only case folding, ``translate``, is slow: 16 ms a
    thousand rows), which it spares all but the candidates.
    """
    text_ = sa.func.job_search_text(Job.params, Job.error, Job.result)
    patterns = ['%' + n.replace('\\', '\\\\').replace('%', '\\%').replace('_', '\\_') + '%'
                for n in needles]
    match = sa.or_(*(text_.ilike(sa.select(sa.literal(p)).scalar_subquery() if unseen else p,
                                 escape='\\') for p in patterns))
    return match.is_(sa.true()) if scan else match


def _indexed(typed, in_json, dialect):
    """What the search index can do for a search (an :class:`_Index`), or None where it cannot help.

    The index is a prefilter: it finds every row the exact condition can
    match (it folds case at least as much), and the exact condition decides.
    SQLite: an FTS5 trigram table, a row per job column, brought up to date
    by the ledger's writer, plus the jobs written since. PostgreSQL: a
    pg_trgm GIN index over ``job_search_text``. Up to
    :data:`CANDIDATES + 1 <CANDIDATES>` candidates are read (on PostgreSQL,
    the ids of rows the index's ILIKE matches, in no particular order) to
    tell a search with few candidates from one with many; few are named by
    rowid (SQLite) or id (PostgreSQL).
    """
    needles = [n for n in dict.fromkeys((typed, in_json)) if len(n) >= TRIGRAM]
    if len(needles) < len(dict.fromkeys((typed, in_json))):
        return None  # too short for trigrams: only a scan can tell
    # The jobs whose id starts with the search are named with the
    # candidates, so that the list reads them all by rowid or id: a filter
    # beside them (a queue, a state) is then tested on those rows, not
    # walked (see query_filters).
    prefixed = db.session.scalars(
        sa.select(sa.literal_column('job.rowid') if dialect == 'sqlite' else Job.id)
        .select_from(Job).where(_id_prefix(typed, dialect)).limit(CANDIDATES + 1)).all()
    prefixed = set(prefixed) if len(prefixed) <= CANDIDATES else None
    if dialect == 'sqlite':
        rowids = _sqlite_candidates(needles)
        few = None if rowids is None or prefixed is None else _rowid_in(rowids | prefixed)
        return _Index(dialect, tuple(needles), prefixed, few)
    # The ids of the rows the index's ILIKE matches: with few, the list
    # reads them by id rather than asking the trigram index again.
    found = db.session.scalars(
        sa.select(Job.id).where(_trigram_match(needles)).limit(CANDIDATES + 1)).all()
    named = None if len(found) > CANDIDATES or prefixed is None else set(found) | prefixed
    return _Index(dialect, tuple(needles), prefixed,
                  None if named is None else Job.id.in_(sorted(named)) if named else sa.false())


def _candidates_between(index, lo, hi):
    """A condition narrowing a window of the list to the index's candidates in it, or None.

    SQLite: the candidates among job rowids ``lo`` to ``hi`` (the least and
    greatest in the window), read from the index; None when there are more
    than :data:`WINDOW_CANDIDATES` of them: the window's rows are then
    tested one by one (the list stops at a page of matches, which so many
    candidates fill soon). PostgreSQL: the trigram condition, which the planner
    answers together with the window's range of the list's index (a
    BitmapAnd: only the window's candidates are read from the table). It
    does so only when it expects the trigram index to match many rows,
    which a search with many candidates does: the pattern is kept from its
    statistics, which expect a few dozen (reading every candidate in the
    ledger to find a window's few: 5 ms for 2,344 at a million jobs).
    """
    if index.dialect != 'sqlite':
        return _trigram_match(index.needles, unseen=True)
    rowids = _sqlite_candidates(index.needles, lo, hi)
    return None if rowids is None else _rowid_in(rowids)


class SearchPlan(NamedTuple):
    """How a search for ``q`` is answered (see :func:`search_plan`).

    ``index``: the :class:`_Index`, or None for a search too short for it.
    :meth:`condition` is the exact condition, narrowed by the index where
    it can. ``needles``: the folded texts looked for (as typed, as JSON
    holds it), of any length.
    """
    prefix: object
    contains: object
    index: _Index | None
    needles: tuple = ()

    @property
    def whole(self):
        """True when the index names every candidate in the ledger (few of them)."""
        return self.index is not None and self.index.few is not None

    def condition(self, narrow=None):
        """The search's SQL condition; ``narrow`` (a window's candidates) narrows it further.

        With every job it can match named (``whole``), those and only those
        are looked at: the names first, then the exact condition.
        """
        if self.whole:
            return sa.and_(self.index.few, sa.or_(self.prefix, self.contains))
        return sa.or_(self.prefix, self.contains if narrow is None
                      else sa.and_(narrow, self.contains))

    @property
    def by_name(self):
        """True when the list reads the matches by the rowids named (SQLite, ``whole``):
        its other conditions are then tests of those rows, kept from SQLite's planner
        (which would otherwise walk a filter's index over the whole ledger)."""
        return self.whole and self.index.dialect == 'sqlite'


def search_plan(q):
    """A :class:`SearchPlan` for a search for ``q`` (see :func:`search_condition`).

    With few candidates in the index (``plan.whole``) the condition holds
    them and a list is read from the whole ledger at once. Otherwise a list
    reads a window of the ledger per page (:func:`list_jobs`): at most
    :data:`SEARCH_WINDOW` jobs where the index narrows it (many
    candidates), :data:`SCAN_WINDOW` where it cannot (fewer than
    :data:`TRIGRAM` characters).

    Within a request the plan of a ``q`` is made once: a page lists and
    counts the same search, and reading the index's candidates costs up to
    6 ms on PostgreSQL at a million jobs.
    """
    q = q.strip()
    if not has_request_context():
        return _search_plan(q)
    plans = g.setdefault('search_plans', {})
    if q not in plans:
        plans[q] = _search_plan(q)
    return plans[q]


def _search_plan(q):
    typed, in_json = _search_variants(q)
    contains = sa.or_(_contains(sa.cast(Job.params, sa.Text), (typed, in_json)),
                      _contains(Job.error, (typed,)),
                      _contains(sa.cast(Job.result, sa.Text), (typed, in_json)))
    dialect = db.session.get_bind().dialect.name
    return SearchPlan(_id_prefix(typed, dialect), contains, _indexed(typed, in_json, dialect),
                      tuple(dict.fromkeys((typed, in_json))))


def search_condition(q):
    """Jobs whose id starts with ``q``, or whose parameters, error or result contain it.

    Any text: accented, CJK, emoji. ASCII letters match in either case.
    Parameters and results are searched in their stored JSON, both as typed
    (``"n": 2`` finds ``{"n": 2}``) and as a JSON string holds it (``a"b``
    is stored ``a\\"b``). The meaning is this exact condition on SQLite
    and PostgreSQL alike; an index (see :func:`_indexed`) only makes it
    fast for searches of :data:`TRIGRAM` characters or more, with few
    candidates (a list reads a search with many a window at a time).
    """
    plan = search_plan(q)
    if plan.whole or plan.index is None:
        return plan.condition()
    # Many candidates, and no window to narrow: on PostgreSQL the index
    # still narrows the rows; on SQLite the exact condition tests each.
    return plan.condition(_trigram_match(plan.index.needles)
                          if plan.index.dialect != 'sqlite' else None)


# The jobs list's filters, in its query string.
FILTER_KEYS = ('state', 'queue', 'task', 'q', 'finished_from', 'finished_to')
TIME_FILTERS = ('finished_from', 'finished_to')  # ISO 8601 times (UTC) among them
# Characters in a filter value, for pages and API alike: 500 of any script
# fit gunicorn's request line (gunicorn.conf.py's limit_request_line).
MAX_FILTER = 500


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
        raise BadQuery(f'state must be one of {", ".join(states.JOB_STATES)}', 'state')
    for key in FILTER_KEYS:
        value = filters.get(key)
        if value is not None and len(value) > MAX_FILTER:
            raise BadQuery(f'{key} must be at most {MAX_FILTER} characters', key)
    for key in TIME_FILTERS:
        parse_time(filters.get(key), key)


def parse_time(value, name):
    """An ISO 8601 time (``2026-03-01T12:00:00Z``) as a naive UTC datetime; None for None.

    A time with another offset is converted to UTC; one with none is read as
    UTC. Raises :class:`BadQuery` naming ``name`` for anything else.
    """
    if value is None:
        return None
    try:
        if len(value) > 40:
            raise ValueError(value)
        return catalog.parse_eta(value)  # a submission's eta reads the same way
    except (ValueError, TypeError, AttributeError):
        raise BadQuery(f'{name} must be an ISO 8601 time in UTC, such as '
                       f'2026-03-01T12:00:00Z', name) from None


def finished_between(finished_from=None, finished_to=None, column=Job.finished_at):
    """SQL conditions: finished at or after ``finished_from``, before ``finished_to``.

    Both are ISO 8601 text (:func:`parse_time`) or None (no bound); a job
    that has not finished matches no bound. ``column``: the finish time as
    the conditions test it. Raises :class:`BadQuery`.
    """
    start = parse_time(finished_from, 'finished_from')
    end = parse_time(finished_to, 'finished_to')
    if start is not None and end is not None and end <= start:
        raise BadQuery('finished_to must come after finished_from', 'finished_to')
    return ([column >= start] if start is not None else []) + (
        [column < end] if end is not None else [])


def query_filters(state=None, queue=None, task=None, q=None, finished_from=None,
                  finished_to=None, by_name=False):
    """Validated filters as SQL conditions; raises :class:`BadQuery`.

    ``by_name``: the rows are read by the rowids a search names
    (:attr:`SearchPlan.by_name`; so too when ``q`` is such a search): each
    filter is a test of those rows, in a form SQLite cannot answer from an
    index. Otherwise its planner may walk the filter's index over the whole
    ledger, testing each job against the names: 100 to 150 ms for a search
    with no candidate beside ``queue=default``, at 100,000 and 200,000 jobs.
    """
    check_filters({'state': state, 'queue': queue, 'task': task, 'q': q})
    plan = search_plan(q) if q and q.strip() else None
    column = _unindexed if by_name or (plan is not None and plan.by_name) else _as_is
    conditions = finished_between(finished_from, finished_to, column(Job.finished_at))
    if state:
        conditions.append(column(Job.state) == state)
    if queue:
        conditions.append(column(Job.queue) == queue)
    if task:
        conditions.append(column(Job.task) == task)
    if plan is not None:
        conditions.append(search_condition(q))
    return conditions


def _as_is(column):
    return column


# Jobs a search looks at per page when the index does not name all its
# candidates at once, at most: a page then holds the matches among them,
# and its cursor goes on from the last. SCAN_WINDOW where the index cannot
# narrow the search (too short for it, or in the run-time order); SEARCH_WINDOW
# where it narrows each window to its candidates (a walk of the list's index,
# no row read). Each row of a SCAN_WINDOW is read and tested: at a million
# jobs on the 2-core machine, 20 ms for 10,000 in the created order and 25 ms
# in the run-time order (whose rows are spread over the file), so that a
# page with no match cost 70 ms; 5,000 keep it to about half.
SCAN_WINDOW = 5_000
SEARCH_WINDOW = 20_000
# The first jobs of a window a search with many candidates tries first: a
# text one job in twenty holds fills a page from them.
DENSE_WINDOW = 1_000


class _Key:
    """A list position, as :func:`encode_cursor` reads it from a job."""

    def __init__(self, created_at, id):
        self.created_at, self.id = created_at, id


# The orders a jobs list can be read in: newest first, oldest first, or the
# finished jobs whose last attempt ran longest first.
SORTS = ('newest', 'oldest', 'runtime')
_RUNTIME_CURSOR = '~'  # marks a cursor of the run-time order


def encode_run_cursor(seconds, job_id):
    """The cursor of a run-time ordered page that ends with a job whose last attempt ran
    ``seconds`` (a float, written as its shortest exact text)."""
    return _pack(f'{_RUNTIME_CURSOR}{seconds!r}', job_id)


# The run time a run-time cursor holds, as encode_run_cursor writes it: a
# float's repr (``2.5``, ``0.000125``, ``1.5e-05``).
_RUN_SECONDS = re.compile(r'-?[0-9]{1,20}(\.[0-9]{1,20})?(e[-+][0-9]{1,3})?')


def decode_run_cursor(cursor):
    """``(seconds, id)`` of a run-time cursor (seconds a finite float); raises
    :class:`BadQuery` (saying so when the cursor is one of the created orders')."""
    try:
        key, job_id = _unpack(cursor)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery('cursor is not one this server handed out', 'cursor') from None
    seconds = key[len(_RUNTIME_CURSOR):]
    if key.startswith(_RUNTIME_CURSOR) and _RUN_SECONDS.fullmatch(seconds) \
            and math.isfinite(float(seconds)):
        return float(seconds), job_id
    if not key.startswith(_RUNTIME_CURSOR):
        _created_cursor_of_other_order(key)
    raise BadQuery('cursor is not one this server handed out', 'cursor')


def _created_cursor_of_other_order(key):
    """Raise :class:`BadQuery` naming the orders a cursor holding ``key`` belongs to, when
    it is a created-order position."""
    try:
        dt.datetime.fromisoformat(key.removeprefix(_OLDEST_CURSOR))
    except ValueError:
        return
    order = 'oldest' if key.startswith(_OLDEST_CURSOR) else 'newest'
    raise BadQuery(f'cursor belongs to the {order} order, not runtime: give sort={order}',
                   'cursor')


def check_sort(sort):
    """``sort`` if it is one of :data:`SORTS` (None: ``'newest'``); raises :class:`BadQuery`."""
    if sort in (None, ''):
        return 'newest'
    if sort not in SORTS:
        raise BadQuery(f'sort must be one of {", ".join(SORTS)}', 'sort')
    return sort


def check_cursor(cursor, sort='newest'):
    """Raise :class:`BadQuery` unless ``cursor`` is one this server hands out for ``sort``."""
    if sort == 'runtime':
        decode_run_cursor(cursor)
    else:
        decode_cursor(cursor, sort)


def list_jobs(state=None, queue=None, task=None, q=None, limit=50, cursor=None,
              with_result=False, sort='newest', finished_from=None, finished_to=None):
    """One page of jobs in ``sort`` order (:data:`SORTS`): ``(jobs, next_cursor)``.

    ``newest`` (the default) and ``oldest`` walk (created_at, id) down or
    up; ``runtime`` lists finished jobs by their latest attempt's run time
    (``Job.run_seconds``; a job whose attempts never ran has none and is
    left out), longest first, then id. Keyset
    pagination: a page continues strictly after the previous page's last
    row, so a job is listed once whatever is added meanwhile (in the
    run-time order a job that runs again between two pages moves, and may
    be listed again or missed, as in any order by a value that changes);
    each page is an index range scan, as fast on page 10,000 as on page 1.
    Results (up to 64 KiB each) are only loaded when asked for. A
    search whose candidates the index does not name all at once (see
    :func:`search_plan`; in the run-time order on SQLite, up to
    :data:`RUN_CANDIDATES` are named) looks at a window of the list per page
    (:data:`SEARCH_WINDOW` jobs in the created orders, :data:`SCAN_WINDOW`
    for a search too short for the index and in the run-time order, whose
    window the index cannot narrow; a window is the next jobs of the order
    with at most one filter, the first of ``state``, ``queue`` and ``task``
    given, and the others are tested on its jobs): the page holds the first
    ``limit`` matches in it, or fewer (even none) with a cursor that goes on from the
    window's last job, so that every page costs about the same at any
    ledger size however many jobs match (the window's first
    :data:`DENSE_WINDOW` jobs are tried alone first: a common text fills
    its page from them; then, in the created orders, when they held some
    matches, a window twice the size their share needs for a page, if under
    the whole window's).
    ``next_cursor`` is None after the last page. ``finished_from`` and
    ``finished_to`` (ISO 8601, UTC) keep the jobs finished in that range
    (:func:`finished_between`). Raises :class:`BadQuery` for a bad filter,
    sort or cursor.
    """
    sort = check_sort(sort)
    check_filters({'state': state, 'queue': queue, 'task': task, 'q': q})
    plan = search_plan(q) if q and q.strip() else None
    if sort == 'runtime' and plan is not None and not plan.whole and plan.index is not None \
            and plan.index.dialect == 'sqlite' and plan.index.prefixed is not None:
        rowids = _sqlite_candidates(plan.index.needles, cap=RUN_CANDIDATES)
        if rowids is not None:  # every candidate, named: the whole ledger at once
            plan = plan._replace(index=plan.index._replace(
                few=_rowid_in(rowids | plan.index.prefixed)))
    by_name = plan is not None and plan.by_name
    conditions = query_filters(state, queue, task, finished_from=finished_from,
                               finished_to=finished_to, by_name=by_name)
    # Read by the names, the rows' other conditions are tests of each (see query_filters).
    column = _unindexed if by_name else _as_is
    # A window (a search read a window at a time) is the next jobs of the
    # order with at most one filter, the first of state, queue and task
    # given: each has an index in each order, so that finding a window is a
    # walk of that index alone, however narrow the other filters (a range of
    # finish times, a second filter), which the page then tests on the
    # window's rows. (Walked with every filter, a narrow one took 0.2 to 0.8 s
    # a page at 100,000 to 200,000 jobs, growing with the ledger.)
    walk = [c == v for c, v in ((Job.state, state), (Job.queue, queue), (Job.task, task))
            if v][:1]
    if sort == 'runtime':
        # The finished jobs with a run time, through the run-time indexes
        # (Job.run_seconds: the writer keeps it), longest first.
        ran = (Job.finished_at, Job.run_seconds)
        conditions += [column(c).is_not(None) for c in ran]
        walk += [c.is_not(None) for c in ran]
        if cursor:
            seconds, job_id = decode_run_cursor(cursor)
            bound = sa.tuple_(sa.literal(seconds, sa.Float), job_id)
            conditions.append(sa.tuple_(*map(column, _RUN_KEY)) < bound)
            walk.append(sa.tuple_(*_RUN_KEY) < bound)
        edge = None
        if plan is None or plan.whole:
            if plan is not None:
                conditions.append(plan.condition())
            rows = _page_keys(conditions, _RUN_ORDER, limit, _RUN_KEY)
        else:
            # A search the index does not name every candidate of: a window
            # of the list per page, as in the created orders, whose run-time
            # order the index's rowid ranges cannot follow: each row of the
            # window is tested, its first DENSE_WINDOW jobs first; when they
            # hold no page, the rest of the window after them (they are not
            # read again), whose edge is the whole window's.
            if DENSE_WINDOW < SCAN_WINDOW:
                rows, edge = _run_window_page(plan, conditions, walk, DENSE_WINDOW, limit)
                if len(rows) <= limit and edge is not None:
                    after = sa.tuple_(*_RUN_KEY) < sa.tuple_(*edge)
                    more, edge = _run_window_page(plan, [*conditions, after], [*walk, after],
                                                  SCAN_WINDOW - DENSE_WINDOW, limit - len(rows))
                    rows += more
            else:
                rows, edge = _run_window_page(plan, conditions, walk, SCAN_WINDOW, limit)
        jobs = _rows_of([job_id for _seconds, job_id in rows[:limit]], with_result)
        if len(rows) > limit:
            return jobs, encode_run_cursor(*rows[limit - 1])
        return jobs, encode_run_cursor(*edge) if edge is not None else None
    newest = sort == 'newest'
    key = sa.tuple_(*_CREATED_KEY)
    if cursor:
        bound = sa.tuple_(*decode_cursor(cursor, sort))
        at = sa.tuple_(*map(column, _CREATED_KEY))
        conditions.append(at < bound if newest else at > bound)
        walk.append(key < bound if newest else key > bound)
    order = (Job.created_at.desc(), Job.id.desc()) if newest else (Job.created_at, Job.id)
    if plan is None or plan.whole:
        if plan is not None:
            conditions.append(plan.condition())
        # The page's positions first (what the sort holds stays small), then its rows.
        keys = _page_keys(conditions, order, limit)
        edge = None
    else:
        unfiltered = len(conditions) == bool(cursor)  # nothing but the cursor yet
        size = SCAN_WINDOW if plan.index is None else SEARCH_WINDOW
        # A common text fills a page from the first jobs of the window: they
        # are tried first, and the whole window read only when they hold no
        # page. The page is the same either way (the first matches in the
        # window), and costs what the page does, not what the window does.
        keys = None
        if plan.index is not None and DENSE_WINDOW < size:
            keys, edge = _window_page(plan, conditions, walk, order, key, newest, DENSE_WINDOW,
                                      limit, unfiltered, dense=True)
            if len(keys) <= limit and edge is not None:
                # No page among them: a window twice the size their share of
                # matches needs for one is tried before the whole window.
                grown = DENSE_WINDOW * (limit + 1) * 2 // len(keys) if keys else size
                keys = None
                if grown < size:
                    keys, edge = _window_page(plan, conditions, walk, order, key, newest, grown,
                                              limit, unfiltered)
                    if len(keys) <= limit and edge is not None:
                        keys = None
        if keys is None:
            keys, edge = _window_page(plan, conditions, walk, order, key, newest, size, limit,
                                      unfiltered)
    # A job deleted between the two reads is left out of the page, which
    # still ends where its positions did (not at the window's edge, which
    # would skip the matches before it).
    rows = _rows_of([job_id for _created, job_id in keys[:limit]], with_result)
    if len(keys) > limit:
        return rows, encode_cursor(_Key(*keys[limit - 1]), sort)
    return rows, encode_cursor(_Key(*edge), sort) if edge is not None else None


# The created orders' position of a job, and the run-time order's, with its order.
_CREATED_KEY = (Job.created_at, Job.id)
_RUN_KEY = (Job.run_seconds, Job.id)
_RUN_ORDER = (Job.run_seconds.desc(), Job.id.desc())


def _run_window_page(plan, conditions, walk, size, limit):
    """``(keys, edge)``: the positions ``(run_seconds, id)`` of the first ``limit + 1``
    jobs meeting ``conditions`` and ``plan`` among the next ``size`` jobs of the run-time
    order meeting ``walk`` (see :func:`list_jobs`), and the window's last position (None:
    the rest of the list is shorter than a window). On PostgreSQL the index's own test goes
    first on each row (``_trigram_match``'s ``scan``)."""
    edge = _edge(walk, _RUN_ORDER, size, _RUN_KEY)
    narrow = _scan_first(plan)
    conditions = [*conditions, plan.condition(narrow)]
    if edge is not None:
        conditions.append(sa.tuple_(*_RUN_KEY) >= sa.tuple_(*edge))
    return _page_keys(conditions, _RUN_ORDER, limit, _RUN_KEY), edge


def _page_keys(conditions, order, limit, key=_CREATED_KEY):
    """The positions (``key``'s columns: ``(created_at, id)`` by default) of the first
    ``limit + 1`` jobs meeting ``conditions`` in ``order``: read from the list's index."""
    return [tuple(r) for r in db.session.execute(
        sa.select(*key).where(*conditions).order_by(*order).limit(limit + 1)).all()]


def _edge(conditions, order, size, key=_CREATED_KEY):
    """The position (``key``'s columns) of the ``size``-th job meeting ``conditions`` in
    ``order``, the last of a window, or None when no job is left after the window (the
    window holds the rest of the list): the list's index skipped through, no row read.

    A window ending on the list's last job has no edge: its page would
    otherwise hand out a cursor to an empty page.
    """
    last, *after = db.session.execute(sa.select(*key).where(*conditions).order_by(*order)
                                      .offset(size - 1).limit(2)).all() or [None]
    return last if after else None


def _window_page(plan, conditions, walk, order, key, newest, size, limit, unfiltered,
                 dense=False):
    """``(keys, edge)``: the positions ``(created_at, id)`` of the first ``limit + 1`` jobs
    meeting ``conditions`` and ``plan`` among the next ``size`` jobs of the order meeting
    ``walk`` (see :func:`list_jobs`; ``key`` is its position's columns) and the window's
    last position (None: the rest of the list is shorter than a window); ``dense`` for the
    first few jobs of a window (see :func:`_window`)."""
    edge, narrow = _window(plan.index, walk, order, size, dense)
    if plan.index is None:
        narrow = _scan_first(plan)
    conditions = [*conditions, plan.condition(narrow)]
    if edge is not None:
        if narrow is not None and unfiltered and db.session.get_bind().dialect.name == 'sqlite':
            # The window's candidates are named by rowid: SQLite is kept
            # from walking the list's index between the cursor and the
            # edge (all of the window) to find them. (With a filter it
            # walks that filter's index, which the edge must then bound.)
            key = sa.tuple_(_unindexed(Job.created_at), _unindexed(Job.id))
        conditions.append(key >= sa.tuple_(*edge) if newest else key <= sa.tuple_(*edge))
    return _page_keys(conditions, order, limit), edge


def _scan_first(plan):
    """PostgreSQL: the index's own test of a row (``_trigram_match``'s ``scan``), for the
    rows of a window tested one by one, before the exact condition; None on SQLite.

    So too for a search shorter than the index's trigrams: the ILIKE finds
    any text, and spares the exact condition (its ASCII-only case folding,
    ``translate``, is slow) all but the rows that hold it: a window of
    5,000 jobs with no match took 78 ms at 30,000 jobs.
    """
    if db.session.get_bind().dialect.name == 'sqlite':
        return None
    return _trigram_match(plan.index.needles if plan.index is not None else plan.needles,
                          scan=True)


def _unindexed(column):
    """``+column`` (SQLite): the same value, which the planner does not answer from an index."""
    return UnaryExpression(column, operator=operators.custom_op('+'), type_=column.type)


def _window(index, conditions, order, size, dense=False):
    """``(edge, narrow)``: the window of ``size`` jobs a page of a search looks at, and its
    candidates.

    The window is the next ``size`` jobs of the list (those meeting
    ``conditions``, in ``order``): :data:`SEARCH_WINDOW` or
    :data:`DENSE_WINDOW`, or :data:`SCAN_WINDOW` for a search the index
    cannot narrow (``index`` None). ``edge``: the ``(created_at, id)`` of
    its last job, None when what is left of the list is shorter than a
    window. ``narrow``: a condition naming the index's candidates in the
    window (see :func:`_candidates_between`), or None: each row of the
    window is tested. On PostgreSQL those of a ``dense`` one (the first few
    jobs of a window) are tested without asking the index, which would read
    its candidates in the whole ledger to name those among them, with the
    index's own test first (``_trigram_match``'s ``scan``).
    """
    edge = _edge(conditions, order, size)
    if index is None:
        return edge, None
    if index.dialect != 'sqlite':
        return edge, (_trigram_match(index.needles, scan=True) if dense
                      else _candidates_between(index, None, None))
    # SQLite: the range of the window's rowids, which the search index is
    # read in: one more walk of the list's index (each entry holds its
    # job's rowid), no row read.
    window = sa.select(sa.literal_column('job.rowid').label('r')).select_from(Job) \
        .where(*conditions).order_by(*order).limit(size).subquery()
    lo, hi = db.session.execute(
        sa.select(sa.func.min(window.c.r), sa.func.max(window.c.r))).one()
    if lo is None:
        return None, None  # nothing left of the list
    return edge, _candidates_between(index, lo, hi)


def _rows_of(ids, with_result):
    """The Job rows of ``ids``, in that order (one deleted in between is left out)."""
    by_id = {job.id: job for job in db.session.scalars(
        sa.select(Job).options(*(() if with_result else (defer(Job.result, raiseload=True),)))
        .where(Job.id.in_(ids)))} if ids else {}
    return [by_id[i] for i in ids if i in by_id]


# A count of the rows matching a list's filters (a range of finish times, a
# search with few candidates) stops here: past it the list says "10,000+".
COUNT_BOUND = 10_000


class Count(NamedTuple):
    """How many jobs match a list's filters.

    ``n``: the count, or None when it cannot be had cheaply (a search the
    index does not name all the candidates of: too short for it, or more
    than :data:`CANDIDATES`). ``exact``: False when the count stopped at its
    bound, so at least ``n`` match.
    """
    n: int | None
    exact: bool = True


def count_jobs(filters, bound=COUNT_BOUND):
    """A :class:`Count` of the jobs matching ``filters`` (as :func:`parse_filters` returns).

    By state, queue and task alone it is the sum of the kept counters
    (:class:`app.models.JobCount`, a few rows at any ledger size) and
    exact; with a search whose candidates the index names all at once
    (:data:`CANDIDATES` at most), or a range of finish times, the matches
    are counted up to ``bound``; any other search is not counted (``n``
    None: it is listed a window at a time).
    Raises :class:`BadQuery` for a bad filter.
    """
    check_filters(filters)
    q = (filters.get('q') or '').strip()
    times = {k: filters.get(k) for k in TIME_FILTERS}
    if not q and not any(times.values()):
        column = {'state': JobCount.state, 'queue': JobCount.queue, 'task': JobCount.task}
        # Summed per queue, so that PostgreSQL reads the few rows through the
        # counters' index: a plain sum reads the whole table, which keeps the
        # space of its rows' past versions (a million-job seeding left 60 rows
        # in 289 MB, and the sum took 226 ms instead of 0.1).
        sums = db.session.scalars(sa.select(sa.func.sum(JobCount.n)).where(
            *(column[k] == filters[k] for k in column if filters.get(k)))
            .group_by(JobCount.queue)).all()
        return Count(int(sum(sums)))
    plan = search_plan(q) if q else None
    if plan is not None and not plan.whole:
        # Too short for the index, or too many candidates in it: only a
        # walk of the ledger could count them.
        return Count(None, False)
    conditions = query_filters(filters.get('state'), filters.get('queue'), filters.get('task'),
                               **times, by_name=plan is not None and plan.by_name)
    if plan is not None:
        conditions.append(plan.condition())
    ids = sa.select(Job.id).where(*conditions).limit(bound + 1).subquery()
    n = db.session.scalar(sa.select(sa.func.count()).select_from(ids))
    return Count(min(n, bound), n <= bound)


def stats():
    """Counts of jobs by state, overall and per queue.

    ``{'states': {state: n}, 'queues': {queue: {state: n}}, 'total': n}``,
    read from the counters the database keeps (:class:`app.models.JobCount`):
    a few rows, whatever the size of the ledger.
    """
    rows = db.session.execute(
        sa.select(JobCount.queue, JobCount.state, sa.func.sum(JobCount.n))
        .group_by(JobCount.queue, JobCount.state)).all()
    by_state = dict.fromkeys(states.JOB_STATES, 0)
    by_queue = {}
    for queue, state, count in rows:
        if not count:
            continue
        count = int(count)  # PostgreSQL sums to a Decimal
        by_state[state] = by_state.get(state, 0) + count
        by_queue.setdefault(queue, dict.fromkeys(states.JOB_STATES, 0))[state] = count
    return {'states': by_state, 'queues': by_queue, 'total': sum(by_state.values())}


def _whole_minute(at, up=False):
    floor = at.replace(second=0, microsecond=0)
    return floor + dt.timedelta(minutes=1) if up and floor != at else floor


def _counted_queues():
    """Every queue some job row names (from the counters: a few rows)."""
    return db.session.scalars(sa.select(JobCount.queue).distinct()).all()


def finished(since, until, by, queues=None):
    """Jobs finished in ``[since, until)``, counted by the columns named in ``by``.

    ``by`` is a tuple of ``'queue'``, ``'task'``, ``'state'``; returns
    ``{key tuple: n}``. Exact, and its cost follows the window's length in
    minutes and the finishes of two minutes, not the ledger's size: whole
    minutes come from the per-minute rollups, the two ends from the rows
    (an index range per queue over ``finished_at``; ``queues``, every
    queue a job names, is read when not given).
    """
    counts = {}

    def add(rows):
        for *key, n in rows:
            if n:
                counts[tuple(key)] = counts.get(tuple(key), 0) + int(n)

    first, last = _whole_minute(since, up=True), _whole_minute(until)
    if first >= last:
        edges = [(since, until)]
    else:
        edges = [(since, first), (last, until)]
        add(db.session.execute(
            sa.select(*(getattr(JobMinute, c) for c in by), sa.func.sum(JobMinute.n))
            .where(JobMinute.minute >= first, JobMinute.minute < last)
            .group_by(*(getattr(JobMinute, c) for c in by))))
    queues = _counted_queues() if queues is None else queues
    for a, b in edges:
        if a < b and queues:
            add(db.session.execute(
                sa.select(*(getattr(Job, c) for c in by), sa.func.count())
                .where(Job.queue.in_(queues), Job.finished_at >= a, Job.finished_at < b)
                .group_by(*(getattr(Job, c) for c in by))))
    return counts


def finished_per_queue(now=None):
    """Jobs finished per queue over the last minute and the last 15: ``{queue: {60: n, 900: n}}``."""
    now = now or utcnow()
    recent = {}
    queues = _counted_queues()
    for seconds in (60, 900):
        for (queue,), n in finished(now - dt.timedelta(seconds=seconds),
                                    now + dt.timedelta(microseconds=1), ('queue',),
                                    queues).items():
            recent.setdefault(queue, {})[seconds] = n
    return recent


def oldest_waiting(queues, now=None):
    """``{queue: seconds}``: how long the oldest job waiting to run in each of ``queues`` has waited.

    Waiting means queued (since it was queued: its row's last change), or
    scheduled or retrying and due (since it was due; the broker holds it
    ready until a worker takes it). 0.0 for a queue where nothing waits.
    Two probes of partial indexes per queue (``ix_job_waiting``,
    ``ix_job_due``, which hold only such jobs), whatever the ledger's size;
    their conditions are written as the indexes spell them, so both
    databases match them to the query.
    """
    now = now or utcnow()
    ages = {}
    for queue in queues:
        queued = (sa.select(Job.updated_at).where(Job.queue == queue, sa.text(WAITING))
                  .order_by(Job.updated_at).limit(1).scalar_subquery())
        due = (sa.select(Job.scheduled_for)
               .where(Job.queue == queue, sa.text(DUE), Job.scheduled_for <= now)
               .order_by(Job.scheduled_for).limit(1).scalar_subquery())
        since = [t for t in db.session.execute(sa.select(queued, due)).one() if t is not None]
        ages[queue] = max(0.0, (now - min(since)).total_seconds()) if since else 0.0
    return ages


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


def _latest_failed(error_type):
    """A correlated subquery: the id of the latest failed job in ``JobCount``'s group.

    One probe of the partial index ``ix_job_failed`` (queue, task, error
    type, finished_at, id) over failed jobs.
    """
    return (sa.select(Job.id)
            .where(Job.state == states.FAILED, Job.queue == JobCount.queue,
                   Job.task == JobCount.task, error_type)
            .order_by(Job.finished_at.desc(), Job.id.desc()).limit(1)
            .correlate(JobCount).scalar_subquery())


def failures(queue=None):
    """Failed jobs grouped by task and error type: count, and the latest of each group.

    ``[{'task', 'error_type', 'count', 'latest': Job}]``, largest group
    first. Counts come from the kept counters, and each group's latest job
    from one index probe per queue (in the same statement), so the cost
    follows the number of groups, not of jobs.
    """
    rows = db.session.execute(
        sa.select(JobCount.queue, JobCount.task, JobCount.error_type, sa.func.sum(JobCount.n),
                  _latest_failed(Job.error_type == JobCount.error_type),
                  # A failure without a type is counted under ''; its row may hold NULL.
                  sa.case((JobCount.error_type == '', _latest_failed(Job.error_type.is_(None)))))
        .where(JobCount.state == states.FAILED, *([JobCount.queue == queue] if queue else []))
        .group_by(JobCount.queue, JobCount.task, JobCount.error_type)).all()
    ids = {i for row in rows for i in row[4:] if i is not None}
    by_id = {j.id: j for j in db.session.scalars(sa.select(Job).where(Job.id.in_(ids)))} \
        if ids else {}

    def newest(job):
        return (job.finished_at or dt.datetime.min, job.id)

    groups = {}
    for _queue, task, error_type, n, *latest_ids in rows:
        found = [by_id[i] for i in latest_ids if i in by_id]
        if not n or not found:
            continue
        latest = max(found, key=newest)
        group = groups.setdefault((task, error_type or None), {
            'task': task, 'error_type': error_type or None, 'count': 0, 'latest': latest})
        group['count'] += int(n)  # PostgreSQL sums to a Decimal
        if newest(latest) > newest(group['latest']):
            group['latest'] = latest
    return sorted(groups.values(), key=lambda g: (-g['count'], g['task'], g['error_type'] or ''))


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
    now = utcnow()
    return finished(now - dt.timedelta(hours=hours), now + dt.timedelta(microseconds=1),
                    ('task', 'state'))


def workers(lost_after):
    """Consumers as their heartbeats describe them: online first, newest first."""
    rows = db.session.scalars(sa.select(Worker).order_by(Worker.started_at.desc())).all()
    return sorted(rows, key=lambda w: not w.online(lost_after))


def running_on(workers, lost_after):
    """``{consumer id: [job id]}``: the jobs each of ``workers`` (Worker rows) runs now.

    An online consumer's own last heartbeat says. An offline or stopped
    one's last heartbeat is stale: only the jobs the ledger still shows
    running on it are kept (the reaper recovers the rest, and a job it
    recovered is no longer that consumer's). One query for all of them.
    """
    result = {w.id: list(w.current or []) for w in workers if w.online(lost_after)}
    gone = [w for w in workers if w.id not in result]
    ids = {i for w in gone for i in (w.current or []) if isinstance(i, str) and len(i) <= 36}
    still = {}
    if ids:
        still = dict(db.session.execute(
            sa.select(Job.id, Job.worker).where(Job.id.in_(sorted(ids)),
                                                Job.state == states.RUNNING)).all())
    for w in gone:
        result[w.id] = [i for i in (w.current or [])
                        if i in still and (still[i] or '').split('/')[0] == w.id]
    return result


def consumers_of(queues, lost_after):
    """``{queue: [consumer id]}``: the consumers online now that serve each of ``queues``."""
    serving = {q: [] for q in queues}
    for w in workers(lost_after):
        if w.online(lost_after):
            for q in w.queues or []:
                if q in serving:
                    serving[q].append(w.id)
    return serving


def task_names():
    """Every declared task type's name, sorted."""
    return sorted(catalog.TASKS)


def known_queue(name, configured):
    """Whether ``name`` is one of the ``configured`` queues or one some job row names."""
    return name in configured or db.session.scalar(
        sa.select(JobCount.queue).where(JobCount.queue == name).limit(1)) is not None


def known_task(name):
    """Whether ``name`` is a declared task type or one some job row names."""
    return name in catalog.TASKS or db.session.scalar(
        sa.select(JobCount.task).where(JobCount.task == name).limit(1)) is not None


# -- metrics ------------------------------------------------------------------

def job_outcome(outcome):
    """The job's outcome (succeeded, failed, canceled) when an attempt that ended with
    ``outcome`` ended its job: a timeout, a loss or an interruption fails it."""
    return outcome if outcome in (states.SUCCEEDED, states.CANCELED) else states.FAILED


def finished_totals():
    """Jobs ended by an attempt, over all time: ``{(queue, task, outcome): n}``.

    ``outcome`` is the job's (:func:`job_outcome`). Read from the totals the
    ledger's writer keeps (:class:`app.models.MetricTotal`): they never go
    down, whatever is purged or pruned. A job canceled while it waited
    ended by no attempt and is not counted here.
    """
    totals = {}
    for queue, task, outcome, n in db.session.execute(
            sa.select(MetricTotal.queue, MetricTotal.task, MetricTotal.outcome,
                      sa.func.sum(MetricTotal.finished))
            .group_by(MetricTotal.queue, MetricTotal.task, MetricTotal.outcome)):
        if n:
            key = (queue, task, job_outcome(outcome))
            totals[key] = totals.get(key, 0) + int(n)
    return totals


def timing_totals(timing):
    """Run times (``timing='run'``) or wait times (``'wait'``) over all time, per queue and task.

    ``{(queue, task): (counts, seconds)}``: ``counts[i]`` times fell in bucket
    ``i`` of :data:`~app.models.TIMING_BUCKETS` (the last one: longer than
    every bound), ``seconds`` their sum. Never goes down (see
    :func:`finished_totals`).
    """
    found = {}
    for queue, task, bucket, n, seconds in db.session.execute(
            sa.select(TimingTotal.queue, TimingTotal.task, TimingTotal.bucket,
                      sa.func.sum(TimingTotal.n), sa.func.sum(TimingTotal.seconds))
            .where(TimingTotal.timing == timing)
            .group_by(TimingTotal.queue, TimingTotal.task, TimingTotal.bucket)):
        counts, total = found.get((queue, task), ([0] * (len(TIMING_BUCKETS) + 1), 0.0))
        counts[min(bucket, len(TIMING_BUCKETS))] += int(n or 0)
        found[(queue, task)] = (counts, total + float(seconds or 0.0))
    return found


# Chart windows: their length and the step of their points (seconds).
SERIES_WINDOWS = {'1h': (3600, 60), '24h': (86400, 900), '7d': (7 * 86400, 3600)}
MAX_POINTS = 7 * 1440  # a week, minute by minute


def quantile(q, counts):
    """The ``q`` quantile (0..1) of times counted in ``counts`` (per bucket of
    :data:`~app.models.TIMING_BUCKETS`), in seconds; None when nothing was counted.

    Interpolated within the bucket it falls in, as Prometheus's
    ``histogram_quantile`` does; in the bucket beyond the last bound, that bound.
    """
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(TIMING_BUCKETS):
                return TIMING_BUCKETS[-1]
            low = TIMING_BUCKETS[i - 1] if i else 0.0
            return low + (TIMING_BUCKETS[i] - low) * (rank - seen) / n
        seen += n
    return TIMING_BUCKETS[-1]


def _slot(column, since, step):
    """SQL: the index of the ``step``-second slot from ``since`` that ``column`` (a minute) is in."""
    start = calendar.timegm(since.timetuple())
    if db.session.get_bind().dialect.name == 'postgresql':
        return sa.cast(sa.func.floor((sa.extract('epoch', column) - start) / step), sa.Integer)
    return (sa.cast(sa.func.strftime('%s', column), sa.Integer) - start) // step


def metric_series(since, until, step=60, queue=None, task=None):
    """The metric history from ``since`` to ``until`` (naive UTC), in points ``step`` s apart.

    ``step`` is a whole number of minutes (seconds: 60, 900, 3600...);
    ``since`` is cut to its minute. Returns a list, oldest first, with one
    dict per point: ``at`` (the point's start, naive UTC), ``finished``
    (jobs ended by an attempt, ``{succeeded, failed, canceled: n}``),
    ``attempts`` (attempts ended, ``{attempt outcome: n}``), ``run_p50``,
    ``run_p95``, ``wait_p50``, ``wait_p95`` (seconds, None without
    attempts), ``run_count``, ``wait_count`` and ``depth`` (the largest
    ready depth sampled in the point, None without a sample; only with no
    ``task``, and summed over queues without ``queue``). ``queue`` and
    ``task`` narrow it. Reads the per-minute rollups (grouped by the
    database, a row per point and key), so a week costs about what an hour
    does. Raises :class:`BadQuery` for a bad window or step.
    """
    if not isinstance(step, int) or step < 60 or step % 60:
        raise BadQuery('step must be a whole number of minutes, in seconds (60, 900, 3600...)')
    since = _whole_minute(since)
    if until <= since:
        raise BadQuery('until must come after since')
    points = -(-int((until - since).total_seconds()) // step)
    if points > MAX_POINTS:
        raise BadQuery(f'at most {MAX_POINTS} points: choose a longer step')
    series = [{'at': since + dt.timedelta(seconds=i * step),
               'finished': dict.fromkeys(sorted(states.FINISHED), 0), 'attempts': {},
               'depth': None, '_run': [0] * (len(TIMING_BUCKETS) + 1),
               '_wait': [0] * (len(TIMING_BUCKETS) + 1)} for i in range(points)]

    def narrowed(model):
        return [model.minute >= since, model.minute < until,
                *([model.queue == queue] if queue else []),
                *([model.task == task] if task and hasattr(model, 'task') else [])]

    slot = _slot(MetricMinute.minute, since, step).label('slot')
    for i, outcome, attempts, finished_ in db.session.execute(
            sa.select(slot, MetricMinute.outcome, sa.func.sum(MetricMinute.attempts),
                      sa.func.sum(MetricMinute.finished))
            .where(*narrowed(MetricMinute)).group_by(slot, MetricMinute.outcome)):
        i = int(i)
        if 0 <= i < points:
            point = series[i]
            point['attempts'][outcome] = point['attempts'].get(outcome, 0) + int(attempts)
            point['finished'][job_outcome(outcome)] += int(finished_)
    slot = _slot(TimingMinute.minute, since, step).label('slot')
    for i, timing, bucket, n in db.session.execute(
            sa.select(slot, TimingMinute.timing, TimingMinute.bucket, sa.func.sum(TimingMinute.n))
            .where(*narrowed(TimingMinute))
            .group_by(slot, TimingMinute.timing, TimingMinute.bucket)):
        i = int(i)
        if 0 <= i < points and timing in (RUN, WAIT):
            series[i]['_' + timing][min(bucket, len(TIMING_BUCKETS))] += int(n)
    if not task:
        slot = _slot(DepthMinute.minute, since, step).label('slot')
        per_minute = (sa.select(DepthMinute.minute, slot, sa.func.sum(DepthMinute.ready)
                                .label('ready'))
                      .where(*narrowed(DepthMinute))
                      .group_by(DepthMinute.minute, slot).subquery())
        for i, depth in db.session.execute(
                sa.select(per_minute.c.slot, sa.func.max(per_minute.c.ready))
                .group_by(per_minute.c.slot)):
            i = int(i)
            if 0 <= i < points:
                series[i]['depth'] = int(depth)
    for point in series:
        for timing in (RUN, WAIT):
            counts = point.pop('_' + timing)
            point[f'{timing}_count'] = sum(counts)
            point[f'{timing}_p50'] = quantile(0.5, counts)
            point[f'{timing}_p95'] = quantile(0.95, counts)
    return series

"""The counters and rollups the database keeps beside the job rows: recount, check, compact.

``job_count`` and ``job_minute`` (see :class:`app.models.JobCount` and
:class:`app.models.JobMinute`) are kept by triggers created in migration
0008, in the same transaction as every change to ``job``, whoever makes it:
the ledger's writer, the API, bulk actions, the reaper, a purge, or SQL
typed by hand. The same migration indexes the searched text (an FTS5
trigram table on SQLite, a pg_trgm index on PostgreSQL); on SQLite the
index is brought up to date in bulk by :func:`index_pending`.

What lives here is what the triggers cannot do: rebuild everything from
the rows (:func:`recount`, after a restore or a hand edit with the
triggers off), say whether the kept values agree with the rows
(:func:`differences`), and keep the tables small (:func:`compact`).
"""
import json

# The job columns a search looks in, in the order the SQLite index numbers them.
SEARCHED = ('params', 'error', 'result')

# What each counter row is keyed by, computed from the job rows: the same
# expressions the triggers use (migration 0008).
_ERROR_KEY = "CASE WHEN state = 'failed' THEN coalesce(error_type, '') ELSE '' END"
_MINUTE = {'sqlite': "substr(finished_at, 1, 16) || ':00.000000'",
           'postgresql': "date_trunc('minute', finished_at)"}


def _counted(conn):
    """``{'job_count': SQL, 'job_minute': SQL}``: each table's keys and counts from the rows."""
    minute = _MINUTE[conn.dialect.name]
    return {
        'job_count': (f'SELECT queue, task, state, {_ERROR_KEY} AS error_type, count(*) AS n '
                      'FROM job GROUP BY 1, 2, 3, 4'),
        'job_minute': (f'SELECT {minute} AS minute, queue, task, state, count(*) AS n FROM job '
                       'WHERE finished_at IS NOT NULL GROUP BY 1, 2, 3, 4'),
    }


_KEPT = {
    'job_count': 'SELECT queue, task, state, error_type, sum(n) FROM job_count '
                 'GROUP BY queue, task, state, error_type',
    'job_minute': 'SELECT minute, queue, task, state, sum(n) FROM job_minute '
                  'GROUP BY minute, queue, task, state',
}
_COLUMNS = {'job_count': 'queue, task, state, error_type',
            'job_minute': 'minute, queue, task, state'}


def _as_dict(rows):
    return {tuple(str(v) for v in row[:-1]): row[-1] for row in rows if row[-1]}


def _search_drift(conn):
    """``{'out of date': n, 'missing': n}``: SQLite search index rows that no longer
    hold their job column's text (or whose job is gone), and job columns with
    no index row; jobs noted for indexing (``job_search_pending``) aside."""
    pending = 'SELECT job_rowid FROM job_search_pending'
    stale = conn.exec_driver_sql(
        f'SELECT count(*) FROM job_search s LEFT JOIN job j ON j.rowid = s.rowid / 4 '
        f'WHERE s.rowid / 4 NOT IN ({pending}) AND (j.rowid IS NULL OR s.text IS NOT '
        f'CASE s.rowid % 4 WHEN 0 THEN j.params WHEN 1 THEN j.error ELSE j.result END)').scalar()
    missing = sum(conn.exec_driver_sql(
        f'SELECT count(*) FROM job j LEFT JOIN job_search s ON s.rowid = j.rowid * 4 + {k} '
        f'WHERE j.{column} IS NOT NULL AND s.rowid IS NULL AND j.rowid NOT IN ({pending})'
    ).scalar() for k, column in enumerate(SEARCHED))
    return {name: n for name, n in (('out of date', stale), ('missing', missing)) if n}


def one_snapshot(conn):
    """Make the rest of ``conn``'s transaction read the ledger as of one moment.

    Call it first in a new transaction, before :func:`differences`, so the
    rows and the counters are read as they stood together while writers go
    on: PostgreSQL's REPEATABLE READ; on SQLite an explicit ``BEGIN`` (the
    driver begins a transaction only before a write, so each SELECT would
    otherwise see the file as of its own start; in WAL mode a read
    transaction keeps one).
    """
    if conn.dialect.name == 'postgresql':
        conn.exec_driver_sql('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ')
    else:
        conn.exec_driver_sql('BEGIN')


def differences(conn):
    """Where the kept counters disagree with the rows: ``{table: {key: (kept, counted)}}``.

    ``conn`` is a SQLAlchemy connection; keys are tuples of text (the
    columns of :data:`_COLUMNS`). An empty dict means every counter and
    rollup agrees with a count of the job rows as they are now. On SQLite
    the search index is checked too: ``'job_search'`` then maps
    ``('out of date',)`` and ``('missing',)`` to ``(rows, 0)`` (see
    :func:`_search_drift`). Reads only; while writers run, call
    :func:`one_snapshot` first so both sides see the same rows.
    """
    found = {}
    if conn.dialect.name == 'sqlite':
        drift = _search_drift(conn)
        if drift:
            found['job_search'] = {(name,): (n, 0) for name, n in drift.items()}
    for table, sql in _counted(conn).items():
        counted = _as_dict(conn.exec_driver_sql(sql).all())
        kept = _as_dict(conn.exec_driver_sql(_KEPT[table]).all())
        wrong = {key: (kept.get(key, 0), counted.get(key, 0))
                 for key in counted.keys() | kept.keys() if kept.get(key, 0) != counted.get(key, 0)}
        if wrong:
            found[table] = wrong
    return found


def recount(conn):
    """Rebuild every counter, rollup and the search index from the job rows; return row counts.

    Runs in the caller's transaction on ``conn``; on PostgreSQL it first
    locks ``job`` against writers (readers go on) so no change slips between
    the count and the rewrite; on SQLite the write transaction does that.
    Returns ``{'job_count': rows, 'job_minute': rows}`` written, and
    ``'differed'``: how many kept values disagreed with the rows before.
    """
    name = conn.dialect.name
    if name == 'postgresql':
        conn.exec_driver_sql('LOCK TABLE job IN SHARE MODE')
    else:
        # A write first, so the transaction holds SQLite's write lock before
        # it reads (a read first could not become a write once another
        # writer committed).
        conn.exec_driver_sql('DELETE FROM job_search')
        conn.exec_driver_sql('DELETE FROM job_search_pending')
        _index(conn, None)
    written = {'differed': sum(map(len, differences(conn).values()))}
    for table, sql in _counted(conn).items():
        conn.exec_driver_sql(f'DELETE FROM {table}')
        written[table] = conn.exec_driver_sql(
            f'INSERT INTO {table} ({_COLUMNS[table]}, shard, n) '
            f'SELECT {_COLUMNS[table]}, 0, n FROM ({sql}) AS counted').rowcount
    return written


def compact(conn):
    """Fold the counter rows of ended PostgreSQL sessions into shard 0; return rows folded.

    On PostgreSQL each database session adds to rows of its own (its
    backend pid) so that writers never wait on each other; this folds the
    rows of sessions that have ended into shard 0 (and deletes what sums to
    0), taking only rows no one holds (``SKIP LOCKED``), so it never waits
    on a writer. On SQLite there is one shard and nothing to do (0). Runs in
    the caller's transaction; the leading consumer calls it every
    ``COMPACT_INTERVAL`` seconds.
    """
    if conn.dialect.name != 'postgresql':
        return 0
    folded = 0
    # One folder at a time: shard 0 is written by no trigger.
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('job_count.compact'))")
    for table, columns in _COLUMNS.items():
        rows = conn.exec_driver_sql(
            f'WITH gone AS (DELETE FROM {table} WHERE ctid IN ('
            f'  SELECT ctid FROM {table} WHERE shard <> 0 AND shard NOT IN ('
            f'    SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL) '
            f'  FOR UPDATE SKIP LOCKED) RETURNING {columns}, n) '
            f'INSERT INTO {table} AS t ({columns}, shard, n) '
            f'SELECT {columns}, 0, sum(n) FROM gone GROUP BY {columns} '
            f'ON CONFLICT ({columns}, shard) DO UPDATE SET n = t.n + excluded.n '
            f'RETURNING {columns}, t.n').all()
        folded += len(rows)
        keys = [tuple(row[:-1]) for row in rows if row[-1] == 0]
        if keys:
            where = ' AND '.join(f'{c} = %s' for c in columns.split(', '))
            conn.exec_driver_sql(f'DELETE FROM {table} WHERE {where} AND shard = 0 AND n = 0',
                                 keys)
    return folded


def _index(conn, rowids):
    """(Re)index the jobs whose rowids are in the JSON array ``rowids`` (None: every job)."""
    if rowids is None:
        where = ''
    else:
        where = 'AND rowid IN (SELECT value FROM json_each(?))'
        # A job changed or deleted: its old text leaves the index first.
        conn.exec_driver_sql(
            'DELETE FROM job_search WHERE rowid IN (SELECT value * 4 + k FROM json_each(?), '
            '(SELECT 0 AS k UNION ALL SELECT 1 UNION ALL SELECT 2))', (rowids,))
    for k, column in enumerate(SEARCHED):
        conn.exec_driver_sql(
            f'INSERT INTO job_search (rowid, text) SELECT rowid * 4 + {k}, {column} FROM job '
            f'WHERE {column} IS NOT NULL {where}', () if rowids is None else (rowids,))


def index_pending(conn, limit=50_000):
    """Index the jobs written since the last call (SQLite); return how many it indexed.

    On SQLite, writing a job only notes its rowid (``job_search_pending``,
    by trigger): indexing in bulk costs a tenth of indexing row by row in
    the writing statement. This takes up to ``limit`` noted jobs, replaces
    what the index holds for them with their columns as they are now (a
    deleted job leaves it), and clears their notes, in the caller's
    transaction on ``conn``. The ledger's writer calls it about once a
    second; until then a search reads the noted jobs as candidates (see
    :func:`app.queries.search_plan`). On PostgreSQL the index is kept by the
    database: 0.
    """
    if conn.dialect.name != 'sqlite':
        return 0
    # A write first: the transaction holds the write lock before it reads.
    taken = conn.exec_driver_sql(
        'DELETE FROM job_search_pending WHERE job_rowid IN (SELECT job_rowid FROM '
        'job_search_pending ORDER BY job_rowid LIMIT ?) RETURNING job_rowid', (limit,)).all()
    if taken:
        _index(conn, json.dumps([r[0] for r in taken]))
    return len(taken)


# Schema objects migration 0008 creates that no model describes (the search
# index and its shadow tables): autogenerate and the schema test leave them be.
_OUTSIDE_MODELS = ('job_search', 'ix_job_search', 'ix_job_id_pattern')  # job_search_pending too


def modelled(name, type_, parent_names):
    """Alembic's ``include_name`` hook: False for the schema objects no model describes.

    ``name`` is a table or index name; see Alembic's ``EnvironmentContext.configure``.
    """
    return not (name or '').startswith(_OUTSIDE_MODELS)

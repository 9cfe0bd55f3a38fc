"""Counters, per-minute rollups and a search index, kept by the database.

``job_count`` (jobs per queue, task, state and, for failed jobs, error type)
and ``job_minute`` (jobs finished per minute, queue, task and state) are
kept by triggers on ``job`` in the same transaction as every change to it,
so the pages read a few rows instead of scanning the ledger. A search index
covers the parameters, the error and the result: an FTS5 trigram table on
SQLite (kept up to date by the ledger's writer from the rows the triggers
note in ``job_search_pending``), a pg_trgm GIN index on PostgreSQL. All are
filled from the rows already there.

A later migration that rebuilds ``job`` (Alembic's batch mode on SQLite
copies the table) must create these triggers again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 21:15:00

"""
import logging

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

logger = logging.getLogger('alembic.runtime.migration')

# -- SQLite -----------------------------------------------------------------

# A failed job's error type is part of its counter's key; every other state's is ''.
_SQLITE_ERROR_KEY = "CASE WHEN {r}.state = 'failed' THEN coalesce({r}.error_type, '') ELSE '' END"
# The minute a job finished: its stored time (text) cut to the minute.
_SQLITE_MINUTE = "substr({r}.finished_at, 1, 16) || ':00.000000'"


# What each table's rows are keyed by (beside shard 0), as expressions of
# the job row {r}; and which job rows each counts.
_SQLITE_KEYS = {
    'job_count': {'queue': '{r}.queue', 'task': '{r}.task', 'state': '{r}.state',
                  'error_type': _SQLITE_ERROR_KEY},
    'job_minute': {'minute': _SQLITE_MINUTE, 'queue': '{r}.queue', 'task': '{r}.task',
                   'state': '{r}.state'},
}
_SQLITE_COUNTED = {'job_count': '1', 'job_minute': '{r}.finished_at IS NOT NULL'}


def _sqlite_tally(table, r, sign):
    """Add ``sign`` (1 or -1) to ``table``'s row for job row ``r`` (NEW or OLD).

    A row whose count falls to 0 is deleted at once (a key of the primary
    index), so neither table keeps keys no job has.
    """
    keys = {column: expr.format(r=r) for column, expr in _SQLITE_KEYS[table].items()}
    columns = ', '.join(keys)
    sql = (f"INSERT INTO {table} ({columns}, shard, n) "
           f"SELECT {', '.join(keys.values())}, 0, {sign} "
           f"WHERE {_SQLITE_COUNTED[table].format(r=r)} "
           f"ON CONFLICT ({columns}, shard) DO UPDATE SET n = n {'+' if sign > 0 else '-'} 1;")
    if sign < 0:
        match = ' AND '.join(f'{column} = {expr}' for column, expr in keys.items())
        sql += f" DELETE FROM {table} WHERE {match} AND shard = 0 AND n = 0;"
    return sql


# The search index holds each searched column of a job as a row of its own,
# numbered job rowid * 4 + column number. Writing a job only notes its rowid
# in job_search_pending; the ledger's writer indexes what is noted in bulk
# about once a second (a tenth of the cost of indexing row by row in the
# writing statement), and a search reads the noted rows as candidates too.
SEARCHED = ('params', 'error', 'result')
_SQLITE_NOTE = "INSERT OR IGNORE INTO job_search_pending (job_rowid) VALUES ({r}.rowid);"


SQLITE_TRIGGERS = {
    'job_count_insert': f"AFTER INSERT ON job BEGIN {_sqlite_tally('job_count', 'NEW', 1)} END",
    'job_count_delete': f"AFTER DELETE ON job BEGIN {_sqlite_tally('job_count', 'OLD', -1)} END",
    'job_count_update': (
        "AFTER UPDATE OF queue, task, state, error_type ON job "
        "WHEN OLD.queue IS NOT NEW.queue OR OLD.task IS NOT NEW.task "
        "OR OLD.state IS NOT NEW.state "
        "OR (NEW.state = 'failed' AND OLD.error_type IS NOT NEW.error_type) "
        f"BEGIN {_sqlite_tally('job_count', 'OLD', -1)} {_sqlite_tally('job_count', 'NEW', 1)} END"),
    'job_minute_insert': ("AFTER INSERT ON job WHEN NEW.finished_at IS NOT NULL "
                          f"BEGIN {_sqlite_tally('job_minute', 'NEW', 1)} END"),
    'job_minute_delete': ("AFTER DELETE ON job WHEN OLD.finished_at IS NOT NULL "
                          f"BEGIN {_sqlite_tally('job_minute', 'OLD', -1)} END"),
    'job_minute_update': (
        "AFTER UPDATE OF queue, task, state, finished_at ON job "
        "WHEN (OLD.finished_at IS NOT NULL OR NEW.finished_at IS NOT NULL) AND ("
        "OLD.finished_at IS NOT NEW.finished_at OR OLD.queue IS NOT NEW.queue "
        "OR OLD.task IS NOT NEW.task OR OLD.state IS NOT NEW.state) "
        f"BEGIN {_sqlite_tally('job_minute', 'OLD', -1)} {_sqlite_tally('job_minute', 'NEW', 1)} END"),
    'job_search_insert': f"AFTER INSERT ON job BEGIN {_SQLITE_NOTE.format(r='NEW')} END",
    'job_search_delete': f"AFTER DELETE ON job BEGIN {_SQLITE_NOTE.format(r='OLD')} END",
    'job_search_update': (
        "AFTER UPDATE OF params, error, result ON job "
        "WHEN OLD.params IS NOT NEW.params OR OLD.error IS NOT NEW.error "
        f"OR OLD.result IS NOT NEW.result BEGIN {_SQLITE_NOTE.format(r='NEW')} END"),
}

# -- PostgreSQL ---------------------------------------------------------------

# One function for both tables. Each database session adds to rows of its
# own (shard = its backend pid), so concurrent writers never wait on one
# counter row or deadlock over two; the leader folds ended sessions' rows
# into shard 0. A row whose count falls to 0 is deleted.
POSTGRES_FUNCTION = """
CREATE OR REPLACE FUNCTION job_tally() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    own_shard integer := pg_backend_pid();
    remaining bigint;
    moved boolean := true;
    finish_moved boolean := true;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        moved := OLD.queue IS DISTINCT FROM NEW.queue OR OLD.task IS DISTINCT FROM NEW.task
                 OR OLD.state IS DISTINCT FROM NEW.state
                 OR (NEW.state = 'failed' AND OLD.error_type IS DISTINCT FROM NEW.error_type);
        finish_moved := (OLD.finished_at IS NOT NULL OR NEW.finished_at IS NOT NULL) AND (
                 OLD.finished_at IS DISTINCT FROM NEW.finished_at
                 OR OLD.queue IS DISTINCT FROM NEW.queue OR OLD.task IS DISTINCT FROM NEW.task
                 OR OLD.state IS DISTINCT FROM NEW.state);
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF moved THEN
            INSERT INTO job_count AS c (queue, task, state, error_type, shard, n)
            VALUES (OLD.queue, OLD.task, OLD.state,
                    CASE WHEN OLD.state = 'failed' THEN coalesce(OLD.error_type, '') ELSE '' END,
                    own_shard, -1)
            ON CONFLICT (queue, task, state, error_type, shard) DO UPDATE SET n = c.n - 1
            RETURNING c.n INTO remaining;
            IF remaining = 0 THEN
                DELETE FROM job_count WHERE queue = OLD.queue AND task = OLD.task
                    AND state = OLD.state AND shard = own_shard AND n = 0 AND error_type =
                    CASE WHEN OLD.state = 'failed' THEN coalesce(OLD.error_type, '') ELSE '' END;
            END IF;
        END IF;
        IF finish_moved AND OLD.finished_at IS NOT NULL THEN
            INSERT INTO job_minute AS m (minute, queue, task, state, shard, n)
            VALUES (date_trunc('minute', OLD.finished_at), OLD.queue, OLD.task, OLD.state,
                    own_shard, -1)
            ON CONFLICT (minute, queue, task, state, shard) DO UPDATE SET n = m.n - 1
            RETURNING m.n INTO remaining;
            IF remaining = 0 THEN
                DELETE FROM job_minute WHERE minute = date_trunc('minute', OLD.finished_at)
                    AND queue = OLD.queue AND task = OLD.task AND state = OLD.state
                    AND shard = own_shard AND n = 0;
            END IF;
        END IF;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        IF moved THEN
            INSERT INTO job_count AS c (queue, task, state, error_type, shard, n)
            VALUES (NEW.queue, NEW.task, NEW.state,
                    CASE WHEN NEW.state = 'failed' THEN coalesce(NEW.error_type, '') ELSE '' END,
                    own_shard, 1)
            ON CONFLICT (queue, task, state, error_type, shard) DO UPDATE SET n = c.n + 1;
        END IF;
        IF finish_moved AND NEW.finished_at IS NOT NULL THEN
            INSERT INTO job_minute AS m (minute, queue, task, state, shard, n)
            VALUES (date_trunc('minute', NEW.finished_at), NEW.queue, NEW.task, NEW.state,
                    own_shard, 1)
            ON CONFLICT (minute, queue, task, state, shard) DO UPDATE SET n = m.n + 1;
        END IF;
    END IF;
    RETURN NULL;
END
$$
"""

# TRUNCATE fires no row trigger: it empties the counters too.
POSTGRES_TRUNCATE_FUNCTION = """
CREATE OR REPLACE FUNCTION job_tally_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_count;
    DELETE FROM job_minute;
    RETURN NULL;
END
$$
"""

# The text a search looks in, as one immutable expression the index is built on.
POSTGRES_SEARCH_FUNCTION = """
CREATE OR REPLACE FUNCTION job_search_text(params json, error text, result json)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(params::text, '') || chr(10) || coalesce(error, '') || chr(10)
           || coalesce(result::text, '')
$$
"""


def _raw(sql):
    """Run ``sql`` as written (its ``:00`` is text, not a bound parameter)."""
    op.get_bind().exec_driver_sql(sql)


def _tables():
    op.create_table('job_count',
    sa.Column('queue', sa.String(length=32), nullable=False),
    sa.Column('task', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('error_type', sa.String(length=200), nullable=False),
    sa.Column('shard', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('queue', 'task', 'state', 'error_type', 'shard',
                            name=op.f('pk_job_count'))
    )
    op.create_table('job_minute',
    sa.Column('minute', sa.DateTime(), nullable=False),
    sa.Column('queue', sa.String(length=32), nullable=False),
    sa.Column('task', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('shard', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('minute', 'queue', 'task', 'state', 'shard',
                            name=op.f('pk_job_minute'))
    )
    # Counts no longer come from an index over (queue, state): one index
    # less for every job written.
    op.drop_index('ix_job_queue_state', table_name='job')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index('ix_job_failed', ['queue', 'task', 'error_type', 'finished_at', 'id'],
                              unique=False, sqlite_where=sa.text("state = 'failed'"),
                              postgresql_where=sa.text("state = 'failed'"))


def _fill(minute):
    """Counters and rollups from the rows already in the ledger."""
    _raw(
        "INSERT INTO job_count (queue, task, state, error_type, shard, n) "
        "SELECT queue, task, state, CASE WHEN state = 'failed' THEN coalesce(error_type, '') "
        "ELSE '' END AS e, 0, count(*) FROM job GROUP BY queue, task, state, e")
    _raw(
        f"INSERT INTO job_minute (minute, queue, task, state, shard, n) "
        f"SELECT {minute} AS m, queue, task, state, 0, count(*) FROM job "
        f"WHERE finished_at IS NOT NULL GROUP BY m, queue, task, state")


def upgrade():
    _tables()
    bind = op.get_bind()
    if bind.dialect.name == 'sqlite':
        _fill(_SQLITE_MINUTE.format(r='job'))
        _raw("CREATE VIRTUAL TABLE job_search USING fts5(text, tokenize='trigram')")
        _raw('CREATE TABLE job_search_pending (job_rowid INTEGER PRIMARY KEY)')
        for k, column in enumerate(SEARCHED):
            _raw(f"INSERT INTO job_search (rowid, text) SELECT rowid * 4 + {k}, {column} "
                 f"FROM job WHERE {column} IS NOT NULL")
        for name, body in SQLITE_TRIGGERS.items():
            _raw(f'CREATE TRIGGER {name} {body}')
    else:
        _fill("date_trunc('minute', finished_at)")
        _raw(POSTGRES_FUNCTION)
        _raw('CREATE TRIGGER job_tally AFTER INSERT OR UPDATE OR DELETE ON job '
                   'FOR EACH ROW EXECUTE FUNCTION job_tally()')
        # Every job written updates a few counter rows: room on each page for
        # their new versions (HOT updates, pruned in place), and a vacuum
        # after every 1,000 dead ones, so a burst of writes leaves no bloat
        # for the readers to scan.
        for table, fill in (('job_count', 10), ('job_minute', 50)):
            _raw(f'ALTER TABLE {table} SET (fillfactor = {fill}, '
                 'autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)')
        _raw(POSTGRES_TRUNCATE_FUNCTION)
        _raw('CREATE TRIGGER job_tally_truncate AFTER TRUNCATE ON job '
             'FOR EACH STATEMENT EXECUTE FUNCTION job_tally_truncate()')
        _raw(POSTGRES_SEARCH_FUNCTION)
        # An id prefix (a search) as an index range, whatever the collation.
        _raw('CREATE INDEX ix_job_id_pattern ON job (id text_pattern_ops)')
        # pg_trgm ships with PostgreSQL and is a trusted extension (13+): a
        # database owner may create it. Without it search still works, by scan.
        try:
            with bind.begin_nested():
                bind.exec_driver_sql('CREATE EXTENSION IF NOT EXISTS pg_trgm')
        except sa.exc.DBAPIError as exc:
            logger.warning('pg_trgm is not available (%s): job search will scan the ledger',
                           exc.orig)
        else:
            _raw('CREATE INDEX ix_job_search ON job USING gin '
                       '(job_search_text(params, error, result) gin_trgm_ops)')


def downgrade():
    bind = op.get_bind()
    if bind.dialect.name == 'sqlite':
        for name in SQLITE_TRIGGERS:
            _raw(f'DROP TRIGGER IF EXISTS {name}')
        _raw('DROP TABLE IF EXISTS job_search')
        _raw('DROP TABLE IF EXISTS job_search_pending')
    else:
        _raw('DROP INDEX IF EXISTS ix_job_search')
        _raw('DROP INDEX IF EXISTS ix_job_id_pattern')
        _raw('DROP TRIGGER IF EXISTS job_tally ON job')
        _raw('DROP FUNCTION IF EXISTS job_tally()')
        _raw('DROP TRIGGER IF EXISTS job_tally_truncate ON job')
        _raw('DROP FUNCTION IF EXISTS job_tally_truncate()')
        _raw('DROP FUNCTION IF EXISTS job_search_text(json, text, json)')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_failed', sqlite_where=sa.text("state = 'failed'"),
                            postgresql_where=sa.text("state = 'failed'"))
    op.create_index('ix_job_queue_state', 'job', ['queue', 'state'], unique=False)
    op.drop_table('job_minute')
    op.drop_table('job_count')

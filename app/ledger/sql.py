"""The ledger's SQL, in each database driver's own dialect."""
import datetime as dt

from .. import states, text


# Every job update is one statement run with executemany over the batch, in
# the driver's own SQL: at thousands of jobs a second the writer's time (and
# its hold on the GIL, which Huey's worker threads wait for) is the cost of
# recording, so rows go to the driver as plain tuples.
_SQL = {
    # attempt n started (a later attempt may already be recorded: guard)
    'start': 'UPDATE job SET state = {running}, attempts = ?, started_at = ?, finished_at = NULL, '
             'scheduled_for = NULL, worker = ?, progress = NULL, progress_message = NULL, '
             'version = version + 1, updated_at = ? WHERE id = ? AND attempts < ?',
    # attempt n started and ended within one batch (fast jobs)
    'ran': 'UPDATE job SET state = ?, attempts = ?, started_at = ?, finished_at = ?, '
           'run_seconds = ?, scheduled_for = NULL, worker = ?, result = ?, error = ?, '
           'error_type = ?, progress = ?, progress_message = NULL, version = version + 1, '
           'updated_at = ? '
           'WHERE id = ? AND attempts < ?',
    # attempt n ended; the job moves only if no later attempt started meanwhile
    'finish': 'UPDATE job SET state = ?, finished_at = ?, run_seconds = ?, result = ?, error = ?, '
              'error_type = ?, progress = COALESCE(?, progress), version = version + 1, '
              'updated_at = ? '
              'WHERE id = ? AND attempts = ? AND state = {running}',
    'progress': 'UPDATE job SET progress = ?, progress_message = ?, version = version + 1, '
                'updated_at = ? WHERE id = ? AND attempts = ? AND state = {running}',
    # the scheduler moved a due job into the queue
    'queued': 'UPDATE job SET state = {queued}, version = version + 1, updated_at = ? '
              'WHERE id = ? AND state = {scheduled}',
    # when a retry (or a scheduled job) is due
    'scheduled': 'UPDATE job SET scheduled_for = ?, version = version + 1, updated_at = ? '
                 'WHERE id = ? AND (state = {retrying} OR state = {scheduled})',
    'attempt': 'INSERT INTO attempt (job_id, number, worker, outcome, started_at, finished_at, '
               'duration, error_type, error_message, traceback) '
               'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
    'end_attempt': 'UPDATE attempt SET outcome = ?, finished_at = ?, duration = ?, '
                   'error_type = ?, error_message = ?, traceback = ? '
                   'WHERE job_id = ? AND number = ? AND outcome = {attempt_running}',
    'log': 'INSERT INTO attempt_log (job_id, number, at, level, message) VALUES (?, ?, ?, ?, ?)',
    # a consumer's heartbeat; counts arrive as increments since the last one
    'heartbeat': 'INSERT INTO worker (id, host, pid, queues, concurrency, started_at, last_seen, '
                 'stopped_at, processed, failed, current, leader) '
                 'VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET '
                 'last_seen = excluded.last_seen, stopped_at = NULL, '
                 'processed = worker.processed + excluded.processed, '
                 'failed = worker.failed + excluded.failed, current = excluded.current, '
                 'leader = excluded.leader, queues = excluded.queues, '
                 'concurrency = excluded.concurrency',
    'stopped': 'UPDATE worker SET stopped_at = ?, last_seen = ?, current = ?, leader = ? '
               'WHERE id = ?',
    # rows for jobs Huey runs that the ledger has not seen; the API's wins
    'job': 'INSERT INTO job (id, task, queue, params, secret_params, state, priority, attempts, '
           'retries, retry_delay, created_at, updated_at, version) '
           'VALUES (?, ?, ?, ?, ?, {queued}, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (id) DO NOTHING',
    # a job that succeeded never runs again: the real values of its secret
    # parameters are no longer needed
    'forget_secrets': 'UPDATE job SET secret_params = NULL '
                      'WHERE id = ? AND state = {succeeded} AND secret_params IS NOT NULL',
}


# The columns of a submitted job's row (app.jobs, through Dialect.insert_rows), in the
# order of Dialect.submitted's values; the others are left empty.
SUBMITTED = ('id', 'task', 'queue', 'params', 'secret_params', 'state', 'priority', 'retries',
             'retry_delay', 'attempts', 'attempt_base', 'timeout', 'idempotency_key',
             'created_at', 'updated_at', 'scheduled_for', 'version')


# How many rows one INSERT statement of Dialect.insert_rows takes on SQLite:
# as many of the largest size as fit, then of the next; fewer rows than the
# smallest size go in one executemany. A few sizes keep the statements
# SQLite prepares (and the sqlite3 module caches) few.
ROWS_A_STATEMENT = (100, 20, 5)


class Dialect:
    """The statements and value conversions of one database driver."""

    def __init__(self, dialect):
        literals = {name: f"'{value}'" for name, value in (
            ('running', states.RUNNING), ('queued', states.QUEUED),
            ('succeeded', states.SUCCEEDED),
            ('scheduled', states.SCHEDULED), ('retrying', states.RETRYING),
            ('attempt_running', states.ATTEMPT_RUNNING))}
        self.sql = {k: v.format(**literals) for k, v in _SQL.items()}
        self.sqlite = dialect.name == 'sqlite'
        self.mark = '?'
        if dialect.paramstyle != 'qmark':
            self.sql = {k: v.replace('%', '%%').replace('?', '%s') for k, v in self.sql.items()}
            self.mark = '%s'
        if dialect.name == 'sqlite':
            self.ts, self.read_ts = _sqlite_ts, _sqlite_read_ts
        else:
            self.ts = self.read_ts = lambda v: v

    def due_rows(self, conn, ids):
        """``[(id, attempts, scheduled_for, updated_at)]`` of those of the jobs ``ids`` (a
        sequence of at most 1,000) that have rows, in no order; the times naive UTC datetimes.

        The driver's own SELECT, and SQLite's text times parsed by
        ``fromisoformat``: SQLAlchemy's row processing cost several
        microseconds a row, for every attempt the writer records.
        """
        rows = conn.exec_driver_sql(
            f'SELECT id, attempts, scheduled_for, updated_at FROM job '
            f'WHERE id IN ({", ".join([self.mark] * len(ids))})', tuple(ids)).all()
        read = self.read_ts
        return [(job_id, attempts, read(scheduled_for), read(updated_at))
                for job_id, attempts, scheduled_for, updated_at in rows]

    def submitted(self, job):
        """The values of ``job``'s row (an object with the :data:`SUBMITTED` attributes)
        for the ``submitted`` statement, as the driver takes them."""
        ts, json = self.ts, self.json
        created = ts(job.created_at)
        updated = created if job.updated_at is job.created_at else ts(job.updated_at)
        return (job.id, job.task, job.queue, json(job.params), json(job.secret_params),
                job.state, job.priority, job.retries, job.retry_delay, job.attempts,
                job.attempt_base, job.timeout, job.idempotency_key, created, updated,
                ts(job.scheduled_for), job.version)

    def insert_rows(self, conn, table, columns, rows):
        """Insert ``rows`` (tuples of the values of ``columns``, as the driver takes them)
        into ``table`` in ``conn``'s transaction. Raises what the driver raises (an
        ``IntegrityError`` for a key taken), the rows before it written: the caller
        rolls back.

        On SQLite, several rows go in one statement (see :data:`ROWS_A_STATEMENT`).
        Inside a transaction SQLite keeps a statement journal for every statement
        that fires triggers and may fail part way, and copies into it each page
        the statement changes before changing it. With the job table's
        triggers (the counters, migration 0008) and its fourteen indexes, a
        row a statement copied a page of the table, of each index and of the
        counters for every row: two thirds of the CPU time of inserting a
        thousand jobs. A statement of many rows copies each page once. Other
        drivers take the rows in one ``executemany`` (psycopg sends them in
        one pipeline).
        """
        if not rows:
            return
        names = ', '.join(columns)
        one = f'({", ".join([self.mark] * len(columns))})'
        if not self.sqlite:
            conn.exec_driver_sql(f'INSERT INTO {table} ({names}) VALUES {one}', rows)
            return
        start = 0
        for size in ROWS_A_STATEMENT:
            if len(rows) - start < size:
                continue
            sql = f'INSERT INTO {table} ({names}) VALUES {", ".join([one] * size)}'
            while len(rows) - start >= size:
                conn.exec_driver_sql(sql, tuple(v for row in rows[start:start + size]
                                                for v in row))
                start += size
        if start < len(rows):
            conn.exec_driver_sql(f'INSERT INTO {table} ({names}) VALUES {one}', rows[start:])

    @staticmethod
    def json(value):
        # The same UTF-8 text as the ORM writes, storable whatever the task gave.
        return None if value is None else text.dumps(value)


def _sqlite_ts(value):
    """SQLAlchemy's storage format for DateTime on SQLite (``'2026-01-31 12:00:00.000000'``:
    a 4-digit year, microseconds always, no offset), which pages and keyset
    pagination compare as text; None stays None."""
    # isoformat writes it in a quarter of strftime's time (the writer
    # converts several times per attempt), and pads years before 1000 as
    # SQLAlchemy does, where strftime does not.
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.replace(tzinfo=None)
    return value.isoformat(' ', 'microseconds')


def _sqlite_read_ts(value):
    """A time as :func:`_sqlite_ts` (or SQLAlchemy) stores it on SQLite, as a naive
    datetime; None stays None."""
    return None if value is None else dt.datetime.fromisoformat(value)


_dialects = {}


def dialect(conn):
    """The :class:`Dialect` of ``conn``'s driver (made once per dialect name)."""
    d = conn.dialect
    if d.name not in _dialects:
        _dialects[d.name] = Dialect(d)
    return _dialects[d.name]

"""bench/seed.py: a small seeded ledger has the mix it promises, written as production writes it."""
import datetime as dt
import importlib.util
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from app import catalog, states
from app.extensions import db
from app.models import Job

from conftest import make_app

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location('bench_seed', ROOT / 'bench' / 'seed.py')
seed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seed)

NOW = dt.datetime(2026, 3, 2, 12, 0, 0)
DAYS = 30
ENDED = {states.ATTEMPT_SUCCEEDED, states.ATTEMPT_FAILED, states.ATTEMPT_TIMEOUT,
         states.ATTEMPT_CANCELED, states.ATTEMPT_LOST}


@pytest.fixture(scope='module')
def seeded(tmp_path_factory):
    """300 jobs over 30 days on three queues, 64 a transaction: ``(app, summary)``."""
    tmp = tmp_path_factory.mktemp('seeded')
    app = make_app(tmp, QUEUES='default,critical,bulk')
    summary = seed.seed(app, 300, days=DAYS, seed=7, now=NOW, chunk=64, fork=False)
    yield app, summary
    with app.app_context():
        db.engine.dispose()


def rows(app, query):
    with app.app_context():
        try:
            return db.session.execute(sa.text(query)).all()
        finally:
            db.session.remove()


def test_the_ledger_holds_every_job_in_the_states_the_summary_counts(seeded):
    app, summary = seeded
    assert summary['jobs'] == 300
    by_state = dict(rows(app, 'SELECT state, count(*) FROM job GROUP BY state'))
    assert by_state == dict(summary['states'])
    assert set(by_state) == set(states.JOB_STATES)
    assert by_state[states.SUCCEEDED] > 0.75 * 300
    assert 0 < by_state[states.FAILED] < 0.15 * 300
    assert rows(app, 'SELECT count(*) FROM attempt')[0][0] == summary['attempts']
    assert rows(app, 'SELECT count(*) FROM attempt_log')[0][0] == summary['logs'] > 0


def test_jobs_spread_over_the_tasks_and_queues(seeded):
    app, _ = seeded
    tasks = dict(rows(app, 'SELECT task, count(*) FROM job GROUP BY task'))
    assert {'noop', 'sleep', 'payment', 'flaky'} <= set(tasks)
    assert set(dict(rows(app, 'SELECT queue, count(*) FROM job GROUP BY queue'))) == {
        'default', 'critical', 'bulk'}


def test_attempts_agree_with_each_jobs_state(seeded):
    app, _ = seeded
    outcomes = {}
    for job_id, number, outcome in rows(app, 'SELECT job_id, number, outcome FROM attempt '
                                             'ORDER BY job_id, number'):
        outcomes.setdefault(job_id, []).append((number, outcome))
    retried = 0
    for job_id, state, attempts, error in rows(app, 'SELECT id, state, attempts, error FROM job'):
        mine = outcomes.get(job_id, [])
        assert [n for n, _ in mine] == list(range(1, attempts + 1)), job_id
        last = mine[-1][1] if mine else None
        if state in (states.QUEUED, states.SCHEDULED):
            assert attempts == 0
        elif state == states.RUNNING:
            assert last == states.ATTEMPT_RUNNING
        elif state == states.RETRYING:
            assert last in ENDED - {states.ATTEMPT_SUCCEEDED} and error
        elif state == states.SUCCEEDED:
            assert last == states.ATTEMPT_SUCCEEDED and error is None
        elif state == states.FAILED:
            assert last in ENDED - {states.ATTEMPT_SUCCEEDED} and error
        elif state == states.CANCELED:
            assert last in (None, states.ATTEMPT_CANCELED)
        # Every attempt but the last ended without success.
        assert all(o not in (states.ATTEMPT_SUCCEEDED, states.ATTEMPT_RUNNING)
                   for _, o in mine[:-1]), job_id
        retried += attempts > 1
    assert retried > 0.05 * 300


def test_failed_attempts_keep_an_error_and_a_multi_line_traceback(seeded):
    app, _ = seeded
    failed = rows(app, "SELECT error_type, error_message, traceback FROM attempt "
                       "WHERE outcome = 'failed'")
    assert failed
    for error_type, message, tb in failed:
        assert error_type and message
        assert tb.startswith('Traceback (most recent call last):')
        assert tb.count('\n') > 4 and tb.rstrip().endswith(f'{error_type}: {message}')
    types = {t for t, _, _ in failed}
    assert 'RuntimeError' in types and len(types) >= 2


def test_times_fall_within_the_period_and_in_order(seeded):
    app, _ = seeded
    start = NOW - dt.timedelta(days=DAYS)
    parse = dt.datetime.fromisoformat
    for state, created, started, finished, scheduled in rows(
            app, 'SELECT state, created_at, started_at, finished_at, scheduled_for FROM job'):
        created = parse(created)
        assert start <= created <= NOW
        if started is not None:
            assert created <= parse(started) <= NOW
        if finished is not None:
            assert created <= parse(finished) <= NOW
            assert state in states.FINISHED
        if state in (states.SCHEDULED, states.RETRYING):
            assert parse(scheduled) > NOW
    for started, finished in rows(app, 'SELECT started_at, finished_at FROM attempt '
                                       'WHERE started_at IS NOT NULL AND finished_at IS NOT NULL'):
        assert parse(started) <= parse(finished) <= NOW


def test_secret_values_are_kept_only_for_jobs_that_may_run_again(seeded):
    app, _ = seeded
    payments = rows(app, "SELECT state, params, secret_params FROM job WHERE task = 'payment'")
    assert payments
    for state, params, secret in payments:
        assert '"**** ' in params
        assert (secret is None) == (state == states.SUCCEEDED)


def test_consumers_have_their_rows_and_counts(seeded):
    app, summary = seeded
    workers = rows(app, 'SELECT id, processed, stopped_at FROM worker')
    assert len(workers) >= 2
    ended = rows(app, "SELECT count(*) FROM attempt WHERE outcome != 'running'")[0][0]
    assert sum(p for _, p, _ in workers) == ended
    assert [w for w in workers if w[2] is None]  # the current consumers


def test_the_same_seed_and_now_make_the_same_jobs(seeded):
    app, summary = seeded
    again = seed.Generator(300, DAYS, NOW, 7, app.config, catalog.TASKS)
    stories = [s for chunk in again.stories() for s in chunk]
    assert Counter(s.state for s in stories) == summary['states']
    ids = {r[0] for r in rows(app, 'SELECT id FROM job')}
    assert {s.id for s in stories} == ids


def journal_mode(app):
    return rows(app, 'PRAGMA journal_mode')[0][0]


def test_the_counters_agree_with_the_rows_and_search_holds_every_job(seeded):
    from app.ledger import tallies
    app, _ = seeded
    with app.app_context():
        try:
            assert tallies.differences(db.session.connection()) == {}
        finally:
            db.session.remove()
    assert rows(app, 'SELECT count(*) FROM job_search_pending')[0][0] == 0
    params = rows(app, 'SELECT count(*) FROM job_search WHERE rowid % 4 = 0')[0][0]
    assert params == 300


def test_the_ledger_is_left_in_wal_mode_and_an_append_keeps_it_all_along(tmp_path, monkeypatch):
    app = make_app(tmp_path)
    assert journal_mode(app) == 'wal'
    seen = []  # the journal mode while each transaction of the append was written
    real = seed.write

    def write(session, chunk):
        seen.append(session.connection().exec_driver_sql('PRAGMA journal_mode').scalar())
        return real(session, chunk)
    seed.seed(app, 40, days=DAYS, seed=1, now=NOW, fork=False)
    assert journal_mode(app) == 'wal'
    monkeypatch.setattr(seed, 'write', write)
    summary = seed.seed(app, 40, days=DAYS, seed=2, now=NOW, fork=False)
    assert seen == ['wal'] and summary['jobs'] == 40
    assert rows(app, 'SELECT count(*) FROM job')[0][0] == 80
    with app.app_context():
        db.engine.dispose()


def test_a_fresh_ledger_is_written_with_its_journal_in_memory(tmp_path, monkeypatch):
    app = make_app(tmp_path)
    seen = []
    real = seed.write

    def write(session, chunk):
        seen.append(session.connection().exec_driver_sql('PRAGMA journal_mode').scalar())
        return real(session, chunk)
    monkeypatch.setattr(seed, 'write', write)
    seed.seed(app, 30, days=DAYS, seed=1, now=NOW, chunk=10, fork=False)
    assert seen == ['memory'] * 3
    assert journal_mode(app) == 'wal'
    with app.app_context():
        db.engine.dispose()


def ledger_rows(app):
    """Every row of the tables seeding writes, as text, but for the times of the writing."""
    out = {}
    for table in ('job', 'attempt', 'attempt_log', 'job_count', 'job_minute', 'metric_minute',
                  'metric_total', 'timing_minute', 'timing_total', 'worker'):
        columns = [r[1] for r in rows(app, f'PRAGMA table_info({table})')
                   if r[1] not in ('updated_at', 'last_seen', 'stopped_at')]
        out[table] = sorted(map(repr, rows(app, f'SELECT {", ".join(columns)} FROM {table}')))
    return out


def search_rows(app):
    """The search index's rows by job id and column (the job's rowid may differ)."""
    return sorted(rows(app, 'SELECT job.id, job_search.rowid % 4, job_search.text '
                            'FROM job_search JOIN job ON job.rowid = job_search.rowid / 4'))


def close(mine, theirs):
    """``ledger_rows`` equal but for the last digits of sums of seconds (floats added in
    another order)."""
    def rounded(table):
        return [tuple(round(v, 9) if isinstance(v, float) else v for v in eval(r))
                for r in table]
    return mine.keys() == theirs.keys() and all(
        rounded(mine[t]) == rounded(theirs[t]) for t in mine)


def test_jobs_written_in_their_last_state_make_the_ledger_apply_makes(tmp_path):
    # Settled jobs (seed.settle) are written at once: their rows in their last
    # state, their attempts, logs and history. Written op by op through the
    # ledger's writer (and jobs.change for those canceled while they waited),
    # the same stories make the same rows: versions, counters, rollups and
    # the search index included.
    ledgers = {}
    for settled in (True, False):
        app = make_app(tmp_path / str(settled), QUEUES='default,critical,bulk')
        summary = seed.seed(app, 2000, days=DAYS, seed=11, now=NOW, chunk=500, fork=False,
                            settled=settled)
        ledgers[settled] = app, summary
    (app, summary), (replayed, again) = ledgers[True], ledgers[False]
    assert (again['states'], again['attempts'], again['logs']) == (
        summary['states'], summary['attempts'], summary['logs'])
    mine, theirs = ledger_rows(app), ledger_rows(replayed)
    assert len(mine['job']) == 2000 and len(mine['timing_total']) > 50
    assert close(mine, theirs)
    assert search_rows(app) == search_rows(replayed) and len(search_rows(app)) > 2000
    # What the comparison covers: jobs retried, canceled while they waited
    # (some of them delayed), submitted through the API, and attempts' logs.
    kinds = dict(rows(app, """
        SELECT 'retried', count(*) FROM job WHERE attempts > 1 UNION ALL
        SELECT 'canceled waiting', count(*) FROM job WHERE state = 'canceled' AND attempts = 0
        UNION ALL SELECT 'canceled delayed', count(*) FROM job
                  WHERE state = 'canceled' AND attempts = 0 AND scheduled_for IS NOT NULL
        UNION ALL SELECT 'api', count(*) FROM job WHERE idempotency_key IS NOT NULL
                                                     OR timeout IS NOT NULL
        UNION ALL SELECT 'logs', count(*) FROM attempt_log"""))
    assert all(kinds.values()), kinds
    for a in (app, replayed):
        with a.app_context():
            db.engine.dispose()


@pytest.mark.processes
def test_stories_made_in_a_forked_process_make_the_same_ledger(seeded, tmp_path):
    app, summary = seeded
    forked = make_app(tmp_path, QUEUES='default,critical,bulk')
    again = seed.seed(forked, 300, days=DAYS, seed=7, now=NOW, chunk=64)
    assert (again['states'], again['attempts'], again['logs']) == (
        summary['states'], summary['attempts'], summary['logs'])
    mine, theirs = ledger_rows(forked), ledger_rows(app)
    assert len(mine['job']) == 300 and len(mine['metric_minute']) > 0
    assert mine == theirs
    with forked.app_context():
        db.engine.dispose()


@pytest.mark.processes
def test_a_generator_that_fails_fails_the_seeding_and_leaves_wal_mode(tmp_path, monkeypatch):
    app = make_app(tmp_path)

    def broken(self, chunk=seed.CHUNK):
        yield list(real(self, chunk))[0]
        raise ValueError('no more stories')
    real = seed.Generator.stories
    monkeypatch.setattr(seed.Generator, 'stories', broken)  # the forked process inherits it
    with pytest.raises(RuntimeError, match='no more stories'):
        seed.seed(app, 30, days=DAYS, seed=1, now=NOW, chunk=10)
    assert journal_mode(app) == 'wal'
    assert rows(app, 'SELECT count(*) FROM job')[0][0] == 10  # the first chunk, committed
    with app.app_context():
        db.engine.dispose()


@pytest.mark.processes
def test_a_seeding_stopped_by_sigterm_ends_its_generator_and_says_what_it_left(tmp_path):
    import contextlib
    import os
    import signal
    import sqlite3
    import subprocess
    import sys

    from helpers import wait_for
    target = tmp_path / 'stopped.db'
    proc = subprocess.Popen([sys.executable, str(ROOT / 'bench' / 'seed.py'), '--jobs', '2000000',
                             '--database-url', str(target)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, 'INSTANCE_PATH': str(tmp_path)})
    children = Path(f'/proc/{proc.pid}/task/{proc.pid}/children')
    try:
        # The generating process is forked once the ledger is migrated.
        wait_for(lambda: children.read_text().split(), 60, 0.1, 'the generating process')
        generator = int(children.read_text().split()[0])

        def written():
            with contextlib.closing(sqlite3.connect(target, timeout=5)) as conn:
                return conn.execute('SELECT count(*) FROM job').fetchone()[0]
        # Stopped while it writes (a transaction takes about a second).
        wait_for(lambda: written() >= 20_000, 120, 0.2, 'the first transactions')
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert f'seeding interrupted: sqlite:///{target} holds part of a history' in err
    assert 'Traceback' not in err
    # The ledger it left is whole: its indexes built, its journal back in WAL mode.
    stopped, fresh = make_app(tmp_path, DATABASE_URL=f'sqlite:///{target}'), \
        make_app(tmp_path / 'fresh')
    assert job_indexes(stopped) == job_indexes(fresh)
    assert rows(stopped, 'PRAGMA integrity_check') == [('ok',)]
    assert journal_mode(stopped) == 'wal' and rows(stopped, 'SELECT count(*) FROM job')[0][0]
    for app in (stopped, fresh):
        with app.app_context():
            db.engine.dispose()
    # The generator is gone too, and holds no copy of the ledger or of the pipe.
    wait_for(lambda: not Path(f'/proc/{generator}').exists()
             or Path(f'/proc/{generator}/stat').read_text().split(') ')[1][0] == 'Z',
             10, 0.1, 'the generating process to end')


def job_indexes(app):
    """The job table's indexes as the database describes them: ``{name: definition}``."""
    with app.app_context():
        try:
            if db.engine.dialect.name == 'sqlite':
                found = db.session.execute(sa.text(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                    "AND tbl_name = 'job'")).all()
            else:
                found = db.session.execute(sa.text(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'job'")).all()
            return dict(found)
        finally:
            db.session.remove()


def test_an_empty_ledger_is_written_without_the_job_indexes_and_ends_with_them(
        tmp_path, monkeypatch, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    migrated = job_indexes(app)
    deferred = {i.name for i in Job.__table__.indexes if not i.unique}
    assert {'ix_job_created', 'ix_job_run', 'ix_job_task_run'} <= deferred <= set(migrated)
    seen = []  # the indexes there while each transaction was written
    real = seed.write

    def write(session, chunk):
        seen.append(set(job_indexes(app)))
        return real(session, chunk)
    monkeypatch.setattr(seed, 'write', write)
    seed.seed(app, 30, days=DAYS, seed=1, now=NOW, chunk=10, fork=False)
    assert seen == [set(migrated) - deferred] * 3
    assert job_indexes(app) == migrated  # the same definitions, built once
    # An append writes with them all.
    seen.clear()
    seed.seed(app, 10, days=DAYS, seed=2, now=NOW, chunk=10, fork=False)
    assert seen == [set(migrated)] and job_indexes(app) == migrated
    with app.app_context():
        db.engine.dispose()


def test_a_seeding_that_fails_still_builds_the_job_indexes(tmp_path, monkeypatch):
    app = make_app(tmp_path)
    migrated = job_indexes(app)
    calls = []
    real = seed.write

    def failing(session, chunk):
        calls.append(1)
        if len(calls) == 2:
            raise sa.exc.OperationalError('INSERT', {}, Exception('disk I/O error'))
        return real(session, chunk)
    monkeypatch.setattr(seed, 'write', failing)
    with pytest.raises(sa.exc.OperationalError):
        seed.seed(app, 30, days=DAYS, seed=1, now=NOW, chunk=10, fork=False)
    assert job_indexes(app) == migrated
    assert rows(app, 'SELECT count(*) FROM job')[0][0] == 10  # the first chunk, committed
    with app.app_context():
        db.engine.dispose()


@pytest.mark.parametrize('args, says', [
    (['--days', 'nan'], '--days must be more than 0 and at most 36,500'),
    (['--days', 'inf'], '--days must be'),
    (['--days', '1e6'], '--days must be'),
    (['--days', '0'], '--days must be'),
    (['--now', '0001-01-02T00:00:00Z'], 'the period must start after 1970-01-01'),
    (['--now', '1971-01-01T00:00:00Z', '--days', '400'], 'the period must start after'),
    (['--now', '9999-12-31T00:00:00Z'], 'and end before 9000-01-01'),
    (['--now', 'soon'], '--now:'),
    (['--jobs', '-1'], '--jobs must be 0 or more'),
    (['--jobs', '1_000'], "argument --jobs: '1_000': must be a whole number (ASCII digits)"),
    (['--jobs', '\u0663'], 'argument --jobs:'),
    (['--seed', '1e3'], "argument --seed: '1e3': must be a whole number"),
])
def test_impossible_arguments_are_refused_before_the_ledger_is_made(tmp_path, capsys, args,
                                                                    says):
    path = tmp_path / 'ledger.db'
    with pytest.raises(SystemExit) as exc:
        seed.main(['--jobs', '10', '--database-url', str(path), *args])
    assert exc.value.code == 2 and says in capsys.readouterr().err
    assert not path.exists()


@pytest.mark.parametrize('url', [':memory:', 'sqlite://', 'sqlite:///:memory:',
                                 'sqlite:///file:memx?mode=memory&cache=shared&uri=true',
                                 'sqlite:///file::memory:?uri=true'])
def test_an_in_memory_ledger_is_refused_and_no_file_is_made(tmp_path, capsys, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        seed.main(['--jobs', '10', '--database-url', url])
    assert exc.value.code == 2 and 'an in-memory ledger is gone' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_database_url_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        seed.main(['--jobs', '10', '--database-url', ''])
    assert exc.value.code == 2 and '--database-url: empty' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('url', ['sqlite:///rel.db', 'sqlite:///file:rel.db?uri=true', 'rel.db'])
def test_a_relative_sqlite_path_is_taken_from_the_current_folder(tmp_path, monkeypatch, url):
    # Once taken from the app's temporary instance folder: "seeded" with exit 0, and
    # the ledger removed with the folder at exit.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('INSTANCE_PATH', raising=False)
    assert seed._url(url).endswith(str(tmp_path / 'rel.db') + ('?uri=true' if 'uri' in url else ''))
    seed.main(['--jobs', '5', '--seed', '3', '--database-url', url])
    ledger = sqlite3.connect(tmp_path / 'rel.db')
    assert ledger.execute('SELECT count(*) FROM job').fetchone() == (5,)
    ledger.close()


@pytest.mark.parametrize('url, shown, says', [
    ('sqlite:////no/such/directory/ledger.db', None, 'unable to open database file'),
    ('postgresql://nobody:s3cret@127.0.0.1:1/ledger', 'postgresql://nobody:***@127.0.0.1:1/ledger',
     'connection'),
    ('postgresql://nobody@127.0.0.1:1/ledger?password=s3cret',
     'postgresql://nobody@127.0.0.1:1/ledger?password=%2A%2A%2A', 'connection'),
    ('postgresql://nobody@127.0.0.1:1/ledger?connect_timeout=abc', None, 'connect_timeout'),
    ('mysql://nobody:s3cret@127.0.0.1/ledger', 'mysql://nobody:***@127.0.0.1/ledger',
     "No module named 'MySQLdb'"),
    ('not-a-database', None, 'file is not a database'),
])
def test_a_ledger_that_cannot_be_opened_is_named_without_a_traceback(tmp_path, url, shown, says):
    if url == 'not-a-database':  # a file that is something else, left as it was
        url = str(tmp_path / 'notes.txt')
        Path(url).write_text('not a ledger\n' * 100)
        shown = f'sqlite:///{url}'
    with pytest.raises(SystemExit) as exc:
        seed.main(['--jobs', '10', '--database-url', url])
    message = str(exc.value.code)
    assert message.startswith(f'cannot open the ledger {shown or url}: ') and says in message, \
        message
    assert 's3cret' not in message  # a password is not shown
    if shown and shown.startswith('sqlite:'):
        assert Path(url).read_text() == 'not a ledger\n' * 100


def test_a_ledger_seeded_elsewhere_leaves_no_instance_folder_in_the_checkout(tmp_path,
                                                                             monkeypatch):
    monkeypatch.delenv('INSTANCE_PATH', raising=False)
    monkeypatch.delenv('SECRET_KEY', raising=False)
    app = seed.make_app(f'sqlite:///{tmp_path}/ledger.db')
    instance = Path(app.instance_path)
    assert ROOT not in instance.parents and instance.name.startswith('qm-seed-')
    assert (instance / 'secret_key').is_file()  # the app's key went there, not to instance/
    with app.app_context():
        db.engine.dispose()

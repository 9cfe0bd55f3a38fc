"""The ledger's tables: lenient text, timestamps, defaults, and what each
model says about itself (``to_dict``, ``error``, ``online``, ``retries_left``)."""
import datetime as dt
import time

import pytest
import sqlalchemy as sa
from conftest import make_app

from app.extensions import db
from app.models import (Attempt, AttemptLog, Control, Job, JobEvent, String, Text, Worker,
                        isoformat, utcnow)

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678901)


def new_job(id='job-1', **fields):
    """A ``Job`` with the columns that have no default filled in."""
    values = {'task': 'noop', 'queue': 'default', 'params': {'n': 1}, 'state': 'queued',
              'retries': 3, 'retry_delay': 1.5}
    values.update(fields)
    return Job(id=id, **values)


@pytest.fixture
def ledger(tmp_path, ledger_url):
    """An app context on a migrated ledger, on SQLite, then on PostgreSQL."""
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    with app.app_context():
        yield app
        db.session.remove()
        db.engine.dispose()


def scalar(sql, **params):
    return db.session.execute(sa.text(sql), params).scalar()


# -- timestamps --

@pytest.fixture
def away_from_utc(monkeypatch):
    """The process's local time zone five and a half hours from UTC."""
    monkeypatch.setenv('TZ', 'Asia/Kolkata')
    time.tzset()
    assert time.timezone == -19800
    yield
    monkeypatch.undo()
    time.tzset()


def test_utcnow_is_the_current_utc_time_without_a_zone(away_from_utc):
    before = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    now = utcnow()
    after = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert now.tzinfo is None
    assert before <= now <= after


def test_isoformat_is_milliseconds_with_a_z_and_reads_back_as_utc():
    assert isoformat(T0) == '2026-01-02T03:04:05.678Z'
    assert isoformat(dt.datetime(2026, 1, 2)) == '2026-01-02T00:00:00.000Z'
    assert isoformat(None) is None
    # The same object twice, then another: each gets its own text.
    later = T0 + dt.timedelta(seconds=1)
    assert [isoformat(t) for t in (T0, T0, later, T0)] == [
        '2026-01-02T03:04:05.678Z', '2026-01-02T03:04:05.678Z', '2026-01-02T03:04:06.678Z',
        '2026-01-02T03:04:05.678Z']
    back = dt.datetime.fromisoformat(isoformat(T0))
    assert back.utcoffset() == dt.timedelta(0)
    assert back.replace(tzinfo=None) == T0.replace(microsecond=678000)


# -- lenient text --

@pytest.mark.parametrize('kind', [String(20), Text()])
def test_lenient_types_read_bytes_as_text_and_leave_the_rest_alone(kind):
    assert kind.process_result_value(b'caf\xc3\xa9 \xff\xfe', None) == 'café \ufffd\ufffd'
    assert kind.process_result_value('already text', None) == 'already text'
    assert kind.process_result_value(None, None) is None


def test_lenient_types_keep_the_ddl_of_what_they_wrap():
    from sqlalchemy.dialects import postgresql, sqlite
    for dialect in (sqlite.dialect(), postgresql.dialect()):
        assert String(36).compile(dialect=dialect) == 'VARCHAR(36)'
        assert Text().compile(dialect=dialect) == 'TEXT'


def test_a_blob_written_into_text_columns_behind_the_apps_back_reads_as_text(ctx):
    db.session.add(new_job())
    db.session.flush()
    db.session.add(Attempt(job_id='job-1', number=1, outcome='failed', error_type='E'))
    db.session.add(AttemptLog(job_id='job-1', number=1, at=T0, level='INFO', message='x'))
    db.session.add(JobEvent(job_id='job-1', kind='repair', message='x'))
    db.session.commit()
    blob = b'bad \xff bytes'
    with db.engine.begin() as conn:  # sqlite3 binds bytes as a BLOB
        conn.execute(sa.text('UPDATE job SET error = :b, progress_message = :b, task = :b'),
                     {'b': blob})
        conn.execute(sa.text('UPDATE attempt SET traceback = :b, error_message = :b'), {'b': blob})
        conn.execute(sa.text('UPDATE attempt_log SET message = :b'), {'b': blob})
        conn.execute(sa.text('UPDATE job_event SET message = :b'), {'b': blob})
        assert conn.execute(sa.text('SELECT typeof(error) FROM job')).scalar() == 'blob'
    db.session.expire_all()
    job = db.session.get(Job, 'job-1')
    attempt = job.attempt_rows[0]
    assert (job.error, job.progress_message, job.task) == ('bad \ufffd bytes',) * 3
    assert (attempt.traceback, attempt.error) == ('bad \ufffd bytes', 'E: bad \ufffd bytes')
    assert db.session.scalars(sa.select(AttemptLog.message)).one() == 'bad \ufffd bytes'
    assert job.to_dict(job.attempt_rows)['events'][0]['message'] == 'bad \ufffd bytes'


# -- Job --

def test_a_new_job_row_gets_its_defaults(ledger):
    before = utcnow()
    db.session.add(new_job())
    db.session.commit()
    db.session.expire_all()
    job = db.session.get(Job, 'job-1')
    assert (job.priority, job.attempts, job.attempt_base, job.version) == (0, 0, 0, 1)
    assert before <= job.created_at <= utcnow() and before <= job.updated_at <= utcnow()
    assert (job.result, job.error, job.worker, job.progress, job.idempotency_key) == (None,) * 5


def test_a_job_without_a_result_stores_sql_null_not_json_null(ledger):
    db.session.add_all([new_job('none', result=None), new_job('some', result={'n': [1, 'é']})])
    db.session.commit()
    assert scalar("SELECT result IS NULL FROM job WHERE id = 'none'")
    assert scalar("SELECT count(*) FROM job WHERE result IS NULL") == 1
    db.session.expire_all()
    assert db.session.get(Job, 'some').result == {'n': [1, 'é']}


@pytest.mark.parametrize('base, after, left', [
    (0, 1, 2), (0, 3, 0), (0, 4, -1),
    (3, 4, 2), (3, 6, 0),  # a manual retry after attempt 3 starts a full round
])
def test_retries_left_counts_only_the_current_round(base, after, left):
    assert new_job(retries=3, attempt_base=base).retries_left(after) == left


def test_job_to_dict_names_every_field_with_timestamps_in_iso_form():
    job = new_job(state='running', priority=5, progress=0.5, progress_message='half',
                  result=None, error='E: boom', error_type='E', attempts=2, attempt_base=1,
                  created_at=T0, scheduled_for=None, started_at=T0 + dt.timedelta(seconds=1),
                  finished_at=None, run_seconds=1.25,
                  updated_at=T0 + dt.timedelta(seconds=2), worker='h:1',
                  timeout=30.0, cancel_requested_at=T0 + dt.timedelta(seconds=3),
                  idempotency_key='k', version=7)
    assert job.to_dict() == {
        'id': 'job-1', 'task': 'noop', 'queue': 'default', 'params': {'n': 1},
        'state': 'running', 'priority': 5, 'progress': 0.5, 'progress_message': 'half',
        'result': None, 'error': 'E: boom', 'retries': 3, 'retry_delay': 1.5,
        'attempt_count': 2, 'worker': 'h:1', 'error_type': 'E', 'timeout': 30.0,
        'cancel_requested_at': '2026-01-02T03:04:08.678Z', 'idempotency_key': 'k',
        'created_at': '2026-01-02T03:04:05.678Z', 'scheduled_for': None,
        'started_at': '2026-01-02T03:04:06.678Z', 'finished_at': None, 'run_seconds': 1.25,
        'updated_at': '2026-01-02T03:04:07.678Z', 'version': 7,
    }


def test_job_to_dict_with_attempts_adds_them_and_the_jobs_events_in_order(ledger):
    db.session.add(new_job())
    db.session.commit()
    # written out of order, each in its own transaction, so that a table
    # read without ORDER BY would return them that way
    for row in (Attempt(job_id='job-1', number=2, outcome='succeeded', started_at=T0),
                Attempt(job_id='job-1', number=1, outcome='failed', error_type='E',
                        error_message='x'),
                JobEvent(id=5, job_id='job-1', kind='repair', message='second', at=T0),
                JobEvent(id=2, job_id='job-1', kind='lost', message='first', at=T0)):
        db.session.add(row)
        db.session.commit()
    db.session.expire_all()
    job = db.session.get(Job, 'job-1')
    assert [a.number for a in job.attempt_rows] == [1, 2]
    data = job.to_dict(job.attempt_rows)
    assert [(a['number'], a['state'], a['error']) for a in data['attempts']] == [
        (1, 'failed', 'E: x'), (2, 'succeeded', None)]
    assert data['events'] == [
        {'at': '2026-01-02T03:04:05.678Z', 'kind': 'lost', 'message': 'first'},
        {'at': '2026-01-02T03:04:05.678Z', 'kind': 'repair', 'message': 'second'}]
    assert 'attempts' not in job.to_dict() and 'events' not in job.to_dict()
    assert job.to_dict([])['attempts'] == [] and len(job.to_dict([])['events']) == 2


def test_deleting_a_job_deletes_its_attempts_logs_and_events(ledger):
    db.session.add_all([new_job('gone'), new_job('kept')])
    db.session.flush()
    for job_id in ('gone', 'kept'):
        db.session.add_all([
            Attempt(job_id=job_id, number=1, outcome='failed'),
            AttemptLog(job_id=job_id, number=1, at=T0, level='INFO', message='line'),
            JobEvent(job_id=job_id, kind='repair', message='m')])
    db.session.commit()
    db.session.expire_all()  # nothing loaded: the database's cascade does the work
    db.session.delete(db.session.get(Job, 'gone'))
    db.session.commit()
    for table in ('attempt', 'attempt_log', 'job_event'):
        assert scalar(f'SELECT count(*) FROM {table}') == 1, table
        assert scalar(f"SELECT job_id FROM {table}") == 'kept', table


# -- Attempt, AttemptLog, JobEvent --

@pytest.mark.parametrize('error_type, message, error', [
    (None, None, None), (None, 'orphan message', None), ('', 'x', None),
    ('TimeoutError', None, 'TimeoutError'), ('TimeoutError', '', 'TimeoutError'),
    ('ValueError', 'bad <n>', 'ValueError: bad <n>'),
])
def test_an_attempts_error_is_its_type_and_message(error_type, message, error):
    assert Attempt(error_type=error_type, error_message=message).error == error


def test_attempt_to_dict_calls_its_outcome_the_state():
    attempt = Attempt(job_id='j', number=2, worker='h:1', outcome='failed', started_at=T0,
                      finished_at=T0 + dt.timedelta(milliseconds=1500), duration=1.5,
                      error_type='KeyError', error_message="'x'", traceback='Traceback...')
    assert attempt.to_dict() == {
        'number': 2, 'state': 'failed', 'worker': 'h:1',
        'started_at': '2026-01-02T03:04:05.678Z', 'finished_at': '2026-01-02T03:04:07.178Z',
        'duration': 1.5, 'error': "KeyError: 'x'", 'error_type': 'KeyError',
        'error_message': "'x'", 'traceback': 'Traceback...'}


def test_a_log_line_and_an_event_are_time_level_or_kind_and_message():
    assert AttemptLog(at=T0, level='WARNING', message='low disk').to_dict() == {
        'at': '2026-01-02T03:04:05.678Z', 'level': 'WARNING', 'message': 'low disk'}
    assert JobEvent(at=T0, kind='lost', message='worker died').to_dict() == {
        'at': '2026-01-02T03:04:05.678Z', 'kind': 'lost', 'message': 'worker died'}


def test_an_event_and_a_control_are_stamped_when_written(ledger):
    before = utcnow()
    db.session.add(new_job())
    db.session.flush()
    db.session.add_all([JobEvent(job_id='job-1', kind='repair', message='m'),
                        Control(key='paused:default', value={'by': 'ops', 'n': [1]})])
    db.session.commit()
    db.session.expire_all()
    event = db.session.scalars(sa.select(JobEvent)).one()
    control = db.session.get(Control, 'paused:default')
    assert before <= event.at <= utcnow() and before <= control.updated_at <= utcnow()
    assert control.value == {'by': 'ops', 'n': [1]}


# -- Worker --

def new_worker(omit=(), **fields):
    """A ``Worker`` as a heartbeat 5 s ago describes it, without the columns in ``omit``."""
    values = {'id': 'h:1', 'host': 'h', 'pid': 1, 'queues': ['default'], 'concurrency': 4,
              'started_at': T0, 'last_seen': utcnow() - dt.timedelta(seconds=5),
              'stopped_at': None, 'processed': 10, 'failed': 2, 'current': ['job-1'],
              'leader': True}
    values.update(fields)
    return Worker(**{k: v for k, v in values.items() if k not in omit})


def test_a_worker_is_online_while_it_beats_and_until_it_stops():
    assert new_worker().online(lost_after=10)
    assert not new_worker().online(lost_after=5)  # silent for as long as it may be
    assert not new_worker(stopped_at=utcnow()).online(lost_after=10)


def test_worker_to_dict_says_leader_only_while_the_worker_is_online():
    data = new_worker().to_dict(lost_after=10)
    last_seen = data.pop('last_seen')
    assert last_seen.endswith('Z')
    assert data == {'id': 'h:1', 'host': 'h', 'pid': 1, 'queues': ['default'],
                    'concurrency': 4, 'started_at': '2026-01-02T03:04:05.678Z',
                    'stopped_at': None, 'processed': 10, 'failed': 2, 'current': ['job-1'],
                    'leader': True, 'online': True}
    lost = new_worker().to_dict(lost_after=1)
    assert (lost['leader'], lost['online']) == (False, False)
    stopped = new_worker(stopped_at=T0).to_dict(lost_after=10)
    assert (stopped['leader'], stopped['online'], stopped['stopped_at']) == (
        False, False, '2026-01-02T03:04:05.678Z')
    assert new_worker(leader=False).to_dict(lost_after=10)['leader'] is False


def test_a_new_worker_row_has_counted_nothing_and_leads_nothing(ledger):
    db.session.add(new_worker(omit=('processed', 'failed', 'leader'), last_seen=T0))
    db.session.commit()
    db.session.expire_all()
    worker = db.session.get(Worker, 'h:1')
    assert (worker.processed, worker.failed, worker.leader) == (0, 0, False)
    assert (worker.queues, worker.current) == (['default'], ['job-1'])

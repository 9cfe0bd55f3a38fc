"""The ledger recorder: Huey's signals become Job and Attempt rows.

Jobs run through Huey's real execute path (what a consumer worker does,
minus the thread), on SQLite and on PostgreSQL.
"""
import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from conftest import flushed, make_app, recording_app, run_next, start_recording

import huey_tasks
from app import broker, catalog, consumer, jobs, ledger, queries, queues
from app.extensions import db
from app.leader import process_name
from app.models import Attempt, Job, utcnow


@pytest.fixture
def ledger_app(tmp_path, ledger_url):
    with recording_app(tmp_path, DATABASE_URL=ledger_url) as pair:
        yield pair


def submit(app, task, params=None, **options):
    sub = catalog.validate({'task': task, 'params': params or {}, **options}, app.config)
    return jobs.submit(sub).orm()


def attempts_of(job_id):
    return db.session.scalars(sa.select(Attempt).where(Attempt.job_id == job_id)
                              .order_by(Attempt.number)).all()


def test_noop_succeeds_with_one_attempt(ledger_app):
    app, recorder = ledger_app
    job = submit(app, 'noop')
    run_next()
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts, row.progress, row.error) == ('succeeded', 1, 1.0, None)
    assert row.started_at <= row.finished_at and row.version > 1
    [attempt] = attempts_of(job.id)
    assert attempt.outcome == 'succeeded' and attempt.duration >= 0
    assert attempt.worker.startswith(process_name())


def test_flaky_job_records_each_failed_attempt_then_succeeds(ledger_app):
    app, recorder = ledger_app
    job = submit(app, 'flaky', {'failures': 2}, retry_delay=0)
    for _ in range(2):
        run_next()
        flushed(recorder)
        assert db.session.get(Job, job.id).state == 'retrying'
    run_next()
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts, row.result) == ('succeeded', 3, {'succeeded_on_attempt': 3})
    outcomes = [(a.number, a.outcome, a.error_type) for a in attempts_of(job.id)]
    assert outcomes == [(1, 'failed', 'RuntimeError'), (2, 'failed', 'RuntimeError'),
                        (3, 'succeeded', None)]


def test_failed_attempt_keeps_traceback_and_last_retry_ends_failed(ledger_app):
    app, recorder = ledger_app
    job = submit(app, 'fail', {'message': 'boom <b>'}, retries=1, retry_delay=0)
    run_next()
    run_next()
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts) == ('failed', 2)
    assert row.error == 'RuntimeError: boom <b>' and row.finished_at is not None
    for attempt in attempts_of(job.id):
        assert attempt.outcome == 'failed'
        assert attempt.error_message == 'boom <b>'
        assert 'Traceback (most recent call last)' in attempt.traceback
        assert 'huey_tasks.py' in attempt.traceback and 'in fail' in attempt.traceback
    assert broker.hueys['default'].pending_count() == 0


def test_permanent_error_fails_without_retrying(ledger_app):
    app, recorder = ledger_app
    job = submit(app, 'payment', {'amount': 20000, 'failure_rate': 0})
    run_next()
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts) == ('failed', 1)
    assert row.error.startswith('huey_tasks.CardDeclined: issuer declined 20000.00 EUR')
    assert broker.hueys['default'].pending_count() == 0


def test_retry_delay_is_scheduled_with_backoff_and_jitter(ledger_app):
    app, recorder = ledger_app
    huey = broker.hueys['default']
    job = submit(app, 'fail', retries=2, retry_delay=10)
    before = utcnow()
    run_next()
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert row.state == 'retrying'
    wait = (row.scheduled_for - before).total_seconds()
    assert 7.4 <= wait <= 12.6, wait  # 10 s +-25 %
    [task] = huey.read_schedule(row.scheduled_for + dt.timedelta(seconds=1))
    assert task.retry_delay == 20  # doubled for the next retry
    assert huey.scheduled_count() == 0


def test_jitter_spreads_retries():
    huey = broker.hueys['default']
    now = utcnow()
    etas = set()
    for _ in range(20):
        task = huey_tasks.noop.task_type.wrappers[huey.name].s()
        task.retries, task.retry_delay, task.retry_backoff = 1, 10, 2
        huey.storage.add_to_schedule = lambda data, ts: etas.add(ts)
        try:
            huey._requeue_task(task, now)
        finally:
            del huey.storage.add_to_schedule
    assert len(etas) > 15
    assert all(7.5 <= (eta - now).total_seconds() <= 12.5 for eta in etas)


def test_progress_keeps_the_latest_report_of_the_running_attempt(ledger_app):
    app, recorder = ledger_app
    job = submit(app, 'noop')
    task = broker.hueys['default'].dequeue()
    from app import task_api as context
    recorder.on_signal(None, 'default', 'executing', task)
    with context.running(task, broker.hueys['default']):
        context.progress(1, 4, 'a quarter')
        context.progress(3, 4, 'three quarters')
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert (row.state, row.progress, row.progress_message) == ('running', 0.75, 'three quarters')


def test_a_late_write_about_an_earlier_attempt_does_not_regress_the_job(ledger_app):
    # Attempt 1 fails on consumer A, attempt 2 starts on consumer B, and B's
    # writer flushes before A's.
    app, recorder = ledger_app
    a = ledger.Recorder(recorder.writer.engine)
    b = ledger.Recorder(recorder.writer.engine)
    job = submit(app, 'fail', retries=2, retry_delay=0)
    task = broker.hueys['default'].dequeue()
    a.on_signal(None, 'default', 'executing', task)
    a.on_post_execute(task, None, RuntimeError('first'))
    task.retries -= 1  # what Huey does before it re-enqueues
    b.on_signal(None, 'default', 'executing', task)
    b.flush()
    a.flush()
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts) == ('running', 2)
    assert [(x.number, x.outcome) for x in attempts_of(job.id)] == [(1, 'failed'), (2, 'running')]


def test_job_enqueued_around_the_api_gets_a_row(ledger_app):
    app, recorder = ledger_app
    huey_tasks.sleep.task_type.wrappers['qm.default'].schedule(
        kwargs={'params': {'seconds': 0, 'steps': 1}}, delay=0)
    task = run_next()
    flushed(recorder)
    row = db.session.get(Job, task.id)
    assert (row.task, row.queue, row.state, row.params) == (
        'sleep', 'default', 'succeeded', {'seconds': 0, 'steps': 1})


def test_a_job_whose_row_commits_while_its_attempt_is_written_is_recorded(
        tmp_path, postgres_url):
    # The API commits a job's row just after handing the job to the broker;
    # a fast worker's record can reach the ledger in between. On PostgreSQL
    # the writer's update then misses the uncommitted row, and the row is
    # committed before the writer looks again. (SQLite serializes writers.)
    app = make_app(tmp_path, DATABASE_URL=postgres_url)
    with app.app_context():
        recorder = start_recording(app)
        try:
            huey = broker.hueys['default']
            job_id = str(uuid.uuid4())
            task = huey_tasks.noop.task_type.wrappers[huey.name].s(
                params={}, meta={'base': 0, 'retries': 2})
            task.id, task.retries = job_id, 2
            api = db.engine.connect()
            api_tx = api.begin()
            now = utcnow()
            api.execute(sa.insert(Job.__table__).values(
                id=job_id, task='noop', queue='default', params={}, state='queued',
                priority=0, attempts=0, attempt_base=0, retries=2, retry_delay=5.0,
                created_at=now, updated_at=now, version=1))

            def commit_after_the_first_update(conn, cursor, statement, *args):
                if statement.startswith('UPDATE job SET state') and api_tx.is_active:
                    api_tx.commit()
            sa.event.listen(db.engine, 'after_cursor_execute', commit_after_the_first_update)
            try:
                recorder.on_signal(huey, 'default', 'executing', task)
                recorder.on_post_execute(task, None, None)
                flushed(recorder)
            finally:
                sa.event.remove(db.engine, 'after_cursor_execute', commit_after_the_first_update)
                api.close()
            row = db.session.get(Job, job_id)
            assert (row.state, row.attempts) == ('succeeded', 1)
            assert [(x.number, x.outcome) for x in attempts_of(job_id)] == [(1, 'succeeded')]
        finally:
            consumer.process.recording.stop()
            db.session.remove()
            db.engine.dispose()


def test_interrupted_attempt_is_requeued_as_the_next_attempt(ledger_app):
    app, recorder = ledger_app
    huey = broker.hueys['default']
    job = submit(app, 'noop')
    task = huey.dequeue()
    recorder.on_signal(huey, 'default', 'executing', task)
    recorder.on_signal(huey, 'default', 'interrupted', task)
    flushed(recorder)
    assert db.session.get(Job, job.id).state == 'queued'
    assert huey.pending_count() == 1
    run_next()
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert (row.state, row.attempts) == ('succeeded', 2)
    assert [(x.number, x.outcome) for x in attempts_of(job.id)] == [
        (1, 'interrupted'), (2, 'succeeded')]


def test_the_job_keeps_its_latest_ended_attempts_run_time_for_the_run_time_order(ledger_app):
    app, recorder = ledger_app
    huey = broker.hueys['default']
    runtime = lambda: [j.id for j in queries.list_jobs(sort='runtime')[0]]  # noqa: E731
    # An attempt's start and end written apart (the writer's 'finish').
    first = submit(app, 'noop')
    task = huey.dequeue()
    recorder.on_signal(huey, 'default', 'executing', task)
    flushed(recorder)
    assert db.session.get(Job, first.id).run_seconds is None  # nothing ended yet
    recorder.on_signal(huey, 'default', 'interrupted', task)
    flushed(recorder)
    row = db.session.get(Job, first.id)
    [interrupted] = attempts_of(first.id)
    assert row.state == 'queued' and row.run_seconds == interrupted.duration is not None
    assert first.id not in runtime()  # not finished
    # Started and ended within one batch (the writer's 'ran').
    run_next()
    flushed(recorder)
    row = db.session.get(Job, first.id)
    assert row.state == 'succeeded' and row.run_seconds == attempts_of(first.id)[1].duration
    # Canceled while it waits for a retry: the run time stays its failed
    # attempt's, not the time from that attempt's start to the cancel.
    waiting = submit(app, 'flaky', {'failures': 1}, retry_delay=3600)
    run_next()
    flushed(recorder)
    [failed] = attempts_of(waiting.id)
    assert db.session.get(Job, waiting.id).run_seconds == failed.duration
    jobs.cancel(waiting.id)
    db.session.expire_all()
    row = db.session.get(Job, waiting.id)
    assert row.state == 'canceled' and row.run_seconds == failed.duration
    assert row.finished_at - row.started_at > dt.timedelta(seconds=failed.duration)
    by_run = sorted([(row.run_seconds, row.id),
                     (db.session.get(Job, first.id).run_seconds, first.id)], reverse=True)
    assert runtime() == [i for _s, i in by_run]
    # Canceled before any attempt ran: no run time, not in that order.
    queued = submit(app, 'noop')
    jobs.cancel(queued.id)
    db.session.expire_all()
    assert db.session.get(Job, queued.id).run_seconds is None and queued.id not in runtime()


def test_a_failed_flush_keeps_every_change(ledger_app, tmp_path):
    app, recorder = ledger_app
    job = submit(app, 'noop')
    broken = ledger.Recorder(sa.create_engine(f'sqlite:///{tmp_path}/missing/dir/x.db'))
    task = broker.hueys['default'].dequeue()
    broken.on_signal(None, 'default', 'executing', task)
    broken.on_post_execute(task, 42, None)
    with pytest.raises(ledger.Unwritten):
        broken.flush()
    assert broken.pending == 2
    broken.writer.engine = recorder.writer.engine
    broken.flush()
    db.session.expire_all()
    row = db.session.get(Job, job.id)
    assert (row.state, row.result) == ('succeeded', 42)


def test_unserializable_result_is_kept_as_its_repr(ledger_app):
    app, recorder = ledger_app
    job = submit(app, 'noop')
    task = broker.hueys['default'].dequeue()
    recorder.on_signal(None, 'default', 'executing', task)
    recorder.on_post_execute(task, {1, 2}, None)
    flushed(recorder)
    assert db.session.get(Job, job.id).result == {'repr': '{1, 2}'}


def test_many_retries_scheduled_in_one_batch(ledger_app):
    app, recorder = ledger_app
    ids = [submit(app, 'fail', retries=1, retry_delay=30).id for _ in range(3)]
    for _ in ids:
        run_next()
    flushed(recorder)
    for job_id in ids:
        row = db.session.get(Job, job_id)
        assert row.state == 'retrying' and row.scheduled_for is not None


def test_a_bad_change_is_dropped_without_blocking_the_rest(ledger_app):
    app, recorder = ledger_app
    job = submit(app, 'noop')
    task = broker.hueys['default'].dequeue()
    recorder._ops.append(ledger.Progress(job.id, 1, object(), None))  # cannot be stored
    recorder.on_signal(None, 'default', 'executing', task)
    recorder.on_post_execute(task, 'done', None)
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert (row.state, row.result) == ('succeeded', 'done')


def test_queue_throughput_counts_jobs_finished_in_each_window(ledger_app):
    app, _recorder = ledger_app
    now = utcnow()
    db.session.add_all(Job(
        id=str(uuid.uuid4()), task='noop', queue='default', params={}, state='succeeded',
        retries=0, retry_delay=0.0, created_at=now, updated_at=now,
        finished_at=now - dt.timedelta(seconds=ago))
        for ago in (5, 30, 120, 600, 880, 1200))
    db.session.commit()
    [queue] = queues.overview(app.config)
    # 2 in the last minute; 5 in the last 15 (1 per 3 minutes: 0.3 a minute)
    assert (queue['per_minute'], queue['per_minute_15']) == (2, 0.3)


# -- whatever a task produces is stored --------------------------------------------

def test_a_task_raising_unencodable_text_ends_failed_with_its_error(ledger_app):
    # Enqueued around the API, so nothing refused the text at the edge: the
    # job's row, its parameters and its error are all written by the recorder.
    app, recorder = ledger_app
    huey_tasks.fail.task_type.wrappers['qm.default'].schedule(
        kwargs={'params': {'message': 'boom \ud800 \x00'}, 'meta': {'retries': 0}},
        retries=0, delay=0)
    task = run_next()
    flushed(recorder)
    row = db.session.get(Job, task.id)
    assert (row.state, row.error_type) == ('failed', 'RuntimeError')
    assert row.error == 'RuntimeError: boom \\ud800 \\x00'
    assert row.params == {'message': 'boom \\ud800 \\x00'}
    [attempt] = attempts_of(task.id)
    assert (attempt.outcome, attempt.error_message) == ('failed', 'boom \\ud800 \\x00')
    assert attempt.traceback.rstrip().endswith('RuntimeError: boom \\ud800 \\x00')


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError('str fails')

    def __repr__(self):
        raise RuntimeError('repr fails')


class _NoRepr:
    def __repr__(self):
        raise ValueError('repr fails')


def _ran(ledger_app, value=None, exc=None):
    """A noop job whose attempt ended with ``value`` or ``exc``, recorded."""
    app, recorder = ledger_app
    job = submit(app, 'noop')
    task = broker.hueys['default'].dequeue()
    recorder.on_signal(None, 'default', 'executing', task)
    if exc is not None:
        try:
            raise exc
        except Exception as raised:
            recorder.on_post_execute(task, None, raised)
    else:
        recorder.on_post_execute(task, value, None)
    flushed(recorder)
    return db.session.get(Job, job.id), attempts_of(job.id)


def test_an_exception_whose_str_and_repr_raise_is_recorded(ledger_app):
    job, [attempt] = _ran(ledger_app, exc=_Unprintable())
    assert job.state == 'retrying'  # recorded as failed, not dropped
    assert attempt.error_type == 'test_ledger._Unprintable'
    assert attempt.error_message == '<unprintable _Unprintable object>'


def test_a_huge_exception_message_is_bounded_and_keeps_its_frames(ledger_app):
    job, [attempt] = _ran(ledger_app, exc=RuntimeError('é' * 10_000_000))
    assert len(attempt.error_message) <= ledger.MAX_MESSAGE
    assert attempt.error_message.startswith('éé') and 'characters, cut' in attempt.error_message
    assert len(attempt.traceback) <= ledger.MAX_TRACEBACK
    assert attempt.traceback.startswith('Traceback (most recent call last):')
    assert len(job.error) < ledger.MAX_MESSAGE + 100


def test_an_exception_type_with_a_long_unencodable_name_is_stored(ledger_app):
    odd = type('Odd' + 'x' * 500, (Exception,), {'__module__': 'tasks\ud800\x00'})
    _, [attempt] = _ran(ledger_app, exc=odd('boom'))
    assert attempt.error_type.startswith('tasks\\ud800\\x00.Oddxxx')
    assert len(attempt.error_type) <= 200


def test_results_that_are_not_storable_json_are_stored_safely(ledger_app):
    for value, stored in [
            (b'\xff\x00', {'repr': "b'\\xff\\x00'"}),
            ({'text': 'caf\udce9'}, {'text': 'caf\\udce9'}),
            (float('nan'), {'repr': 'nan'}),
            (_NoRepr(), {'repr': '<unprintable _NoRepr object>'}),
            ({'é': '日本語 ☕'}, {'é': '日本語 ☕'})]:
        job, _ = _ran(ledger_app, value=value)
        assert (job.state, job.result) == ('succeeded', stored), value
    job, _ = _ran(ledger_app, value='x' * 10_000_000)
    assert job.result['truncated'] is True and len(job.result['repr']) <= ledger.MAX_RESULT


def test_log_lines_and_progress_messages_are_stored_safely(ledger_app):
    app, recorder = ledger_app
    from app import task_api as context
    job = submit(app, 'noop')
    task = broker.hueys['default'].dequeue()
    recorder.on_signal(None, 'default', 'executing', task)
    with context.running(task, broker.hueys['default']) as running:
        recorder.on_log(running, 'INFO', 'bad \ud800 and \x00')
        recorder.on_log(running, 'A-VERY-LONG-LEVEL', 'x' * 10_000_000)
        context.progress(1, 2, 'half \ud800')
    flushed(recorder)
    lines = queries.logs(db.session.get(Job, job.id))[1]
    assert [(line.level, line.message[:3]) for line in lines] == [
        ('INFO', 'bad'), ('A-VERY-LON', 'xxx')]
    assert lines[0].message == 'bad \\ud800 and \\x00'
    assert len(lines[1].message) <= ledger.MAX_MESSAGE
    assert db.session.get(Job, job.id).progress_message == 'half \\ud800'


def test_an_interrupted_attempt_of_a_task_not_safe_to_run_twice_fails_it(ledger_app):
    app, recorder = ledger_app
    huey = broker.hueys['default']
    job = submit(app, 'payment', {'failure_rate': 0})
    task = huey.dequeue()
    recorder.on_signal(huey, 'default', 'executing', task)
    recorder.on_signal(huey, 'default', 'interrupted', task)
    flushed(recorder)
    row = db.session.get(Job, job.id)
    assert row.state == 'failed' and 'not safe to run twice' in row.error
    assert [(x.number, x.outcome) for x in attempts_of(job.id)] == [(1, 'interrupted')]
    assert (huey.pending_count(), huey.scheduled_count()) == (0, 0)


def test_a_consumer_stops_taking_jobs_while_the_ledger_is_far_behind():
    recorder = ledger.Recorder(writer=None)
    recorder.HOLD_ABOVE, recorder.RESUME_BELOW = 3, 1
    recorder._ops.extend([('log',)] * 3)
    assert not recorder.backlogged()
    recorder._ops.append(('log',))
    assert recorder.backlogged()
    recorder._ops.pop()
    recorder._ops.pop()
    assert recorder.backlogged()  # until it is well below again
    recorder._ops.clear()
    assert not recorder.backlogged()


@pytest.mark.parametrize('make_exc, error_type, message', [
    (_Unprintable, 'test_ledger._Unprintable', '<unprintable _Unprintable object>'),
    (lambda: type('Odd', (Exception,), {'__module__': 'tasks\ud800'})('typed \ud800'),
     'tasks\\ud800.Odd', 'typed \\ud800'),
])
def test_an_exception_huey_cannot_describe_still_ends_the_job(ledger_app, monkeypatch,
                                                               make_exc, error_type, message):
    # Through Huey's own execute: it builds an error record with repr().
    app, recorder = ledger_app

    def raises(message):
        raise make_exc()
    monkeypatch.setattr(huey_tasks.fail.task_type, 'func', raises)
    job = submit(app, 'fail', {'message': 'x'}, retries=0)
    task = run_next()
    flushed(recorder)
    row = db.session.get(Job, job.id)
    [attempt] = attempts_of(task.id)
    assert (row.state, attempt.outcome) == ('failed', 'failed')
    assert (attempt.error_type, attempt.error_message) == (error_type, message)


# -- write turns (app.ledger.turns) --

def test_write_turns_on_one_sqlite_file_are_taken_one_at_a_time(tmp_path):
    import threading

    import sqlalchemy as sa

    from app.ledger.turns import write_turn
    engine = sa.create_engine(f'sqlite:///{tmp_path / "ledger.db"}')
    order, inside = [], threading.Event()
    release = threading.Event()

    def first():
        with write_turn(engine):
            order.append('first in')
            inside.set()
            release.wait(10)
            order.append('first out')

    def second():
        inside.wait(10)
        with write_turn(engine):  # its own open file: waits as another process would
            order.append('second in')

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    inside.wait(10)
    # The second cannot get in while the first holds the turn.
    assert not threads[1].join(0.3) and threads[1].is_alive()
    release.set()
    for t in threads:
        t.join(10)
    assert order == ['first in', 'first out', 'second in']
    assert (tmp_path / 'ledger.db.lock').exists()


@pytest.mark.parametrize('url', ['sqlite://', 'sqlite:///:memory:',
                                 'postgresql+psycopg://postgres@127.0.0.1:5432/test'])
def test_write_turns_are_nothing_where_no_file_is_shared(url, tmp_path, monkeypatch):
    import sqlalchemy as sa

    from app.ledger.turns import write_turn
    monkeypatch.chdir(tmp_path)
    with write_turn(sa.create_engine(url)):
        with write_turn(sa.create_engine(url)):  # would wait for ever on a lock
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('value', [
    dt.datetime(2026, 11, 30, 3, 4, 5, 67), dt.datetime(2026, 1, 2),
    dt.datetime(5, 6, 7, 8, 9, 10, 999999), None,
    dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))])
def test_the_writers_timestamps_are_the_text_sqlalchemy_stores_on_sqlite(value):
    # Pages compare them as text with the ORM's: one format, whatever the value.
    from app.ledger.sql import Dialect
    engine = sa.create_engine('sqlite://')
    orm = sa.DateTime().dialect_impl(engine.dialect).bind_processor(engine.dialect)(value)
    assert Dialect(engine.dialect).ts(value) == orm


@pytest.mark.parametrize('stored', [
    '2026-11-30 03:04:05.000067', '2026-01-02 00:00:00.000000', '0005-06-07 08:09:10.999999',
    '2026-01-02 00:00:00', None])
def test_the_writer_reads_sqlite_times_as_sqlalchemy_does(stored):
    # The writer reads a starting job's times with the driver (Dialect.due_rows).
    from app.ledger.sql import Dialect
    engine = sa.create_engine('sqlite://')
    orm = sa.DateTime().dialect_impl(engine.dialect).result_processor(engine.dialect, None)(stored)
    assert Dialect(engine.dialect).read_ts(stored) == orm


def test_due_rows_reads_the_jobs_that_have_rows(ledger_client):
    from app.ledger.sql import dialect
    app, _client = ledger_client
    with app.app_context():
        times = (dt.datetime(2026, 1, 2, 3, 4, 5, 6), dt.datetime(2026, 1, 1),
                 dt.datetime(5, 6, 7, 8, 9, 10, 999999))
        db.session.add_all([
            Job(id='a' * 32, task='noop', queue='default', params={}, state='retrying', retries=3, retry_delay=1.0,
                attempts=2, scheduled_for=times[0], updated_at=times[1]),
            Job(id='b' * 32, task='noop', queue='default', params={}, state='queued', retries=0, retry_delay=0.0,
                attempts=0, scheduled_for=None, updated_at=times[2])])
        db.session.commit()
        conn = db.session.connection()
        rows = dialect(conn).due_rows(conn, ['a' * 32, 'b' * 32, 'c' * 32])
        assert sorted(rows) == [('a' * 32, 2, times[0], times[1]), ('b' * 32, 0, None, times[2])]

"""Job commands: one guarded update, a cancel the broker did not hear undone, submissions
written together."""
import threading
import time

import pytest

from app import broker, catalog, jobs, states
from app.extensions import db
from app.models import Job


def submit(app, **options):
    return jobs.submit(catalog.validate({'task': 'noop', 'params': {}, **options}, app.config)).orm()


def test_a_change_moves_the_version_on_and_misses_a_row_changed_meanwhile(ctx):
    job = submit(ctx)
    seen = job.version
    assert jobs.change(Job.id == job.id, Job.version == seen, priority=5) == 1
    assert jobs.change(Job.id == job.id, Job.version == seen, priority=9) == 0  # stale guard
    db.session.commit()
    db.session.refresh(job)
    assert (job.priority, job.version) == (5, seen + 1)
    rows = jobs.change(Job.id == job.id, priority=7, returning=(Job.id, Job.priority))
    assert [tuple(r) for r in rows] == [(job.id, 7)]


@pytest.mark.parametrize('bulk', [False, True])
def test_a_cancel_the_broker_does_not_hear_leaves_the_job_waiting(ctx, monkeypatch, bulk):
    waiting = submit(ctx, delay=3600)
    assert waiting.state == states.SCHEDULED
    version = waiting.version

    def down(*args):
        raise broker.BrokerUnavailable('down')
    monkeypatch.setattr(broker, 'withdraw', down)
    monkeypatch.setattr(broker, 'withdraw_many', down)
    with pytest.raises(broker.BrokerUnavailable):
        if bulk:
            jobs.bulk('cancel', ids=[waiting.id])
        else:
            jobs.cancel(waiting.id)
    db.session.expire_all()
    row = db.session.get(Job, waiting.id)
    assert (row.state, row.finished_at) == (states.SCHEDULED, None)
    assert row.version == version + 2  # canceled, then put back: two changes


def test_a_bulk_retry_counts_a_job_deleted_meanwhile_as_missing(ctx, monkeypatch):
    """A bulk delete between the bulk retry's read of the rows and its retry of one of
    them: once a 404 naming a job the caller never gave, the rest not retried."""
    first, second = (submit(ctx, delay=3600) for _ in range(2))
    jobs.bulk('cancel', ids=[first.id, second.id])
    real = jobs.retry

    def deleted_first(job_id):
        if job_id == first.id:
            jobs.bulk('delete', ids=[first.id])
        return real(job_id)
    monkeypatch.setattr(jobs, 'retry', deleted_first)
    summary = jobs.bulk('retry', filters={'state': 'canceled'})
    assert (summary['matched'], summary['done'], summary['skipped']) == (2, 1, {'missing': 1})
    db.session.expire_all()
    assert db.session.get(Job, first.id) is None
    assert db.session.get(Job, second.id).state == states.QUEUED
    assert broker.message_ids('default') == {second.id}


def test_submissions_arriving_together_share_one_transaction(app, monkeypatch):
    """While one submission is being written, those arriving meanwhile wait and go together."""
    writing, release, calls = threading.Event(), threading.Event(), []
    real = jobs._record

    def slow(subs, audits):
        calls.append(len(subs))
        if len(calls) == 1:
            writing.set()
            release.wait(10)
        return real(subs, audits)
    monkeypatch.setattr(jobs, '_record', slow)
    got = {}

    def one(i):
        with app.app_context():
            job = submit(app, idempotency_key=f'k{i}')
            got[i] = (job.id, job.created, job in db.session, job.idempotency_key)

    first = threading.Thread(target=one, args=(0,))
    first.start()
    assert writing.wait(10)
    others = [threading.Thread(target=one, args=(i,)) for i in range(1, 6)]
    for t in others:
        t.start()
    group = app.extensions['queue_manager.submit_group']
    deadline = time.monotonic() + 10
    while len(group._waiting) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert calls == [1, 5]  # the five that waited: one transaction
    assert sorted(k for _id, _c, _s, k in got.values()) == [f'k{i}' for i in range(6)]
    assert all(created and in_session for _id, created, in_session, _k in got.values())
    with app.app_context():
        assert {j.id for j in db.session.query(Job)} == {i for i, *_ in got.values()}
        assert broker.message_ids('default') == {i for i, *_ in got.values()}


def test_a_submission_that_fails_its_group_fails_alone(app, monkeypatch):
    real = jobs._record

    def picky(subs, audits):
        if any(s.idempotency_key == 'bad' for s in subs):
            raise RuntimeError('this one cannot be written')
        return real(subs, audits)
    monkeypatch.setattr(jobs, '_record', picky)
    group = jobs.SubmitGroup()
    ok, bad = (jobs._Waiting(catalog.validate({'task': 'noop', 'idempotency_key': key},
                                              app.config), None) for key in ('ok', 'bad'))
    with app.app_context():
        jobs.SubmitGroup._write([ok, bad])
        assert ok.slot.created and ok.error is None
        assert isinstance(bad.error, RuntimeError) and bad.slot is None
        assert [j.idempotency_key for j in db.session.query(Job)] == ['ok']
    assert group._waiting == []


def test_submit_many_returns_every_slot_in_order_with_duplicate_keys_sharing_a_job(ctx):
    subs = [catalog.validate({'task': 'noop', **extra}, ctx.config) for extra in (
        {'idempotency_key': 'x'}, {}, {'idempotency_key': 'x'}, {'delay': 60})]
    slots = jobs.submit_many(subs)
    assert [created for _job, created in slots] == [True, True, False, True]
    assert slots[0].job is slots[2].job
    assert [j.state for j, _c in slots] == ['queued', 'queued', 'queued', 'scheduled']
    assert db.session.query(Job).count() == 3
    with pytest.raises(ValueError):
        jobs.submit_many(subs * 300)


def test_batches_sharing_keys_in_any_order_never_deadlock(tmp_path, ledger_url):
    """On PostgreSQL two transactions inserting the same unique keys in opposite
    orders would each hold one the other waits for; rows go in key order."""
    from conftest import make_app
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    keys = [f'k{n:03d}' for n in range(120)]
    errors, slots = [], []

    def send(order):
        with app.app_context():
            try:
                subs = [catalog.validate({'task': 'noop', 'idempotency_key': k}, app.config)
                        for k in order]
                slots.append([s.job.idempotency_key for s in jobs.submit_many(subs)])
            except Exception as exc:  # reported below
                errors.append(exc)
            finally:
                db.session.remove()

    for _round in range(3):
        threads = [threading.Thread(target=send, args=(keys if n % 2 else keys[::-1],))
                   for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    assert all(sorted(s) == keys for s in slots) and len(slots) == 12
    with app.app_context():
        assert db.session.query(Job).count() == 120
        db.session.remove()
        db.engine.dispose()


def test_many_batches_at_once_with_overlapping_keys_all_go_in_one_job_a_key(tmp_path,
                                                                             ledger_url):
    """Each batch sharing some keys with every other: a batch whose keys others took
    between its planning and its INSERT plans again, and gets in, however many
    batches go at once (with three tries and planning outside the write turn, four
    batches at once failed one with a 500)."""
    import random
    from conftest import make_app
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    pool = [f'k{n:03d}' for n in range(200)]
    batches = 10
    start, errors, answers = threading.Barrier(batches), [], []

    def send(n):
        rnd = random.Random(n)
        items = [{'task': 'noop', 'idempotency_key': k} for k in rnd.sample(pool, 150)]
        items += [{'task': 'noop'}] * 50
        rnd.shuffle(items)
        with app.app_context():
            try:
                subs = [catalog.validate(item, app.config) for item in items]
                start.wait(30)
                answers.append([(s.job.idempotency_key, s.job.id) for s in jobs.submit_many(subs)])
            except Exception as exc:  # reported below
                errors.append(exc)
            finally:
                db.session.remove()

    threads = [threading.Thread(target=send, args=(n,)) for n in range(batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(answers) == batches
    by_key = {}
    for answer in answers:
        for key, job_id in answer:
            if key is not None:
                assert by_key.setdefault(key, job_id) == job_id, key
    with app.app_context():
        assert db.session.query(Job).count() == len(by_key) + batches * 50
        assert {j.idempotency_key: j.id for j in db.session.query(Job).filter(
            Job.idempotency_key.is_not(None))} == by_key
        db.session.remove()
        db.engine.dispose()


def test_single_submissions_at_once_sharing_keys_each_get_the_one_job(tmp_path, ledger_url):
    """Two at a time sharing a new key: concurrent calls share a transaction (SubmitGroup),
    and the later one of a pair gets the job the earlier one wrote, read in its own
    session, as its own object: once it was the other call's new job as written
    (``Written``, not mapped), which failed it with a 500, and marking that shared object
    not created could turn the other call's 201 into a 200."""
    from conftest import make_app
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    calls = 32
    start, errors, answers = threading.Barrier(calls), [], []

    def send(n):
        with app.app_context():
            try:
                sub = catalog.validate({'task': 'noop', 'idempotency_key': f'pair-{n // 2}'},
                                       app.config)
                start.wait(30)
                job = jobs.submit(sub)
                answers.append((n // 2, job.id, job.created, isinstance(job, Job)))
            except Exception as exc:  # reported below
                errors.append(exc)
            finally:
                db.session.remove()

    for _round in range(3):
        threads = [threading.Thread(target=send, args=(n,)) for n in range(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == [] and len(answers) == calls
        by_pair = {}
        for pair, job_id, created, _orm in answers:
            by_pair.setdefault(pair, []).append((job_id, created))
        for pair, got in by_pair.items():
            assert len({job_id for job_id, _created in got}) == 1, got
            assert sorted(created for _job_id, created in got) == [False, True], got
        # The one not created is the Job read in the caller's own session.
        assert all(orm for _pair, _job_id, created, orm in answers if not created)
        with app.app_context():
            keys = {j.idempotency_key for j in db.session.query(Job)}
            assert keys == {f'pair-{n}' for n in range(calls // 2)}
            db.session.query(Job).delete()
            db.session.commit()
            db.session.remove()
        answers.clear()
    with app.app_context():
        db.engine.dispose()


def test_a_batch_is_inserted_a_hundred_rows_a_statement_on_sqlite_and_every_counter_agrees(
        tmp_path, ledger_url):
    """Inside a transaction SQLite copies every page a statement with triggers changes
    into a statement journal first; one row a statement made that two thirds of a
    submission's insert (see ``Dialect.insert_rows``). 127 jobs go in as 100, 20 and
    5 rows a statement and the last 2 in one executemany; PostgreSQL takes them in
    one executemany. Either way the rows, counters and search index are those of
    the jobs, in order."""
    import sqlalchemy as sa
    from conftest import make_app
    from app.ledger import tallies
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    inserts = []

    def note(conn, cursor, statement, params, context, many):
        if statement.startswith('INSERT INTO job '):
            inserts.append((statement.count('), ('), len(params) if many else 1))

    with app.app_context():
        subs = [catalog.validate({'task': 'sleep' if n % 3 else 'noop',
                                  'params': {'seconds': n} if n % 3 else {},
                                  'queue': 'default', 'delay': 60 if n % 5 == 0 else 0},
                                 app.config) for n in range(127)]
        sa.event.listen(db.engine, 'before_cursor_execute', note)
        try:
            slots = jobs.submit_many(subs)
        finally:
            sa.event.remove(db.engine, 'before_cursor_execute', note)
        if db.engine.dialect.name == 'sqlite':
            # (rows a statement - 1, executions)
            assert inserts == [(99, 1), (19, 1), (4, 1), (0, 2)]
        else:
            assert inserts == [(0, 127)]
        rows = dict(db.session.query(Job.id, Job.params))
        assert [rows[job.id] for job, _created in slots] == [s.params for s in subs]
        assert [job.state for job, _created in slots] == [
            'scheduled' if n % 5 == 0 else 'queued' for n in range(127)]
        conn = db.session.connection()
        if db.engine.dialect.name == 'sqlite':
            tallies.index_pending(conn)
        assert tallies.differences(conn) == {}
        db.session.remove()
        db.engine.dispose()


def test_new_ids_are_distinct_version_4_uuids_written_as_uuid_writes_them():
    import uuid
    ids = jobs.new_ids(20_000)
    assert len(set(ids)) == 20_000
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == job_id
    # Every bit not fixed by the version and variant varies across the ids.
    ors, ands = 0, ~0
    for job_id in ids:
        value = uuid.UUID(job_id).int
        ors, ands = ors | value, ands & value
    assert bin(ors ^ ands).count('1') == 122
    assert jobs.new_ids(0) == []

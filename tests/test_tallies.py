"""The counters, rollups and search index the database keeps beside the job rows.

Whatever changes the rows (the ledger's writer, commands, bulk actions, a
purge, SQL typed by hand, concurrent writers), the kept values equal a
count of the rows, and a search through the index finds what a scan finds.
"""
import datetime as dt
import random
import threading
import uuid

import pytest
import sqlalchemy as sa
from conftest import flushed, make_app, recording_app

from app import broker, catalog, jobs, queries, states, text
from app.extensions import db
from app.ledger import tallies
from app.models import Job, JobCount, JobMinute, utcnow

TASKS = ('noop', 'fail', 'flaky', 'sleep')


@pytest.fixture
def ledger_app(tmp_path, ledger_url):
    with recording_app(tmp_path, DATABASE_URL=ledger_url, QUEUES='default,bulk') as pair:
        yield pair


@pytest.fixture
def ledger_ctx(tmp_path, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url, QUEUES='default,bulk')
    with app.app_context():
        yield app
        db.session.remove()
        db.engine.dispose()


def submit(app, task, params=None, **options):
    sub = catalog.validate({'task': task, 'params': params or {}, **options}, app.config)
    return jobs.submit(sub).orm()


def disagreements():
    """tallies.differences, both sides read at one moment (as `ledger recount --check` does):
    the recorder's writer may commit while the rows are counted."""
    db.session.commit()
    with db.engine.begin() as conn:
        tallies.one_snapshot(conn)
        return tallies.differences(conn)


def counted_stats():
    """queries.stats() as a scan of the rows would say it."""
    by_queue = {}
    for queue, state, n in db.session.execute(
            sa.select(Job.queue, Job.state, sa.func.count()).group_by(Job.queue, Job.state)):
        by_queue.setdefault(queue, dict.fromkeys(states.JOB_STATES, 0))[state] = n
    return by_queue


def scanned_failures(queue=None):
    """queries.failures() as a scan of the rows would say it: {(task, type): (n, latest id)}."""
    rows = db.session.scalars(sa.select(Job).where(
        Job.state == states.FAILED, *([Job.queue == queue] if queue else [])))
    groups = {}
    for job in rows:
        key = (job.task, job.error_type or None)
        n, latest = groups.get(key, (0, None))
        if latest is None or (job.finished_at, job.id) > (latest.finished_at, latest.id):
            latest = job
        groups[key] = (n + 1, latest)
    return {k: (n, latest.id) for k, (n, latest) in groups.items()}


def drain():
    """Run every job the queues hold, retries included (their delay is 0), as workers would."""
    for _ in range(100):
        ran = False
        for name in ('default', 'bulk'):
            huey = broker.hueys[name]
            huey.enqueue_due()
            task = huey.dequeue()
            if task is not None:
                huey.execute(task)
                ran = True
        if not ran:
            return
    raise AssertionError('the queues never emptied')


def job_row(task='noop', queue='default', state='queued', finished_at=None, **fields):
    now = utcnow()
    return Job(id=str(uuid.uuid4()), task=task, queue=queue, params=fields.pop('params', {}),
               state=state, retries=0, retry_delay=0.0, created_at=fields.pop('created_at', now),
               updated_at=now, finished_at=finished_at, **fields)


def test_counters_agree_with_the_rows_through_every_kind_of_change(ledger_app):
    app, recorder = ledger_app
    made = [submit(app, 'noop') for _ in range(4)]
    made += [submit(app, 'fail', {'message': f'boom {n}'}, retries=1, retry_delay=0)
             for n in range(3)]
    made += [submit(app, 'flaky', {'failures': 1}, retries=2, retry_delay=0)]
    made += [submit(app, 'noop', queue='bulk') for _ in range(2)]
    assert disagreements() == {}
    drain()
    flushed(recorder)
    assert disagreements() == {}
    assert {s for s, in db.session.execute(sa.select(Job.state))} >= {'succeeded', 'failed'}

    # Commands and bulk actions.
    failed = db.session.scalars(sa.select(Job.id).where(Job.state == 'failed')).all()
    jobs.retry(failed[0])
    jobs.bulk('delete', ids=[failed[1]])
    waiting = submit(app, 'sleep', {'seconds': 1}, delay=600)
    jobs.cancel(waiting.id)
    jobs.bulk('retry', filters=queries.parse_filters({'state': 'failed'}))
    assert disagreements() == {}
    drain()
    flushed(recorder)

    # A purge, and SQL typed by hand: moves between queues, states and
    # error types, a finish time rewritten, deletes.
    db.session.execute(sa.update(Job).where(Job.state == 'succeeded')
                       .values(finished_at=utcnow() - dt.timedelta(days=40)))
    db.session.commit()
    assert jobs.purge_finished(30) > 0
    db.session.add_all([job_row('fail', state='failed', error_type=None,
                                finished_at=utcnow()) for _ in range(3)])
    db.session.commit()
    db.session.execute(sa.update(Job).where(Job.queue == 'bulk').values(queue='default'))
    db.session.execute(sa.update(Job).where(Job.state == 'failed', Job.error_type.is_(None))
                       .values(error_type='Renamed'))
    db.session.execute(sa.update(Job).where(Job.state == 'canceled').values(state='failed'))
    db.session.execute(sa.delete(Job).where(Job.task == 'flaky'))
    db.session.commit()
    assert disagreements() == {}
    assert queries.stats()['queues'] == counted_stats()
    got = {(g['task'], g['error_type']): (g['count'], g['latest'].id) for g in queries.failures()}
    assert got == scanned_failures()
    # No key is kept that no job has (on PostgreSQL, once the sessions'
    # rows, which may go below 0 and back, are folded).
    db.session.commit()
    db.engine.dispose()
    with db.engine.begin() as conn:
        tallies.compact(conn)
    assert disagreements() == {}
    assert db.session.scalar(sa.select(sa.func.count()).select_from(JobCount)
                             .where(JobCount.n == 0)) == 0


def test_failure_groups_by_queue_name_the_latest_failure_of_each(ledger_ctx):
    now = utcnow()
    rows = [job_row('fail', queue=random.choice(('default', 'bulk')), state='failed',
                    error_type=random.choice(('ValueError', 'KeyError', None)),
                    finished_at=now - dt.timedelta(seconds=random.randrange(5000)))
            for _ in range(60)]
    rows += [job_row('noop', state='succeeded', finished_at=now)]
    db.session.add_all(rows)
    db.session.commit()
    for queue in (None, 'default', 'bulk'):
        got = {(g['task'], g['error_type']): (g['count'], g['latest'].id)
               for g in queries.failures(queue)}
        assert got == scanned_failures(queue)


def test_throughput_windows_count_exactly_across_minute_edges(ledger_ctx):
    now = utcnow()
    finishes = [now - dt.timedelta(seconds=random.uniform(0, 3 * 3600)) for _ in range(400)]
    # Some exactly on minute edges and on the window's edges.
    finishes += [now.replace(second=0, microsecond=0) - dt.timedelta(minutes=m)
                 for m in range(0, 20)]
    finishes += [now - dt.timedelta(seconds=60), now - dt.timedelta(seconds=900)]
    db.session.add_all(job_row(random.choice(TASKS), queue=random.choice(('default', 'bulk')),
                               state=random.choice(('succeeded', 'failed')), finished_at=at)
                       for at in finishes)
    db.session.commit()
    rows = db.session.execute(sa.select(Job.queue, Job.task, Job.state, Job.finished_at)).all()
    for since, until in [(now - dt.timedelta(seconds=60), now),
                         (now - dt.timedelta(seconds=900), now),
                         (now - dt.timedelta(hours=2, seconds=7), now - dt.timedelta(seconds=13)),
                         (now.replace(second=0, microsecond=0) - dt.timedelta(minutes=30),
                          now.replace(second=0, microsecond=0))]:
        for by in (('queue',), ('task', 'state')):
            expected = {}
            for row in rows:
                if since <= row.finished_at < until:
                    key = tuple(getattr(row, c) for c in by)
                    expected[key] = expected.get(key, 0) + 1
            assert queries.finished(since, until, by) == expected
    per_queue = queries.finished_per_queue(now)
    for queue in ('default', 'bulk'):
        assert per_queue.get(queue, {}).get(900, 0) == sum(
            1 for r in rows if r.queue == queue and now - dt.timedelta(seconds=900)
            <= r.finished_at <= now)


def test_recount_rebuilds_what_was_changed_around_the_triggers(ledger_ctx):
    now = utcnow()
    db.session.add_all([job_row(state='succeeded', finished_at=now) for _ in range(5)]
                       + [job_row('fail', state='failed', error_type='E', finished_at=now)])
    db.session.commit()
    runner = ledger_ctx.test_cli_runner()
    assert 'agree' in runner.invoke(args=['ledger', 'recount', '--check']).output
    # As a restore or an edit with the triggers off would leave them.
    db.session.execute(sa.update(JobCount).values(n=JobCount.n + 5))
    db.session.execute(sa.delete(JobMinute))
    db.session.commit()
    assert set(disagreements()) == {'job_count', 'job_minute'}
    checked = runner.invoke(args=['ledger', 'recount', '--check'])
    assert checked.exit_code == 1
    assert "job_count default noop succeeded '': kept 10, rows 5" in checked.output
    rebuilt = runner.invoke(args=['ledger', 'recount'])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert 'rebuilt: 2 counter rows, 2 per-minute rows (4 differed before)' in rebuilt.output
    assert disagreements() == {}
    assert queries.stats()['states']['succeeded'] == 5
    assert runner.invoke(args=['ledger', 'recount', '--check']).exit_code == 0
    if db.engine.dialect.name == 'sqlite':
        # The search index drifts (a VACUUM renumbering rows, an edit by hand).
        with db.engine.begin() as conn:
            tallies.index_pending(conn)
            conn.exec_driver_sql('DELETE FROM job_search WHERE rowid IN '
                                 '(SELECT rowid FROM job_search LIMIT 2)')
            conn.exec_driver_sql('''UPDATE job SET params = '{"changed": 1}' WHERE error_type = 'E' ''')
            conn.exec_driver_sql('DELETE FROM job_search_pending')
        checked = runner.invoke(args=['ledger', 'recount', '--check'])
        assert checked.exit_code == 1
        assert 'search index: 2 rows missing' in checked.output
        assert 'search index: 1 rows out of date' in checked.output
        assert runner.invoke(args=['ledger', 'recount']).exit_code == 0
        assert runner.invoke(args=['ledger', 'recount', '--check']).exit_code == 0


def test_the_check_reads_rows_and_counters_as_of_one_moment_while_writers_go_on(ledger_ctx):
    # A job committed between the count of the rows and the read of the
    # counters (a consumer's writer, a submission) is no difference.
    db.session.add_all([job_row(state='succeeded', finished_at=utcnow()) for _ in range(3)])
    db.session.commit()
    other = sa.create_engine(db.engine.url)
    kept_reads = []

    def write_meanwhile(conn, cursor, statement, *args):
        if statement == tallies._KEPT['job_count'] and not kept_reads:
            kept_reads.append(statement)
            with sa.orm.Session(other) as writer:  # another process's commit, just now
                writer.add(job_row(state='succeeded', finished_at=utcnow()))
                writer.commit()
    sa.event.listen(db.engine, 'before_cursor_execute', write_meanwhile)
    try:
        checked = ledger_ctx.test_cli_runner().invoke(args=['ledger', 'recount', '--check'])
    finally:
        sa.event.remove(db.engine, 'before_cursor_execute', write_meanwhile)
        other.dispose()
    assert kept_reads and checked.exit_code == 0, checked.output
    assert disagreements() == {}
    assert db.session.query(Job).count() == 4


def test_a_replace_and_a_truncate_keep_the_counters_right(ledger_ctx):
    now = utcnow()
    rows = [job_row(state='canceled', finished_at=now) for _ in range(3)]
    db.session.add_all(rows)
    db.session.commit()
    if db.engine.dialect.name == 'sqlite':
        # REPLACE deletes the row it replaces: its delete triggers fire too.
        db.session.execute(sa.text(
            "INSERT OR REPLACE INTO job SELECT * FROM job WHERE id = :id"), {'id': rows[0].id})
        db.session.execute(sa.text(
            "REPLACE INTO job (id, task, queue, params, state, priority, attempts, attempt_base, "
            "retries, retry_delay, created_at, updated_at, version, error_type) "
            "SELECT id, task, queue, params, 'failed', 0, 1, 0, 0, 0, created_at, updated_at, 2, "
            "'Handmade' FROM job WHERE id = :id"), {'id': rows[1].id})
        db.session.commit()
        assert disagreements() == {}
        assert queries.stats()['states']['failed'] == 1
    else:
        db.session.execute(sa.text('TRUNCATE job CASCADE'))
        db.session.commit()
        assert disagreements() == {}
        assert queries.stats()['total'] == 0


def test_concurrent_writers_keep_exact_counts_and_compaction_folds_their_rows(ledger_ctx):
    """Writers in parallel transactions, each touching many counter rows in its own order."""
    engine = db.engine
    ids = [str(uuid.uuid4()) for _ in range(240)]
    now = utcnow()
    errors = []

    def writer(my_ids, seed):
        rnd = random.Random(seed)
        try:
            with engine.connect() as conn:
                for chunk in range(0, len(my_ids), 10):
                    with conn.begin():
                        for job_id in my_ids[chunk:chunk + 10]:
                            conn.execute(sa.insert(Job).values(
                                id=job_id, task=rnd.choice(TASKS), queue='default', params={},
                                state='queued', retries=0, retry_delay=0.0, created_at=now,
                                updated_at=now))
                    with conn.begin():
                        for job_id in rnd.sample(my_ids[:chunk + 10], 10):
                            state = rnd.choice(('running', 'succeeded', 'failed', 'queued'))
                            conn.execute(sa.update(Job).where(Job.id == job_id).values(
                                state=state, error_type=rnd.choice(('A', 'B')),
                                finished_at=utcnow() if state in ('succeeded', 'failed')
                                else None))
                    if chunk % 30 == 0:
                        with conn.begin():
                            conn.execute(sa.delete(Job).where(
                                Job.id == rnd.choice(my_ids[:chunk + 10])))
        except Exception as exc:  # reported below, with the thread's name
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(ids[n::4], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert disagreements() == {}
    before = db.session.scalar(sa.select(sa.func.count(sa.distinct(JobCount.shard))))
    engine.dispose()  # the writers' sessions end
    with engine.begin() as conn:
        folded = tallies.compact(conn)
    shards = set(db.session.scalars(sa.select(JobCount.shard).distinct()))
    if engine.dialect.name == 'postgresql':
        assert before > 1 and folded > 0
        # Only this test's own session may still have rows of its own.
        assert len(shards - {0}) <= 1
    else:
        assert (before, folded, shards) == (1, 0, {0})
    assert disagreements() == {}


# -- search ------------------------------------------------------------------------

TEXTS = ['Hello World', 'hello there', 'HELLO', 'café crème', 'CAFÉ', '东京タワー', 'emoji 🎉 party',
         'say "hi" now', 'back\\slash', '100% sure', 'under_score', 'ab', 'RuntimeError: disk full',
         'KeyError: \'missing\'', 'nested {"k": [1, 2]}']
QUERIES = ['hello', 'HELLO', 'Hello', 'world', 'caf', 'café', 'CAFÉ', 'crème', '东京', 'タワー',
           '🎉', '"hi"', 'say "hi', 'back\\slash', '100%', '%', 'under_score', '_', 'ab', 'a',
           'disk full', 'error', "'missing'", '"k": [1', 'nothing like this at all', 'xyz',
           '1, 2]', 'ell']


def fill_search_ledger():
    rnd = random.Random(7)
    rows = []
    for n in range(300):
        text_ = rnd.choice(TEXTS)
        where = rnd.choice(('params', 'error', 'result'))
        rows.append(job_row(
            rnd.choice(TASKS), state='failed' if where == 'error' else 'succeeded',
            params={'message': text_, 'n': n} if where == 'params' else {'n': n},
            error=text_ if where == 'error' else None,
            result={'out': text_} if where == 'result' else None,
            created_at=utcnow() - dt.timedelta(seconds=n)))
    db.session.add_all(rows)
    db.session.commit()
    return rows


def search_ids(q, **filters):
    found, cursor = [], None
    while True:
        page, cursor = queries.list_jobs(q=q, limit=50, cursor=cursor, **filters)
        found += [j.id for j in page]
        if cursor is None:
            return found


def index_everything():
    """What the ledger's writer does about once a second: index the jobs written since."""
    with db.engine.begin() as conn:
        while tallies.index_pending(conn, limit=100):
            pass
    if db.engine.dialect.name == 'sqlite':
        assert db.session.execute(sa.text('SELECT count(*) FROM job_search_pending')).scalar() == 0


def test_an_indexed_search_finds_exactly_what_a_scan_finds(ledger_ctx, monkeypatch):
    rows = fill_search_ledger()
    queries_ = QUERIES + [rows[5].id[:8], rows[9].id.upper()[:6], rows[11].id]
    written = {q: search_ids(q) for q in queries_}  # SQLite: not indexed yet, only noted
    index_everything()
    indexed = {q: search_ids(q) for q in queries_}
    monkeypatch.setattr(queries, 'CANDIDATES', 15)  # many queries now find too many candidates
    dense = {q: search_ids(q) for q in queries_}
    monkeypatch.setattr(queries, '_indexed', lambda typed, in_json, dialect: None)
    scanned = {q: search_ids(q) for q in queries_}
    assert indexed == scanned
    assert written == scanned
    assert dense == scanned
    assert scanned['hello'] and scanned['caf'] and scanned['🎉'] and scanned['_']
    assert scanned['nothing like this at all'] == []
    assert scanned[rows[5].id[:8]][0] == rows[5].id


def test_the_search_index_is_used_and_follows_changes_to_the_rows(ledger_ctx):
    fill_search_ledger()
    index_everything()
    dialect = db.engine.dialect.name
    typed, in_json = queries._search_variants('disk full')
    assert queries._indexed(typed, in_json, dialect) is not None  # three characters or more
    assert queries._indexed(*queries._search_variants('ab'), dialect) is None  # too short
    job = db.session.scalars(sa.select(Job).where(Job.error == 'RuntimeError: disk full')).first()
    others = len(search_ids('disk full'))
    job.error = 'OSError: network unreachable'
    db.session.commit()
    for _ in range(2):  # noted, then indexed
        assert len(search_ids('disk full')) == others - 1
        assert job.id in search_ids('network unreachable')
        index_everything()
    db.session.delete(job)
    db.session.commit()
    assert search_ids('network unreachable') == []
    index_everything()
    assert search_ids('network unreachable') == []
    # A row the index no longer holds is the deleted one: its rowid may be taken again.
    db.session.add(job_row(error='RuntimeError: network unreachable again'))
    db.session.commit()
    index_everything()
    assert len(search_ids('network unreachable')) == 1
    if db.engine.dialect.name == 'sqlite':
        plan = ' '.join(str(r) for r in db.session.execute(sa.text(
            'EXPLAIN QUERY PLAN SELECT rowid FROM job_search WHERE job_search MATCH :q'),
            {'q': '"disk"'}))
        assert 'VIRTUAL TABLE INDEX' in plan
    else:
        db.session.execute(sa.text('SET LOCAL enable_seqscan = off'))
        plan = ' '.join(r[0] for r in db.session.execute(sa.text(
            "EXPLAIN SELECT id FROM job WHERE job_search_text(params, error, result) "
            "ILIKE '%disk full%'")))
        db.session.rollback()
        assert 'ix_job_search' in plan


def test_a_search_the_index_cannot_narrow_looks_at_one_window_per_page(ledger_ctx, monkeypatch):
    rows = fill_search_ledger()  # newest first: rows[0] is the newest
    monkeypatch.setattr(queries, 'SCAN_WINDOW', 40)
    # 'ab' (too short for trigrams) is in about one row in fifteen.
    expected = [r.id for r in rows if r.id.startswith('ab')
                or 'ab' in (r.error or '') + str(r.params) + str(r.result)]
    pages, cursor = [], None
    while True:
        page, cursor = queries.list_jobs(q='ab', limit=50, cursor=cursor)
        pages.append(page)
        if cursor is None:
            break
    assert [j.id for page in pages for j in page] == expected
    # 300 rows, 40 a window: 8 pages, each holding only its window's matches.
    assert len(pages) == 8
    assert all(len(page) < 40 for page in pages)
    # A window ending on the list's last job is the last page: no cursor to an
    # empty one (300 rows, 60 or 100 a window: 5 or 3 pages, in either order).
    for window, count in ((60, 5), (100, 3)):
        monkeypatch.setattr(queries, 'SCAN_WINDOW', window)
        for sort in ('newest', 'oldest'):
            pages, cursor = [], None
            while True:
                page, cursor = queries.list_jobs(q='ab', limit=50, cursor=cursor, sort=sort)
                pages.append([j.id for j in page])
                if cursor is None:
                    break
            assert len(pages) == count and pages[-1]
            assert [i for page in pages for i in page] == (
                expected if sort == 'newest' else expected[::-1])
    # The index narrows a longer search: one page, as many as match.
    monkeypatch.setattr(queries, 'SCAN_WINDOW', 1)
    assert len(queries.list_jobs(q='hello', limit=500)[0]) == len(search_ids('hello')) > 40


def windowed_pages(rows, matches, limit, window, oldest=False):
    """The pages a search read a window at a time must give: ``[[id, ...], ...]``.

    ``rows`` newest first; each page looks at the next ``window`` rows from
    its cursor and holds the first ``limit`` matches among them, its cursor
    going on from its last job when it is full, else from the window's last
    row (None when the window reached the end of the list).
    """
    order = list(reversed(rows)) if oldest else list(rows)
    pages, start = [], 0
    while True:
        seen = order[start:start + window]
        found = [i for i, r in enumerate(seen) if matches(r)]
        if len(found) > limit:
            pages.append([seen[i].id for i in found[:limit]])
            start += found[limit - 1] + 1
            continue
        pages.append([seen[i].id for i in found])
        if start + window >= len(order):
            return pages
        start += window


def search_pages(q, limit, sort='newest', **filters):
    pages, cursor = [], None
    while True:
        page, cursor = queries.list_jobs(q=q, limit=limit, cursor=cursor, sort=sort, **filters)
        pages.append([j.id for j in page])
        if cursor is None:
            return pages


def contains(row, needle):
    """What search_condition means for a row of fill_search_ledger (ASCII folded only)."""
    fold = str.maketrans('ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
    texts = [text.dumps(row.params), row.error or '', text.dumps(row.result) if row.result else '']
    return row.id.startswith(needle) or any(needle.translate(fold) in t.translate(fold)
                                            for t in texts)


@pytest.mark.parametrize('sort', ['newest', 'oldest'])
def test_a_search_with_many_candidates_reads_them_a_window_at_a_time(ledger_ctx, monkeypatch,
                                                                      sort):
    rows = fill_search_ledger()  # newest first
    index_everything()
    # 'hello' is in about a fifth of the rows: more candidates than the cap,
    # so each page reads those of its window only; the same pages on SQLite
    # and PostgreSQL, as a model of the windows says.
    monkeypatch.setattr(queries, 'CANDIDATES', 30)
    monkeypatch.setattr(queries, 'SEARCH_WINDOW', 40)
    assert not queries.search_plan('hello').whole
    expected = windowed_pages(rows, lambda r: contains(r, 'hello'), 5, 40, sort == 'oldest')
    assert search_pages('hello', 5, sort) == expected
    # Across pages, exactly what a scan finds, newest (or oldest) first.
    scanned = [r.id for r in (rows if sort == 'newest' else reversed(rows))
               if contains(r, 'hello')]
    assert [i for page in expected for i in page] == scanned and len(scanned) > 30
    # Some pages are full and go on from their last job, some end at their
    # window's edge with fewer (the pager says how far back they looked).
    assert {len(page) for page in expected} > {5}
    # A filter walks its own index: the windows are of the failed jobs.
    failed = [r for r in rows if r.state == 'failed']
    assert search_pages('hello', 5, sort, state='failed') == windowed_pages(
        failed, lambda r: contains(r, 'hello'), 5, 40, sort == 'oldest')
    # Windows with more candidates than their cap test their rows one by one: the same pages.
    monkeypatch.setattr(queries, 'SEARCH_WINDOW', 200)
    monkeypatch.setattr(queries, 'WINDOW_CANDIDATES', 20)
    if db.engine.dialect.name == 'sqlite':
        assert queries._window(queries.search_plan('hello').index, [],
                               (Job.created_at.desc(), Job.id.desc()), 200)[1] is None
    assert search_pages('hello', 5, sort) == windowed_pages(
        rows, lambda r: contains(r, 'hello'), 5, 200, sort == 'oldest')


def windows_read(monkeypatch):
    """A list that fills with ``(window size, dense, matches found + 1 at most, whether the
    window reached the list's end)`` for each window list_jobs reads from now on."""
    tries = []
    real = queries._window_page

    def noted(plan, conditions, walk, order, key, newest, size, limit, unfiltered,
              dense=False):
        ids, edge = real(plan, conditions, walk, order, key, newest, size, limit, unfiltered,
                         dense=dense)
        tries.append((size, dense, len(ids), edge is None))
        return ids, edge
    monkeypatch.setattr(queries, '_window_page', noted)
    return tries


def search_ledger_with_windows(monkeypatch, window):
    """The search ledger, indexed, searched with windows of ``window`` jobs (their first 25
    tried alone, 30 candidates at most named at once): ``(rows, windows_read list)``."""
    rows = fill_search_ledger()
    index_everything()
    monkeypatch.setattr(queries, 'CANDIDATES', 30)
    monkeypatch.setattr(queries, 'SEARCH_WINDOW', window)
    monkeypatch.setattr(queries, 'DENSE_WINDOW', 25)
    return rows, windows_read(monkeypatch)


@pytest.mark.parametrize('sort', ['newest', 'oldest'])
def test_a_common_text_is_first_looked_for_among_the_first_jobs_of_a_window(
        ledger_ctx, monkeypatch, sort):
    rows, windows = search_ledger_with_windows(monkeypatch, 60)
    # The pages are those of the windows of SEARCH_WINDOW jobs, whichever answered them.
    assert search_pages('hello', 5, sort) == windowed_pages(
        rows, lambda r: contains(r, 'hello'), 5, 60, sort == 'oldest')
    assert search_pages('hello', 5, sort, state='failed') == windowed_pages(
        [r for r in rows if r.state == 'failed'], lambda r: contains(r, 'hello'), 5, 60,
        sort == 'oldest')
    # Some pages came from the first 25 jobs alone; the others read the whole window.
    tries = [(dense, found, end) for _size, dense, found, end in windows]
    dense = [t for t in tries if t[0]]
    assert any(n > 5 for _d, n, _end in dense)
    assert any(n <= 5 and not end for _d, n, end in dense)
    assert len(tries) - len(dense) == sum(1 for _d, n, end in dense if n <= 5 and not end)


@pytest.mark.parametrize('sort', ['newest', 'oldest'])
def test_a_text_too_rare_for_the_first_jobs_is_looked_for_in_a_window_its_share_fills(
        ledger_ctx, monkeypatch, sort):
    rows, tries = search_ledger_with_windows(monkeypatch, 200)
    # The pages are those of the windows of SEARCH_WINDOW jobs, whichever answered them.
    assert search_pages('hello', 5, sort) == windowed_pages(
        rows, lambda r: contains(r, 'hello'), 5, 200, sort == 'oldest')
    # After the first 25 jobs held m < 6 matches, a window of 25 * 6 * 2 // m
    # jobs (when under 200) and, only if that held no page either, all 200.
    tries = [(size, found, end) for size, _dense, found, end in tries]
    grown = 0
    for i, (size, found, end) in enumerate(tries):
        if size != 25 or found > 5 or end:
            continue
        following = tries[i + 1]
        if found and 25 * 6 * 2 // found < 200:
            assert following[0] == 25 * 6 * 2 // found
            grown += 1
            if following[1] <= 5 and not following[2]:
                assert tries[i + 2][0] == 200
        else:
            assert following[0] == 200
    assert grown > 0 and {size for size, _n, _e in tries} - {25, 200}


def test_a_request_plans_a_search_once_for_its_list_and_its_count(ledger_ctx, monkeypatch):
    fill_search_ledger()
    index_everything()
    monkeypatch.setattr(queries, 'CANDIDATES', 30)
    made = []
    real = queries._search_plan
    monkeypatch.setattr(queries, '_search_plan', lambda q: made.append(q) or real(q))
    with ledger_ctx.test_request_context('/jobs?q=hello'):
        page, _next = queries.list_jobs(q='hello', limit=5)
        assert queries.count_jobs({'q': ' hello '}) == queries.Count(None, False)
        queries.list_jobs(q='world', limit=5)
    assert len(page) == 5 and made == ['hello', 'world']
    # Outside a request (the CLI, a leader's pass) each call reads the index afresh.
    queries.list_jobs(q='hello', limit=5)
    queries.count_jobs({'q': 'hello'})
    assert made == ['hello', 'world', 'hello', 'hello']


def finished_with_run_times(rows):
    """Every job of ``rows`` finished, with run times (ties among them); by run time, longest
    first."""
    rnd = random.Random(3)
    for r in rows:
        r.finished_at = r.created_at
        r.run_seconds = rnd.choice([0.5, 1.25, 7.5, rnd.randint(1, 10 ** 6) / 1000])
    db.session.commit()
    return sorted(rows, key=lambda r: (r.run_seconds, r.id), reverse=True)


def test_a_search_in_the_run_time_order_looks_at_one_window_per_page(ledger_ctx, monkeypatch):
    rows = fill_search_ledger()
    index_everything()
    finished_with_run_times(rows)
    monkeypatch.setattr(queries, 'CANDIDATES', 30)
    monkeypatch.setattr(queries, 'RUN_CANDIDATES', 30)  # SQLite: none read from the whole ledger
    monkeypatch.setattr(queries, 'SCAN_WINDOW', 40)
    monkeypatch.setattr(queries, 'DENSE_WINDOW', 15)
    by_run = sorted(rows, key=lambda r: (r.run_seconds, r.id), reverse=True)
    # 'hello' has more candidates than the index names at once, 'ab' is too
    # short for it: each page holds the matches among the next 40 jobs of the
    # run-time order (the first 15 tried alone first), on SQLite and PostgreSQL.
    for q, state in (('hello', None), ('ab', None), ('hello', 'failed')):
        assert not queries.search_plan(q).whole
        listed = [r for r in by_run if state in (None, r.state)]
        expected = windowed_pages(listed, lambda r: contains(r, q), 5, 40)
        assert search_pages(q, 5, 'runtime', state=state) == expected, q
        assert sorted(i for page in expected for i in page) == sorted(
            r.id for r in listed if contains(r, q))
        if q == 'ab':  # one job in fifteen: windows that hold no page, whose cursor goes on
            assert any(len(page) < 5 for page in expected[:-1])


def test_a_window_counts_the_jobs_of_one_indexed_filter_and_tests_the_others(ledger_ctx,
                                                                              monkeypatch):
    # A window is the next jobs of the order with at most one filter (the
    # first of state, queue and task), found by a walk of that filter's index;
    # a finish-time range or a second filter is tested on the window's jobs.
    rows = fill_search_ledger()  # newest first
    index_everything()
    by_run = finished_with_run_times(rows)
    for name, value in (('CANDIDATES', 30), ('RUN_CANDIDATES', 30), ('SEARCH_WINDOW', 40),
                        ('SCAN_WINDOW', 40), ('DENSE_WINDOW', 15)):
        monkeypatch.setattr(queries, name, value)
    times = sorted(r.finished_at for r in rows)
    lo, hi = times[60], times[240]
    tasks = sorted({r.task for r in rows})
    for sort, listed in (('newest', rows), ('oldest', rows[::-1]), ('runtime', by_run)):
        for within, walked, kept in (
                ({'finished_from': lo.isoformat(), 'finished_to': hi.isoformat()},
                 lambda r: True, lambda r: lo <= r.finished_at < hi),
                ({'state': 'failed', 'task': tasks[0]},
                 lambda r: r.state == 'failed', lambda r: r.task == tasks[0])):
            walk = [r for r in listed if walked(r)]
            expected = windowed_pages(walk, lambda r: kept(r) and contains(r, 'hello'), 5, 40)
            assert search_pages('hello', 5, sort, **within) == expected, (sort, within)
            assert sorted(sum(expected, [])) == sorted(
                r.id for r in listed if walked(r) and kept(r) and contains(r, 'hello'))
    # Finding a window tests no other filter: on SQLite, a walk of an index alone.
    seen = []

    def note(conn, cursor, statement, params, context, many):
        seen.append(statement)
    sa.event.listen(db.engine, 'before_cursor_execute', note)
    try:
        queries.list_jobs(q='hello', limit=5, finished_from=lo.isoformat())
        queries.list_jobs(q='hello', limit=5, sort='runtime', state='failed', task=tasks[0],
                          finished_to=hi.isoformat())
    finally:
        sa.event.remove(db.engine, 'before_cursor_execute', note)
    # A window's edge (and, on SQLite, its range of rowids): the statements
    # that do not test the search.
    edges = [s for s in seen if ('OFFSET' in s or 'min(' in s)
             and not any(test in s for test in ('instr', 'strpos', 'ILIKE', 'ilike'))]
    assert len(edges) >= 2, seen
    for statement in edges:
        assert 'finished_at >' not in statement and 'finished_at <' not in statement \
            and 'job.task' not in statement, statement


def test_a_run_time_search_on_sqlite_reads_every_candidate_when_they_are_few_enough(
        ledger_ctx, monkeypatch):
    # On SQLite the run-time order's windows cannot be narrowed by the index:
    # up to RUN_CANDIDATES candidates are read from the whole ledger instead,
    # and every page but the last is full. PostgreSQL keeps the windows.
    rows = fill_search_ledger()
    index_everything()
    by_run = finished_with_run_times(rows)
    monkeypatch.setattr(queries, 'CANDIDATES', 30)
    monkeypatch.setattr(queries, 'SCAN_WINDOW', 11)
    monkeypatch.setattr(queries, 'DENSE_WINDOW', 6)
    matching = [r.id for r in by_run if contains(r, 'hello')]
    windowed = windowed_pages(by_run, lambda r: contains(r, 'hello'), 5, 11)
    assert len(matching) > 30 and any(len(page) < 5 for page in windowed[:-1])
    whole = [matching[i:i + 5] for i in range(0, len(matching), 5)]
    sqlite = db.engine.dialect.name == 'sqlite'
    assert search_pages('hello', 5, 'runtime') == (whole if sqlite else windowed)
    failed = [r.id for r in by_run if r.state == 'failed' and contains(r, 'hello')]
    assert sum(search_pages('hello', 5, 'runtime', state='failed'), []) == failed
    # One candidate too many (each match is one index row here): windows again.
    monkeypatch.setattr(queries, 'RUN_CANDIDATES', len(matching) - 1)
    assert search_pages('hello', 5, 'runtime') == windowed
    # A job written since the index was brought up to date is a candidate too.
    if sqlite:
        monkeypatch.setattr(queries, 'RUN_CANDIDATES', len(matching) + 10)
        newest = job_row(state='succeeded', params={'message': 'hello again'},
                         finished_at=utcnow(), run_seconds=10 ** 4)
        db.session.add(newest)
        db.session.commit()
        assert search_pages('hello', 5, 'runtime')[0][0] == newest.id


def test_a_window_is_narrowed_to_the_candidates_the_index_holds_in_it(ledger_ctx, monkeypatch):
    rows = fill_search_ledger()
    index_everything()
    monkeypatch.setattr(queries, 'CANDIDATES', 30)
    monkeypatch.setattr(queries, 'WINDOW_CANDIDATES', 30)
    monkeypatch.setattr(queries, 'SEARCH_WINDOW', 40)
    plan = queries.search_plan('hello')
    order = (Job.created_at.desc(), Job.id.desc())
    edge, narrow = queries._window(plan.index, [], order, 40)
    assert (edge[0], edge[1]) == (rows[39].created_at, rows[39].id)
    assert narrow is not None  # about 8 candidates in 40 rows: under the cap
    in_window = db.session.scalars(sa.select(Job.id).where(
        narrow, sa.tuple_(Job.created_at, Job.id) >= sa.tuple_(*edge))).all()
    expected = {r.id for r in rows[:40] if contains(r, 'hello')}
    # The candidates hold every match of the window (and, on PostgreSQL, the
    # exact condition still decides what case the index folded).
    assert expected <= set(in_window) and len(in_window) < 40
    # A job written since the index was brought up to date is a candidate too.
    if db.engine.dialect.name == 'sqlite':
        newest = job_row(params={'message': 'hello again'}, created_at=utcnow())
        db.session.add(newest)
        db.session.commit()
        assert search_pages('hello', 500)[0][0] == newest.id


def test_a_search_with_many_candidates_is_listed_but_not_counted(ledger_ctx, monkeypatch):
    rows = fill_search_ledger()
    index_everything()
    search = {'state': None, 'queue': None, 'task': None, 'q': 'hello'}
    n = sum(1 for r in rows if contains(r, 'hello'))
    assert queries.count_jobs(search) == (n, True)
    monkeypatch.setattr(queries, 'CANDIDATES', n - 1)  # the index holds one too many
    assert queries.count_jobs(search) == (None, False)
    assert queries.count_jobs({**search, 'q': 'xyz'}) == (0, True)  # none: counted


def test_the_cap_on_candidates_tells_a_whole_ledger_search_from_a_windowed_one(ledger_ctx,
                                                                                 monkeypatch):
    # On PostgreSQL too: no more than CANDIDATES + 1 rows the index matches are read.
    fill_search_ledger()
    index_everything()
    n = len(search_ids('hello'))  # each in one column: as many index rows as jobs
    monkeypatch.setattr(queries, 'CANDIDATES', n)
    assert queries.search_plan('hello').whole
    monkeypatch.setattr(queries, 'CANDIDATES', n - 1)
    assert not queries.search_plan('hello').whole
    assert len(search_ids('hello')) == n


def test_the_ledger_writer_brings_the_search_index_up_to_date(ledger_app):
    app, recorder = ledger_app
    job = submit(app, 'fail', {'message': 'kaboom at the far end'}, retries=0)
    drain()
    flushed(recorder)
    recorder.writer.index(force=True)  # as it does about once a second
    if db.engine.dialect.name == 'sqlite':
        assert db.session.execute(sa.text('SELECT count(*) FROM job_search_pending')).scalar() == 0
        assert db.session.execute(sa.text(
            "SELECT count(*) FROM job_search WHERE job_search MATCH '\"far end\"'")).scalar() == 2
    assert search_ids('kaboom at the far') == [job.id]  # in its parameters and its error


def test_a_term_in_two_columns_of_many_jobs_is_found_in_every_one(ledger_ctx, monkeypatch):
    # Each job is two index rows (parameters and error): the candidate limit
    # counts rows read, not jobs, so a cut-off read is never taken as whole.
    db.session.add_all(job_row('fail', state='failed', params={'message': 'zqxjk boom'},
                               error='RuntimeError: zqxjk boom') for _ in range(8))
    db.session.commit()
    index_everything()
    monkeypatch.setattr(queries, 'CANDIDATES', 10)
    assert len(search_ids('zqxjk')) == 8
    assert len(search_ids('ZQXJK boom')) == 8
    # A search longer than 200 characters means all of it.
    db.session.add(job_row(params={'message': 'x' * 300}))
    db.session.commit()
    assert len(search_ids('x' * 300)) == 1 and search_ids('x' * 301) == []


@pytest.mark.parametrize('search', [None, 'hello'])
@pytest.mark.parametrize('sort', ['newest', 'oldest', 'runtime'])
def test_a_job_deleted_while_its_page_is_read_neither_ends_nor_skips_the_list(
        ledger_ctx, monkeypatch, sort, search):
    rows = fill_search_ledger()
    index_everything()
    if search:  # a search read a window at a time, its first jobs tried alone first
        monkeypatch.setattr(queries, 'CANDIDATES', 30)
        monkeypatch.setattr(queries, 'SEARCH_WINDOW', 120)
        monkeypatch.setattr(queries, 'DENSE_WINDOW', 60)
    matching = {r.id for r in rows if not search or contains(r, search)}
    real, deleted = queries._rows_of, []

    def deleting(ids, with_result):
        # Another session deletes the page's first job between the two reads.
        if ids and not deleted:
            deleted.append(ids[0])
            with db.engine.begin() as conn:
                conn.execute(sa.delete(Job).where(Job.id == ids[0]))
        return real(ids, with_result)
    monkeypatch.setattr(queries, '_rows_of', deleting)
    if sort == 'runtime':  # every job finished, so that the run-time order lists them all
        with db.engine.begin() as conn:
            conn.execute(sa.update(Job).values(started_at=Job.created_at,
                                               finished_at=Job.created_at, run_seconds=0.0))
    listed = [i for page in search_pages(search, 5, sort) for i in page]
    assert deleted and len(listed) == len(set(listed))
    assert set(listed) == matching - set(deleted)

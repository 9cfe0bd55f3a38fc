"""Reading jobs: cursors and filters."""
import contextlib

import pytest

from app import catalog, jobs, queries


def submit(app, task='noop', params=None):
    return jobs.submit(catalog.validate({'task': task, 'params': params or {}}, app.config)).orm()


@contextlib.contextmanager
def sqlite_plans():
    """Yield a function giving the query plans (SQLite's EXPLAIN QUERY PLAN, each as one
    line) of the statements run since the block began that contain a text."""
    import sqlalchemy as sa

    from app.extensions import db
    seen = []

    def note(conn, cursor, statement, params, context, many):
        seen.append((statement, params))

    def plans(containing=''):
        return [' '.join(r[-1] for r in db.session.connection().exec_driver_sql(
            'EXPLAIN QUERY PLAN ' + statement, params))
            for statement, params in list(seen) if containing in statement]
    sa.event.listen(db.engine, 'before_cursor_execute', note)
    try:
        yield plans
    finally:
        sa.event.remove(db.engine, 'before_cursor_execute', note)


def test_a_cursor_round_trips_and_a_forged_one_is_refused(ctx):
    job = submit(ctx)
    assert queries.decode_cursor(queries.encode_cursor(job)) == (job.created_at, job.id)
    for forged in ('not base64 !', 'bm90IGEgY3Vyc29y', ''):
        with pytest.raises(queries.BadQuery):
            queries.decode_cursor(forged)


def test_filters_are_read_by_key_with_a_prefix_and_empty_is_none():
    args = {'f.state': 'failed', 'f.q': '', 'state': 'queued'}
    assert queries.parse_filters(args, prefix='f.') == {
        'state': 'failed', 'queue': None, 'task': None, 'q': None, 'finished_from': None,
        'finished_to': None}


def test_pages_follow_the_cursor_newest_first_each_job_once(ctx):
    made = {submit(ctx).id for _ in range(5)}
    first, cursor = queries.list_jobs(limit=3)
    second, end = queries.list_jobs(limit=3, cursor=cursor)
    listed = [j.id for j in first + second]
    assert (len(first), len(listed), set(listed), end) == (3, 5, made, None)
    times = [j.created_at for j in first + second]
    assert times == sorted(times, reverse=True)


def test_search_finds_text_in_parameters_as_typed(ctx):
    wanted = submit(ctx, 'fail', {'message': 'café 日本語 ☕'})
    submit(ctx, 'fail', {'message': 'plain'})
    for q in ('café', '日本語', '☕'):
        found, _ = queries.list_jobs(q=q)
        assert [j.id for j in found] == [wanted.id], q


@pytest.mark.parametrize('key', [k for k in queries.FILTER_KEYS[1:] if k not in queries.TIME_FILTERS])
def test_a_filter_value_over_the_limit_is_refused_the_same_by_pages_and_api(ctx, key):
    job = submit(ctx)
    long = 'x' * (queries.MAX_FILTER + 1)
    with pytest.raises(queries.BadQuery, match=f'{key} must be at most 500 characters'):
        queries.check_filters({key: long})
    client = ctx.test_client()
    page = client.get('/jobs', query_string={key: long})
    api = client.get('/api/jobs', query_string={key: long})
    bulk = client.post('/jobs/bulk', data={'action': 'delete', 'scope': 'filter',
                                           'confirmed': '1', f'f.{key}': long})
    api_bulk = client.post('/api/jobs/bulk', json={'action': 'delete', 'filter': {key: long}})
    assert [r.status_code for r in (page, api, bulk, api_bulk)] == [400, 400, 400, 400]
    assert 'at most 500 characters' in page.get_data(as_text=True)
    assert queries.get(job.id) is not None  # nothing deleted
    assert queries.check_filters({key: 'x' * queries.MAX_FILTER}) is None


def test_oldest_waiting_counts_queued_jobs_and_due_retries_from_the_partial_indexes(ctx):
    import datetime as dt

    from app.extensions import db
    from app.models import Job, utcnow
    now = utcnow()
    assert queries.oldest_waiting(['default'], now) == {'default': 0.0}
    queued = submit(ctx)
    later = submit(ctx, 'noop')
    row = db.session.get(Job, later.id)
    row.state, row.scheduled_for = 'retrying', now + dt.timedelta(seconds=30)  # not due yet
    db.session.commit()
    at = queued.updated_at
    assert queries.oldest_waiting(['default'], at + dt.timedelta(seconds=20)) == {'default': 20.0}
    # Due 30 s from now, so by then the queued job is still the older one;
    # once it starts, the retry waiting since it was due is the oldest.
    db.session.get(Job, queued.id).state = 'running'
    db.session.commit()
    assert queries.oldest_waiting(['default'], now + dt.timedelta(seconds=45)) == {'default': 15.0}
    assert queries.oldest_waiting(['default'], now + dt.timedelta(seconds=10)) == {'default': 0.0}
    if db.engine.dialect.name == 'sqlite':
        # The statement the query runs is answered from the two partial indexes.
        with sqlite_plans() as plans:
            queries.oldest_waiting(['default'], now)
            [plan] = plans()
        assert 'ix_job_waiting' in plan and 'ix_job_due' in plan, plan


# -- sorts and counts -----------------------------------------------------------

def _finished_jobs(app, spans):
    """One succeeded job per ``(created second, run seconds)``; their ids, in that order."""
    import datetime as dt

    from app.extensions import db
    from app.models import Job
    base = dt.datetime(2026, 1, 1, 12, 0, 0)
    ids = []
    for created, ran in spans:
        job = submit(app)
        row = db.session.get(Job, job.id)
        row.created_at = base + dt.timedelta(seconds=created)
        row.started_at = row.created_at + dt.timedelta(seconds=1)
        row.finished_at = row.started_at + dt.timedelta(seconds=ran)
        row.run_seconds = ran  # as the ledger's writer keeps it
        row.state, row.attempts = 'succeeded', 1
        ids.append(job.id)
    db.session.commit()
    return ids


def _walk(sort, limit, **filters):
    """Every page of a list in ``sort`` order: the ids, and how many pages it took."""
    listed, cursor, pages = [], None, 0
    while True:
        page, cursor = queries.list_jobs(limit=limit, cursor=cursor, sort=sort, **filters)
        listed += [j.id for j in page]
        pages += 1
        if cursor is None:
            return listed, pages
        assert pages < 50, 'the cursor does not move on'


def test_each_sort_pages_through_every_job_once_in_its_order(tmp_path, ledger_url):
    from conftest import make_app

    from app.extensions import db
    from app.models import Job
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    with app.app_context():
        # Run times with ties (2.5 s twice, 0.25 s three times), fractions, and one whose
        # float's text has an exponent (a cursor holds it).
        spans = [(0, 2.5), (1, 0.25), (2, 7.125), (3, 0.25), (4, 2.5), (5, 0.25), (6, 30.0),
                 (7, 1.5e-05)]
        ids = _finished_jobs(app, spans)
        waiting = submit(app).id  # never ran: no run time, left out of that order
        created = {i: n for n, i in enumerate(ids)}
        newest, pages = _walk('newest', 3)
        assert (newest, pages) == ([waiting] + ids[::-1], 3)
        oldest, _ = _walk('oldest', 3)
        assert oldest == ids + [waiting]
        by_run, pages = _walk('runtime', 2)
        ran = {i: spans[created[i]][1] for i in ids}
        assert sorted(by_run) == sorted(ids) and pages == 4
        # Longest first, then the larger id among equal run times.
        assert by_run == sorted(ids, key=lambda i: (ran[i], i), reverse=True)
        if db.engine.dialect.name == 'sqlite':
            # A page of the run-time order walks its index: no sort of the finished jobs.
            with sqlite_plans() as plans:
                queries.list_jobs(limit=2, sort='runtime', cursor=queries.list_jobs(
                    limit=2, sort='runtime')[1])
                for within in ({'state': 'failed'}, {'queue': 'default'}, {'task': 'noop'}):
                    queries.list_jobs(limit=2, sort='runtime', **within)  # as the created order
                pages = plans('ORDER BY job.run_seconds')
            for plan, index in zip(pages, ('ix_job_run', 'ix_job_run', 'ix_job_state_run',
                                           'ix_job_queue_run', 'ix_job_task_run'), strict=True):
                assert f'INDEX {index} ' in plan and 'TEMP B-TREE' not in plan, plan
        # A filter narrows each order the same way.
        db.session.get(Job, ids[2]).task = 'sleep'
        db.session.commit()
        assert _walk('runtime', 1, task='sleep')[0] == [ids[2]]
        assert _walk('oldest', 1, task='noop')[0] == [i for i in ids + [waiting] if i != ids[2]]
        # A cursor of one order is refused by another, and a sort must be one of SORTS.
        _, cursor = queries.list_jobs(limit=1, sort='runtime')
        with pytest.raises(queries.BadQuery):
            queries.list_jobs(limit=1, sort='newest', cursor=cursor)
        with pytest.raises(queries.BadQuery, match='sort must be one of newest, oldest, runtime'):
            queries.list_jobs(sort='longest')
        db.session.remove()
        db.engine.dispose()


def test_a_search_the_index_names_every_match_of_is_read_by_those_names_beside_filters(ctx):
    from app.extensions import db
    from app.models import Job
    with ctx.app_context():
        ids = [submit(ctx, 'fail', {'message': f'needle {n}'}).id for n in range(3)]
        others = [submit(ctx).id for _ in range(4)]
        prefixed = others[0]
        rows = {i: db.session.get(Job, i) for i in ids + others}
        for n, i in enumerate(ids + others):
            rows[i].finished_at, rows[i].run_seconds = rows[i].created_at, float(n + 1)
        db.session.commit()
        # Each order, with filters and a cursor, on SQLite and PostgreSQL: the
        # matches of the text, and the job whose id starts with the search.
        for q, want in (('needle', ids), (prefixed[:8], [prefixed])):
            for sort in ('newest', 'oldest', 'runtime'):
                for within in ({}, {'queue': 'default'}, {'task': 'fail', 'queue': 'default'},
                               {'finished_from': '2000-01-01T00:00:00Z'}):
                    seen, cursor = [], None
                    while True:
                        page, cursor = queries.list_jobs(q=q, limit=1, sort=sort, cursor=cursor,
                                                         **within)
                        seen += [j.id for j in page]
                        if cursor is None:
                            break
                    expected = [i for i in want if within.get('task') in (None, rows[i].task)]
                    assert sorted(seen) == sorted(expected), (q, sort, within)
                    assert len(seen) == len(set(seen))
            assert queries.count_jobs({'q': q, 'queue': 'default'}) == (len(want), True)
        if db.engine.dialect.name == 'sqlite':
            # Read by the rowids the search names, not by walking a filter's
            # index (or the list's) over the whole ledger.
            with sqlite_plans() as plans:
                queries.list_jobs(q='needle', queue='default', limit=1)
                queries.list_jobs(q='needle', task='fail', state='failed', limit=1,
                                  cursor=queries.list_jobs(q='needle', limit=1)[1])
                queries.list_jobs(q='needle', queue='default', sort='runtime', limit=1)
                queries.count_jobs({'q': 'needle', 'queue': 'default'})
                listed = plans('json_each')
            assert len(listed) == 5
            for plan in listed:
                assert 'INTEGER PRIMARY KEY' in plan and 'ix_job' not in plan, plan


def test_counts_come_from_the_counters_and_a_search_is_counted_to_a_bound(ctx):
    from app.extensions import db
    from app.models import Job
    for n in range(4):
        submit(ctx, 'fail', {'message': f'needle {n}'})
    submit(ctx, 'noop')
    db.session.get(Job, submit(ctx, 'noop').id).state = 'failed'
    db.session.commit()
    assert queries.count_jobs({'state': None, 'queue': None, 'task': None, 'q': None}) == (6, True)
    assert queries.count_jobs({'state': 'queued', 'queue': 'default', 'task': 'noop',
                               'q': None}) == (1, True)
    assert queries.count_jobs({'state': 'failed', 'queue': None, 'task': None,
                               'q': None}) == (1, True)
    assert queries.count_jobs({'state': None, 'queue': 'other', 'task': None,
                               'q': None}) == (0, True)
    search = {'state': None, 'queue': None, 'task': 'fail', 'q': 'needle'}
    assert queries.count_jobs(search) == (4, True)
    assert queries.count_jobs(search, bound=3) == (3, False)  # "3+"
    # Too short for the index: not counted rather than a walk of the ledger.
    assert queries.count_jobs({**search, 'q': 'ne'}) == (None, False)
    with pytest.raises(queries.BadQuery):
        queries.count_jobs({**search, 'state': 'nonsense'})


def test_a_range_of_finish_times_is_counted_from_the_rows_as_the_list_shows_it(ctx):
    # The counters know nothing of finish times: a chart point's jobs are
    # counted from the rows, the same ones the list shows.
    ids = _finished_jobs(ctx, [(0, 1), (10, 1), (20, 1), (30, 1)])  # finish at 2, 12, 22, 32 s
    submit(ctx)  # not finished: never in a range
    window = {'state': None, 'queue': None, 'task': None, 'q': None,
              'finished_from': '2026-01-01T12:00:10Z', 'finished_to': '2026-01-01T12:00:30'}
    listed, _ = queries.list_jobs(**window)
    assert {j.id for j in listed} == set(ids[1:3])
    assert queries.count_jobs(window) == (2, True)
    assert queries.count_jobs(window, bound=1) == (1, False)
    assert queries.count_jobs({**window, 'finished_to': None}) == (3, True)
    assert queries.count_jobs({**window, 'state': 'failed'}) == (0, True)
    with pytest.raises(queries.BadQuery):
        queries.count_jobs({**window, 'finished_from': 'yesterday'})


def test_a_dead_consumer_lists_only_the_jobs_still_running_on_it(ctx):
    import datetime as dt

    from app.extensions import db
    from app.models import Job, Worker, utcnow
    still, recovered, other = (submit(ctx).id for _ in range(3))
    for job_id, state, worker in ((still, 'running', 'dead:1/t1'), (recovered, 'queued', None),
                                  (other, 'running', 'alive:2/t1')):
        row = db.session.get(Job, job_id)
        row.state, row.worker = state, worker
    now = utcnow()
    old = now - dt.timedelta(seconds=600)
    db.session.add_all([
        Worker(id='dead:1', host='dead', pid=1, queues=['default'], concurrency=2,
               started_at=old, last_seen=old, current=[still, recovered, other]),
        Worker(id='alive:2', host='alive', pid=2, queues=['default', 'reports'], concurrency=2,
               started_at=now, last_seen=now, current=[other])])
    db.session.commit()
    rows = queries.workers(lost_after=30)
    assert queries.running_on(rows, 30) == {'dead:1': [still], 'alive:2': [other]}
    assert queries.consumers_of(['default', 'reports', 'idle'], 30) == {
        'default': ['alive:2'], 'reports': ['alive:2'], 'idle': []}


def test_the_finished_range_keeps_jobs_finished_in_it_on_either_ledger(ledger_client):
    import datetime as dt
    import uuid
    from app.extensions import db
    from app.models import Job
    app, _client = ledger_client
    base = dt.datetime(2026, 3, 1, 12, 0)
    with app.app_context():
        ids = {}
        for minute in (-1, 0, 4, 5, None):  # None: still queued
            job_id = str(uuid.uuid4())
            finished = None if minute is None else base + dt.timedelta(minutes=minute, seconds=30)
            db.session.add(Job(id=job_id, task='noop', queue='default', params={},
                               state='queued' if minute is None else 'succeeded', retries=0,
                               retry_delay=1.0, created_at=base - dt.timedelta(hours=1),
                               updated_at=base, finished_at=finished))
            ids[minute] = job_id
        db.session.commit()

        def listed(**bounds):
            return {j.id for j in queries.list_jobs(**bounds)[0]}

        assert listed(finished_from='2026-03-01T12:00:00Z', finished_to='2026-03-01T12:05:00Z') \
            == {ids[0], ids[4]}
        assert listed(finished_from='2026-03-01T12:05:00') == {ids[5]}  # no offset: UTC
        assert listed(finished_to='2026-03-01T13:00:00+01:00') == {ids[-1]}  # converted to UTC
        assert listed(finished_from='2026-03-01T12:04:00Z', state='succeeded') == {ids[4], ids[5]}
        assert queries.count_matching({'finished_from': '2026-03-01T11:00:00Z',
                                       'finished_to': '2026-03-01T12:01:00Z'}, 100) == 2
        db.session.remove()


def test_a_bad_finished_range_is_refused_by_name():
    with pytest.raises(queries.BadQuery, match='finished_from must be an ISO 8601 time'):
        queries.check_filters({'finished_from': 'yesterday'})
    with pytest.raises(queries.BadQuery, match='finished_to must be an ISO 8601'):
        queries.finished_between(None, '2026-13-01T00:00:00Z')
    with pytest.raises(queries.BadQuery, match='must come after'):
        queries.finished_between('2026-03-01T12:00:00Z', '2026-03-01T12:00:00Z')
    assert queries.parse_time('2026-03-01T12:00:00.250Z', 'x').isoformat() == \
        '2026-03-01T12:00:00.250000'


def test_counts_read_the_counters_through_their_index_however_large_the_table(
        postgres_url, tmp_path):
    # PostgreSQL keeps the space of a counter row's past versions: after a
    # burst of writes the table is large and its few live rows sit at its end.
    import sqlalchemy as sa
    from conftest import make_app

    from app.extensions import db
    app = make_app(tmp_path, DATABASE_URL=postgres_url)
    with app.app_context():
        for _ in range(3):
            submit(app)
        submit(app, 'fail')
        conn = db.session.connection()
        conn.exec_driver_sql(
            "INSERT INTO job_count (queue, task, state, error_type, shard, n) "
            "SELECT 'past', 'noop', 'queued', '', s, 1 FROM generate_series(1, 50000) s")
        conn.exec_driver_sql("DELETE FROM job_count WHERE queue = 'past'")
        db.session.commit()
        db.session.connection().exec_driver_sql('ANALYZE job_count')
        statements = []

        def note(conn, cursor, statement, parameters, context, executemany):
            statements.append((statement, parameters))
        sa.event.listen(db.engine, 'before_cursor_execute', note)
        counts = [queries.count_jobs({}).n, queries.count_jobs({'task': 'fail'}).n,
                  queries.count_jobs({'state': 'queued', 'queue': 'default'}).n]
        stats, failures = queries.stats(), queries.failures()
        sa.event.remove(db.engine, 'before_cursor_execute', note)
        assert counts == [4, 1, 4] and stats['total'] == 4 and failures == []
        assert len(statements) == 5
        for sql, params in statements:
            plan = '\n'.join(r[0] for r in db.session.connection().exec_driver_sql(
                'EXPLAIN ' + sql, params))
            assert 'job_count' in plan and 'Seq Scan' not in plan, plan
        db.session.remove()
        db.engine.dispose()

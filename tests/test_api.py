"""The JSON API contract, in-process on the embedded broker (no consumer)."""
import base64
import datetime as dt
import json
import uuid

import pytest
import sqlalchemy as sa
from helpers import broker_locked, wait_for

from app.extensions import db
from app.models import Attempt, AttemptLog, Job, utcnow


def post(client, body, **kw):
    return client.post('/api/jobs', json=body, **kw)


def test_submit_answers_201_with_the_job_and_its_location(client):
    resp = post(client, {'task': 'sleep', 'params': {'seconds': 1}, 'priority': 3})
    assert resp.status_code == 201
    job = resp.get_json()
    assert resp.headers['Location'] == f'/api/jobs/{job["id"]}'
    assert (job['task'], job['state'], job['queue'], job['priority']) == ('sleep', 'queued', 'default', 3)
    assert job['params'] == {'seconds': 1.0, 'steps': 10}
    assert (job['retries'], job['retry_delay'], job['attempts']) == (2, 5.0, [])
    for field in ('id', 'progress', 'result', 'created_at', 'started_at', 'finished_at'):
        assert field in job
    assert client.get(f'/api/jobs/{job["id"]}').get_json()['state'] == 'queued'


def test_delayed_job_is_scheduled(client):
    job = post(client, {'task': 'noop', 'delay': 600}).get_json()
    assert job['state'] == 'scheduled'
    due = dt.datetime.fromisoformat(job['scheduled_for'].rstrip('Z'))
    assert 590 < (due - utcnow()).total_seconds() <= 600


def test_bad_submission_is_400_with_fields_and_writes_nothing(client, app):
    resp = post(client, {'task': 'sleep', 'params': {'seconds': 'soon'}, 'retries': -1})
    assert resp.status_code == 400
    assert resp.get_json() == {'error': 'invalid job', 'fields': {
        'params.seconds': 'must be a number', 'retries': 'must be at least 0'}}
    assert post(client, {'task': 'launch-rockets'}).status_code == 400
    with app.app_context():
        assert db.session.query(Job).count() == 0


def test_non_json_body_is_400(client):
    resp = client.post('/api/jobs', data='task=noop', content_type='application/x-www-form-urlencoded')
    assert resp.status_code == 400
    assert resp.get_json()['fields'] == {'body': 'must be a JSON object (Content-Type: application/json)'}
    resp = client.post('/api/jobs', data='{not json', content_type='application/json')
    assert resp.status_code == 400


def test_oversized_body_is_413(client, app):
    body = json.dumps({'task': 'fail', 'params': {'message': 'x' * 70_000}})
    resp = client.post('/api/jobs', data=body, content_type='application/json')
    assert resp.status_code == 413
    assert resp.get_json() == {'error': 'request body larger than 65536 bytes'}
    with app.app_context():
        assert db.session.query(Job).count() == 0


def test_unknown_job_is_404_everywhere(client):
    missing = str(uuid.uuid4())
    for method, path in [('get', f'/api/jobs/{missing}'), ('post', f'/api/jobs/{missing}/retry'),
                         ('post', f'/api/jobs/{missing}/cancel'), ('delete', f'/api/jobs/{missing}'),
                         ('get', '/api/jobs/' + 'x' * 300)]:
        resp = getattr(client, method)(path)
        assert resp.status_code == 404, path
        assert resp.get_json()['error'].startswith('no job with id')


def test_cancel_a_queued_job_then_retry_it(client, app):
    job = post(client, {'task': 'noop'}).get_json()
    resp = client.post(f'/api/jobs/{job["id"]}/cancel')
    assert resp.status_code == 200 and resp.get_json()['state'] == 'canceled'
    from app import broker
    assert broker.hueys['default'].pending_count() == 0  # withdrawn from the queue
    again = client.post(f'/api/jobs/{job["id"]}/cancel')
    assert again.status_code == 409
    assert again.get_json() == {'error': 'cannot cancel a canceled job; only queued, scheduled, '
                                         'running, retrying jobs can be canceled',
                                'state': 'canceled'}
    resp = client.post(f'/api/jobs/{job["id"]}/retry')
    assert resp.status_code == 200 and resp.get_json()['state'] == 'queued'
    assert broker.hueys['default'].pending_count() == 1


def test_cancel_a_scheduled_job_removes_it_from_the_schedule(client):
    from app import broker
    huey = broker.hueys['default']
    job = post(client, {'task': 'noop', 'delay': 3600}).get_json()
    # A job due later goes straight to Huey's schedule, not through a worker.
    assert (huey.scheduled_count(), huey.pending_count()) == (1, 0)
    assert client.post(f'/api/jobs/{job["id"]}/cancel').get_json()['state'] == 'canceled'
    assert huey.scheduled_count() == 0 and huey.pending_count() == 0


def test_state_rules_give_409(client, app):
    job = post(client, {'task': 'noop'}).get_json()
    assert client.post(f'/api/jobs/{job["id"]}/retry').status_code == 409
    resp = client.delete(f'/api/jobs/{job["id"]}')
    assert resp.status_code == 409
    assert resp.get_json()['error'] == ('cannot delete a queued job; only succeeded, failed, '
                                        'canceled jobs can be deleted')


def test_delete_a_finished_job_and_its_attempts(client, app):
    job = post(client, {'task': 'noop'}).get_json()
    with app.app_context():
        row = db.session.get(Job, job['id'])
        row.state, row.attempts = 'failed', 1
        db.session.add(Attempt(job_id=row.id, number=1, outcome='failed', error_type='E'))
        db.session.commit()
    assert client.delete(f'/api/jobs/{job["id"]}').status_code == 204
    assert client.get(f'/api/jobs/{job["id"]}').status_code == 404
    with app.app_context():
        assert db.session.query(Attempt).count() == 0


def test_purge_deletes_old_finished_jobs_with_their_attempts_and_logs(client, app):
    from app import jobs
    old, recent, waiting = (post(client, {'task': 'noop'}).get_json()['id'] for _ in range(3))
    with app.app_context():
        for job_id, finished in ((old, utcnow() - dt.timedelta(days=40)), (recent, utcnow())):
            row = db.session.get(Job, job_id)
            row.state, row.attempts, row.finished_at = 'succeeded', 1, finished
            db.session.add(Attempt(job_id=job_id, number=1, outcome='succeeded'))
            db.session.add(AttemptLog(job_id=job_id, number=1, at=finished, level='INFO',
                                      message='done'))
        db.session.commit()
        assert jobs.purge_finished(30) == 1
        assert {j.id for j in db.session.query(Job)} == {recent, waiting}
        assert {a.job_id for a in db.session.query(Attempt)} == {recent}
        assert {line.job_id for line in db.session.query(AttemptLog)} == {recent}


def _insert_jobs(app, count, **fields):
    start = utcnow() - dt.timedelta(hours=1)
    with app.app_context():
        db.session.add_all(Job(
            id=str(uuid.uuid4()), task=fields.get('task', 'noop'), queue='default',
            params={'n': i}, state=fields.get('state', 'succeeded'), retries=2, retry_delay=5.0,
            # Pairs share a timestamp: the id must break ties.
            created_at=start + dt.timedelta(seconds=i // 2), updated_at=start)
            for i in range(count))
        db.session.commit()


def test_keyset_pages_cover_every_job_once_newest_first(client, app):
    _insert_jobs(app, 23)
    seen, cursor, pages = [], None, 0
    while True:
        url = '/api/jobs?limit=5' + (f'&cursor={cursor}' if cursor else '')
        body = client.get(url).get_json()
        seen.extend(body['jobs'])
        pages += 1
        cursor = body['next']
        if not cursor:
            break
    assert pages == 5 and len(seen) == 23 and len({j['id'] for j in seen}) == 23
    keys = [(j['created_at'], j['id']) for j in seen]
    assert keys == sorted(keys, reverse=True)


def test_the_list_pages_oldest_first_and_by_run_time(client, app):
    _insert_jobs(app, 7)
    with app.app_context():
        jobs_ = db.session.scalars(sa.select(Job).order_by(Job.created_at, Job.id)).all()
        for i, job in enumerate(jobs_):  # run times 0, 3, 6, 2, 5, 1, 4 s; one never started
            if i < 6:
                job.started_at = dt.datetime(2026, 3, 1, 12)
                job.finished_at = job.started_at + dt.timedelta(seconds=i * 3 % 7)
                job.run_seconds = float(i * 3 % 7)  # as the ledger's writer keeps it
        db.session.commit()
        oldest = [j.id for j in jobs_]
        longest = [j.id for j in sorted(jobs_[:6], key=lambda j: (
            (j.finished_at - j.started_at).total_seconds(), j.id), reverse=True)]

    def pages(sort):
        seen, cursor = [], None
        while True:
            body = client.get(f'/api/jobs?sort={sort}&limit=2'
                              + (f'&cursor={cursor}' if cursor else '')).get_json()
            seen += [j['id'] for j in body['jobs']]
            cursor = body['next']
            if not cursor:
                return seen
    assert pages('oldest') == oldest
    assert pages('newest') == list(reversed(oldest))
    assert pages('runtime') == longest
    # A cursor belongs to its order, and says so; an unknown order or a forged
    # run time is refused.
    newest_cursor = client.get('/api/jobs?limit=2').get_json()['next']
    oldest_cursor = client.get('/api/jobs?sort=oldest&limit=2').get_json()['next']
    runtime_cursor = client.get('/api/jobs?sort=runtime&limit=2').get_json()['next']
    forged = base64.urlsafe_b64encode(f'~1e-16384|{oldest[0]}'.encode()).decode()
    infinite = base64.urlsafe_b64encode(f'~1e+999|{oldest[0]}'.encode()).decode()
    arabic = base64.urlsafe_b64encode(f'~\u0661.5|{oldest[0]}'.encode()).decode()
    for query, error in ((f'sort=runtime&cursor={newest_cursor}', 'newest order, not runtime'),
                         (f'sort=runtime&cursor={oldest_cursor}', 'oldest order, not runtime'),
                         (f'sort=oldest&cursor={newest_cursor}', 'newest order: give sort=newest'),
                         (f'cursor={oldest_cursor}', 'oldest order: give sort=oldest'),
                         (f'sort=runtime&cursor={infinite}', 'not one this server handed out'),
                         (f'cursor={runtime_cursor}', 'runtime order'),
                         (f'sort=oldest&cursor={runtime_cursor}', 'runtime order'),
                         (f'sort=runtime&cursor={forged}', 'not one this server handed out'),
                         (f'sort=runtime&cursor={arabic}', 'not one this server handed out'),
                         ('limit=%D9%A3', 'limit must be a whole number'),
                         ('limit=1_0', 'limit must be a whole number'),
                         ('sort=slowest', 'sort')):
        resp = client.get(f'/api/jobs?{query}')
        assert resp.status_code == 400 and error in resp.get_json()['error'], (query, resp.data)
    sort = {p['name']: p for p in client.get('/api/openapi.json').get_json()
            ['paths']['/api/jobs']['get']['parameters']}['sort']
    assert [c for c in sort['schema']['enum'] if c] == ['newest', 'oldest', 'runtime']


def test_filters_and_search(client, app):
    _insert_jobs(app, 4, state='failed', task='fail')
    _insert_jobs(app, 3, state='succeeded', task='noop')
    assert len(client.get('/api/jobs?state=failed').get_json()['jobs']) == 4
    assert len(client.get('/api/jobs?task=noop').get_json()['jobs']) == 3
    assert len(client.get('/api/jobs?state=failed&task=noop').get_json()['jobs']) == 0
    some = client.get('/api/jobs?limit=1').get_json()['jobs'][0]
    assert [j['id'] for j in client.get(f'/api/jobs?q={some["id"][:8]}').get_json()['jobs']] == [some['id']]
    assert len(client.get('/api/jobs?q="n": 2').get_json()['jobs']) == 2  # one per task


def test_the_list_filters_by_the_time_jobs_finished(client, app):
    _insert_jobs(app, 3, state='succeeded')
    with app.app_context():
        jobs_ = db.session.scalars(sa.select(Job).order_by(Job.created_at, Job.id)).all()
        for i, job in enumerate(jobs_):
            job.finished_at = dt.datetime(2026, 3, 1, 12, i * 10)
        db.session.commit()
        wanted = jobs_[1].id
    body = client.get('/api/jobs?finished_from=2026-03-01T12:05:00Z'
                      '&finished_to=2026-03-01T12:15:00Z').get_json()
    assert [j['id'] for j in body['jobs']] == [wanted]
    names = {p['name'] for p in client.get('/api/openapi.json').get_json()
             ['paths']['/api/jobs']['get']['parameters']}
    assert {'finished_from', 'finished_to'} <= names


def test_bad_list_queries_are_400_naming_the_parameter(client):
    for query, field in (('state=exploded', 'state'), ('limit=0', 'limit'),
                         ('limit=100000', 'limit'), ('limit=ten', 'limit'),
                         ('cursor=%%%', 'cursor'), ('sort=slowest', 'sort'),
                         ('finished_from=yesterday', 'finished_from'),
                         ('finished_to=2026-02-30T00:00:00Z', 'finished_to'),
                         ('finished_from=2026-03-02T00:00:00Z&finished_to=2026-03-01T00:00:00Z',
                          'finished_to')):
        resp = client.get(f'/api/jobs?{query}')
        assert resp.status_code == 400, query
        body = resp.get_json()
        assert body['error'] and list(body['fields']) == [field], (query, body)
        assert not body['fields'][field].startswith(field), body  # named once, as the key


def test_tasks_and_stats(client):
    tasks = client.get('/api/tasks').get_json()
    names = [t['name'] for t in tasks['tasks']]
    assert {'noop', 'sleep', 'flaky', 'fail', 'payment'} <= set(names)
    assert tasks['queues'] == ['default']
    post(client, {'task': 'noop'})
    post(client, {'task': 'noop', 'delay': 60})
    stats = client.get('/api/stats').get_json()
    assert stats['states']['queued'] == 1 and stats['states']['scheduled'] == 1
    assert stats['queues']['default']['queued'] == 1 and stats['total'] == 2


def test_healthz_reports_broker_and_database(client):
    body = client.get('/healthz').get_json()
    assert body == {'status': 'ok', 'broker': 'ok', 'broker_kind': 'sqlite (embedded)',
                    'database': 'ok'}


def test_broker_refusal_is_503_and_leaves_no_row(client, app):
    with broker_locked():
        resp = post(client, {'task': 'noop'})
    assert resp.status_code == 503
    assert resp.get_json()['error'].startswith('the job broker is unreachable')
    with app.app_context():
        assert db.session.query(Job).count() == 0
    assert post(client, {'task': 'noop'}).status_code == 201


def test_bulk_cancel_withdraws_every_message(client, app):
    from app import broker
    ids = [post(client, {'task': 'noop', 'delay': 3600}).get_json()['id'] for _ in range(3)]
    keep = post(client, {'task': 'noop'}).get_json()['id']
    resp = client.post('/api/jobs/bulk', json={'action': 'cancel', 'ids': ids})
    assert resp.get_json() == {'action': 'cancel', 'matched': 3, 'done': 3, 'skipped': {},
                               'truncated': False}
    assert broker.message_ids('default') == {keep}


def test_a_cancel_the_broker_refuses_is_503_and_leaves_the_jobs_waiting(client, app):
    from app import broker
    ids = [post(client, {'task': 'noop'}).get_json()['id'] for _ in range(3)]
    later = post(client, {'task': 'noop', 'delay': 3600}).get_json()['id']
    with broker_locked():
        one = client.post(f'/api/jobs/{ids[0]}/cancel')
        many = client.post('/api/jobs/bulk', json={'action': 'cancel', 'ids': [*ids, later]})
    assert (one.status_code, many.status_code) == (503, 503)
    assert many.get_json()['error'].startswith('the job broker is unreachable')
    states = {i: client.get(f'/api/jobs/{i}').get_json()['state'] for i in [*ids, later]}
    assert states == {**{i: 'queued' for i in ids}, later: 'scheduled'}
    assert broker.message_ids('default') >= {*ids, later}
    # with the broker back, the same request cancels them all
    resp = client.post('/api/jobs/bulk', json={'action': 'cancel', 'ids': [*ids, later]})
    assert resp.get_json()['done'] == 4
    assert broker.message_ids('default').isdisjoint({*ids, later})


def test_unique_jobs_share_one_row(client, app):
    first = post(client, {'task': 'noop', 'idempotency_key': 'invoice-42'})
    again = post(client, {'task': 'sleep', 'idempotency_key': 'invoice-42'})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()['id'] == first.get_json()['id'] and again.get_json()['task'] == 'noop'
    with app.app_context():
        assert db.session.query(Job).count() == 1


def _stored_jobs(app, rows):
    """Write jobs as the ledger holds them: ``{name: (params, error, result)}`` -> ids."""
    ids = {}
    with app.app_context():
        for name, (params, error, result) in rows.items():
            job = Job(id=str(uuid.uuid4()), task='fail', queue='default', params=params,
                      state='failed', retries=0, retry_delay=0.0, error=error, result=result,
                      created_at=utcnow(), updated_at=utcnow())
            db.session.add(job)
            ids[name] = job.id
        db.session.commit()
    return ids


def test_search_finds_any_text_in_params_errors_and_results(ledger_client):
    app, client = ledger_client
    ids = _stored_jobs(app, {
        'accent': ({'message': 'café'}, None, None),
        'cjk': ({}, 'RuntimeError: 日本語のエラー', None),
        'emoji': ({}, None, {'drink': '☕ served'}),
        'quote': ({'message': 'say "hi" \\ back'}, None, None),
        'upper': ({}, 'RuntimeError: BOOM', None),
        'capital': ({'name': 'Élodie'}, None, None),
    })

    def found(q):
        resp = client.get('/api/jobs', query_string={'q': q})
        assert resp.status_code == 200, resp.get_json()
        return {name for name, job_id in ids.items()
                if job_id in {j['id'] for j in resp.get_json()['jobs']}}

    assert found('é') == {'accent'}  # É is another letter
    assert found('café') == {'accent'}
    assert found('日本語') == {'cjk'}
    assert found('☕') == {'emoji'}
    assert found('say "hi" \\ back') == {'quote'}  # as typed, not as JSON escapes it
    assert found('boom') == found('BOOM') == {'upper'}  # ASCII letters in any case
    assert found('élodie') == set() and found('Élodie') == {'capital'}  # others as typed
    pages = client.get('/jobs', query_string={'q': '日本語'}).get_data(as_text=True)
    assert f'id="job-{ids["cjk"]}"' in pages and f'id="job-{ids["accent"]}"' not in pages


def test_json_is_stored_as_utf8_text(ledger_client):
    app, client = ledger_client
    job = client.post('/api/jobs', json={'task': 'fail', 'params': {'message': 'é ☕'}}).get_json()
    with app.app_context():
        stored = db.session.execute(
            sa.select(sa.cast(Job.params, sa.Text)).where(Job.id == job['id'])).scalar()
    assert stored == '{"message": "é ☕"}'


# -- POST /api/jobs/batch ------------------------------------------------------------

def batch(client, items, **kw):
    return client.post('/api/jobs/batch', json={'jobs': items}, **kw)


def test_a_batch_answers_201_with_its_jobs_in_order(client, app):
    from app import broker
    items = [{'task': 'sleep', 'params': {'seconds': n}} for n in range(5)]
    items.append({'task': 'noop', 'delay': 600, 'priority': 7})
    resp = batch(client, items)
    assert resp.status_code == 201
    body = resp.get_json()
    assert body['created'] == [True] * 6
    assert [j['params'].get('seconds') for j in body['jobs']] == [0.0, 1.0, 2.0, 3.0, 4.0, None]
    assert [j['state'] for j in body['jobs']] == ['queued'] * 5 + ['scheduled']
    assert body['jobs'][5]['priority'] == 7
    ids = [j['id'] for j in body['jobs']]
    assert len(set(ids)) == 6
    assert broker.message_ids('default') == set(ids)  # every message in the broker, rows committed
    huey = broker.hueys['default']
    assert (huey.pending_count(), huey.scheduled_count()) == (5, 1)
    assert [client.get(f'/api/jobs/{i}').get_json()['state'] for i in ids] == \
        ['queued'] * 5 + ['scheduled']


def test_a_batch_is_validated_all_or_nothing_with_errors_by_index(client, app):
    items = [{'task': 'noop'}, {'task': 'sleep', 'params': {'seconds': 'soon'}},
             {'task': 'noop'}, {'task': 'launch'}, 'not a job',
             {'task': 'sleep', 'retries': -1, 'colour': 'red'}]
    resp = batch(client, items)
    assert resp.status_code == 400
    body = resp.get_json()
    assert body['error'] == 'invalid jobs'
    assert body['errors'] == [
        {'index': 1, 'field': 'params.seconds', 'message': 'must be a number'},
        {'index': 3, 'field': 'task', 'message': body['errors'][1]['message']},
        {'index': 4, 'field': '', 'message': 'must be a JSON object'},
        {'index': 5, 'field': 'colour', 'message': 'unknown field'},
        {'index': 5, 'field': 'retries', 'message': 'must be at least 0'}]
    assert body['errors'][1]['message'].startswith('unknown task; one of ')
    # The single endpoint's shape too, the fields named by their job.
    assert body['fields']['jobs[1].params.seconds'] == 'must be a number'
    assert body['fields']['jobs[4]'] == 'must be a JSON object'
    from app import broker
    with app.app_context():
        assert db.session.query(Job).count() == 0
    assert broker.message_ids('default') == set()


def test_a_batch_whose_text_cannot_be_stored_lists_the_errors_by_index(client, app):
    # Checked on the body's text before the jobs are: the same answer's shape.
    deep = 'x'
    for _ in range(40):
        deep = [deep]
    body = ('{"jobs": [{"task": "noop"}, {"task": "fail", "params": {"message": "\\ud800"}}, '
            '{"task": "sleep", "params": {"message": "nul \\u0000"}}, {"task": "noop", '
            '"params": {"deep": ' + json.dumps(deep) + '}}]}')
    resp = client.post('/api/jobs/batch', data=body, content_type='application/json')
    assert resp.status_code == 400
    answer = resp.get_json()
    assert answer['error'] == 'invalid jobs'
    assert [(e['index'], e['field'].split('[')[0]) for e in answer['errors']] == [
        (1, 'params.message'), (2, 'params.message'), (3, 'params.deep')]
    assert answer['errors'][0]['message'] == 'contains an unpaired surrogate (U+D800)'
    assert answer['fields']['jobs[1].params.message'] == answer['errors'][0]['message']
    with app.app_context():
        assert db.session.query(Job).count() == 0


def test_a_batch_body_must_be_a_list_of_jobs(client):
    # The body as a whole at fault: named in "fields", and "errors" (by job) is
    # there, empty, as in every 400 of the route, so a client reads one shape.
    for body, fields in (({}, {'jobs': 'must be a non-empty list of jobs'}),
                         ({'jobs': []}, {'jobs': 'must be a non-empty list of jobs'}),
                         ({'jobs': {'task': 'noop'}}, {'jobs': 'must be a non-empty list of jobs'}),
                         ({'jobs': [{'task': 'noop'}], 'x': 1}, {'x': 'unknown field'}),
                         ([{'task': 'noop'}], {'body': 'must be a JSON object'})):
        resp = client.post('/api/jobs/batch', json=body)
        assert resp.status_code == 400, body
        assert {k: v for k, v in resp.get_json().items() if k != 'error'} == \
            {'fields': fields, 'errors': []}, body
    # So too when the request is refused before the view reads it (its query string).
    resp = client.post('/api/jobs/batch?x=%ff', json={'jobs': [{'task': 'noop'}]})
    assert resp.get_json() == {'error': 'invalid request', 'fields': {'x': 'is not valid UTF-8'},
                               'errors': []}
    # One job's endpoint has no "errors".
    assert 'errors' not in client.post('/api/jobs', json={}).get_json()


def test_a_batch_holds_at_most_1000_jobs(client, app):
    resp = batch(client, [{'task': 'noop'}] * 1001)
    assert resp.status_code == 413
    assert resp.get_json() == {'error': 'at most 1000 jobs a call (got 1001): split the batch',
                               'fields': {'jobs': 'too many jobs'}}
    resp = batch(client, [{'task': 'noop'}] * 1000)
    assert resp.status_code == 201 and len(resp.get_json()['jobs']) == 1000
    with app.app_context():
        assert db.session.query(Job).count() == 1000


def test_a_batch_larger_than_its_body_limit_is_413(tmp_path):
    from conftest import make_app
    app = make_app(tmp_path, MAX_BATCH_CONTENT_LENGTH=2000)
    client = app.test_client()
    resp = batch(client, [{'task': 'fail', 'params': {'message': 'x' * 400}}] * 10)
    assert resp.status_code == 413
    assert resp.get_json() == {'error': 'request body larger than 2000 bytes'}
    # Larger than one job may be (MAX_CONTENT_LENGTH), within the batch's own limit.
    assert batch(client, [{'task': 'noop'}] * 100).status_code == 201


def test_idempotency_keys_hold_within_and_across_batches(client, app):
    first = batch(client, [{'task': 'noop', 'idempotency_key': 'a'},
                           {'task': 'noop', 'idempotency_key': 'b'},
                           {'task': 'sleep', 'idempotency_key': 'a'}])
    assert first.status_code == 201
    body = first.get_json()
    # The same key twice in one batch: one job, as if submitted one after the other.
    assert body['created'] == [True, True, False]
    assert body['jobs'][2]['id'] == body['jobs'][0]['id'] and body['jobs'][2]['task'] == 'noop'
    again = batch(client, [{'task': 'noop', 'idempotency_key': 'b'},
                           {'task': 'noop', 'idempotency_key': 'c'}])
    assert again.status_code == 201
    assert again.get_json()['created'] == [False, True]
    assert again.get_json()['jobs'][0]['id'] == body['jobs'][1]['id']
    single = post(client, {'task': 'noop', 'idempotency_key': 'c'})
    assert single.status_code == 200 and single.get_json()['id'] == again.get_json()['jobs'][1]['id']
    only_old = batch(client, [{'task': 'noop', 'idempotency_key': 'a'}])
    assert only_old.status_code == 200 and only_old.get_json()['created'] == [False]
    from app import broker
    with app.app_context():
        assert db.session.query(Job).count() == 3
    assert len(broker.message_ids('default')) == 3


def test_a_batch_the_broker_refuses_is_503_and_leaves_no_row(client, app):
    from app import broker
    with broker_locked():
        resp = batch(client, [{'task': 'noop'}, {'task': 'noop', 'delay': 60}])
    assert resp.status_code == 503
    assert resp.get_json()['error'].startswith('the job broker is unreachable')
    with app.app_context():
        assert db.session.query(Job).count() == 0
    assert broker.message_ids('default') == set()
    assert batch(client, [{'task': 'noop'}]).status_code == 201


@pytest.fixture
def mail_refused(tmp_path, monkeypatch):
    """``(app, client, refuse)``: queues default and mail, the broker refusing every call for
    mail (``refuse(queue, entries)`` is what it then does)."""
    return _mail_refused(tmp_path, monkeypatch)


def _mail_refused(tmp_path, monkeypatch, **config):
    from conftest import make_app

    from app import broker
    app = make_app(tmp_path, QUEUES='default,mail', **config)
    real = broker.put_prepared

    def refuse(queue, entries):
        if queue == 'mail':
            raise broker.BrokerUnavailable('the broker refused: down')
        return real(queue, entries)
    monkeypatch.setattr(broker, 'put_prepared', refuse)
    return app, app.test_client(), refuse


def test_a_batch_the_broker_refuses_part_way_takes_back_what_it_took(mail_refused):
    """Two queues, two round trips: the second refused, the first queue's messages withdrawn."""
    from app import broker
    app, client, _refuse = mail_refused
    resp = batch(client, [{'task': 'noop'}, {'task': 'noop'},
                          {'task': 'noop', 'queue': 'mail'}, {'task': 'noop', 'queue': 'mail'}])
    assert resp.status_code == 503
    with app.app_context():
        assert db.session.query(Job).count() == 0
    assert broker.message_ids('default') == set() and broker.message_ids('mail') == set()


def test_a_refused_submission_names_the_jobs_the_broker_may_still_hold(mail_refused,
                                                                        monkeypatch):
    """Refused part way, and the broker unreachable to take back what it took (a Redis
    that died after keeping the first round trip): the 503 no longer says "nothing was
    changed", and names the jobs that run if it kept them; the refused queue's too (a
    round trip may be refused part way)."""
    from app import broker
    app, client, refuse = mail_refused

    def unreachable(queue, job_ids):
        raise broker.BrokerUnavailable('unreachable')
    monkeypatch.setattr(broker, 'remove_waiting', unreachable)
    resp = batch(client, [{'task': 'noop'}, {'task': 'noop'},
                          {'task': 'noop', 'queue': 'mail'}, {'task': 'noop', 'queue': 'mail'}])
    assert resp.status_code == 503
    body = resp.get_json()
    assert body['error'] == ('the job broker is unreachable; no job was recorded, but if it took '
                             'the messages of the jobs in "unconfirmed" before it failed, they '
                             'run when it is back')
    assert len(body['unconfirmed']) == 4 == len(set(body['unconfirmed']))
    assert 'recorded' not in body
    assert broker.message_ids('default') <= set(body['unconfirmed'])
    assert len(broker.message_ids('default')) == 2
    with app.app_context():
        assert db.session.query(Job).count() == 0
    # One job alone, its broker call failing: the job named, as the broker may have run it.
    monkeypatch.setattr(broker, 'enqueue', lambda job, **kw: refuse('mail', []))
    resp = client.post('/api/jobs', json={'task': 'noop'})
    assert resp.status_code == 503 and len(resp.get_json()['unconfirmed']) == 1
    # The broker refusing with nothing handed over: nothing to name.
    monkeypatch.setattr(broker, 'remove_waiting', lambda queue, job_ids: set())
    resp = client.post('/api/jobs', json={'task': 'noop'})
    assert resp.status_code == 503 and 'unconfirmed' not in resp.get_json()
    assert 'nothing was changed' in resp.get_json()['error']


def test_a_keyed_job_the_broker_may_hold_is_recorded_and_runs_once(tmp_path, ledger_url,
                                                                    monkeypatch):
    """Refused part way with the withdrawal unreachable: the jobs with idempotency keys keep
    their rows (a key used twice in the batch, one job), so a retry with the key returns the
    job instead of making a second one beside a message the broker kept; the reconciler
    enqueues the one the broker does not hold and leaves the one it holds; a job without a
    key keeps no row."""
    from app import broker, jobs, reconcile
    from app.models import JobEvent
    app, client, _refuse = _mail_refused(tmp_path, monkeypatch, DATABASE_URL=ledger_url)

    def unreachable(queue, job_ids):
        raise broker.BrokerUnavailable('unreachable')
    monkeypatch.setattr(broker, 'remove_waiting', unreachable)
    resp = batch(client, [{'task': 'noop', 'idempotency_key': 'held'}, {'task': 'noop'},
                          {'task': 'noop', 'queue': 'mail', 'idempotency_key': 'lost'},
                          {'task': 'noop', 'queue': 'mail'},
                          {'task': 'noop', 'idempotency_key': 'held'}])
    assert resp.status_code == 503
    body = resp.get_json()
    assert body['error'] == (
        'the job broker is unreachable; the jobs in "recorded" (submitted with idempotency '
        'keys) were recorded and run once when it is back: submitting again with their keys '
        'returns them; no other job was recorded, but if it took the messages of the other '
        'jobs in "unconfirmed" before it failed, they run when it is back')
    held, plain, lost, _mail = body['unconfirmed']
    assert body['recorded'] == [held, lost]
    assert broker.message_ids('default') == {held, plain} and broker.message_ids('mail') == set()
    with app.app_context():
        rows = {j.id: (j.state, j.queue, j.idempotency_key, j.attempts)
                for j in db.session.query(Job)}
        assert rows == {held: ('queued', 'default', 'held', 0), lost: ('queued', 'mail', 'lost', 0)}
        events = {(e.job_id, e.kind, e.message) for e in db.session.query(JobEvent)}
        assert events == {(held, 'unconfirmed', jobs.UNCONFIRMED),
                          (lost, 'unconfirmed', jobs.UNCONFIRMED)}
    # The retry with a key gets the job, even with the broker still refusing.
    resp = client.post('/api/jobs', json={'task': 'noop', 'queue': 'mail',
                                          'idempotency_key': 'lost'})
    assert resp.status_code == 200 and resp.get_json()['id'] == lost
    # The broker back: the reconciler puts back what it does not hold, once.
    monkeypatch.undo()
    app.config.update(RECONCILE_GRACE=0.1, RECONCILE_INTERVAL=0)
    with app.app_context():
        r = reconcile.Reconciler()
        restored = []
        wait_for(lambda: restored.extend(r.run(app.config)) or
                 broker.message_ids('mail') == {lost}, timeout=20, message='restored')
        assert restored == [lost]
        assert broker.message_ids('default') == {held, plain}
        assert broker.hueys['default'].pending_count() == 2  # held's message not doubled
        assert [r.run(app.config) for _ in range(3)] == [[], [], []]


@pytest.mark.parametrize('path', ['/api/alerts', '/api/audit'])
@pytest.mark.parametrize('before', ['99999999999999999999999', str(2**63), '0', '-1', 'x'])
def test_a_page_cursor_out_of_a_row_ids_range_is_a_400_not_a_500(client, path, before):
    resp = client.get(f'{path}?before={before}')
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert 'before' in resp.get_json()['fields']


@pytest.mark.parametrize('path', ['/api/alerts', '/api/audit'])
def test_the_largest_row_id_is_a_cursor_like_any_other(client, path):
    assert client.get(f'{path}?before={2**63 - 1}').status_code == 200

"""Pages and fragments: rendering, escaping, forms that work without JavaScript."""
import datetime as dt
import json
import logging
import re
import traceback
import uuid

import sqlalchemy as sa
from werkzeug.datastructures import MultiDict

from app import live
from app.extensions import db
from app.models import Attempt, Job

XSS = '<script>alert(1)</script>'


def submit(client, **form):
    return client.post('/jobs', data=form)


def test_dashboard_lists_counts_form_and_recent_jobs(client):
    job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    html = client.get('/').get_data(as_text=True)
    assert 'id="queue-stats"' in html and 'id="submit-form"' in html
    assert f'id="job-{job["id"]}"' in html
    assert re.search(r'data-state="queued">1<', html)
    assert 'htmx-4.0.1.min.js' in html


def test_parameters_and_errors_are_escaped_everywhere(client, app):
    job = client.post('/api/jobs', json={'task': 'fail', 'params': {'message': XSS}}).get_json()
    with app.app_context():
        row = db.session.get(Job, job['id'])
        row.state, row.attempts, row.error = 'failed', 1, f'RuntimeError: {XSS}'
        db.session.add(Attempt(job_id=row.id, number=1, outcome='failed', error_type='RuntimeError',
                               error_message=XSS, traceback=f'Traceback...\nRuntimeError: {XSS}'))
        db.session.commit()
    for path in ('/', '/jobs', f'/jobs/{job["id"]}', f'/jobs/{job["id"]}/row',
                 f'/jobs/{job["id"]}/attempts', f'/jobs?q={XSS}'):
        html = client.get(path).get_data(as_text=True)
        assert XSS not in html, path
        assert '&lt;script&gt;alert(1)&lt;/script&gt;' in html, path


def test_form_submission_redirects_to_the_job(client, app):
    resp = submit(client, task='sleep', **{'params.seconds': '2', 'params.steps': '4'})
    assert resp.status_code == 303
    job_id = resp.headers['Location'].rsplit('/', 1)[1]
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert (job.task, job.params) == ('sleep', {'seconds': 2.0, 'steps': 4})
    page = client.get(resp.headers['Location']).get_data(as_text=True)
    assert f'Submitted sleep job {job_id[:8]}' in page


def test_bad_form_rerenders_with_messages_by_the_fields(client, app):
    resp = submit(client, task='sleep', priority='900', **{'params.seconds': '-3', 'params.steps': 'x'})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert '<p class="error" id="e-seconds">seconds must be at least 0</p>' in html
    assert '<p class="error" id="e-steps">steps must be a whole number</p>' in html
    assert 'priority must be at most 100' in html
    assert 'value="-3"' in html  # what was typed stays in the field
    with app.app_context():
        assert db.session.query(Job).count() == 0


def test_htmx_form_errors_return_just_the_form(client):
    resp = client.post('/jobs', data={'task': 'sleep', 'params.steps': '0'},
                       headers={'HX-Request': 'true'})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert html.lstrip().startswith('<form id="submit-form"') and '<html' not in html


def test_htmx_dashboard_submit_returns_a_fresh_form(client):
    resp = client.post('/jobs', data={'task': 'noop', 'stay': '1'}, headers={'HX-Request': 'true'})
    assert resp.status_code == 201
    assert 'Submitted noop job' in resp.get_data(as_text=True)


def test_task_fields_follow_the_declaration(client):
    html = client.get('/jobs/new/fields?task=payment').get_data(as_text=True)
    assert 'name="params.amount"' in html and 'min="0.01"' in html
    assert '<option value="GBP"' in html
    page = client.get('/jobs/new?task=flaky').get_data(as_text=True)
    assert 'name="params.failures"' in page and 'name="params.seconds"' not in page


def test_actions_appear_only_where_the_state_allows(client, app):
    job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    html = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    assert f'/jobs/{job["id"]}/cancel' in html
    assert f'/jobs/{job["id"]}/retry' not in html and f'/jobs/{job["id"]}/delete' not in html
    resp = client.post(f'/jobs/{job["id"]}/cancel')
    assert resp.status_code == 303
    html = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    assert f'/jobs/{job["id"]}/retry' in html and f'/jobs/{job["id"]}/delete' in html
    assert client.post(f'/jobs/{job["id"]}/delete', data={'confirmed': '1'}).status_code == 303
    assert client.get(f'/jobs/{job["id"]}').status_code == 404


def test_conflicting_action_is_a_409_page(client):
    job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    resp = client.post(f'/jobs/{job["id"]}/retry')
    assert resp.status_code == 409
    assert 'cannot retry a queued job' in resp.get_data(as_text=True)


def test_not_found_is_a_page_or_a_fragment_for_htmx(client):
    page = client.get('/jobs/nope')
    assert page.status_code == 404 and '<html' in page.get_data(as_text=True)
    fragment = client.get('/jobs/nope/summary', headers={'HX-Request': 'true'})
    assert fragment.status_code == 404 and '<html' not in fragment.get_data(as_text=True)


def test_job_list_filters_and_pages_without_javascript(client):
    for _ in range(3):
        client.post('/api/jobs', json={'task': 'noop'})
    client.post('/api/jobs', json={'task': 'sleep'})
    html = client.get('/jobs?task=sleep').get_data(as_text=True)
    assert html.count('<tr id="job-') == 1
    client.application.config['PAGE_SIZE'] = 2
    first = client.get('/jobs').get_data(as_text=True)
    assert first.count('<tr id="job-') == 2
    older = re.search(r'href="(/jobs\?cursor=[^"]+)"', first).group(1)
    second = client.get(older.replace('&amp;', '&')).get_data(as_text=True)
    assert second.count('<tr id="job-') == 2
    assert set(re.findall(r'<tr id="job-([^"]+)"', first)).isdisjoint(
        re.findall(r'<tr id="job-([^"]+)"', second))



# -- rows written straight into the ledger never break a page ---------------------

BIG = 10 * 1024 * 1024


def _insert(app, table, values, json=(), raw=None):
    """Insert a row as it is: ``json`` columns cast for PostgreSQL, ``raw`` ones as SQL."""
    postgres = db.engine.dialect.name == 'postgresql'
    columns, exprs = list(values), []
    for name in values:
        exprs.append(f'CAST(:{name} AS json)' if name in json and postgres else f':{name}')
    for name, sql in (raw or {}).items():
        columns.append(name)
        exprs.append(sql)
    with db.engine.begin() as conn:
        conn.execute(sa.text(f'INSERT INTO {table} ({", ".join(columns)}) '
                             f'VALUES ({", ".join(exprs)})'), values)


def _job(**values):
    now = dt.datetime(2026, 1, 1, 12, 0, 0)
    row = {'id': str(uuid.uuid4()), 'task': 'fail', 'queue': 'default', 'params': '{}',
           'state': 'failed', 'priority': 0, 'attempts': 1, 'attempt_base': 0, 'retries': 0,
           'retry_delay': 0.0, 'created_at': now, 'updated_at': now, 'finished_at': now,
           'version': 2, 'error_type': 'RuntimeError'}
    row.update(values)
    return row


def poison(app):
    """Write rows no application path writes; return their job ids."""
    ids = []
    with app.app_context():
        # JSON escapes of a lone surrogate and of NUL are valid JSON, even to
        # PostgreSQL; 10 MB of text; an RTL override.
        row = _job(params='{"message": "\\ud800", "nul": "\\u0000"}',
                   result='{"r": "\\udfff"}', error='RuntimeError: \u202eevil ' + 'é' * BIG)
        _insert(app, 'job', row, json=('params', 'result'))
        _insert(app, 'attempt', {'job_id': row['id'], 'number': 1, 'outcome': 'failed',
                                 'error_type': 'RuntimeError', 'error_message': 'x' * BIG,
                                 'traceback': 'Traceback\n' + 'y' * BIG})
        _insert(app, 'attempt_log', {'job_id': row['id'], 'number': 1, 'level': 'INFO',
                                     'at': dt.datetime(2026, 1, 1),
                                     'message': '\u202eevil\u202c ' + 'z' * BIG})
        ids.append(row['id'])
        succeeded = _job(state='succeeded', result='{"big": "' + 'r' * BIG + '"}')
        _insert(app, 'job', succeeded, json=('params', 'result'))
        ids.append(succeeded['id'])
        # Numbers JSON cannot carry: NaN and infinities in float columns, a
        # number past a float's range in the parameters.
        nan, inf = (("CAST('NaN' AS float)", "CAST('-Infinity' AS float)")
                    if db.engine.dialect.name == 'postgresql' else ('9e999', '-9e999'))
        numbers = _job(state='running', finished_at=None, params='{"n": 1e999}')
        del numbers['retry_delay']
        _insert(app, 'job', numbers, json=('params',),
                raw={'progress': nan, 'retry_delay': inf})
        _insert(app, 'attempt', {'job_id': numbers['id'], 'number': 1, 'outcome': 'failed'},
                raw={'duration': inf})
        ids.append(numbers['id'])
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        _insert(app, 'worker', {'id': 'host:1', 'host': 'host', 'pid': 1, 'concurrency': 1,
                                'started_at': now, 'last_seen': now, 'processed': 0,
                                'failed': 0, 'leader': False,
                                'queues': '["default", "\\ud800"]', 'current': '["\\u0000"]'},
                json=('queues', 'current'))
        if db.engine.dialect.name == 'sqlite':
            # SQLite keeps whatever it is given: text that is not JSON, text
            # that is not UTF-8 (a surrogate's CESU-8 bytes among it), BLOBs.
            bad = _job()
            del bad['params']
            _insert(app, 'job', bad, raw={'params': "'{not json'",
                                          'error': "CAST(x'eda080ff41' AS TEXT)"})
            ids.append(bad['id'])
            blob = _job(state='scheduled', scheduled_for=dt.datetime(2030, 1, 1),
                        finished_at=None)
            del blob['params']
            _insert(app, 'job', blob, raw={'params': "x'7b226d223a2022c3a9227d'",
                                           'result': "x'c3'", 'error': "x'ff00'",
                                           'worker': "x'ff'"})
            ids.append(blob['id'])
            _insert(app, 'worker', {'id': 'host:2', 'host': 'host', 'pid': 2,
                                    'concurrency': 1, 'started_at': now, 'last_seen': now,
                                    'processed': 0, 'failed': 0, 'leader': False},
                    raw={'queues': "'[not json'", 'current': "x'ff'"})
    return ids


PAGES = ('/', '/jobs', '/jobs?state=failed', '/jobs?q=evil', '/failures', '/scheduled',
         '/workers', '/periodic', '/queues', '/stats')
APIS = ('/api/jobs', '/api/jobs?q=%C3%A9', '/api/failures', '/api/scheduled', '/api/workers',
        '/api/stats', '/api/queues', '/api/periodic')


def test_pages_fragments_and_api_answer_with_poisoned_rows_in_the_ledger(ledger_client):
    app, client = ledger_client
    ids = poison(app)
    paths = list(PAGES) + list(APIS)
    for job_id in ids:
        paths += [f'/jobs/{job_id}', f'/jobs/{job_id}/row', f'/jobs/{job_id}/summary',
                  f'/jobs/{job_id}/attempts', f'/api/jobs/{job_id}', f'/api/jobs/{job_id}/log']
    for path in paths:
        resp = client.get(path)
        assert resp.status_code == 200, (path, resp.get_data(as_text=True)[:500])
        body = resp.get_data().decode('utf-8')
        if path.startswith('/api/'):
            json.loads(body, parse_constant=_not_json)  # strict: no NaN, no Infinity
        assert 'data-unreadable' not in resp.get_data(as_text=True), path
    job_page = client.get(f'/jobs/{ids[0]}').get_data(as_text=True)
    assert '\\ud800' in job_page and '\\x00' in job_page  # escaped, shown
    assert 'more characters: see the API' in job_page  # 10 MB cut for the page
    api = client.get(f'/api/jobs/{ids[0]}').get_json()
    assert api['params'] == {'message': '\\ud800', 'nul': '\\x00'}
    assert len(api['attempts'][0]['error_message']) == BIG  # the API has all of it


def _not_json(literal):
    raise AssertionError(f'{literal} is not JSON')


def test_numbers_json_cannot_carry_read_back_as_strings(ledger_client):
    app, client = ledger_client
    numbers = poison(app)[2]
    job = client.get(f'/api/jobs/{numbers}').get_json()
    assert job['params'] == {'n': '1e999'}
    assert job['retry_delay'] == '-Infinity'
    assert job['attempts'][0]['duration'] == '-Infinity'


def test_live_views_render_with_poisoned_rows_in_the_ledger(ledger_client):
    app, _ = ledger_client
    ids = poison(app)
    views = [{'view': 'dashboard'}, {'view': 'jobs'}, {'view': 'jobs', 'q': 'evil'},
             {'view': 'workers'}, {'view': 'failures'}, {'view': 'scheduled'}]
    views += [{'view': 'job', 'id': job_id} for job_id in ids]
    for args in views:
        with app.test_request_context('/ws', query_string=args) as ctx:
            key, factory = live.view_for(args, app.config)
            html = factory(key, ctx.request.environ).render_html()
        html.encode('utf-8')
        assert 'data-unreadable' not in html, args


def test_a_row_that_cannot_be_rendered_costs_that_row_only(client, app, caplog):
    good = client.post('/api/jobs', json={'task': 'noop'}).get_json()['id']
    with app.app_context():
        bad = _job(state='failed')
        del bad['retries']
        _insert(app, 'job', bad, raw={'retries': "'many'"})  # SQLite keeps text anywhere
    with caplog.at_level(logging.ERROR, logger='app.templating'):
        for path in ('/', '/jobs', f'/jobs/{bad["id"]}/row'):
            resp = client.get(path)
            html = resp.get_data(as_text=True)
            assert resp.status_code == 200, path
            placeholder = re.search(rf'<tr id="job-{bad["id"]}" class="unreadable"[^>]*>(.*?)</tr>',
                                    html, re.S)
            assert placeholder, path
            assert f'href="/jobs/{bad["id"]}"' in placeholder.group(1)
            if path != f'/jobs/{bad["id"]}/row':
                assert f'<tr id="job-{good}" data-state="queued"' in html, path
        page = client.get(f'/jobs/{bad["id"]}')
        assert page.status_code == 200
        assert f'id="job-{bad["id"]}-summary" class="unreadable"' in page.get_data(as_text=True)
    assert any('could not be rendered' in r.getMessage() and r.exc_info for r in caplog.records)


# -- lists, actions, truthful pages --------------------------------------------

def test_the_options_open_on_their_own_errors_and_stay_folded_otherwise(client):
    for headers in ({}, {'HX-Request': 'true'}):  # without JavaScript, and swapped by htmx
        html = submit(client, task='noop', delay='99999999', queue='default').get_data(as_text=True)
        assert re.search(r'<details class="options" open>', html), headers
        assert 'openopen' not in html and 'delay must be at most' in html
    # An error elsewhere, with the options as the form sends them (empty, the first queue).
    html = submit(client, task='sleep', queue='default', delay='', priority='',
                  **{'params.steps': '0'}).get_data(as_text=True)
    assert '<details class="options">' in html
    assert '<details class="options">' in client.get('/jobs/new').get_data(as_text=True)


def test_periodic_task_types_are_offered_apart_under_their_label(client):
    html = client.get('/jobs/new').get_data(as_text=True)
    group = re.search(r'<optgroup label="periodic — normally started on schedule">(.*?)</optgroup>',
                      html, re.S)
    assert group and re.findall(r'value="(\w+)"', group.group(1)) == ['purge', 'report']
    before = html[:group.start()]
    assert 'value="sleep"' in before and 'value="purge"' not in before


def test_the_jobs_list_counts_its_filter_and_sorts_with_cursors(client, app):
    ids = [client.post('/api/jobs', json={'task': 'noop'}).get_json()['id'] for _ in range(3)]
    client.post('/api/jobs', json={'task': 'fail'})
    html = client.get('/jobs?task=noop').get_data(as_text=True)
    assert re.search(r'id="job-count"[^>]*data-count="3"', html)
    assert '<strong>3</strong> jobs match these filters' in html
    html = client.get('/jobs?task=fail').get_data(as_text=True)
    assert '<strong>1</strong> job matches these filters' in html
    app.config['PAGE_SIZE'] = 2
    html = client.get('/jobs?task=noop&sort=oldest').get_data(as_text=True)
    assert re.findall(r'<tr id="job-([0-9a-f-]{36})"', html) == ids[:2]
    assert '3</strong> jobs match these filters; 2 on this page' in html
    assert '<option value="oldest" selected>' in html
    nxt = re.search(r'rel="next" href="([^"]+)"', html).group(1).replace('&amp;', '&')
    assert 'sort=oldest' in nxt and 'task=noop' in nxt
    html = client.get(nxt).get_data(as_text=True)
    assert re.findall(r'<tr id="job-([0-9a-f-]{36})"', html) == ids[2:]
    assert client.get('/jobs?sort=sideways').status_code == 400
    assert 'sort must be one of' in client.get('/jobs?sort=sideways').get_data(as_text=True)
    # A short search is listed but not counted.
    assert 'total not counted for this search' in client.get('/jobs?q=no').get_data(as_text=True)


def test_a_search_with_many_candidates_pages_a_window_at_a_time_and_says_how_far(
        client, app, monkeypatch):
    from app import queries
    made = []  # oldest first
    for message in ('needle 1', None, 'needle 2', None, 'needle 3', 'needle 4'):
        body = {'task': 'fail', 'params': {'message': message}} if message else {'task': 'noop'}
        made.append(client.post('/api/jobs', json=body).get_json()['id'])
    monkeypatch.setattr(queries, 'CANDIDATES', 2)  # four candidates: too many to list at once
    monkeypatch.setattr(queries, 'PENDING_CANDIDATES', 2)  # (SQLite: none indexed yet)
    monkeypatch.setattr(queries, 'SEARCH_WINDOW', 3)
    html = client.get('/jobs?q=needle').get_data(as_text=True)
    # The newest three jobs hold two matches: both, newest first, and how far it looked.
    assert re.findall(r'<tr id="job-([0-9a-f-]{36})"', html) == [made[5], made[4]]
    assert 'Searched the jobs created back to' in html
    assert 'total not counted for this search' in html
    nxt = re.search(r'rel="next" href="([^"]+)"', html).group(1).replace('&amp;', '&')
    html = client.get(nxt).get_data(as_text=True)
    assert re.findall(r'<tr id="job-([0-9a-f-]{36})"', html) == [made[2], made[0]]
    # With the cap above the candidates, one page from the whole ledger, counted.
    monkeypatch.setattr(queries, 'CANDIDATES', 4)
    monkeypatch.setattr(queries, 'PENDING_CANDIDATES', len(made))
    html = client.get('/jobs?q=needle').get_data(as_text=True)
    assert re.findall(r'<tr id="job-([0-9a-f-]{36})"', html) == [made[5], made[4], made[2],
                                                                  made[0]]
    assert '<strong>4</strong> jobs match these filters' in html
    assert 'Searched the jobs created' not in html



def test_a_run_time_search_with_many_candidates_says_how_far_down_it_looked(
        client, app, monkeypatch):
    from app import queries
    # Longest run first: a match, two other jobs, then three matches.
    texts = ('needle a', 'hay', 'hay', 'needle d', 'needle e', 'needle f')
    ids = []
    with app.app_context():
        for n, message in enumerate(texts):
            row = _job(error=f'RuntimeError: {message}', run_seconds=9.0 - n)
            _insert(app, 'job', row, json=('params', 'result'))
            ids.append(row['id'])
    monkeypatch.setattr(queries, 'CANDIDATES', 2)  # four candidates: too many to list at once
    monkeypatch.setattr(queries, 'PENDING_CANDIDATES', 2)  # (SQLite: none indexed yet)
    monkeypatch.setattr(queries, 'RUN_CANDIDATES', 2)
    monkeypatch.setattr(queries, 'DENSE_WINDOW', 1)
    monkeypatch.setattr(queries, 'SCAN_WINDOW', 3)
    html = client.get('/jobs?q=needle&sort=runtime').get_data(as_text=True)
    # The three longest runs hold one match; the page says how far down it looked.
    assert re.findall(r'<tr id="job-([0-9a-f-]{36})"', html) == [ids[0]]
    assert 'Searched the jobs whose latest run took 7.00 s or longer; shorter » searches ' \
           'further.' in html
    assert 'Searched the jobs created' not in html
    nxt = re.search(r'rel="next" href="([^"]+)"', html).group(1).replace('&amp;', '&')
    html = client.get(nxt).get_data(as_text=True)
    assert re.findall(r'<tr id="job-([0-9a-f-]{36})"', html) == ids[3:]


def test_attempts_read_as_they_are(app, client):
    with app.app_context():
        first = _job(state='succeeded', attempts=1, retries=2)
        third = _job(state='succeeded', attempts=3, retries=2)
        waiting = _job(state='retrying', attempts=1, retries=3)
        for row in (first, third, waiting):
            _insert(app, 'job', row)
    html = client.get('/jobs').get_data(as_text=True)

    def cell(row):
        return re.search(rf'id="job-{row["id"]}".*?<td class="num attempts" data-label="Attempts">(.*?)</td>',
                         html, re.S).group(1)
    assert '1/3' not in html
    assert re.fullmatch(r'<span class="muted" title="1 attempt made; up to 3 allowed"></span>',
                        cell(first))
    assert '>3 attempts<' in cell(third)
    assert '>attempt 2 of 4<' in cell(waiting)


def test_bulk_confirmations_name_the_filter_or_the_jobs_and_the_count(client, app):
    ids = [client.post('/api/jobs', json={'task': 'noop'}).get_json()['id'] for _ in range(12)]
    html = client.post('/jobs/bulk', data={'action': 'cancel', 'scope': 'filter',
                                           'f.task': 'noop', 'f.state': 'queued'}
                       ).get_data(as_text=True)
    assert '<h1 id="confirm-title">Cancel 12 jobs?</h1>' in html
    assert '<dt>state</dt><dd>queued</dd>' in html and '<dt>task</dt><dd>noop</dd>' in html
    assert re.search(r'<button class="btn btn-danger btn-destructive" type="submit">Cancel 12 jobs'
                     r'</button>\s*<a class="btn btn-safe" href="/jobs\?', html)
    html = client.post('/jobs/bulk', data={'action': 'cancel', 'scope': 'filter'}
                       ).get_data(as_text=True)
    assert 'none: every job in the ledger' in html
    html = client.post('/jobs/bulk', data=MultiDict([('action', 'cancel'), ('scope', 'selected')]
                                                    + [('ids', i) for i in ids])
                       ).get_data(as_text=True)
    assert '<h1 id="confirm-title">Cancel 12 jobs?</h1>' in html
    named = re.findall(r'<a class="mono" href="/jobs/([0-9a-f-]{36})">', html)
    assert named == ids[:10] and '>and 2 more</li>' in html
    # A searched filter is shown as text, escaped.
    html = client.post('/jobs/bulk', data={'action': 'delete', 'scope': 'filter', 'f.q': XSS}
                       ).get_data(as_text=True)
    assert XSS not in html and '&lt;script&gt;' in html


def test_a_bulk_action_confirmed_for_n_jobs_never_takes_more(client, app):
    for _ in range(3):
        client.post('/api/jobs', json={'task': 'noop', 'delay': 3600})
    form = {'action': 'cancel', 'scope': 'filter', 'f.task': 'noop', 'f.state': 'scheduled'}
    html = client.post('/jobs/bulk', data=form).get_data(as_text=True)
    assert '<input type="hidden" name="expected" value="3">' in html
    # Two more come to match while the question is on screen.
    later = [client.post('/api/jobs', json={'task': 'noop', 'delay': 3600}).get_json()['id']
             for _ in range(2)]
    again = client.post('/jobs/bulk', data={**form, 'expected': '3', 'confirmed': '1'})
    html = again.get_data(as_text=True)
    assert again.status_code == 200 and '<h1 id="confirm-title">Cancel 5 jobs?</h1>' in html
    assert 'The filter matched 3 when you confirmed; it matches 5 now' in html
    assert all(client.get(f'/api/jobs/{i}').get_json()['state'] == 'scheduled' for i in later)
    done = client.post('/jobs/bulk', data={**form, 'expected': '5', 'confirmed': '1'})
    assert done.status_code == 303
    assert all(client.get(f'/api/jobs/{i}').get_json()['state'] == 'canceled' for i in later)
    # A range of finish times is named in the question too.
    html = client.post('/jobs/bulk', data={'action': 'delete', 'scope': 'filter',
                                           'f.finished_from': '2026-01-01T00:00:00Z'}
                       ).get_data(as_text=True)
    assert '<dt>finished from</dt>' in html and 'none: every job in the ledger' not in html


def test_a_single_delete_without_javascript_asks_first(client, app):
    job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    client.post(f'/jobs/{job["id"]}/cancel')
    page = client.post(f'/jobs/{job["id"]}/delete')
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and '<h1 id="confirm-title">Delete 1 job?</h1>' in html
    assert f'action="/jobs/{job["id"]}/delete"' in html and 'name="confirmed" value="1"' in html
    assert f'<a class="btn btn-safe" href="/jobs/{job["id"]}">Keep it</a>' in html
    assert client.get(f'/jobs/{job["id"]}').status_code == 200  # not deleted yet
    assert client.post(f'/jobs/{job["id"]}/delete', data={'confirmed': '1'}).status_code == 303
    assert client.get(f'/jobs/{job["id"]}').status_code == 404
    # A job whose state forbids it is refused, not asked about.
    running = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    assert client.post(f'/jobs/{running["id"]}/delete').status_code == 409


def test_queues_say_who_serves_them_and_how_long_the_oldest_job_waited(tmp_path):
    from conftest import make_app

    from app.models import Worker, utcnow
    app = make_app(tmp_path, QUEUES=['default', 'reports'])
    client = app.test_client()
    old = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    with app.app_context():
        now = utcnow()
        db.session.execute(sa.update(Job).where(Job.id == old['id']).values(
            updated_at=now - dt.timedelta(seconds=130)))
        db.session.add(Worker(id='host:7-1', host='host', pid=7, queues=['reports'],
                              concurrency=1, started_at=now, last_seen=now, current=[]))
        db.session.commit()
    html = client.get('/queues').get_data(as_text=True)
    default = re.search(r'<tr id="queue-default".*?</tr>', html, re.S).group(0)
    reports = re.search(r'<tr id="queue-reports".*?</tr>', html, re.S).group(0)
    assert 'data-consumers="0"' in default and 'no consumer online' in default
    assert '>running<' not in html
    assert re.search(r'class="num latency" data-seconds="13\d\.\d" data-label="Latency">2m 1\d', default), default
    assert 'data-consumers="1"' in reports and '>served<' in reports and 'host:7-1' in reports
    assert 'Waiting in Huey' not in html and 'Broker messages' in html
    assert re.search(r'<abbr title="Depth: messages in the broker', html)

# -- times and the job page --

def _ended(app, job_id, state, error_type=None, message=None, outcome=None, traceback=None,
           ran=2.5, **values):
    """Give job ``job_id`` one attempt that ran ``ran`` s and ended as told."""
    with app.app_context():
        row = db.session.get(Job, job_id)
        finished = dt.datetime.utcnow().replace(microsecond=0) - dt.timedelta(minutes=3)
        started = finished - dt.timedelta(seconds=ran)
        row.state, row.attempts, row.started_at, row.finished_at = state, 1, started, finished
        row.run_seconds = ran  # as the ledger's writer keeps it
        row.error_type = error_type
        row.error = (f'{error_type}: {message}' if message else error_type) if error_type else None
        for key, value in values.items():
            setattr(row, key, value)
        db.session.add(Attempt(job_id=job_id, number=1, outcome=outcome or state, started_at=started,
                               finished_at=finished, duration=ran, error_type=error_type,
                               error_message=message, traceback=traceback))
        db.session.commit()
        return started, finished


def test_times_read_relative_with_the_exact_utc_time_for_hover_and_screen_readers(client, app):
    job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    started, finished = _ended(app, job['id'], 'succeeded', result={'ok': True})
    exact = finished.strftime('%Y-%m-%d %H:%M:%S')
    stamp = (f'<time datetime="{finished.isoformat()}Z" title="{exact} UTC" data-relative>'
             f'<span class="ago">3 min ago</span><span class="sr-only"> ({exact} UTC)</span></time>')
    page = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    assert f'<dt>Finished</dt><dd>{stamp}</dd>' in page
    assert '<dt>Run time</dt><dd class="run-time">2.50 s</dd>' in page
    assert '<span class="muted run-time">ran 2.50 s</span>' in page
    for path in ('/jobs', f'/jobs/{job["id"]}/row', '/'):
        html = client.get(path).get_data(as_text=True)
        assert f'<td class="finished" data-label="Finished">{stamp}</td>' in html, path
        assert '<td class="num run-time" data-label="Run time">2.50 s</td>' in html, path
    assert '<th>Finished</th><th class="num">Run time</th>' in client.get('/jobs').get_data(as_text=True)


def test_a_running_job_shows_its_clock_from_its_start(client, app):
    job = client.post('/api/jobs', json={'task': 'sleep'}).get_json()
    with app.app_context():
        row = db.session.get(Job, job['id'])
        start = dt.datetime.utcnow().replace(microsecond=0) - dt.timedelta(seconds=75)
        row.state, row.attempts, row.started_at = 'running', 1, start
        db.session.add(Attempt(job_id=row.id, number=1, outcome='running', started_at=start))
        db.session.commit()
    clock = re.compile(r'<span class="elapsed" data-since="' + re.escape(start.isoformat() + 'Z')
                       + r'" title="running since [^"]+ UTC">1m 1[5-9]s</span>')
    page = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    assert re.search(r'<dt>Running for</dt><dd>' + clock.pattern, page)
    assert re.search(r'running for ' + clock.pattern, page)  # the attempt
    assert re.search(r'<td class="num run-time" data-label="Run time">' + clock.pattern, client.get('/jobs').get_data(as_text=True))


def _real_traceback():
    def hook(obj):
        raise KeyError('no field a')
    try:
        json.loads('{"a": 1}', object_hook=hook)
    except KeyError as exc:
        return ''.join(traceback.format_exception(exc))


def test_a_failed_job_shows_its_own_frames_first_and_folds_the_rest(client, app):
    job = client.post('/api/jobs', json={'task': 'fail', 'params': {'message': 'x' * 300}}).get_json()
    tb = _real_traceback()
    _ended(app, job['id'], 'failed', 'KeyError', "'no field a'", traceback=tb)
    page = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    own, _, rest = page.partition('<details class="tb-folded">')
    own = own[own.index('<div class="tb">'):]
    assert 'in <code>hook</code>' in own and 'in <code>_real_traceback</code>' in own
    assert 'json' not in own.replace('json.loads', '')  # the standard library's frames are folded
    assert re.match(r'<summary>\d+ framework frames? \(Huey, queue-manager, libraries\)</summary>', rest)
    assert 'json/__init__.py' in rest.split('</details>')[0]
    assert '<pre class="tb-exception">KeyError: &#39;no field a&#39;</pre>' in rest
    dom_id = f'traceback-{job["id"]}-1'
    assert f'<pre class="traceback" id="{dom_id}" tabindex="0">' in rest  # as printed, folded
    assert re.search(r'<button type="button" class="btn btn-copy" hidden aria-label="Copy the '
                     r'traceback"\s+data-copy-target="' + dom_id + '">Copy</button>', page)
    # the latest attempt's traceback is open; text that does not parse is shown as it is
    assert '<details class="attempt-traceback" open>' in page


def test_a_traceback_that_does_not_parse_is_shown_as_it_is(client, app):
    job = client.post('/api/jobs', json={'task': 'fail'}).get_json()
    _ended(app, job['id'], 'failed', 'RuntimeError', 'boom',
           traceback='Traceback (most recent call last):\n… [90,000 characters, cut] …\nRuntimeError: boom')
    page = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    assert (f'<pre class="traceback" id="traceback-{job["id"]}-1" tabindex="0">Traceback (most recent call last):\n'
            '… [90,000 characters, cut] …\nRuntimeError: boom</pre>') in page
    assert 'tb-folded' not in page and 'tb-raw' not in page


def test_cancels_timeouts_and_lost_attempts_read_in_an_operators_words(client, app):
    cases = [('canceled', 'app.task_api.Canceled', 'canceled by an operator at 40% (step 4)',
              'canceled', 'Canceled by an operator at 40% (step 4)'),
             ('failed', 'huey.exceptions.TaskTimeout', 'timeout 2.0s', 'timeout',
              'Timed out after 2 s'),
             ('failed', 'WorkerLost', 'worker h:1-2 died (its lease ran out)', 'lost',
              'Lost: worker h:1-2 died (its lease ran out)')]
    for state, etype, message, outcome, words in cases:
        job = client.post('/api/jobs', json={'task': 'sleep'}).get_json()
        _ended(app, job['id'], state, etype, message, outcome=outcome)
        raw = f'{etype}: {message}'
        shown = f'title="{raw}">{words}</bdi>'
        page = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
        heading = 'How it ended' if state == 'canceled' else 'Last error'
        assert f'<strong>{heading}</strong> <bdi class="ending ending-{outcome}" {shown}' in page
        assert f'<p class="attempt-error"><bdi class="ending ending-{outcome}" {shown}' in page
        row = client.get(f'/jobs/{job["id"]}/row').get_data(as_text=True)
        assert f'<td class="error-cell" data-label="Last error"><bdi class="ending ending-{outcome}" title="{raw}">' in row
        # the API keeps what is stored
        api = client.get(f'/api/jobs/{job["id"]}').get_json()
        assert (api['error'], api['attempts'][0]['error']) == (raw, raw)


def test_the_job_page_offers_copy_buttons_for_id_parameters_and_result(client, app):
    job = client.post('/api/jobs', json={'task': 'fail', 'params': {'message': XSS}}).get_json()
    _ended(app, job['id'], 'succeeded', result={'answer': XSS})
    page = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    buttons = dict(re.findall(r'<button type="button" class="btn btn-copy" hidden aria-label="([^"]+)"'
                              r'\s+(data-copy-(?:text|target)="[^"]*")>Copy</button>', page))
    assert buttons == {
        'Copy the job id': f'data-copy-text="{job["id"]}"',
        'Copy the parameters as JSON': 'data-copy-text="{\n  &#34;message&#34;: '
                                       '&#34;&lt;script&gt;alert(1)&lt;/script&gt;&#34;\n}"',
        'Copy the result': f'data-copy-target="result-{job["id"]}"'}
    assert f'<pre class="result" id="result-{job["id"]}" tabindex="0">' in page
    assert 'times.js' in page and 'copy.js' in page


def test_job_list_keeps_its_finished_range_through_paging_and_refuses_a_bad_one(client, app):
    base = dt.datetime(2026, 3, 1, 12, 0)
    with app.app_context():
        db.session.add_all(Job(id=str(uuid.uuid4()), task='noop', queue='default', params={},
                               state='succeeded', retries=0, retry_delay=1.0,
                               created_at=base + dt.timedelta(seconds=i), updated_at=base,
                               finished_at=base + dt.timedelta(minutes=1 if i < 55 else 30))
                           for i in range(60))
        db.session.commit()
    html = client.get('/jobs?finished_from=2026-03-01T12:00:00Z&finished_to=2026-03-01T12:10:00Z'
                      ).get_data(as_text=True)
    assert html.count('data-state="succeeded"') == 50
    older = re.search(r'<a rel="next" href="([^"]+)"', html).group(1).replace('&amp;', '&')
    assert 'finished_from=2026-03-01T12:00:00Z' in older
    assert 'finished_to=2026-03-01T12:10:00Z' in older
    assert '<input type="hidden" name="finished_from" value="2026-03-01T12:00:00Z">' in html
    assert html.count('name="f.finished_to"') == 1  # a bulk action by filter keeps it too
    assert client.get(older).get_data(as_text=True).count('data-state="succeeded"') == 5
    resp = client.get('/jobs?finished_from=<b>noon</b>')
    assert resp.status_code == 400
    body = resp.get_data(as_text=True)
    assert 'finished_from must be an ISO 8601 time' in body and '<b>noon' not in body


def test_a_task_changed_without_javascript_ignores_the_fields_left_by_the_one_before(client):
    # The form showed sleep's fields; noop was chosen without "Show its parameters".
    resp = submit(client, task='noop', **{'params.seconds': '1', 'params.steps': '10'})
    assert resp.status_code == 303, resp.get_data(as_text=True)
    job = client.get('/api/jobs?task=noop').get_json()['jobs'][0]
    assert job['params'] == {}
    # Its own fields still count, wrong ones refused and named as the form names them.
    resp = submit(client, task='fail', **{'params.seconds': '1', 'params.message': 'x' * 501})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 400 and 'unknown parameter' not in html
    assert 'name="params.message"' in html and 'name="params.seconds"' not in html
    # The API names an unknown parameter as before.
    api = client.post('/api/jobs', json={'task': 'noop', 'params': {'seconds': 1}})
    assert api.status_code == 400 and api.get_json()['fields'] == {'params.seconds': 'unknown parameter'}


def test_the_workers_page_marks_one_leader_the_one_heard_from_last(client, app):
    # A leader killed outright keeps its flag until it is seen offline; its
    # successor already leads.
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    for name, ago in (('host:dead', 6), ('host:new', 1), ('host:plain', 0)):
        with app.app_context():
            _insert(app, 'worker', {'id': name, 'host': 'host', 'pid': 1, 'concurrency': 1,
                                    'started_at': now - dt.timedelta(minutes=5),
                                    'last_seen': now - dt.timedelta(seconds=ago), 'processed': 0,
                                    'failed': 0, 'leader': name != 'host:plain',
                                    'queues': '["default"]', 'current': '[]'},
                    json=('queues', 'current'))
    html = client.get('/workers').get_data(as_text=True)
    badges = re.findall(r'<td class="mono" data-label="Consumer">([^<]+) <span class="badge '
                        r'badge-scheduled"[^>]*>leader</span>', html)
    assert badges == ['host:new']

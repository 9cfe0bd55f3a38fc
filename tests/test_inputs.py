"""Input at the edge: text that cannot be stored is refused, naming the field, and nothing is written.

In-process on the embedded broker (no consumer), on SQLite and PostgreSQL.
"""
import json
import re

import pytest
import sqlalchemy as sa

from app import broker, catalog
from app.extensions import db
from app.models import Job

# The reproducer, byte for byte: a JSON escape of a lone surrogate.
SURROGATE_BODY = b'{"task":"fail","params":{"message":"\\ud800"},"delay":3600}'


def counts(app):
    """Jobs in the ledger and messages in the broker: what a refused request must not change."""
    with app.app_context():
        rows = db.session.scalar(sa.select(sa.func.count()).select_from(Job))
        db.session.remove()
    huey = broker.hueys['default']
    return rows, huey.pending_count() + huey.scheduled_count()


def post_json(client, path, raw):
    return client.post(path, data=raw, content_type='application/json')


def test_a_lone_surrogate_is_refused_at_submit_and_nothing_is_written(ledger_client):
    app, client = ledger_client
    resp = post_json(client, '/api/jobs', SURROGATE_BODY)
    assert resp.status_code == 400
    assert resp.get_json() == {'error': 'invalid job', 'fields': {
        'params.message': 'contains an unpaired surrogate (U+D800)'}}
    assert counts(app) == (0, 0)
    for path in ('/', '/jobs', '/api/jobs'):
        assert client.get(path).status_code == 200


@pytest.mark.parametrize('raw, field, message', [
    (b'{"task": "fail", "params": {"message": "a\\u0000b"}}', 'params.message',
     'contains a NUL character'),
    (b'{"task": "fail", "idempotency_key": "\\udfff"}', 'idempotency_key',
     'contains an unpaired surrogate (U+DFFF)'),
    (b'{"task": "fail", "params": {"\\ud800": 1}}', 'params.\\ud800',
     'its name contains an unpaired surrogate (U+D800)'),
])
def test_unstorable_text_anywhere_in_a_body_is_refused_by_its_field(ledger_client, raw, field,
                                                                    message):
    app, client = ledger_client
    resp = post_json(client, '/api/jobs', raw)
    assert (resp.status_code, resp.get_json()['fields']) == (400, {field: message})
    assert counts(app) == (0, 0)


@pytest.mark.parametrize('raw, message', [
    (b'{"task": "fail", "params": {"message": "\xff\xfe"}}', 'is not valid UTF-8 (byte 40)'),
    (b'[' * 30000 + b']' * 30000, 'is nested more than 32 levels deep'),
    (b'{"task": "sleep", "params": {"seconds": NaN}}', 'is not valid JSON: NaN is not a JSON value'),
    (b'["task", "noop"]', 'must be a JSON object'),
    (b'', 'is not valid JSON: Expecting value: line 1 column 1 (char 0)'),
])
def test_a_body_that_is_not_utf8_json_is_refused(client, app, raw, message):
    resp = post_json(client, '/api/jobs', raw)
    assert resp.status_code == 400
    assert resp.get_json() == {'error': 'invalid request', 'fields': {'body': message}}
    assert counts(app) == (0, 0)


@pytest.mark.parametrize('path, raw, name', [
    # Read last-wins, the good value would hide the bad one a proxy or log reads first.
    ('/api/jobs/batch', b'{"jobs": [{"task": "launch"}], "jobs": [{"task": "noop"}]}', 'jobs'),
    ('/api/jobs', b'{"task": "noop", "params": {"seconds": 1, "seconds": 2}}', 'seconds'),
    ('/api/jobs', b'{"task": "sleep", "params": {"n": [{"a": 1, "a": 1}]}}', 'a'),
    ('/api/jobs', b'{"task": "noop", "\\ud800": 1, "\\ud800": 2}', '\\ud800'),
    ('/api/jobs/bulk', b'{"action": "retry", "ids": [], "action": "retry"}', 'action'),
])
def test_a_body_naming_a_member_twice_is_refused_whole(client, app, path, raw, name):
    resp = post_json(client, path, raw)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    message = f'names {json.dumps(name)} twice in one object: each name may appear once'
    assert resp.get_json()['fields'] == {'body': message}
    assert counts(app) == (0, 0)


def test_a_batch_with_its_jobs_named_once_is_read(client, app):
    resp = post_json(client, '/api/jobs/batch', b'{"jobs": [{"task": "launch"}]}')
    assert resp.status_code == 400
    assert [e['index'] for e in resp.get_json()['errors']] == [0]  # the body was read


def test_deep_nesting_inside_a_field_is_refused_by_its_field(client, app):
    nested = '[' * 40 + ']' * 40
    resp = post_json(client, '/api/jobs', f'{{"task": "fail", "params": {{"message": {nested}}}}}'
                     .encode())
    assert resp.status_code == 400
    [(field, message)] = resp.get_json()['fields'].items()
    assert field.startswith('params.message[0]') and 'levels deep' in message
    assert counts(app) == (0, 0)


def test_numbers_and_times_out_of_any_range_are_400_not_500(client, app):
    for body, field in [({'task': 'sleep', 'params': {'seconds': 10 ** 400}}, 'params.seconds'),
                        ({'task': 'noop', 'delay': 10 ** 400}, 'delay'),
                        ({'task': 'noop', 'eta': '0001-01-01T00:00:00+01:00'}, 'eta'),
                        ({'task': 'noop', 'eta': '9999-12-31T23:59:59-23:59'}, 'eta')]:
        resp = client.post('/api/jobs', json=body)
        assert resp.status_code == 400, body
        assert field in resp.get_json()['fields'], resp.get_json()
    assert counts(app) == (0, 0)


def test_path_parameters_with_nul_are_400_on_every_ledger(ledger_client):
    _, client = ledger_client
    for method, path in [('get', '/api/jobs/%00'), ('post', '/api/jobs/a%00b/retry'),
                         ('delete', '/api/jobs/%00'), ('get', '/jobs/%00'),
                         ('post', '/api/queues/%00/pause'), ('post', '/periodic/%00/trigger')]:
        resp = getattr(client, method)(path)
        assert resp.status_code == 400, path
    resp = client.get('/api/jobs/%00')
    assert resp.get_json() == {'error': 'invalid request',
                               'fields': {'job_id': 'contains a NUL character'}}


def test_query_strings_that_cannot_be_stored_are_400_naming_the_parameter(ledger_client):
    _, client = ledger_client
    assert client.get('/api/jobs?q=%00').get_json()['fields'] == {'q': 'contains a NUL character'}
    assert client.get('/api/jobs?q=%ff').get_json()['fields'] == {'q': 'is not valid UTF-8'}
    assert client.get('/api/jobs?%ff=1').get_json()['fields'] == {
        '\ufffd': 'its name is not valid UTF-8'}
    page = client.get('/jobs?queue=%00')
    assert page.status_code == 400
    assert re.search(r'<bdi class="mono">queue</bdi> contains a NUL character',
                     page.get_data(as_text=True))
    # The live socket checks its query before the handshake, as pages do.
    assert client.get('/ws?view=jobs&q=%00').status_code == 400


def test_a_path_that_is_not_utf8_is_400(client):
    # As a WSGI server hands it over: the raw bytes as Latin-1 (the test
    # client would decode them itself).
    resp = client.get('/api/jobs/x', environ_overrides={'PATH_INFO': '/api/jobs/\xff\xfe'})
    assert (resp.status_code, resp.get_json()['fields']) == (400, {'path': 'is not valid UTF-8'})


def test_the_submit_form_comes_back_with_the_message_by_the_field(client, app):
    resp = client.post('/jobs', data={'task': 'fail', 'params.message': 'a\x00b'})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert '<p class="error" id="e-message">message contains a NUL character</p>' in html
    assert 'value="a\\x00b"' in html  # what was typed, made visible
    resp = client.post('/jobs', data=b'task=fail&params.message=%ff',
                       content_type='application/x-www-form-urlencoded',
                       headers={'HX-Request': 'true'})
    assert resp.status_code == 400
    assert 'message is not valid UTF-8' in resp.get_data(as_text=True)
    assert resp.get_data(as_text=True).lstrip().startswith('<form id="submit-form"')
    assert counts(app) == (0, 0)


def test_errors_of_fields_the_form_does_not_show_are_listed_on_top(client, app):
    resp = client.post('/jobs', data={'task': 'noop', 'idempotency_key': 'k' * 10_000,
                                      'timeout': 'soon'})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert 'the request was refused' in html
    assert re.search(r'<li>idempotency_key [^<]+</li>', html), html[:2000]
    assert re.search(r'<li>timeout [^<]+</li>', html), html[:2000]
    assert counts(app) == (0, 0)


@pytest.mark.parametrize('path', ['/jobs', '/api/jobs', '/jobs/bulk'])
def test_multipart_bodies_are_refused_whole(client, app, path):
    # Its parser would hand bytes that are not UTF-8 over as U+FFFD.
    boundary = 'b0undary'
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="task"\r\n\r\nfail\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="params.message"\r\n\r\n'
            ).encode() + b'bad\xed\xa0\x80\xff' + f'\r\n--{boundary}--\r\n'.encode()
    resp = client.post(path, data=body,
                       content_type=f'multipart/form-data; boundary={boundary}')
    assert resp.status_code == 415
    assert 'URL-encoded' in resp.get_data(as_text=True)
    assert counts(app) == (0, 0)


def test_bidi_overrides_are_stored_and_isolated_where_shown(client, app):
    rtl = '\u202egnp.exe\u202c'
    job = client.post('/api/jobs', json={'task': 'fail', 'params': {'message': rtl}}).get_json()
    assert job['params'] == {'message': rtl}
    row = client.get(f'/jobs/{job["id"]}/row').get_data(as_text=True)
    assert f'<bdi>{{&#34;message&#34;: &#34;{rtl}&#34;}}</bdi>' in row


def test_bulk_filters_must_be_strings(client):
    resp = client.post('/api/jobs/bulk', json={'action': 'cancel', 'filter': {'queue': 5}})
    assert resp.get_json()['fields'] == {'filter.queue': 'must be a string'}
    resp = client.post('/api/jobs/bulk', json={'action': 'cancel', 'ids': ['ok', 'a\x00']})
    assert resp.get_json()['fields'] == {'ids[1]': 'contains a NUL character'}


def test_a_405_says_which_methods_the_url_takes(client):
    resp = client.put('/api/jobs')
    assert resp.status_code == 405 and set(resp.headers['Allow'].split(', ')) >= {'GET', 'POST'}


# -- fuzzing every text input --------------------------------------------------------

# What each field is sent, as it travels: JSON text, or bytes in a URL or a form.
HOSTILE_JSON = {
    'surrogate': '"\\ud800"', 'nul': '"a\\u0000"', 'rtl': '"\\u202eabc\\u202c"',
    'not-utf8': b'"\xff\xfe"', 'long': json.dumps('x' * 10240), 'long-cjk': json.dumps('日' * 10240),
    'nested': '[' * 5000 + ']' * 5000, 'number': '1e999',
}
HOSTILE_URL = {
    'surrogate-bytes': '%ED%A0%80', 'nul': '%00', 'rtl': '%E2%80%AEabc', 'not-utf8': '%FF%FE',
    'long': 'x' * 10240, 'long-cjk': '%E6%97%A5' * 3000,
}


def _json_body(fields, name, hostile):
    """A valid submission with ``name`` (a dotted path) replaced by raw JSON ``hostile``."""
    body = json.dumps(fields).encode()
    marker = '"@@HOSTILE@@"'
    parts = name.split('.')
    target = fields
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = '@@HOSTILE@@'
    body = json.dumps(fields).encode()
    value = hostile if isinstance(hostile, bytes) else hostile.encode()
    return body.replace(marker.encode(), value)


def _submission_fields():
    names = ['task', 'queue', 'priority', 'delay', 'eta', 'retries', 'retry_delay', 'timeout',
             'idempotency_key', 'unknown_field', 'params.unknown']
    for task in catalog.TASKS.values():
        names += [(task.name, f'params.{p.name}') for p in task.params]
    return names


def _check(app, client, method, path, before, **kwargs):
    resp = getattr(client, method)(path, **kwargs)
    assert resp.status_code < 500, (method, path, kwargs.get('data', b'')[:200],
                                    resp.get_data(as_text=True)[:300])
    if resp.status_code >= 400:
        assert counts(app) == before, (method, path, 'left something behind')
    resp.get_data().decode('utf-8')  # whatever it answers can be sent
    return resp


def test_fuzz_every_api_body_field(ledger_client):
    app, client = ledger_client
    for field in _submission_fields():
        task, name = field if isinstance(field, tuple) else ('noop', field)
        for label, hostile in HOSTILE_JSON.items():
            before = counts(app)
            raw = _json_body({'task': task}, name, hostile)
            _check(app, client, 'post', '/api/jobs', before, data=raw,
                   content_type='application/json')
    for name in ('action', 'ids', 'filter.state', 'filter.queue', 'filter.task', 'filter.q'):
        for label, hostile in HOSTILE_JSON.items():
            fields = {'action': 'cancel'} if name != 'action' else {'ids': []}
            if name.startswith('filter.'):
                fields['filter'] = {}
            raw = _json_body(fields, name, hostile)
            _check(app, client, 'post', '/api/jobs/bulk', counts(app), data=raw,
                   content_type='application/json')


def test_fuzz_every_query_path_and_form_field(ledger_client):
    app, client = ledger_client
    queries = {'/api/jobs': ('state', 'queue', 'task', 'q', 'limit', 'cursor'),
               '/api/failures': ('queue',), '/api/scheduled': ('queue', 'limit'),
               '/jobs': ('state', 'queue', 'task', 'q', 'cursor'), '/jobs/new': ('task', 'params.message'),
               '/jobs/new/fields': ('task',), '/failures': ('queue',), '/scheduled': ('queue',),
               '/ws': ('view', 'id', 'q', 'queue', 'cursor')}
    paths = [('get', '/api/jobs/{}'), ('get', '/api/jobs/{}/log'), ('post', '/api/jobs/{}/retry'),
             ('post', '/api/jobs/{}/cancel'), ('post', '/api/jobs/{}/run-now'),
             ('delete', '/api/jobs/{}'), ('post', '/api/queues/{}/pause'),
             ('post', '/api/queues/{}/resume'), ('post', '/api/periodic/{}/pause'),
             ('post', '/api/periodic/{}/trigger'), ('get', '/jobs/{}'), ('get', '/jobs/{}/row'),
             ('get', '/jobs/{}/summary'), ('get', '/jobs/{}/attempts'),
             ('post', '/jobs/{}/retry'), ('post', '/jobs/{}/cancel'), ('post', '/jobs/{}/run-now'),
             ('post', '/jobs/{}/delete'), ('post', '/queues/{}/pause'),
             ('post', '/periodic/{}/resume'), ('post', '/periodic/{}/trigger')]
    forms = {'/jobs': {'task': 'fail', 'params.message': 'm', 'queue': 'default', 'priority': '1',
                       'delay': '', 'eta': '', 'retries': '', 'retry_delay': '', 'stay': '1'},
             '/jobs/bulk': {'action': 'cancel', 'scope': 'filter', 'f.state': 'queued',
                            'f.queue': '', 'f.task': '', 'f.q': '', 'ids': 'x', 'confirmed': '1'}}
    for label, hostile in HOSTILE_URL.items():
        for path, names in queries.items():
            for name in names:
                _check(app, client, 'get', f'{path}?view=jobs&{name}={hostile}', counts(app))
        for method, template in paths:
            _check(app, client, method, template.format(hostile[:300]), counts(app))
        for path, fields in forms.items():
            for name in fields:
                body = '&'.join(f'{k}={hostile if k == name else v}' for k, v in fields.items())
                _check(app, client, 'post', path, counts(app), data=body.encode(),
                       content_type='application/x-www-form-urlencoded')
    for path in ('/', '/jobs', '/api/jobs', '/failures', '/scheduled'):
        assert client.get(path).status_code == 200, path


def test_a_route_with_its_own_body_limit_names_it_once_for_the_view_and_for_chunked_bodies(app):
    from flask import Flask

    from app import inputs
    # The batch route's limit reaches SizedBody from its decorator alone.
    assert inputs.route_limits(app) == {'/api/jobs/batch': app.config['MAX_BATCH_CONTENT_LENGTH']}
    assert app.wsgi_app.limits == inputs.route_limits(app)
    assert app.wsgi_app.limit == app.config['MAX_CONTENT_LENGTH']
    other = Flask('other')
    other.config['BIG'] = 10
    other.add_url_rule('/things/<name>', 'thing', inputs.body_limit('BIG')(lambda name: name),
                       methods=['POST'])
    with pytest.raises(ValueError, match='without variables'):
        inputs.route_limits(other)

"""Who may see and do what, and that no other website can act for them.

The route table below lists every route of the app with the action it
takes; a route added without a line here fails the first test, so none is
left open by accident.
"""
import re
import time
import urllib.parse

import pytest
from conftest import make_app

from app import accounts, auth, catalog, create_app, jobs, roles
from app.extensions import db
from app.models import Job

# (endpoint, method) -> the action it takes; None: open to anyone.
ROUTES = {
    ('auth.login', 'GET'): None, ('auth.login', 'POST'): None, ('auth.logout', 'POST'): None,
    ('health.healthz', 'GET'): None, ('api.openapi_document', 'GET'): None,
    ('static', 'GET'): None,
    ('pages.dashboard', 'GET'): 'view', ('pages.job_list', 'GET'): 'view',
    ('pages.job_page', 'GET'): 'view', ('pages.job_row', 'GET'): 'view',
    ('pages.job_summary', 'GET'): 'view', ('pages.job_attempts', 'GET'): 'view',
    ('pages.new_job', 'GET'): 'view', ('pages.task_fields', 'GET'): 'view',
    ('pages.queues_page', 'GET'): 'view', ('pages.periodic_page', 'GET'): 'view',
    ('pages.failures_page', 'GET'): 'view', ('pages.workers_page', 'GET'): 'view',
    ('pages.scheduled_list', 'GET'): 'view', ('pages.stats_fragment', 'GET'): 'view',
    ('pages.alerts_page', 'GET'): 'view', ('pages.alert_banner_fragment', 'GET'): 'view',
    ('pages.queue_page', 'GET'): 'view', ('pages.task_page', 'GET'): 'view',
    ('pages.charts_fragment', 'GET'): 'view',
    ('api.list_alerts', 'GET'): 'view',
    ('live.live_socket', 'GET'): 'view', ('health.prometheus_metrics', 'GET'): 'view',
    ('pages.create_job', 'POST'): 'submit', ('pages.retry_job', 'POST'): 'retry',
    ('pages.cancel_job', 'POST'): 'cancel', ('pages.run_now_job', 'POST'): 'run-now',
    ('pages.delete_job', 'POST'): 'delete', ('pages.bulk_jobs', 'POST'): 'retry',
    ('pages.pause_queue', 'POST'): 'pause', ('pages.resume_queue', 'POST'): 'resume',
    ('pages.pause_periodic', 'POST'): 'pause', ('pages.resume_periodic', 'POST'): 'resume',
    ('pages.trigger_periodic', 'POST'): 'trigger',
    ('api.stats', 'GET'): 'view', ('api.list_jobs', 'GET'): 'view', ('api.get_job', 'GET'): 'view',
    ('api.job_log', 'GET'): 'view', ('api.failures', 'GET'): 'view', ('api.scheduled', 'GET'): 'view',
    ('api.list_queues', 'GET'): 'view', ('api.list_periodic', 'GET'): 'view',
    ('api.list_tasks', 'GET'): 'view', ('api.list_workers', 'GET'): 'view',
    ('api.submit_job', 'POST'): 'submit', ('api.submit_batch', 'POST'): 'submit',
    ('api.retry_job', 'POST'): 'retry',
    ('api.cancel_job', 'POST'): 'cancel', ('api.run_job_now', 'POST'): 'run-now',
    ('api.delete_job', 'DELETE'): 'delete', ('api.bulk_action', 'POST'): 'retry',
    ('api.pause_queue', 'POST'): 'pause', ('api.resume_queue', 'POST'): 'resume',
    ('api.pause_periodic', 'POST'): 'pause', ('api.resume_periodic', 'POST'): 'resume',
    ('api.trigger_periodic', 'POST'): 'trigger',
    ('pages.audit_page', 'GET'): 'audit', ('api.audit_log', 'GET'): 'audit',
    ('admin.users_page', 'GET'): 'users', ('admin.create_user', 'POST'): 'users',
    ('admin.set_role', 'POST'): 'users', ('admin.delete_user', 'POST'): 'users',
    ('admin.create_token', 'POST'): 'users', ('admin.revoke_token', 'POST'): 'users',
}
PASSWORD = 'long enough'


def app_routes(app):
    """``[(endpoint, method, rule)]`` of every route (HEAD and OPTIONS aside)."""
    return [(rule.endpoint, method, rule) for rule in app.url_map.iter_rules()
            for method in sorted(rule.methods - {'HEAD', 'OPTIONS'})]


def url_of(rule, job_id):
    values = {'job_id': job_id, 'filename': 'app.css', 'token_id': '1',
              'name': 'report' if '/periodic/' in rule.rule else
                      'viewer' if '/users/' in rule.rule else
                      'noop' if '/tasks/' in rule.rule else 'default'}
    path = rule.rule
    for arg in rule.arguments:
        path = re.sub(rf'<(?:[^:<>]+:)?{arg}>', values[arg], path)
    return path + ('?view=dashboard' if rule.rule == '/ws' else '')


def body_of(endpoint, job_id):
    """``(kwargs for the client)`` a request to ``endpoint`` needs to reach its action."""
    if endpoint == 'api.submit_job':
        return {'json': {'task': 'noop'}}
    if endpoint == 'api.submit_batch':
        return {'json': {'jobs': [{'task': 'noop'}, {'task': 'noop'}]}}
    if endpoint == 'pages.create_job':
        return {'data': {'task': 'noop'}}
    if endpoint == 'api.bulk_action':
        return {'json': {'action': 'retry', 'ids': [job_id]}}
    if endpoint == 'pages.bulk_jobs':
        return {'data': {'action': 'retry', 'scope': 'selected', 'ids': job_id}}
    return {}


def new_job(app, task='noop', **options):
    with app.app_context():
        return jobs.submit(catalog.validate({'task': task, 'params': {}, **options}, app.config)).id


def login(client, name, password=PASSWORD):
    resp = client.post('/login', data={'name': name, 'password': password})
    assert resp.status_code == 303, resp.get_data(as_text=True)[:500]
    return client


@pytest.fixture
def users_app(tmp_path):
    """An app with a user of each role (``viewer``, ``operator``, ``admin``) and their tokens."""
    app = make_app(tmp_path)
    app.tokens = {}
    with app.app_context():
        for role in roles.ROLES:
            accounts.create_user(role, PASSWORD, role)
            app.tokens[role] = accounts.create_token(role, 'tests')[1]
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def test_every_route_is_in_the_table():
    app = create_app({'INSTANCE_PATH': '/nonexistent', 'REDIS_URL': None})
    found = {(endpoint, method) for endpoint, method, _rule in app_routes(app)}
    assert found == set(ROUTES), ('routes not in ROUTES (give each its action)', found - set(ROUTES),
                                  'gone', set(ROUTES) - found)


@pytest.mark.parametrize('via', ['session', 'token'])
def test_each_role_may_do_what_its_role_allows_on_every_route(users_app, via):
    app = users_app
    for role in roles.ROLES:
        client = app.test_client()
        headers = {}
        if via == 'session':
            login(client, role)
        else:
            headers['Authorization'] = f'Bearer {app.tokens[role]}'
        for endpoint, method, rule in app_routes(app):
            action = ROUTES[(endpoint, method)]
            if action is None or endpoint == 'auth.logout':
                continue
            job_id = new_job(app, delay=600)
            resp = client.open(url_of(rule, job_id), method=method, headers=headers,
                               **body_of(endpoint, job_id))
            allowed = roles.may(role, action)
            where = f'{role} via {via}: {method} {rule.rule} ({action})'
            if allowed:
                assert resp.status_code not in (401, 403), (where, resp.get_data(as_text=True)[:300])
            else:
                assert resp.status_code == 403, (where, resp.status_code)
                text = resp.get_data(as_text=True)
                assert roles.refusal(role, action) in text.replace('&#39;', "'"), where
                with app.app_context():
                    assert db.session.get(Job, job_id) is not None  # nothing changed



def test_a_batch_with_an_admin_only_task_is_refused_whole_unless_admin(users_app):
    app = users_app
    operator, admin = (login(app.test_client(), name) for name in ('operator', 'admin'))
    items = [{'task': 'noop'}, {'task': 'purge'}, {'task': 'noop'}, {'task': 'purge'}]
    resp = operator.post('/api/jobs/batch', json={'jobs': items})
    assert resp.status_code == 403
    reason = roles.refusal('operator', 'admin-task')
    assert resp.get_json() == {'error': reason, 'errors': [
        {'index': 1, 'field': 'task', 'message': reason},
        {'index': 3, 'field': 'task', 'message': reason}]}
    with app.app_context():
        assert db.session.query(Job).count() == 0  # not even the noop jobs
    ok = operator.post('/api/jobs/batch', json={'jobs': [items[0], items[2]]})
    assert ok.status_code == 201
    resp = admin.post('/api/jobs/batch', json={'jobs': items})
    assert resp.status_code == 201 and [j['task'] for j in resp.get_json()['jobs']] == \
        ['noop', 'purge', 'noop', 'purge']
    viewer = app.test_client()
    resp = viewer.post('/api/jobs/batch', json={'jobs': [items[0]]},
                       headers={'Authorization': f"Bearer {app.tokens['viewer']}"})
    assert resp.status_code == 403
    assert resp.get_json()['error'] == roles.refusal('viewer', 'submit')


def test_nobody_gets_401_from_the_api_and_the_login_page_from_pages(users_app):
    app = users_app
    client = app.test_client()
    for endpoint, method, rule in app_routes(app):
        if ROUTES[(endpoint, method)] is None:
            continue
        job_id = new_job(app)
        resp = client.open(url_of(rule, job_id), method=method, **body_of(endpoint, job_id))
        where = f'{method} {rule.rule}'
        if endpoint.startswith(('pages.', 'admin.')) and method == 'GET':
            assert resp.status_code == 302, where
            target = urllib.parse.urlsplit(resp.headers['Location'])
            assert target.path == '/login'
            assert urllib.parse.parse_qs(target.query)['next'] == [url_of(rule, job_id)]
        else:
            assert resp.status_code == 401, where
        if endpoint.startswith('api.'):
            assert resp.headers['WWW-Authenticate'].startswith('Bearer')
            assert 'authentication required' in resp.get_json()['error']
        with app.app_context():
            assert db.session.get(Job, job_id).state == 'queued'
    # The open ones stay open.
    assert client.get('/healthz').status_code == 200
    assert client.get('/api/openapi.json').status_code == 200
    assert client.get('/login').status_code == 200
    assert client.get('/static/app.css').status_code == 200


def test_bulk_delete_and_admin_only_tasks_need_an_admin(users_app):
    app = users_app
    operator, admin = (login(app.test_client(), name) for name in ('operator', 'admin'))
    job_id = new_job(app, delay=600)
    resp = operator.post('/api/jobs/bulk', json={'action': 'delete', 'ids': [job_id]})
    assert resp.status_code == 403 and 'only admins may delete jobs' in resp.get_json()['error']
    resp = operator.post('/jobs/bulk', data={'action': 'delete', 'scope': 'selected', 'ids': job_id,
                                              'confirmed': '1'})
    assert resp.status_code == 403
    assert operator.post('/api/jobs', json={'task': 'purge'}).status_code == 403
    assert operator.post('/api/periodic/purge/trigger').status_code == 403
    assert operator.post('/api/periodic/report/trigger').status_code == 201
    assert admin.post('/api/jobs', json={'task': 'purge'}).status_code == 201
    purge_id = new_job(app, 'purge', delay=600)
    assert operator.post(f'/api/jobs/{purge_id}/run-now').status_code == 403
    assert admin.post(f'/api/jobs/{purge_id}/run-now').status_code == 200
    assert operator.post(f'/api/jobs/{job_id}/cancel').status_code == 200  # finished: deletable
    resp = admin.post('/api/jobs/bulk', json={'action': 'delete', 'ids': [job_id]})
    assert resp.status_code == 200 and resp.get_json()['done'] == 1
    # A bulk retry spares the admin-only jobs an operator may not run again.
    assert admin.post(f'/api/jobs/{purge_id}/cancel').status_code == 200
    noop_id = new_job(app, delay=600)
    assert operator.post(f'/api/jobs/{noop_id}/cancel').status_code == 200
    for client, expected in ((operator, {'done': 1, 'skipped': {'not allowed': 1}}),
                             (admin, {'done': 2, 'skipped': {}})):
        resp = client.post('/api/jobs/bulk', json={'action': 'retry', 'ids': [purge_id, noop_id]})
        got = resp.get_json()
        assert {'done': got['done'], 'skipped': got['skipped']} == expected
        with app.app_context():
            assert db.session.get(Job, purge_id).state == ('canceled' if client is operator
                                                           else 'queued')
        if client is operator:
            assert operator.post('/jobs/bulk', data={'action': 'retry', 'scope': 'filter',
                                                     'f.task': 'purge'}).status_code == 303
            with app.app_context():
                assert db.session.get(Job, purge_id).state == 'canceled'
            admin.post(f'/api/jobs/{noop_id}/cancel')


def test_pages_show_only_the_actions_the_role_allows(users_app):
    app = users_app
    failed = new_job(app, delay=600)
    with app.app_context():
        jobs.cancel(failed)
    for role in roles.ROLES:
        client = login(app.test_client(), role)
        job_page = client.get(f'/jobs/{failed}').get_data(as_text=True)
        listing = client.get('/jobs').get_data(as_text=True)
        dashboard = client.get('/').get_data(as_text=True)
        queues = client.get('/queues').get_data(as_text=True)
        assert (f'/jobs/{failed}/retry' in job_page) == roles.may(role, 'retry'), role
        assert (f'/jobs/{failed}/delete' in job_page) == roles.may(role, 'delete'), role
        assert ('value="delete"' in listing) == roles.may(role, 'delete'), role
        assert ('name="ids"' in listing) == roles.may(role, 'retry'), role
        assert ('id="submit-form"' in dashboard) == roles.may(role, 'submit'), role
        assert ('/queues/default/pause' in queues) == roles.may(role, 'pause'), role
        assert f'{role} <span class="muted">({role})</span>' in dashboard


# -- cross-site requests --

STATE_CHANGES = [(e, m) for (e, m), action in ROUTES.items()
                 if m != 'GET' and action is not None]


@pytest.mark.parametrize('headers', [
    {'Sec-Fetch-Site': 'cross-site'},
    {'Sec-Fetch-Site': 'same-site'},
    {'Sec-Fetch-Site': None, 'Origin': 'http://evil.example'},
    {'Sec-Fetch-Site': None, 'Origin': 'null'},
    {'Sec-Fetch-Site': None},  # neither header, but the session cookie: the token is needed
], ids=['cross-site', 'same-site', 'other-origin', 'null-origin', 'no-headers'])
def test_another_site_cannot_act_for_a_logged_in_user(users_app, headers):
    app = users_app
    client = login(app.test_client(), 'admin')
    client.environ_base.pop('HTTP_SEC_FETCH_SITE')  # only what the variant sends
    sent = {k: v for k, v in headers.items() if v is not None}
    for endpoint, method in STATE_CHANGES:
        rule = next(r for e, m, r in app_routes(app) if (e, m) == (endpoint, method))
        job_id = new_job(app, delay=600)
        resp = client.open(url_of(rule, job_id), method=method, headers=sent,
                           **body_of(endpoint, job_id))
        assert resp.status_code == 403, (endpoint, resp.status_code)
        with app.app_context():
            job = db.session.get(Job, job_id)
            assert job is not None and job.state == 'scheduled', endpoint
    with app.app_context():
        assert db.session.query(Job).count() == len(STATE_CHANGES)  # nothing submitted


def test_the_synchronizer_token_lets_a_browser_without_the_headers_act(users_app):
    app = users_app
    client = login(app.test_client(), 'operator')
    client.environ_base.pop('HTTP_SEC_FETCH_SITE')
    form = client.get('/jobs/new').get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    assert client.post('/jobs', data={'task': 'noop'}).status_code == 403
    assert client.post('/jobs', data={'task': 'noop', 'csrf_token': token}).status_code == 303
    assert client.post('/jobs', data={'task': 'noop'},
                       headers={'Origin': 'http://localhost'}).status_code == 303


def test_a_token_request_needs_no_csrf_token_and_a_cookieless_script_neither(users_app, tmp_path):
    app = users_app
    client = app.test_client()
    client.environ_base.pop('HTTP_SEC_FETCH_SITE')
    resp = client.post('/api/jobs', json={'task': 'noop'},
                       headers={'Authorization': f'Bearer {app.tokens["operator"]}'})
    assert resp.status_code == 201
    local = make_app(tmp_path / 'local')  # no user: the local mode, where curl just works
    curl = local.test_client()
    curl.environ_base.pop('HTTP_SEC_FETCH_SITE')
    assert curl.post('/api/jobs', json={'task': 'noop'}).status_code == 201
    assert curl.post('/api/jobs', json={'task': 'noop'},
                     headers={'Origin': 'http://evil.example'}).status_code == 403


def test_a_bad_authorization_header_is_a_401_not_a_fallback_to_the_session(users_app):
    client = login(users_app.test_client(), 'admin')
    for header in ('Basic YWRtaW46eA==', 'Bearer', 'Bearer qm_nope', 'Bearer ' + 'x' * 300):
        resp = client.get('/api/stats', headers={'Authorization': header})
        assert resp.status_code == 401, header


def test_a_socket_from_another_site_is_refused(users_app):
    # The test client cannot take a socket over: the refusal falls back to 403
    # here (a real server closes it with 1008: tests/test_live.py).
    client = login(users_app.test_client(), 'viewer')
    resp = client.get('/ws?view=dashboard', headers={
        'Connection': 'Upgrade', 'Upgrade': 'websocket', 'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==', 'Origin': 'http://evil.example'})
    assert resp.status_code == 403
    assert 'a socket opened from another site (http://evil.example) is refused' in \
        resp.get_data(as_text=True)


# -- logging in --

def test_login_logout_and_a_safe_next(users_app):
    client = users_app.test_client()
    assert client.get('/login').status_code == 200
    resp = client.post('/login', data={'name': 'viewer', 'password': PASSWORD,
                                       'next': '/jobs?state=failed'})
    assert resp.headers['Location'] == '/jobs?state=failed'
    assert client.get('/jobs').status_code == 200
    for evil in ('//evil.example/x', 'https://evil.example', '/\\evil.example',
                 '/\t/evil.example', '/\n/x', '/ /evil.example', '/%09/x\x7f'):
        client.post('/logout')
        resp = client.post('/login', data={'name': 'viewer', 'password': PASSWORD, 'next': evil})
        assert resp.headers['Location'] == '/', evil
    assert client.post('/logout').status_code == 303
    assert client.get('/jobs').status_code == 302


def test_a_wrong_password_is_refused_and_repeated_ones_are_slowed(users_app):
    client = users_app.test_client()
    for _ in range(accounts.FREE_FAILURES):
        resp = client.post('/login', data={'name': 'admin', 'password': 'guess'})
        assert resp.status_code == 401 and 'Wrong name or password.' in resp.get_data(as_text=True)
    resp = client.post('/login', data={'name': 'admin', 'password': PASSWORD})
    assert resp.status_code == 429 and int(resp.headers['Retry-After']) >= 1
    assert 'Too many failed logins' in resp.get_data(as_text=True)
    assert client.get('/jobs').status_code == 302  # not logged in, even with the right password


def test_an_idle_session_ends(users_app):
    client = login(users_app.test_client(), 'viewer')
    assert client.get('/jobs').status_code == 200
    with client.session_transaction() as session:
        session['seen'] -= users_app.config['SESSION_IDLE_TIMEOUT'] + 1
    resp = client.get('/jobs')
    assert resp.status_code == 302 and 'expired=1' in resp.headers['Location']
    assert 'Your session expired' in client.get(resp.headers['Location']).get_data(as_text=True)
    assert client.get('/api/stats').status_code == 401


def test_a_new_role_takes_effect_and_a_deleted_user_is_out(users_app):
    app = users_app
    client = login(app.test_client(), 'operator')
    assert client.post('/api/queues/default/pause').status_code == 200
    with app.app_context():
        accounts.set_role('operator', 'viewer')
    assert client.get('/api/stats').status_code == 401  # its session ended
    login(client, 'operator')
    assert client.post('/api/queues/default/resume').status_code == 403
    with app.app_context():
        accounts.delete_user('operator')
    assert client.get('/api/stats').status_code == 401


# -- when login is asked for --

def test_make_run_needs_no_login_until_a_user_exists(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    page = client.get('/').get_data(as_text=True)
    assert 'no login · local admin' in page and 'id="submit-form"' in page
    assert client.post('/api/jobs', json={'task': 'noop'}).status_code == 201
    stranger = app.test_client()
    stranger.environ_base['REMOTE_ADDR'] = '192.0.2.7'  # not this machine
    assert stranger.get('/api/stats').status_code == 401
    with app.app_context():
        accounts.create_user('ada', PASSWORD, 'admin')
    assert client.get('/api/stats').status_code == 401
    assert client.get('/').status_code == 302


@pytest.mark.parametrize('config', [{'AUTH': 'login'}, {'HOST': '0.0.0.0'},
                                    {'REDIS_URL': 'redis://127.0.0.1:9/0'}],
                         ids=['AUTH=login', 'public-host', 'distributed'])
def test_login_is_asked_for_when_the_deployment_is_not_a_local_one(tmp_path, config):
    client = make_app(tmp_path, **config).test_client()
    assert client.get('/api/stats').status_code == 401
    assert client.get('/').status_code == 302
    assert client.post('/api/jobs', json={'task': 'noop'}).status_code == 401


def test_a_logged_out_sessions_cookie_is_worth_nothing_after(users_app):
    client = login(users_app.test_client(), 'operator')
    copy = client.get_cookie('session').value
    assert client.post('/logout').status_code == 303
    thief = users_app.test_client()
    thief.set_cookie('session', copy)
    assert thief.get('/api/stats').status_code == 401


def test_a_deleted_users_session_never_fits_the_next_user(users_app):
    app = users_app
    with app.app_context():
        accounts.create_user('mallory', PASSWORD, 'viewer')
    client = login(app.test_client(), 'mallory')
    with app.app_context():
        accounts.delete_user('mallory')
        zed = accounts.create_user('zed', PASSWORD, 'admin')
        assert zed.id > max(u.id for u in accounts.list_users() if u.name != 'zed')
    assert client.get('/api/stats').status_code == 401


@pytest.mark.parametrize('headers', [
    {'Host': 'rebound.evil.example:8000'},  # a page whose DNS name now points here
    {'X-Forwarded-For': '203.0.113.9'},  # through a tunnel or proxy nobody declared
    {'Forwarded': 'for=203.0.113.9'},
], ids=['dns-rebinding', 'x-forwarded-for', 'forwarded'])
def test_the_login_free_local_mode_is_for_this_machine_only(tmp_path, headers):
    client = make_app(tmp_path).test_client()
    assert client.get('/api/stats').status_code == 200
    for host in ('localhost:8000', '[::1]:8000', '[::1]', '127.0.0.1', 'LOCALHOST'):
        assert client.get('/api/stats', headers={'Host': host}).status_code == 200, host
    assert client.get('/api/stats', headers=headers).status_code == 401
    assert client.post('/api/jobs', json={'task': 'noop'}, headers=headers).status_code == 401


def test_a_sockets_credential_ends_with_its_session_token_or_the_local_mode(users_app, tmp_path):
    app = users_app
    with app.app_context():
        user = accounts.get_user('viewer')
        alive = auth.Credential('session', 'viewer', key=user.get_id(), seen=time.time(),
                                idle_timeout=60)
        idle = auth.Credential('session', 'viewer', key=user.get_id(), seen=time.time() - 61,
                               idle_timeout=60)
        token = auth.Credential('token', 'viewer', key=app.tokens['viewer'])
        assert (alive.ended(), idle.ended(), token.ended()) == (
            None, 'your session expired: log in again', None)
        accounts.set_role('viewer', 'operator')  # its sessions end
        assert alive.ended() == 'your session ended: log in again'
        accounts.revoke_token(accounts.list_tokens()[-1].id)  # the first, the viewer's
        assert token.ended() == 'your token was revoked'
    local = make_app(tmp_path / 'local')
    with local.app_context():
        credential = auth.Credential('local', '')
        assert credential.ended() is None
        accounts.create_user('ada', PASSWORD, 'admin')
        assert credential.ended() == 'your session ended: log in again'

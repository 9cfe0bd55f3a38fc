"""Security headers on every response, the session cookie's flags, trusted proxies."""
import http.client
import urllib.parse

import pytest
from conftest import make_app
from helpers import Deployment, add_user, start_web
from werkzeug.exceptions import NotFound

from app import accounts, headers
from app.extensions import db

HEADERS = {
    'Referrer-Policy': 'same-origin',
    'X-Content-Type-Options': 'nosniff',
    'X-Frame-Options': 'DENY',
    'Cross-Origin-Opener-Policy': 'same-origin',
    'Cross-Origin-Resource-Policy': 'same-origin',
}

# Keywords a policy must never grant: they would let injected text run.
UNSAFE = {"'unsafe-inline'", "'unsafe-eval'", "'unsafe-hashes'", "'wasm-unsafe-eval'", '*',
          'data:', 'blob:', 'http:', 'https:', 'ws:', 'wss:'}


def directives(value):
    """``{directive: [sources]}`` of a Content-Security-Policy value; a repeated one fails."""
    parsed = {}
    for part in value.split(';'):
        name, *sources = part.split()
        assert name not in parsed, f'{name} twice in {value!r}'
        parsed[name] = sources
    return parsed


def assert_secured(resp, what, host='localhost', scheme='ws'):
    """Every security header on ``resp``, and a policy that runs nothing but this site's files."""
    for name, value in HEADERS.items():
        assert resp.headers.get(name) == value, (what, name, resp.headers.get(name))
    csp = directives(resp.headers['Content-Security-Policy'])
    assert csp == {
        'default-src': ["'self'"],
        'script-src': ["'self'"],
        'style-src': ["'self'"],
        'img-src': ["'self'"],
        'connect-src': ["'self'", f'{scheme}://{host}'],
        'object-src': ["'none'"],
        'base-uri': ["'self'"],
        'form-action': ["'self'"],
        'frame-ancestors': ["'none'"],
    }, what
    assert not UNSAFE & {s for sources in csp.values() for s in sources}, what


@pytest.fixture
def job_id(client):
    return client.post('/api/jobs', json={'task': 'noop'}).get_json()['id']


# A value for each variable part of a route, and the query a route needs.
def samples(job_id):
    return {'job_id': job_id, 'filename': 'app.css', 'name': 'default'}


QUERIES = {'live.live_socket': {'view': 'dashboard'}, 'pages.task_page': {'name': 'noop'}}


def get_routes(app, job_id):
    """``[url]`` of every GET route the app has, with sample values filled in."""
    adapter = app.url_map.bind('localhost')
    urls = []
    for rule in app.url_map.iter_rules():
        if 'GET' not in rule.methods or rule.websocket:
            continue
        values = {arg: samples(job_id)[arg] for arg in rule.arguments}  # a new one needs a sample
        values.update(QUERIES.get(rule.endpoint, {}))
        urls.append(adapter.build(rule.endpoint, values, method='GET'))
    return sorted(set(urls))


def test_every_get_route_carries_the_headers(app, client, job_id):
    urls = get_routes(app, job_id)
    # the walk did find pages, fragments, the API, static files and the socket's GET
    for expected in ('/', f'/jobs/{job_id}/row', '/api/jobs', '/static/app.css',
                     '/ws?view=dashboard', '/healthz'):
        assert expected in urls
    for url in urls:
        for extra in ({}, {'HX-Request': 'true'}):
            resp = client.get(url, headers=extra)
            assert resp.status_code == 200, (url, resp.status_code)
            assert_secured(resp, (url, extra))


@pytest.mark.parametrize('method, url, status, kwargs', [
    ('GET', '/nowhere', 404, {}),
    ('GET', '/jobs/no-such-job', 404, {}),
    ('GET', '/api/jobs/no-such-job', 404, {}),
    ('GET', '/jobs/no-such-job/row', 404, {'headers': {'HX-Request': 'true'}}),
    ('POST', '/', 405, {}),
    ('DELETE', '/api/stats', 405, {}),
    ('GET', '/ws?view=nowhere', 400, {}),
    ('GET', '/api/jobs?state=nope', 400, {}),
    ('POST', '/api/jobs', 400, {'json': {'task': 'no-such-task'}}),
    ('POST', '/jobs', 400, {'data': {'task': 'sleep', 'params.seconds': '-1'}}),
    ('POST', '/api/jobs', 413, {'data': 'x' * 70_000, 'content_type': 'application/json'}),
    # a WebSocket handshake the test client cannot hand over
    ('GET', '/ws?view=dashboard', 503, {'headers': {
        'Connection': 'Upgrade', 'Upgrade': 'websocket', 'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ=='}}),
])
def test_error_answers_carry_the_headers(client, method, url, status, kwargs):
    resp = client.open(url, method=method, **kwargs)
    assert resp.status_code == status
    assert_secured(resp, url)


def test_an_unhandled_error_carries_the_headers(app):
    def broken():
        raise KeyError('a bug')

    def gone():
        raise NotFound()
    app.add_url_rule('/broken', 'broken', broken)
    app.add_url_rule('/api/gone', 'gone', gone)
    client = app.test_client()
    resp = client.get('/broken')
    assert resp.status_code == 500
    assert_secured(resp, '/broken')
    assert_secured(client.get('/api/gone'), '/api/gone')


def test_the_policy_names_the_socket_origin_of_the_host_asked():
    policy = directives(headers.policy('dash.example.com:8443', secure=True))
    assert policy['connect-src'] == ["'self'", 'wss://dash.example.com:8443']
    assert directives(headers.policy('10.0.0.5', secure=False))['connect-src'] == [
        "'self'", 'ws://10.0.0.5']


@pytest.mark.parametrize('host', ['[::1]:8000', "evil.example; script-src 'unsafe-inline'",
                                  'a b', '', None])
def test_a_host_the_policy_cannot_name_leaves_connect_src_at_self(host):
    policy = directives(headers.policy(host, secure=True))
    assert policy['connect-src'] == ["'self'"]
    assert policy['script-src'] == ["'self'"]


def test_a_forged_host_header_cannot_loosen_the_policy(client):
    resp = client.get('/', headers={'Host': "x; script-src 'unsafe-inline'"})
    assert directives(resp.headers['Content-Security-Policy'])['connect-src'] == ["'self'"]
    assert "'unsafe-inline'" not in resp.headers['Content-Security-Policy']


def test_a_view_may_set_a_stricter_policy_of_its_own(app):
    app.add_url_rule('/strict', 'strict', lambda: ('', 204, {'Content-Security-Policy': "default-src 'none'"}))
    resp = app.test_client().get('/strict')
    assert resp.headers['Content-Security-Policy'] == "default-src 'none'"
    assert resp.headers['X-Frame-Options'] == 'DENY'


# -- the session cookie --

def session_cookie(client, **kwargs):
    """The Set-Cookie header of an answer that flashes a message (so writes the session)."""
    resp = client.post('/jobs/bulk', data={'action': 'retry'}, **kwargs)
    assert resp.status_code == 303
    cookies = [v for k, v in resp.headers.items() if k == 'Set-Cookie']
    assert len(cookies) == 1 and cookies[0].startswith('session='), cookies
    return {attr.strip().split('=')[0].lower() for attr in cookies[0].split(';')[1:]}


def test_the_session_cookie_is_httponly_and_lax_and_not_secure_over_http(client):
    flags = session_cookie(client)
    assert {'httponly', 'samesite', 'path'} <= flags and 'secure' not in flags
    resp = client.post('/jobs/bulk', data={'action': 'retry'})
    assert 'SameSite=Lax' in resp.headers['Set-Cookie']


def test_the_session_cookie_is_secure_over_https(app):
    client = app.test_client()
    assert 'secure' in session_cookie(client, base_url='https://localhost')
    resp = client.get('/', base_url='https://localhost')
    assert directives(resp.headers['Content-Security-Policy'])['connect-src'] == [
        "'self'", 'wss://localhost']


def logged_in(app):
    """A test client logged in as an admin (a proxied request is another machine's: it logs in)."""
    with app.app_context():
        accounts.create_user('ada', 'long enough', 'admin')
    client = app.test_client()
    assert client.post('/login', data={'name': 'ada', 'password': 'long enough'}).status_code == 303
    return client


def test_a_forwarded_proto_is_ignored_without_proxy_fix(client, app):
    # Through a proxy nobody declared, the login-free local mode does not answer.
    assert client.post('/jobs/bulk', data={'action': 'retry'},
                       headers={'X-Forwarded-Proto': 'https'}).status_code == 401
    flags = session_cookie(logged_in(app), headers={'X-Forwarded-Proto': 'https'})
    assert 'secure' not in flags


def test_proxy_fix_trusts_the_proxys_scheme_and_host(tmp_path):
    app = make_app(tmp_path, PROXY_FIX=1)
    try:
        client = logged_in(app)
        forwarded = {'X-Forwarded-Proto': 'https', 'X-Forwarded-Host': 'dash.example.com'}
        assert 'secure' in session_cookie(client, headers=forwarded)
        # the client's own address comes from the proxy too: another machine logs in
        resp = app.test_client().get('/api/stats',
                                     headers={**forwarded, 'X-Forwarded-For': '203.0.113.7'})
        assert resp.status_code == 401
        resp = client.get('/', headers=forwarded)
        assert_secured(resp, '/ behind a proxy', host='dash.example.com', scheme='wss')
        # only the last hop is trusted: a client's own header before it is not
        assert 'secure' not in session_cookie(client, headers={'X-Forwarded-Proto': 'https, http'})
    finally:
        with app.app_context():
            db.engine.dispose()


def test_an_https_site_marks_the_cookie_secure_on_any_request(tmp_path):
    app = make_app(tmp_path, PREFERRED_URL_SCHEME='https')
    try:
        assert 'secure' in session_cookie(app.test_client())
    finally:
        with app.app_context():
            db.engine.dispose()


# -- gunicorn: the same rules in the real server --

def post_from_localhost(base, headers):
    """``(Set-Cookie, Content-Security-Policy)`` of a flashing POST to the server at ``base``."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request('POST', '/jobs/bulk', body='action=retry', headers={
            'Content-Type': 'application/x-www-form-urlencoded', **headers})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 303
        return resp.getheader('Set-Cookie'), resp.getheader('Content-Security-Policy')
    finally:
        conn.close()


@pytest.mark.processes
def test_gunicorn_trusts_a_forwarded_scheme_only_with_proxy_fix(tmp_path):
    dep = Deployment('embedded', tmp_path)
    # A proxied request is another machine's: it comes with credentials.
    token = add_user(dep.env, 'ada', 'admin', 'long enough', token=True)
    forwarded = {'X-Forwarded-Proto': 'https', 'Authorization': f'Bearer {token}'}
    try:
        # gunicorn's own default would trust this from 127.0.0.1
        cookie, csp = post_from_localhost(dep.api.base, forwarded)
        assert 'HttpOnly' in cookie and 'Secure' not in cookie
        assert f'ws://127.0.0.1:{dep.port}' in csp
        dep.web.stop()
        dep.processes.remove(dep.web)
        web, api = start_web(dict(dep.env, PROXY_FIX='1'), tmp_path, name='web-proxied')
        dep.processes.append(web)
        cookie, csp = post_from_localhost(api.base, forwarded)
        assert 'Secure' in cookie
        assert f'wss://{api.base.removeprefix("http://")}' in csp
    finally:
        dep.close()

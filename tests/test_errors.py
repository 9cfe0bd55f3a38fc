"""Error answers: JSON under /api/ and /healthz, a page (or an htmx fragment)
elsewhere, each exception with its status, and a rollback where a request
may have written half of something."""
import logging
import sqlite3

import psycopg.errors
import pytest
import sqlalchemy as sa
from conftest import make_app
from flask import request
from werkzeug.exceptions import InternalServerError, NotFound

from app import auth, broker, catalog, errors, queries, states
from app.extensions import db
from app.models import Control

# What each route of the ``raising`` fixture raises, by the name in its URL.
RAISED = {
    'invalid': lambda: catalog.ValidationError({'params.n': 'must be a <number>'}, 'invalid <job>'),
    'bad-query': lambda: queries.BadQuery('unknown state "<nope>"'),
    'conflict': lambda: states.StateConflict('retry', 'running'),
    'broker': lambda: broker.BrokerUnavailable('connection refused'),
    'ledger': lambda: sa.exc.OperationalError(
        'SELECT 1', {}, sqlite3.OperationalError('unable to open database file')),
    'locked': lambda: sa.exc.OperationalError(
        'UPDATE job SET state = ?', {}, sqlite3.OperationalError('database is locked')),
    'deadlock': lambda: sa.exc.OperationalError(
        'INSERT INTO job', {}, psycopg.errors.DeadlockDetected('deadlock detected')),
    'disconnected': lambda: sa.exc.DisconnectionError('the server closed the connection'),
    'disconnected-silently': lambda: sa.exc.DisconnectionError(''),
    'not-found': lambda: NotFound('no job <b>x</b> here'),
    'bug': lambda: KeyError('secret internals'),
}


@pytest.fixture
def raising(app):
    """The app with routes that raise, under /api/ and under a page URL.

    ``?write=1`` first flushes a ``Control`` row, half of a change that was
    never committed; ``app.seen`` records, after each request, whether the
    session still held it when the answer was made.
    """
    app.seen = []

    def handler(kind):
        if request.args.get('write'):
            db.session.add(Control(key='half-written', value=1))
            db.session.flush()
        if request.method == 'POST':
            request.get_data()  # reading the body is what hits MAX_CONTENT_LENGTH
        raise RAISED[kind]()
    auth.action('submit')(handler)  # a POST route must say what it does (app.auth)
    app.add_url_rule('/api/raise/<kind>', 'api_raise', handler, methods=['GET', 'POST'])
    app.add_url_rule('/raise/<kind>', 'page_raise', handler, methods=['GET', 'POST'])

    @app.after_request
    def probe(response):
        app.seen.append(db.session.get(Control, 'half-written') is not None)
        return response
    return app


BUSY = 'the ledger database is busy with other writers; nothing was changed, try again shortly'


# -- respond(), called directly in a request --

def test_respond_under_api_is_json_with_the_message_and_extra_fields(app):
    with app.test_request_context('/api/jobs/x'):
        body, status = errors.respond(409, 'cannot do that', state='running', fields={'a': 'b'})
    assert status == 409
    assert body.mimetype == 'application/json'
    assert body.get_json() == {'error': 'cannot do that', 'state': 'running', 'fields': {'a': 'b'}}


def test_respond_for_healthz_is_json_and_a_path_that_only_looks_like_the_api_is_a_page(app):
    with app.test_request_context('/healthz'):
        body, _ = errors.respond(503, 'down')
        assert body.get_json() == {'error': 'down'}
    for path in ('/api', '/apiary', '/jobs/api/x', '/healthz/more'):
        with app.test_request_context(path):
            page, status = errors.respond(404, 'gone')
        assert isinstance(page, str) and status == 404, path
        assert '<h1>404</h1>' in page and '<p>gone</p>' in page, path


def test_respond_to_a_browser_is_a_whole_page_and_to_htmx_just_the_fragment(app):
    with app.test_request_context('/jobs/x'):
        page, status = errors.respond(404, 'no such job')
    with app.test_request_context('/jobs/x', headers={'HX-Request': 'true'}):
        fragment, _ = errors.respond(404, 'no such job')
    assert status == 404
    assert '<html' in page and '<title>' in page and '<section class="panel error-page"' in page
    assert fragment.lstrip().startswith('<section class="panel error-page" role="alert">')
    assert '<html' not in fragment and '<p>no such job</p>' in fragment
    assert 'href="/"' in fragment  # the way back to the dashboard


def test_a_page_url_is_answered_with_html_even_to_a_client_asking_for_json(app):
    with app.test_request_context('/jobs/x', headers={'Accept': 'application/json'}):
        page, _ = errors.respond(404, 'no such job')
    assert isinstance(page, str) and '<h1>404</h1>' in page


def test_respond_lists_fields_on_the_page_and_escapes_every_message(app):
    with app.test_request_context('/jobs', headers={'HX-Request': 'true'}):
        page, status = errors.respond(
            400, '<script>alert(1)</script>', fields={'<i>name</i>': 'bad & <b>worse</b>'},
            detail='only in JSON')
    assert status == 400
    assert '&lt;script&gt;alert(1)&lt;/script&gt;' in page and '<script>' not in page
    assert '<bdi class="mono">&lt;i&gt;name&lt;/i&gt;</bdi> bad &amp; &lt;b&gt;worse&lt;/b&gt;' in page
    assert 'only in JSON' not in page  # extra fields other than ``fields`` are JSON's alone


def test_a_page_without_fields_has_no_field_list(app):
    for fields in ({}, None):
        with app.test_request_context('/jobs'):
            page, _ = errors.respond(400, 'bad', fields=fields)
        assert 'error-fields' not in page


# -- the handlers ``register`` installs --

@pytest.mark.parametrize('kind, status, extra', [
    ('invalid', 400, {'fields': {'params.n': 'must be a <number>'}}),
    ('bad-query', 400, {'fields': {}}),
    ('conflict', 409, {'state': 'running'}),
    ('broker', 503, {'detail': 'connection refused'}),
    ('ledger', 503, {}),
    ('locked', 503, {}),
    ('deadlock', 503, {}),
    ('disconnected', 503, {}),
    ('not-found', 404, {}),
    ('bug', 500, {}),
])
def test_each_exception_is_its_status_with_a_json_error_under_api(raising, kind, status, extra):
    resp = raising.test_client().get(f'/api/raise/{kind}')
    assert resp.status_code == status
    assert resp.mimetype == 'application/json'
    body = resp.get_json()
    assert set(body) == {'error', *extra}
    assert {k: body[k] for k in extra} == extra
    assert body['error'] == {
        'invalid': 'invalid <job>',
        'bad-query': 'unknown state "<nope>"',
        'conflict': 'cannot retry a running job; only failed, canceled jobs can be retried',
        'broker': 'the job broker is unreachable; nothing was changed, try again shortly',
        'ledger': 'the ledger database is unreachable; try again shortly',
        'locked': BUSY,
        'deadlock': BUSY,
        'disconnected': 'the ledger database is unreachable; try again shortly',
        'not-found': 'no job <b>x</b> here',
        'bug': InternalServerError.description,
    }[kind]


@pytest.mark.parametrize('kind, status, shown', [
    ('invalid', 400, ['invalid &lt;job&gt;', '<bdi class="mono">params.n</bdi> must be a &lt;number&gt;']),
    ('bad-query', 400, ['unknown state &#34;&lt;nope&gt;&#34;']),
    ('conflict', 409, ['cannot retry a running job']),
    ('broker', 503, ['the job broker is unreachable']),
    ('ledger', 503, ['the ledger database is unreachable']),
    ('deadlock', 503, ['the ledger database is busy']),
    ('not-found', 404, ['no job &lt;b&gt;x&lt;/b&gt; here']),
    ('bug', 500, ['The server encountered an internal error']),
])
def test_each_exception_is_its_status_on_an_escaped_page_elsewhere(raising, kind, status, shown):
    client = raising.test_client()
    page = client.get(f'/raise/{kind}')
    fragment = client.get(f'/raise/{kind}', headers={'HX-Request': 'true'})
    for resp in (page, fragment):
        assert resp.status_code == status and resp.mimetype == 'text/html'
        html = resp.get_data(as_text=True)
        assert f'<h1>{status}</h1>' in html
        for text in shown:
            assert text in html
    assert '<html' in page.get_data(as_text=True)
    assert '<html' not in fragment.get_data(as_text=True)


@pytest.mark.parametrize('kind, retry_after', [
    ('locked', '1'), ('deadlock', '1'), ('ledger', None), ('disconnected', None)])
def test_a_busy_ledger_asks_to_come_back_in_a_second_and_one_that_is_away_does_not(
        raising, kind, retry_after):
    resp = raising.test_client().post(f'/api/raise/{kind}?write=1')
    assert resp.status_code == 503
    assert resp.headers.get('Retry-After') == retry_after
    assert raising.seen == [False]


@pytest.mark.parametrize('orig, busy', [
    (psycopg.errors.DeadlockDetected('deadlock detected'), True),
    (psycopg.errors.SerializationFailure('could not serialize access'), True),
    (psycopg.errors.LockNotAvailable('could not obtain lock'), True),
    (sqlite3.OperationalError('database is locked'), True),
    (sqlite3.OperationalError('database table is locked: job'), True),
    (psycopg.errors.AdminShutdown('terminating connection'), False),
    (psycopg.OperationalError('connection refused'), False),
    (sqlite3.OperationalError('disk I/O error'), False),
    (sqlite3.OperationalError('no such table: job'), False),
])
def test_ledger_busy_tells_a_lock_or_deadlock_from_an_absent_database(orig, busy):
    assert errors.ledger_busy(sa.exc.OperationalError('SELECT 1', {}, orig)) is busy


@pytest.mark.parametrize('kind', ['conflict', 'broker', 'ledger', 'bug'])
def test_an_error_that_may_follow_a_write_rolls_the_session_back_before_answering(raising, kind):
    resp = raising.test_client().get(f'/api/raise/{kind}?write=1')
    assert resp.status_code in (409, 500, 503)
    assert raising.seen == [False]
    with raising.app_context():
        assert db.session.get(Control, 'half-written') is None


def test_a_bug_is_logged_with_its_traceback_and_its_text_stays_out_of_the_answer(raising, caplog):
    with caplog.at_level(logging.ERROR, logger='app.errors'):
        resp = raising.test_client().post('/raise/bug')
    assert resp.status_code == 500 and 'secret internals' not in resp.get_data(as_text=True)
    record, = [r for r in caplog.records if r.name == 'app.errors']
    assert record.getMessage() == 'unhandled error on POST /raise/bug'
    assert record.exc_info and record.exc_info[0] is KeyError


def test_a_broker_refusal_is_logged_as_a_warning_naming_the_cause(raising, caplog):
    with caplog.at_level(logging.WARNING, logger='app.errors'):
        raising.test_client().get('/api/raise/broker')
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == 'app.errors'] == [
        ('WARNING', 'broker unavailable: connection refused')]


@pytest.fixture
def ledger_in_a_folder(tmp_path):
    """An app whose SQLite ledger is alone in a folder the test can take away."""
    (tmp_path / 'ledger').mkdir()
    app = make_app(tmp_path, DATABASE_URL=f'sqlite:///{tmp_path}/ledger/ledger.db')

    @app.route('/api/count')
    def count():
        return {'jobs': db.session.execute(sa.text('SELECT count(*) FROM job')).scalar()}
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def test_a_ledger_that_went_away_is_a_503_logged_on_one_line(ledger_in_a_folder, tmp_path, caplog):
    app = ledger_in_a_folder
    client = app.test_client()
    assert client.get('/api/count').get_json() == {'jobs': 0}
    with app.app_context():
        db.engine.dispose()
    (tmp_path / 'ledger' / 'ledger.db').unlink()
    (tmp_path / 'ledger').rmdir()  # SQLite cannot even create a new file there
    with caplog.at_level(logging.WARNING, logger='app.errors'):
        resp = client.get('/api/count')
    assert resp.status_code == 503
    assert resp.get_json() == {'error': 'the ledger database is unreachable; try again shortly'}
    message, = [r.getMessage() for r in caplog.records if r.name == 'app.errors']
    assert message.startswith('ledger unavailable on GET /api/count: (sqlite3.OperationalError)')
    assert '\n' not in message and '[SQL' not in message


def test_a_ledger_error_without_a_message_is_still_a_503_logged(raising, caplog):
    with caplog.at_level(logging.WARNING, logger='app.errors'):
        resp = raising.test_client().get('/api/raise/disconnected-silently')
    assert resp.status_code == 503
    assert [r.getMessage() for r in caplog.records if r.name == 'app.errors'] == [
        'ledger unavailable on GET /api/raise/disconnected-silently: (no message)']


def test_a_ledger_error_still_answers_503_when_the_rollback_fails_too(raising, monkeypatch):
    def rollback():
        raise sa.exc.OperationalError('ROLLBACK', {}, sqlite3.OperationalError('disk I/O error'))
    monkeypatch.setattr(db.session, 'rollback', rollback)
    resp = raising.test_client().get('/api/raise/ledger')
    assert resp.status_code == 503
    assert resp.get_json() == {'error': 'the ledger database is unreachable; try again shortly'}


def test_a_body_over_the_limit_is_a_413_naming_the_limit(tmp_path):
    app = make_app(tmp_path, MAX_CONTENT_LENGTH=100)

    @app.post('/api/echo')
    @auth.action('submit')
    def echo():
        return {'size': len(request.get_data())}
    client = app.test_client()
    assert client.post('/api/echo', data=b'x' * 100).get_json() == {'size': 100}
    resp = client.post('/api/echo', data=b'x' * 101, content_type='application/octet-stream')
    assert resp.status_code == 413
    assert resp.get_json() == {'error': 'request body larger than 100 bytes'}
    page = client.post('/jobs', data=b'x' * 1000, content_type='application/octet-stream')
    assert page.status_code == 413 and 'request body larger than 100 bytes' in page.get_data(as_text=True)


def test_a_405_keeps_its_allow_header_and_the_json_content_type(raising):
    resp = raising.test_client().delete('/api/raise/bug')
    assert resp.status_code == 405
    assert set(resp.headers['Allow'].split(', ')) == {'GET', 'HEAD', 'OPTIONS', 'POST'}
    # werkzeug's own headers for its HTML page are left out
    assert resp.mimetype == 'application/json'
    assert resp.get_json() == {'error': 'The method is not allowed for the requested URL.'}


def test_an_unknown_url_is_a_404_page_or_json_by_its_prefix(client):
    page = client.get('/no/such/page')
    api = client.get('/api/no/such/thing')
    assert page.status_code == api.status_code == 404
    assert page.mimetype == 'text/html' and '<h1>404</h1>' in page.get_data(as_text=True)
    assert 'Allow' not in page.headers
    assert api.get_json() == {'error': NotFound.description}

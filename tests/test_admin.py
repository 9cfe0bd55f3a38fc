"""The admins' users and tokens page: the same commands as `flask users` and `flask tokens`."""
import re

import pytest
from conftest import make_app

from app import accounts, audit
from app.extensions import db

PASSWORD = 'long enough'


@pytest.fixture
def admin(tmp_path):
    app = make_app(tmp_path)
    with app.app_context():
        accounts.create_user('ada', PASSWORD, 'admin')
    client = app.test_client()
    assert client.post('/login', data={'name': 'ada', 'password': PASSWORD}).status_code == 303
    client.app = app
    yield client
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def test_an_admin_creates_changes_and_deletes_users_from_the_page(admin):
    resp = admin.post('/users', data={'name': 'bob', 'role': 'viewer', 'password': PASSWORD})
    assert resp.status_code == 303
    page = admin.get('/users').get_data(as_text=True)
    assert 'Created bob (viewer).' in page and '<td data-label="Name">bob</td>' in page
    assert admin.post('/users/bob/role', data={'role': 'operator'}).status_code == 303
    with admin.app.app_context():
        assert accounts.get_user('bob').role == 'operator'
    resp = admin.post('/users', data={'name': 'bob', 'role': 'viewer', 'password': PASSWORD})
    assert resp.status_code == 400 and 'exists already' in resp.get_data(as_text=True)
    resp = admin.post('/users', data={'name': 'carl', 'role': 'root', 'password': PASSWORD})
    assert resp.status_code == 400 and 'role must be one of' in resp.get_data(as_text=True)
    resp = admin.post('/users/ada/role', data={'role': 'viewer'})
    assert resp.status_code == 400 and 'last admin' in resp.get_data(as_text=True)
    assert admin.post('/users/bob/delete').status_code == 303
    assert admin.post('/users/nobody/delete').status_code == 400


def test_a_token_is_shown_once_and_revoked_from_the_page(admin):
    resp = admin.post('/tokens', data={'user': 'ada', 'name': 'deploy <b>'})
    assert resp.status_code == 201
    html = resp.get_data(as_text=True)
    token = re.search(r'<code id="new-token">(qm_[^<]+)</code>', html).group(1)
    assert 'deploy &lt;b&gt;' in html and 'deploy <b>' not in html
    assert token not in admin.get('/users').get_data(as_text=True)  # never again
    assert 'session' in admin.get_cookie('session').key and token not in admin.get_cookie('session').value
    program = admin.app.test_client()
    assert program.get('/api/stats', headers={'Authorization': f'Bearer {token}'}).status_code == 200
    token_id = re.search(r'id="token-(\d+)"', admin.get('/users').get_data(as_text=True)).group(1)
    assert admin.post(f'/tokens/{token_id}/revoke').status_code == 303
    assert program.get('/api/stats', headers={'Authorization': f'Bearer {token}'}).status_code == 401
    assert admin.post(f'/tokens/{token_id}/revoke').status_code == 404


def test_account_changes_are_in_the_audit_log(admin, tmp_path):
    admin.post('/users', data={'name': 'bob', 'role': 'viewer', 'password': PASSWORD})
    admin.post('/users/bob/role', data={'role': 'operator'})
    admin.post('/tokens', data={'user': 'bob', 'name': 'ci'})
    admin.post('/users/bob/delete')
    run = admin.app.test_cli_runner()
    run.invoke(args=['users', 'create', 'cli-made', '--role', 'viewer', '--password-stdin'],
               input=PASSWORD + '\n')
    with admin.app.app_context():
        got = [(e.user, e.via, e.action, e.target) for e in reversed(audit.entries())][1:]
    assert got[:4] == [('ada', 'session', 'create-user', 'user bob (viewer)'),
                       ('ada', 'session', 'set-role', 'user bob -> operator'),
                       ('ada', 'session', 'create-token', got[2][3]),
                       ('ada', 'session', 'delete-user', 'user bob')]
    assert re.fullmatch(r'token \d+ for bob', got[2][3])
    assert got[4][1:] == ('cli', 'create-user', 'user cli-made (viewer)')


def test_only_admins_reach_the_page(tmp_path):
    app = make_app(tmp_path)
    with app.app_context():
        accounts.create_user('ada', PASSWORD, 'admin')
        accounts.create_user('olly', PASSWORD, 'operator')
    client = app.test_client()
    client.post('/login', data={'name': 'olly', 'password': PASSWORD})
    assert client.get('/users').status_code == 403
    assert client.post('/tokens', data={'user': 'olly'}).status_code == 403
    assert 'href="/users"' not in client.get('/').get_data(as_text=True)

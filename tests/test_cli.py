"""The users and tokens commands, as `flask --app wsgi ...` runs them."""
import re

from app import accounts


def run(app, *args, input=None):
    return app.test_cli_runner().invoke(args=list(args), input=input)


def test_users_are_created_listed_changed_and_deleted(app):
    out = run(app, 'users', 'create', 'ada', '--role', 'admin', '--password-stdin',
              input='correct horse\n')
    assert out.exit_code == 0 and out.output == 'created ada (admin)\n'
    # From a prompt, asked twice
    out = run(app, 'users', 'create', 'bob', '--role', 'viewer', input='long enough\nlong enough\n')
    assert out.exit_code == 0, out.output
    listed = run(app, 'users', 'list').output.splitlines()
    assert [line.split('\t')[:2] for line in listed] == [['ada', 'admin'], ['bob', 'viewer']]
    assert run(app, 'users', 'set-role', 'bob', 'operator').output == 'bob is now operator\n'
    assert run(app, 'users', 'set-password', 'bob', '--password-stdin',
               input='new password\n').exit_code == 0
    with app.app_context():
        assert accounts.authenticate('bob', 'new password').role == 'operator'
    assert run(app, 'users', 'delete', 'bob').output == 'deleted bob\n'
    assert len(run(app, 'users', 'list').output.splitlines()) == 1


def test_users_commands_fail_clearly(app):
    out = run(app, 'users', 'create', 'ada', '--role', 'root', '--password-stdin', input='x' * 9)
    assert out.exit_code == 2 and "'root' is not one of" in out.output
    out = run(app, 'users', 'create', 'ada', '--role', 'admin', '--password-stdin', input='short\n')
    assert out.exit_code == 1 and 'Error: a password has at least 8 characters' in out.output
    out = run(app, 'users', 'delete', 'nobody')
    assert out.exit_code == 1 and "no user named 'nobody'" in out.output
    run(app, 'users', 'create', 'ada', '--role', 'admin', '--password-stdin', input='long enough\n')
    out = run(app, 'users', 'set-role', 'ada', 'viewer')
    assert out.exit_code == 1 and 'last admin' in out.output


def test_ensure_admin_creates_the_first_admin_once(app, monkeypatch):
    monkeypatch.delenv('ADMIN_PASSWORD', raising=False)
    out = run(app, 'users', 'ensure-admin')
    password = re.search(r'one-time password (\S+)', out.output).group(1)
    with app.app_context():
        assert accounts.authenticate('admin', password).role == 'admin'
    assert run(app, 'users', 'ensure-admin').output == 'users exist already; nothing to do\n'


def test_ensure_admin_takes_the_password_from_the_environment(app, monkeypatch):
    monkeypatch.setenv('ADMIN_PASSWORD', 'from the environment')
    out = run(app, 'users', 'ensure-admin', '--name', 'boss')
    assert out.exit_code == 0 and 'from the environment' not in out.output
    with app.app_context():
        assert accounts.authenticate('boss', 'from the environment').role == 'admin'


def test_a_token_is_printed_once_works_and_is_revoked(app):
    run(app, 'users', 'create', 'bot', '--role', 'operator', '--password-stdin',
        input='long enough\n')
    token = run(app, 'tokens', 'create', '--user', 'bot', '--name', 'ci').output.strip()
    client = app.test_client()
    auth = {'Authorization': f'Bearer {token}'}
    assert client.post('/api/jobs', json={'task': 'noop'}, headers=auth).status_code == 201
    listed = run(app, 'tokens', 'list').output
    assert token not in listed and '\tci\tbot\toperator\t' in listed and 'last used 20' in listed
    token_id = listed.split('\t', 1)[0]
    assert run(app, 'tokens', 'revoke', token_id).output == f'revoked token {token_id} (ci)\n'
    resp = client.get('/api/stats', headers=auth)
    assert resp.status_code == 401 and 'unknown or revoked token' in resp.get_json()['error']
    out = run(app, 'tokens', 'create', '--user', 'nobody')
    assert out.exit_code == 1 and "no user named 'nobody'" in out.output

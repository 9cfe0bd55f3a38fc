"""Accounts: users with hashed passwords and roles, API tokens, slowed failed logins."""
import datetime as dt
import threading

import pytest
import sqlalchemy as sa

from app import accounts
from app.extensions import db
from app.models import ApiToken, LoginFailure, User


def test_a_user_logs_in_with_the_right_password_only(ctx):
    user = accounts.create_user('ada', 'correct horse', 'operator')
    assert user.password_hash.startswith('scrypt:') and 'correct horse' not in user.password_hash
    assert accounts.authenticate('ada', 'wrong horse') is None
    assert accounts.authenticate('nobody', 'correct horse') is None
    logged = accounts.authenticate('ada', 'correct horse')
    assert logged.id == user.id and logged.last_login_at is not None


@pytest.mark.parametrize('name,password,role,message', [
    ('', 'long enough', 'viewer', 'a user name is 1 to 64'),
    ('x' * 65, 'long enough', 'viewer', 'a user name is 1 to 64'),
    ('tab\there', 'long enough', 'viewer', 'letters, digits'),
    ('a/b', 'long enough', 'viewer', 'letters, digits'),
    ('..', 'long enough', 'viewer', 'not starting with a dot'),
    ('ok', 'short', 'viewer', 'at least 8 characters'),
    ('ok', 'nul\x00inside', 'viewer', 'NUL'),
])
def test_bad_names_and_passwords_are_refused(ctx, name, password, role, message):
    with pytest.raises(accounts.AccountError, match=message):
        accounts.create_user(name, password, role)
    assert not accounts.any_user()


def test_names_are_unique_and_roles_known(ctx):
    accounts.create_user('ada', 'long enough', 'admin')
    with pytest.raises(accounts.AccountError, match='exists already'):
        accounts.create_user('ada', 'another one', 'viewer')
    with pytest.raises(ValueError, match='role must be one of'):
        accounts.create_user('bob', 'long enough', 'root')


def test_a_new_role_or_password_ends_the_users_sessions(ctx):
    accounts.create_user('root', 'long enough', 'admin')
    user = accounts.create_user('ada', 'long enough', 'viewer')
    session_id = user.get_id()
    assert accounts.load_session_user(session_id).name == 'ada'
    accounts.set_role('ada', 'operator')
    assert accounts.load_session_user(session_id) is None
    session_id = accounts.get_user('ada').get_id()
    accounts.set_password('ada', 'a new password')
    assert accounts.load_session_user(session_id) is None
    assert accounts.authenticate('ada', 'a new password').role == 'operator'
    for forged in ('', 'x', '1', ':1', '1:x', None):
        assert accounts.load_session_user(forged) is None


def test_without_any_admin_other_users_can_still_change(ctx):
    accounts.create_user('vic', 'long enough', 'viewer')
    accounts.create_user('olly', 'long enough', 'operator')
    accounts.set_role('vic', 'operator')
    accounts.delete_user('olly')
    assert [(u.name, u.role) for u in accounts.list_users()] == [('vic', 'operator')]


def test_the_last_admin_stays(ctx):
    accounts.create_user('root', 'long enough', 'admin')
    with pytest.raises(accounts.AccountError, match='last admin'):
        accounts.set_role('root', 'viewer')
    with pytest.raises(accounts.AccountError, match='last admin'):
        accounts.delete_user('root')
    accounts.create_user('second', 'long enough', 'admin')
    accounts.delete_user('root')
    assert [u.name for u in accounts.list_users()] == ['second']


def test_a_token_acts_as_its_user_until_revoked_and_only_its_hash_is_kept(ctx):
    accounts.create_user('bot', 'long enough', 'operator')
    row, token = accounts.create_token('bot', 'deploy script')
    assert token.startswith('qm_') and len(token) > 40
    assert token not in row.token_hash and db.session.get(ApiToken, row.id).name == 'deploy script'
    assert accounts.token_user(token).name == 'bot'
    assert db.session.get(ApiToken, row.id).last_used_at is not None
    for wrong in (token + 'x', token[:-1], 'qm_', '', None, 'x' * 500):
        assert accounts.token_user(wrong) is None
    accounts.revoke_token(row.id)
    assert accounts.token_user(token) is None
    with pytest.raises(accounts.AccountError, match='no token'):
        accounts.revoke_token(row.id)


def test_a_known_token_is_looked_up_once_in_a_while_and_forgotten_when_changed_here(
        ctx, monkeypatch):
    accounts.create_user('bot', 'long enough', 'operator')
    row, token = accounts.create_token('bot')
    cache = accounts.token_cache()
    assert cache.identity(token) == ('bot', 'operator')
    # Changed around this process (another web process, the CLI): still known
    # until the entry is older than SECONDS, then looked up again.
    db.session.execute(sa.update(User).where(User.name == 'bot').values(role='viewer'))
    db.session.commit()
    assert cache.identity(token) == ('bot', 'operator')
    monkeypatch.setattr(accounts.TokenCache, 'SECONDS', 0.0)
    cache.clear()
    assert cache.identity(token) == ('bot', 'viewer')
    monkeypatch.setattr(accounts.TokenCache, 'SECONDS', 60.0)
    assert cache.identity(token) == ('bot', 'viewer')
    # Changed here: forgotten at once.
    accounts.set_role('bot', 'operator')
    assert cache.identity(token) == ('bot', 'operator')
    accounts.revoke_token(row.id)
    assert cache.identity(token) is None
    assert cache.identity('qm_unknown') is None and cache.identity('x' * 500) is None


def test_deleting_a_user_revokes_their_tokens(ctx):
    accounts.create_user('root', 'long enough', 'admin')
    accounts.create_user('bot', 'long enough', 'viewer')
    _row, token = accounts.create_token('bot')
    accounts.delete_user('bot')
    assert accounts.token_user(token) is None and accounts.list_tokens() == []


def test_failed_logins_are_slowed_per_account_and_per_address(ctx):
    assert accounts.login_wait('ada', '10.0.0.1') == 0
    for _ in range(accounts.FREE_FAILURES - 1):
        accounts.login_failed('ada', '10.0.0.1')
    assert accounts.login_wait('ada', '10.0.0.1') == 0  # the free ones cost nothing
    accounts.login_failed('ada', '10.0.0.1')
    assert 0 < accounts.login_wait('ada', '10.0.0.2') <= 1  # the account, from anywhere
    assert 0 < accounts.login_wait('bob', '10.0.0.1') <= 1  # the address, for any account
    accounts.login_failed('ada', '10.0.0.1')
    assert 1 < accounts.login_wait('ada', '10.0.0.1') <= 2  # doubling
    assert accounts.login_wait('bob', '10.0.0.2') == 0
    for _ in range(20):
        accounts.login_failed('ada', '10.0.0.1')
    assert accounts.login_wait('ada', '10.0.0.1') <= accounts.MAX_WAIT
    # A quiet window forgets them; a success forgets them at once.
    old = dt.datetime(2000, 1, 1)
    for row in db.session.query(LoginFailure):
        row.last_at = old
    db.session.commit()
    assert accounts.login_wait('ada', '10.0.0.1') == 0
    accounts.login_failed('ada', '10.0.0.1')
    assert db.session.get(LoginFailure, 'account:ada').failures == 1
    accounts.login_succeeded('ada', '10.0.0.1')
    assert db.session.query(LoginFailure).count() == 0
    assert db.session.query(User).count() == 0


def test_two_admins_demoting_each_other_at_once_leave_one_admin(app):
    with app.app_context():
        accounts.create_user('ada', 'long enough', 'admin')
        accounts.create_user('bob', 'long enough', 'admin')
    barrier = threading.Barrier(2)
    outcomes = []

    def demote(name):
        with app.app_context():
            barrier.wait()
            try:
                accounts.set_role(name, 'viewer')
                outcomes.append('done')
            except accounts.AccountError:
                outcomes.append('refused')
            finally:
                db.session.remove()
    threads = [threading.Thread(target=demote, args=(n,)) for n in ('ada', 'bob')]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    with app.app_context():
        assert [u.role for u in accounts.list_users()].count('admin') == 1
    assert sorted(outcomes) == ['done', 'refused']

"""Users, their passwords and roles, API tokens, and the slowing of failed logins.

Passwords are hashed with Werkzeug's scrypt (``generate_password_hash``);
tokens are random and stored as their SHA-256 (see :class:`app.models.ApiToken`).
Every function works in the current app context and commits its change.
"""
import datetime as dt
import functools
import hashlib
import re
import secrets
import threading
import time

import sqlalchemy as sa
from flask import current_app, has_app_context
from sqlalchemy.orm import joinedload
from werkzeug.security import check_password_hash, generate_password_hash

from . import events, roles
from .extensions import db
from .models import ApiToken, LoginFailure, User, utcnow

MAX_NAME = 64
MIN_PASSWORD = 8
TOKEN_PREFIX = 'qm_'

# Failed logins: the first FREE_FAILURES within FAILURE_WINDOW seconds cost
# nothing; each one after that doubles the wait before the next attempt is
# heard (1 s, 2 s, 4 s...), up to MAX_WAIT seconds. Per account and per
# address, so neither guessing one password from many addresses nor many
# accounts from one address goes fast.
FREE_FAILURES = 5
FAILURE_WINDOW = 15 * 60
MAX_WAIT = 300


@functools.cache
def _dummy_hash():
    # Checked against when the account does not exist, so that the answer
    # takes as long as for a wrong password (the name's existence does not
    # leak). Made on first use: a hash costs about 0.1 s of CPU, which every
    # process importing this module (consumers, their ledger writers, CLI
    # commands) paid at start.
    return generate_password_hash('not a password', method='scrypt')


class AccountError(ValueError):
    """A user or token command that cannot be done (unknown name, bad password...)."""


_NAME = re.compile(r'[\w@+-][\w.@+-]*')


def _check_name(name):
    name = (name or '').strip()
    if not name or len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise AccountError(f'a user name is 1 to {MAX_NAME} letters, digits and . @ + - _, '
                           f'not starting with a dot')
    return name


def _check_password(password):
    if password is None or len(password) < MIN_PASSWORD:
        raise AccountError(f'a password has at least {MIN_PASSWORD} characters')
    if '\x00' in password:
        raise AccountError('a password cannot contain NUL')
    return password


def any_user():
    """Whether at least one user exists."""
    return db.session.scalar(sa.select(User.id).limit(1)) is not None


def get_user(name):
    """The :class:`User` named ``name``; :class:`AccountError` if there is none."""
    user = db.session.scalar(sa.select(User).where(User.name == name))
    if user is None:
        raise AccountError(f'no user named {name!r}')
    return user


def list_users():
    """Every user, by name."""
    return db.session.scalars(sa.select(User).order_by(User.name)).all()


def create_user(name, password, role):
    """Create a user; returns it. Raises :class:`AccountError` (taken name, short password)
    or :class:`app.roles.UnknownRole`."""
    name = _check_name(name)
    roles.check(role)
    _check_password(password)
    if db.session.scalar(sa.select(User.id).where(User.name == name)) is not None:
        raise AccountError(f'a user named {name!r} exists already')
    user = User(name=name, password_hash=generate_password_hash(password, method='scrypt'),
                role=role, session_epoch=secrets.randbelow(2 ** 62), created_at=utcnow())
    db.session.add(user)
    db.session.commit()
    # The login-free mode ends with the first user: its sockets close ('').
    events.publish(sessions=[''])
    return user


def set_role(name, role):
    """Give ``name`` another role; its sessions end (it logs in again). Returns the user."""
    roles.check(role)
    user = get_user(name)
    was_admin = user.role == 'admin'
    user.role = role
    user.session_epoch += 1
    db.session.flush()
    if was_admin:
        _keep_an_admin(user)
    db.session.commit()
    _forget_tokens()
    events.publish(sessions=[user.name])
    return user


def set_password(name, password):
    """Give ``name`` a new password; its sessions end. Returns the user."""
    _check_password(password)
    user = get_user(name)
    user.password_hash = generate_password_hash(password, method='scrypt')
    user.session_epoch += 1
    db.session.commit()
    _forget_tokens()
    events.publish(sessions=[user.name])
    return user


def end_sessions(user):
    """End every session of ``user`` (a :class:`User`): logging out, here or anywhere."""
    user.session_epoch += 1
    db.session.commit()
    _forget_tokens()
    events.publish(sessions=[user.name])


def delete_user(name):
    """Delete ``name``, its tokens and (through its session epoch) its sessions."""
    user = get_user(name)
    was_admin = user.role == 'admin'
    db.session.execute(sa.delete(ApiToken).where(ApiToken.user_id == user.id))
    db.session.delete(user)
    db.session.flush()
    if was_admin:
        _keep_an_admin(user)
    db.session.commit()
    _forget_tokens()
    events.publish(sessions=[name])


def _keep_an_admin(user):
    """Undo the change just flushed and refuse it if it left no admin.

    Counted after the change, in its transaction: the write holds SQLite's
    lock (another writer waits, then counts this change too) and the admins'
    rows are locked on PostgreSQL, so two admins demoting each other at once
    cannot both succeed.
    """
    admins = db.session.scalars(
        sa.select(User.id).where(User.role == 'admin').with_for_update()).all()
    if not admins:
        db.session.rollback()
        raise AccountError(f'{user.name!r} is the last admin; make another admin first')


def authenticate(name, password):
    """The :class:`User` with this name and password, or None (in about the same time either way)."""
    user = db.session.scalar(sa.select(User).where(User.name == (name or '').strip()))
    if user is None:
        check_password_hash(_dummy_hash(), password or '')
        return None
    if not check_password_hash(user.password_hash, password or ''):
        return None
    user.last_login_at = utcnow()
    db.session.commit()
    return user


def load_session_user(session_id):
    """The :class:`User` a session's id (``"<id>:<epoch>"``) names, if that session still holds."""
    user_id, _, epoch = str(session_id).partition(':')
    if not (user_id.isascii() and user_id.isdigit() and epoch.isascii() and epoch.isdigit()):
        return None
    user = db.session.get(User, int(user_id))
    return user if user is not None and user.session_epoch == int(epoch) else None


# -- API tokens --

def _hash_token(token):
    return hashlib.sha256(token.encode('utf-8', 'surrogatepass')).hexdigest()


def create_token(user_name, name=None):
    """A new token for ``user_name``: ``(ApiToken row, the token)``; the token is shown only now."""
    user = get_user(user_name)
    label = (name or '').strip() or f'token {utcnow():%Y-%m-%d %H:%M}'
    if len(label) > MAX_NAME or not label.isprintable():
        raise AccountError(f'a token name is at most {MAX_NAME} printable characters')
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=label, token_hash=_hash_token(token),
                   created_at=utcnow())
    db.session.add(row)
    db.session.commit()
    return row, token


def list_tokens():
    """Every token (never the token itself), newest first."""
    return db.session.scalars(sa.select(ApiToken).order_by(ApiToken.id.desc())).all()


def revoke_token(token_id):
    """Revoke token ``token_id``; :class:`AccountError` if there is none."""
    row = db.session.get(ApiToken, token_id)
    if row is None:
        raise AccountError(f'no token with id {token_id}')
    db.session.delete(row)
    db.session.commit()
    _forget_tokens()
    return row


# The token with its user, in one query built once: every API request asks.
_TOKEN_QUERY = (sa.select(ApiToken).options(joinedload(ApiToken.user))
                .where(ApiToken.token_hash == sa.bindparam('hash')))


def _token_shaped(token):
    """Whether ``token`` could be one of ours (else no lookup is worth it)."""
    return bool(token) and token.startswith(TOKEN_PREFIX) and len(token) <= 200


class TokenCache:
    """Who bearer tokens name, remembered by this process for up to :attr:`SECONDS`.

    Every API request shows its token; looking it up costs a query. A known
    token's ``(user name, role)`` is kept for 10 seconds (what an open
    socket waits before it checks its credential again): a token revoked,
    or a user changed, by another process counts for at most that long
    here; changes made in this process clear it at once. Unknown tokens are
    never kept. At most :attr:`SIZE` tokens; keyed by the token's SHA-256.
    """
    SECONDS = 10.0
    SIZE = 10_000

    def __init__(self):
        self._known = {}
        self._lock = threading.Lock()

    def identity(self, token):
        """``(name, role)`` of ``token``'s user, or None (unknown or revoked)."""
        if not _token_shaped(token):
            return None
        key = _hash_token(token)
        now = time.monotonic()
        with self._lock:
            known = self._known.get(key)
        if known is not None and known[0] > now:
            return known[1]
        user = token_user(token)
        if user is None:
            return None
        with self._lock:
            if len(self._known) >= self.SIZE:
                self._known.clear()
            self._known[key] = (now + self.SECONDS, (user.name, user.role))
        return user.name, user.role

    def clear(self):
        """Forget every token (a token, a role or a user changed)."""
        with self._lock:
            self._known.clear()


def token_cache():
    """This process's :class:`TokenCache` (one per app); in an app context."""
    return current_app.extensions.setdefault('queue_manager.tokens', TokenCache())


def _forget_tokens():
    if has_app_context():
        token_cache().clear()


def token_user(token):
    """The :class:`User` a bearer ``token`` belongs to, or None; notes when it was last used.

    The last-use time is written at most once a minute per token, so a busy
    program does not write a row per request.
    """
    if not _token_shaped(token):
        return None
    row = db.session.scalar(_TOKEN_QUERY, {'hash': _hash_token(token)})
    if row is None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > dt.timedelta(minutes=1):
        row.last_used_at = now
        db.session.commit()
    return row.user


# -- slowing failed logins --

def _keys(name, address):
    return [f'account:{(name or "").strip()[:MAX_NAME]}', f'address:{address or "unknown"}']


def login_wait(name, address):
    """Seconds to wait before a login for ``name`` from ``address`` is heard (0: at once)."""
    now = utcnow()
    wait = 0.0
    for row in db.session.scalars(sa.select(LoginFailure).where(
            LoginFailure.key.in_(_keys(name, address)))):
        if (now - row.last_at).total_seconds() > FAILURE_WINDOW or row.failures < FREE_FAILURES:
            continue
        delay = min(MAX_WAIT, 2 ** (row.failures - FREE_FAILURES))
        wait = max(wait, delay - (now - row.last_at).total_seconds())
    return max(0.0, wait)


def login_failed(name, address):
    """Count a failed login against the account and the address.

    Called before the password is checked (and undone by
    :func:`login_succeeded`), so that guesses sent in parallel are counted
    before any of them is heard.
    """
    now = utcnow()
    for key in _keys(name, address):
        for _try in range(3):  # two first failures at once: one inserts, one updates
            row = db.session.get(LoginFailure, key)
            if row is None:
                db.session.add(LoginFailure(key=key, failures=1, last_at=now))
            else:
                stale = (now - row.last_at).total_seconds() > FAILURE_WINDOW
                db.session.execute(sa.update(LoginFailure).where(LoginFailure.key == key).values(
                    failures=1 if stale else LoginFailure.failures + 1, last_at=now))
            try:
                db.session.commit()
                break
            except sa.exc.IntegrityError:
                db.session.rollback()


def login_succeeded(name, address):
    """Forget the failures of the account and the address."""
    db.session.execute(sa.delete(LoginFailure).where(LoginFailure.key.in_(_keys(name, address))))
    db.session.commit()

"""Command-line management of users and API tokens, in Flask's conventions.

``flask --app wsgi users create NAME --role ROLE [--password-stdin]``,
``users list``, ``users set-role NAME ROLE``, ``users set-password NAME``,
``users delete NAME``, ``users ensure-admin``; ``flask --app wsgi tokens
create --user NAME [--name LABEL]`` (prints the token once), ``tokens
list``, ``tokens revoke ID``. ``flask --app wsgi ledger recount [--check]``
rebuilds (or only checks) the counters, rollups and search index the
database keeps beside the job rows. Errors print a message and exit with
status 1.
"""
import getpass
import os
import secrets
import sys

import click
from flask.cli import AppGroup

from . import accounts, audit, roles
from .extensions import db
from .ledger import tallies

users = AppGroup('users', help='Manage the users who log in to the dashboard.')
tokens = AppGroup('tokens', help='Manage the API tokens of programs (Authorization: Bearer).')
ledger = AppGroup('ledger', help='Maintain the ledger\'s counters, rollups and search index.')


def register(app):
    """Add the ``users``, ``tokens`` and ``ledger`` command groups to ``app``'s ``flask`` command."""
    app.cli.add_command(users)
    app.cli.add_command(tokens)
    app.cli.add_command(ledger)


def _fail(exc):
    raise click.ClickException(str(exc))


def _audit(action, target):
    # Account changes made here are in the audit log too, as the system
    # user who ran the command.
    try:
        who = getpass.getuser()
    except Exception:
        who = None
    audit.record(user=who, role=None, via='cli', action=action, target=target)


def _read_password(password_stdin):
    if password_stdin:
        password = sys.stdin.readline().rstrip('\r\n')
    else:
        password = click.prompt('Password', hide_input=True, confirmation_prompt=True)
    return password


@users.command('create')
@click.argument('name')
@click.option('--role', type=click.Choice(roles.ROLES), required=True, help='What the user may do.')
@click.option('--password-stdin', is_flag=True, help='Read the password from standard input.')
def create_user(name, role, password_stdin):
    """Create user NAME with ROLE (password from a prompt, or from standard input)."""
    try:
        user = accounts.create_user(name, _read_password(password_stdin), role)
    except (accounts.AccountError, roles.UnknownRole) as exc:
        _fail(exc)
    _audit('create-user', f'user {user.name} ({user.role})')
    click.echo(f'created {user.name} ({user.role})')


@users.command('list')
def list_users():
    """List the users: name, role, created, last login."""
    for user in accounts.list_users():
        d = user.to_dict()
        click.echo(f"{d['name']}\t{d['role']}\tcreated {d['created_at']}\t"
                   f"last login {d['last_login_at'] or 'never'}")


@users.command('set-role')
@click.argument('name')
@click.argument('role', type=click.Choice(roles.ROLES))
def set_role(name, role):
    """Give user NAME the role ROLE (their sessions end)."""
    try:
        accounts.set_role(name, role)
    except (accounts.AccountError, roles.UnknownRole) as exc:
        _fail(exc)
    _audit('set-role', f'user {name} -> {role}')
    click.echo(f'{name} is now {role}')


@users.command('set-password')
@click.argument('name')
@click.option('--password-stdin', is_flag=True, help='Read the password from standard input.')
def set_password(name, password_stdin):
    """Give user NAME a new password (their sessions end)."""
    try:
        accounts.set_password(name, _read_password(password_stdin))
    except accounts.AccountError as exc:
        _fail(exc)
    _audit('set-password', f'user {name}')
    click.echo(f'password of {name} changed')


@users.command('delete')
@click.argument('name')
def delete_user(name):
    """Delete user NAME with their tokens and sessions."""
    try:
        accounts.delete_user(name)
    except accounts.AccountError as exc:
        _fail(exc)
    _audit('delete-user', f'user {name}')
    click.echo(f'deleted {name}')


@users.command('ensure-admin')
@click.option('--name', default='admin', show_default=True)
def ensure_admin(name):
    """Create the first admin if no user exists: password from $ADMIN_PASSWORD, else a
    one-time password printed here (change it with ``users set-password``)."""
    if accounts.any_user():
        click.echo('users exist already; nothing to do')
        return
    password = os.environ.get('ADMIN_PASSWORD')
    generated = not password
    if generated:
        password = secrets.token_urlsafe(12)
    try:
        accounts.create_user(name, password, 'admin')
    except accounts.AccountError as exc:
        _fail(exc)
    _audit('create-user', f'user {name} (admin)')
    if generated:
        click.echo(f'created admin {name!r} with the one-time password {password} '
                   f'(change it: flask --app wsgi users set-password {name})')
    else:
        click.echo(f'created admin {name!r} with the password in ADMIN_PASSWORD')


@tokens.command('create')
@click.option('--user', 'user_name', required=True, help='The user the token acts as.')
@click.option('--name', 'label', default=None, help='A label, to recognise it later.')
def create_token(user_name, label):
    """Create an API token for a user and print it (it is shown only this once)."""
    try:
        row, token = accounts.create_token(user_name, label)
    except accounts.AccountError as exc:
        _fail(exc)
    _audit('create-token', f'token {row.id} for {user_name}')
    click.echo(token)


@tokens.command('list')
def list_tokens():
    """List the tokens: id, name, user, role, created, last used (never the token)."""
    for row in accounts.list_tokens():
        d = row.to_dict()
        click.echo(f"{d['id']}\t{d['name']}\t{d['user']}\t{d['role']}\tcreated {d['created_at']}"
                   f"\tlast used {d['last_used_at'] or 'never'}")


@tokens.command('revoke')
@click.argument('token_id', type=int)
def revoke_token(token_id):
    """Revoke token ID: programs using it get 401 from now on."""
    try:
        row = accounts.revoke_token(token_id)
    except accounts.AccountError as exc:
        _fail(exc)
    _audit('revoke-token', f'token {row.id}')
    click.echo(f'revoked token {row.id} ({row.name})')


@ledger.command('recount')
@click.option('--check', is_flag=True,
              help='Only compare the kept counters with the rows; exit 1 if they differ.')
def recount(check):
    """Rebuild the counters, per-minute rollups and search index from the job rows.

    The database keeps them in the same transaction as every change, so
    this is for after a restore or a change made with the triggers off.
    Writers wait while it runs (a few seconds per million jobs).
    """
    with db.engine.begin() as conn:
        if check:
            if conn.dialect.name == 'postgresql':  # both sides from one snapshot
                conn.exec_driver_sql('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ')
            wrong = tallies.differences(conn)
            for table, keys in sorted(wrong.items()):
                for key, (kept, counted) in sorted(keys.items()):
                    if table == 'job_search':
                        click.echo(f'search index: {kept} rows {key[0]}')
                    else:
                        shown = ' '.join(k if k else "''" for k in key)
                        click.echo(f'{table} {shown}: kept {kept}, rows {counted}')
            if wrong:
                counters = sum(len(keys) for table, keys in wrong.items() if table != 'job_search')
                raise click.ClickException(
                    f'{counters} counters differ from the rows'
                    + ('' if 'job_search' not in wrong else '; the search index is out of date')
                    + '; run "flask --app wsgi ledger recount" to rebuild them')
            click.echo('counters agree with the rows')
            return
        written = tallies.recount(conn)
    click.echo(f'rebuilt: {written["job_count"]} counter rows, {written["job_minute"]} '
               f'per-minute rows ({written["differed"]} differed before)')
    _audit('ledger-recount', None)

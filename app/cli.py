"""Command-line management of users and API tokens, in Flask's conventions.

``flask --app wsgi users create NAME --role ROLE [--password-stdin]``,
``users list``, ``users set-role NAME ROLE``, ``users set-password NAME``,
``users delete NAME``, ``users ensure-admin``; ``flask --app wsgi tokens
create --user NAME [--name LABEL]`` (prints the token once), ``tokens
list``, ``tokens revoke ID``. ``flask --app wsgi ledger recount [--check]``
rebuilds (or only checks) the counters, rollups and search index the
database keeps beside the job rows. ``flask --app wsgi jobs stats``,
``jobs list`` (the API's filters and paging), ``jobs retry|cancel|delete``
(by ids or by filter, after a confirmation that ``--yes`` skips) and ``jobs
purge --days N`` act on jobs through the same services as the API. Errors
print a message and exit with status 1 (2 for a usage error).
"""
import contextlib
import getpass
import os
import secrets
import sys

import click
import sqlalchemy.exc as sa_exc
from flask import current_app
from flask.cli import AppGroup
from werkzeug.exceptions import NotFound

from . import accounts, audit, broker, catalog, jobs, queries, roles, states, templating
from .extensions import db
from .ledger import tallies

users = AppGroup('users', help='Manage the users who log in to the dashboard.')
tokens = AppGroup('tokens', help='Manage the API tokens of programs (Authorization: Bearer).')
ledger = AppGroup('ledger', help='Maintain the ledger\'s counters, rollups and search index.')
jobs_cli = AppGroup('jobs', help='See and act on jobs: stats, list, retry, cancel, delete, purge.')


class _WholeNumber(click.IntRange):
    """click's ``IntRange`` over ASCII digits only (see :func:`app.catalog.whole_number`):
    ``int()`` alone takes '٣' and '1_000'."""
    name = 'integer'

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value = catalog.whole_number(value)
            except ValueError:
                self.fail(f'{value!r} is not a whole number (ASCII digits)', param, ctx)
        return super().convert(value, param, ctx)


def register(app):
    """Add the ``users``, ``tokens``, ``ledger`` and ``jobs`` command groups to ``app``'s
    ``flask`` command."""
    app.cli.add_command(users)
    app.cli.add_command(tokens)
    app.cli.add_command(ledger)
    app.cli.add_command(jobs_cli)


def _fail(exc):
    raise click.ClickException(str(exc))


def _audit(action, target, count=None, outcome='done'):
    # Changes made here are in the audit log too, as the system user who
    # ran the command.
    try:
        who = getpass.getuser()
    except Exception:
        who = None
    audit.record(user=who, role=None, via='cli', action=action, target=target, count=count,
                 outcome=outcome)


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
@click.argument('token_id', type=_WholeNumber())
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
            tallies.one_snapshot(conn)  # writers go on: both sides as of one moment
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


# -- jobs -------------------------------------------------------------------------

@contextlib.contextmanager
def _job_errors(action=None, target=None):
    """Turn the services' refusals into a message and exit status 1.

    With ``action``, a refused change is written to the audit log as the API
    writes a refused request.
    """
    try:
        yield
    except (NotFound, queries.BadQuery, states.StateConflict, broker.BrokerUnavailable,
            sa_exc.OperationalError) as exc:
        db.session.rollback()
        if isinstance(exc, NotFound):
            message, outcome = exc.description, 'refused: 404 not found'
        elif isinstance(exc, states.StateConflict):
            message, outcome = str(exc), 'refused: 409 conflict'
        elif isinstance(exc, broker.BrokerUnavailable):
            message = (f'the job broker is unreachable ({exc}); what it did not take was left '
                       f'as it was, try again shortly')
            outcome = 'refused: broker unreachable'
        elif isinstance(exc, sa_exc.OperationalError):
            first = (str(exc.orig if exc.orig is not None else exc).splitlines() or ['?'])[0]
            raise click.ClickException(f'the ledger database is unreachable: {first[:300]}')
        else:
            message, outcome = str(exc), 'refused: 400 bad request'
        if action is not None:
            _audit(action, target, outcome=outcome)
        raise click.ClickException(message) from None


def _filter_options(command):
    """The jobs list's filters (app.api.FILTERS), as options."""
    for option in reversed((
            click.option('--state', type=click.Choice(states.JOB_STATES),
                         help='Only jobs in this state.'),
            click.option('--queue', help='Only jobs of this queue.'),
            click.option('--task', help='Only jobs of this task type.'),
            click.option('-q', '--search', 'q', metavar='TEXT',
                         help='An id prefix, or text in the parameters, the error or the result.'))):
        command = option(command)
    return command


def _filters(state, queue, task, q):
    filters = queries.parse_filters({'state': state, 'queue': queue, 'task': task, 'q': q})
    with _job_errors():
        queries.check_filters(filters)
    return filters


def _described(filters):
    """``state=failed queue=x``, as the audit log writes a bulk action's filter."""
    return ' '.join(f'{k}={v}' for k, v in filters.items() if v) or '(all jobs)'


def _table(header, rows):
    """Lines of a plain text table, columns as wide as their widest cell."""
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ['  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _json(body):
    # Flask's JSON provider: the same encoding as the API's answers.
    click.echo(current_app.json.dumps(body))


@jobs_cli.command('stats')
@click.option('--json', 'as_json', is_flag=True, help='Print what GET /api/stats answers.')
def job_stats(as_json):
    """Counts of jobs per queue and state."""
    with _job_errors():
        counts = queries.stats()
    if as_json:
        _json(counts)
        return
    named = current_app.config['QUEUES']
    order = named + sorted(set(counts['queues']) - set(named))
    empty = dict.fromkeys(states.JOB_STATES, 0)
    rows = [[queue, *(counts['queues'].get(queue, empty)[s] for s in states.JOB_STATES),
             sum(counts['queues'].get(queue, empty).values())] for queue in order]
    rows.append(['all', *(counts['states'][s] for s in states.JOB_STATES), counts['total']])
    for line in _table(['QUEUE', *(s.upper() for s in states.JOB_STATES), 'TOTAL'], rows):
        click.echo(line)


@jobs_cli.command('list')
@_filter_options
@click.option('--limit', type=_WholeNumber(min=1), default=None,
              help='Jobs per page (default PAGE_SIZE, at most MAX_PAGE_SIZE).')
@click.option('--sort', type=click.Choice(queries.SORTS), default='newest', show_default=True,
              help='newest or oldest first by creation, or runtime: finished jobs, the '
                   'longest last attempt first (a cursor belongs to its order).')
@click.option('--cursor', help='The "next" cursor of the previous page.')
@click.option('--json', 'as_json', is_flag=True,
              help='Print what GET /api/jobs answers: {"jobs": [...], "next": cursor}.')
def list_jobs(state, queue, task, q, limit, sort, cursor, as_json):
    """Jobs newest first (or as --sort says), with the API's filters; a page at a time."""
    config = current_app.config
    if limit is not None and limit > config['MAX_PAGE_SIZE']:
        raise click.BadParameter(f'at most {config["MAX_PAGE_SIZE"]} (MAX_PAGE_SIZE)',
                                 param_hint='--limit')
    filters = _filters(state, queue, task, q)
    with _job_errors():
        page, next_cursor = queries.list_jobs(
            **filters, limit=limit or config['PAGE_SIZE'], cursor=cursor, sort=sort,
            with_result=as_json)
    if as_json:
        _json({'jobs': [j.to_dict() for j in page], 'next': next_cursor})
        return
    rows = [[j.id, j.state, j.queue, j.task, j.attempts,
             j.created_at.isoformat(timespec='seconds'),
             j.finished_at.isoformat(timespec='seconds') if j.finished_at else '-',
             templating.format_duration(templating.run_time(j)) or '-']
            for j in page]
    # RUN: the latest attempt's run time of a finished job (the run-time order's key).
    for line in _table(['ID', 'STATE', 'QUEUE', 'TASK', 'ATTEMPTS', 'CREATED', 'FINISHED', 'RUN'],
                       rows):
        click.echo(line)
    if not page:
        click.echo('no jobs on this page' if next_cursor else 'no jobs match', err=True)
    if next_cursor:
        # On standard error: standard output stays the table alone.
        click.echo(f'more: add --cursor {next_cursor}', err=True)


_VERBS = {'retry': ('Retry', 'retried', 'queued again'),
          'cancel': ('Cancel', 'canceled (or asked to stop)', 'canceled'),
          'delete': ('Delete', 'deleted', 'deleted')}


def _act(action, ids, filters, every, yes):
    verb, done_verb, one_done = _VERBS[action]
    chosen = any(filters.values()) or every
    if ids and chosen:
        raise click.UsageError('give job ids or a filter (--state, --queue, --task, -q, --all), '
                               'not both')
    if not ids and not chosen:
        raise click.UsageError('name the jobs: one or more ids, or a filter (--state, --queue, '
                               '--task, -q), or --all for every job')
    if every and any(filters.values()):
        raise click.UsageError('--all means every job: give it no filter')
    if ids:
        ids = list(dict.fromkeys(ids))
        if len(ids) > jobs.MAX_BULK:
            raise click.UsageError(f'at most {jobs.MAX_BULK} ids at once')
        target = 'ids ' + ', '.join(ids)
        missing = []
        with _job_errors():
            for job_id in ids:
                try:
                    queries.get(job_id)
                except NotFound:
                    missing.append(job_id)
        if missing:
            _audit(action, target, outcome='refused: 404 not found')
            raise click.ClickException(
                f'no job with id {", ".join(missing)}; nothing was changed')
        count, what = len(ids), ('job ' + ids[0] if len(ids) == 1 else f'{len(ids)} jobs named')
    else:
        target = 'filter ' + _described(filters)
        with _job_errors():
            count = queries.count_matching(filters, jobs.MAX_BULK)
        if not count:
            click.echo(f'no jobs match {_described(filters)}; nothing to do')
            return
        many = f'{count}' if count < jobs.MAX_BULK else f'the first {count}'
        what = f'{many} job{"s" if count != 1 else ""} matching {_described(filters)}'
    if not yes:
        try:
            confirmed = click.confirm(f'{verb} {what}?', default=False)
        except click.Abort:  # no answer (standard input closed)
            confirmed = False
        if not confirmed:
            _audit(action, target, count=count, outcome='not confirmed')
            raise click.ClickException('not confirmed; nothing was changed (--yes skips the '
                                       'question)')
    if ids and len(ids) == 1:
        # One job: the API's own command for it, with its refusal if the
        # job's state does not allow the action.
        with _job_errors(action, ids[0]):
            job = {'retry': jobs.retry, 'cancel': jobs.cancel, 'delete': jobs.delete}[action](ids[0])
        _audit(action, ids[0], count=1)
        if action == 'cancel' and job.state == states.RUNNING:
            click.echo(f'job {ids[0]} is running: asked to stop at its next progress report')
        else:
            click.echo(f'job {ids[0]} {one_done}')
        return
    with _job_errors(action, target):
        result = jobs.bulk(action, ids=ids or None, filters=None if ids else filters)
    _audit(action, target, count=result['done'])
    skipped = ', '.join(f'{n} {reason}' for reason, n in sorted(result['skipped'].items()))
    click.echo(f'{result["done"]} of {result["matched"]} jobs {done_verb}'
               + (f'; skipped: {skipped}' if skipped else '')
               + ('; more match: run it again' if result['truncated'] else ''))


def _action_command(action, help_text):
    @jobs_cli.command(action, help=help_text)
    @click.argument('ids', nargs=-1, metavar='[ID]...')
    @_filter_options
    @click.option('--all', 'every', is_flag=True, help='Every job (no filter).')
    @click.option('--yes', '-y', is_flag=True, help='Do not ask for confirmation (scripts, cron).')
    def command(ids, state, queue, task, q, every, yes):
        _act(action, ids, _filters(state, queue, task, q), every, yes)
    command.__name__ = f'{action}_jobs'
    return command


retry_jobs = _action_command('retry', 'Retry failed or canceled jobs: by ID, or every job '
                             'matching the filter. Jobs in other states are skipped.')
cancel_jobs = _action_command('cancel', 'Cancel waiting jobs and ask running ones to stop: by '
                              'ID, or every job matching the filter.')
delete_jobs = _action_command('delete', 'Delete finished jobs with their attempts and logs: by '
                              'ID, or every job matching the filter.')


@jobs_cli.command('purge')
@click.option('--days', type=_WholeNumber(1, 3650), required=True,
              help='Delete jobs that finished more than this many days ago.')
@click.option('--yes', '-y', is_flag=True, help='Do not ask for confirmation (scripts, cron).')
def purge_jobs(days, yes):
    """Delete jobs finished more than DAYS days ago, with their attempts and logs."""
    target = f'finished more than {days} days ago'
    with _job_errors():
        count = jobs.purgeable(days)
    if not count:
        click.echo(f'no job finished more than {days} days ago; nothing to do')
        return
    if not yes:
        try:
            confirmed = click.confirm(f'Delete {count} job{"s" if count != 1 else ""} finished '
                                      f'more than {days} days ago, with their attempts and logs?',
                                      default=False)
        except click.Abort:
            confirmed = False
        if not confirmed:
            _audit('purge', target, count=count, outcome='not confirmed')
            raise click.ClickException('not confirmed; nothing was changed (--yes skips the '
                                       'question)')
    with _job_errors('purge', target):
        deleted = jobs.purge_finished(days)
    _audit('purge', target, count=deleted)
    click.echo(f'deleted {deleted} jobs finished more than {days} days ago')

"""The admins' pages: users and API tokens (``/users``), the same commands as ``flask users``."""
from flask import Blueprint, flash, redirect, render_template, request, url_for

from . import accounts, auth, roles

bp = Blueprint('admin', __name__)


def _page(status=200, **context):
    # Never cached: the page that shows a new token must not be kept anywhere.
    return render_template('users.html', users=accounts.list_users(),
                           tokens=accounts.list_tokens(), roles=roles.ROLES,
                           **context), status, {'Cache-Control': 'no-store'}


@bp.get('/users')
@auth.action('users')
def users_page():
    """Every user and API token, with the forms that manage them."""
    return _page()


@bp.post('/users')
@auth.action('users')
def create_user():
    """Create a user from the form (name, role, password)."""
    auth.note(action='create-user')
    form = request.form
    try:
        user = accounts.create_user(form.get('name', ''), form.get('password', ''),
                                    form.get('role', ''))
    except (accounts.AccountError, roles.UnknownRole) as exc:
        return _page(400, error=str(exc), name=form.get('name', ''))
    flash(f'Created {user.name} ({user.role}).', 'ok')
    return redirect(url_for('admin.users_page'), 303)


@bp.post('/users/<name>/role')
@auth.action('users')
def set_role(name):
    """Give a user another role (their sessions end)."""
    auth.note(action='set-role')
    try:
        accounts.set_role(name, request.form.get('role', ''))
    except (accounts.AccountError, roles.UnknownRole) as exc:
        return _page(400, error=str(exc))
    flash(f'{name} is now {request.form["role"]}.', 'ok')
    return redirect(url_for('admin.users_page'), 303)


@bp.post('/users/<name>/delete')
@auth.action('users')
def delete_user(name):
    """Delete a user with their tokens and sessions."""
    auth.note(action='delete-user')
    try:
        accounts.delete_user(name)
    except accounts.AccountError as exc:
        return _page(400, error=str(exc))
    flash(f'Deleted {name}.', 'ok')
    return redirect(url_for('admin.users_page'), 303)


@bp.post('/tokens')
@auth.action('users')
def create_token():
    """Create a token for a user; the page shows it this once (never in a redirect or cookie)."""
    auth.note(action='create-token')
    try:
        row, token = accounts.create_token(request.form.get('user', ''), request.form.get('name'))
    except accounts.AccountError as exc:
        return _page(400, error=str(exc))
    auth.note(outcome='done', target=f'token {row.id} for {row.user.name}')
    return _page(201, new_token=token, new_token_row=row)


@bp.post('/tokens/<int:token_id>/revoke')
@auth.action('users')
def revoke_token(token_id):
    """Revoke a token: programs using it get 401 from now on."""
    auth.note(action='revoke-token')
    try:
        row = accounts.revoke_token(token_id)
    except accounts.AccountError as exc:
        return _page(404, error=str(exc))
    flash(f'Revoked token {row.id} ({row.name}).', 'ok')
    return redirect(url_for('admin.users_page'), 303)

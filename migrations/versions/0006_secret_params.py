"""Secret parameters: their real values kept apart from the parameters every page shows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 19:00:00

Adds ``job.secret_params``. Jobs recorded before hold the values of their
secret parameters in ``params`` in the clear; for the parameters declared
secret when this revision was written (the ``payment`` task's ``card``)
the value moves to ``secret_params`` (a failed job may still be retried
with it) and ``params`` keeps it masked, as the application now writes it
(``**** 4242``; ``****`` under 12 characters). Downgrading puts the values
back into ``params`` and drops the column.
"""
import json

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

BATCH = 500
# The secret parameters declared when this revision was written, by task.
SECRET = {'payment': ('card',)}


def _mask(value):
    # app.masking.mask as it was written with this revision (kept here so
    # that the migration does not change with the application).
    return f'**** {value[-4:]}' if len(value) >= 12 else ('****' if value else value)


def _load(raw):
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode('utf-8', 'replace')
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _rewrite(conn, change):
    """Call ``change(task, params, secret)`` on each job of a task in :data:`SECRET`; write
    back the ``(params, secret)`` it returns, unless None."""
    postgres = conn.dialect.name == 'postgresql'
    read = ('CAST(params AS TEXT), CAST(secret_params AS TEXT)' if postgres
            else 'params, secret_params')
    write = ('params = CAST(:params AS json), secret_params = CAST(:secret AS json)'
             if postgres else 'params = :params, secret_params = :secret')
    for task in SECRET:
        last = ''
        while True:
            rows = conn.execute(sa.text(
                f'SELECT id, {read} FROM job WHERE task = :task AND id > :last '
                f'ORDER BY id LIMIT {BATCH}'), {'task': task, 'last': last}).all()
            if not rows:
                break
            for job_id, params, secret in rows:
                params = _load(params)
                if params is None:
                    continue  # unreadable: the application shows it as such
                changed = change(task, params, _load(secret) or {})
                if changed is not None:
                    new_params, new_secret = changed
                    conn.execute(sa.text(f'UPDATE job SET {write} WHERE id = :id'), {
                        'params': json.dumps(new_params, ensure_ascii=False),
                        'secret': json.dumps(new_secret, ensure_ascii=False) if new_secret else None,
                        'id': job_id})
            last = rows[-1][0]


def _hide(task, params, secret):
    names = [n for n in SECRET[task] if isinstance(params.get(n), str) and n not in secret]
    if not names:
        return None
    return ({k: _mask(v) if k in names else v for k, v in params.items()},
            {**secret, **{n: params[n] for n in names}})


def _reveal(task, params, secret):
    if not secret:
        return None
    return {**params, **secret}, None


def upgrade():
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('secret_params', sa.JSON(), nullable=True))
    _rewrite(op.get_bind(), _hide)


def downgrade():
    _rewrite(op.get_bind(), _reveal)
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('secret_params')

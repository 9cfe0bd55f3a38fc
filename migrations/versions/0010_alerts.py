"""Alerts: one row per incident of a rule, and the indexes that find the oldest waiting job.

``alert`` keeps each incident (fired, resolved, its webhook delivery); a
unique partial index allows one firing row per rule and subject. Two
partial indexes on ``job`` hold only the jobs waiting to run (queued, or
scheduled and retrying ones once due), so the age of the oldest per queue
is one index probe. Indexes only: ``job`` is not rebuilt, and the triggers
of migration 0008 stay.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 10:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

WAITING = "state = 'queued'"
DUE = "state IN ('scheduled', 'retrying')"
FIRING = "state = 'firing'"


def upgrade():
    op.create_table('alert',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('rule', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('scope', sa.String(length=8), nullable=False),
    sa.Column('subject', sa.String(length=100), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('fired_at', sa.DateTime(), nullable=False),
    sa.Column('resolved_at', sa.DateTime(), nullable=True),
    sa.Column('value', sa.Double(), nullable=False),
    sa.Column('threshold', sa.Double(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('resolution', sa.Text(), nullable=True),
    sa.Column('delivery', sa.String(length=16), nullable=False),
    sa.Column('notified', sa.String(length=16), nullable=True),
    sa.Column('delivered_at', sa.DateTime(), nullable=True),
    sa.Column('delivery_attempts', sa.Integer(), nullable=False),
    sa.Column('delivery_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alert'))
    )
    op.create_index('uq_alert_firing', 'alert', ['rule', 'subject'], unique=True,
                    sqlite_where=sa.text(FIRING), postgresql_where=sa.text(FIRING))
    op.create_index('ix_alert_state', 'alert', ['state', 'id'], unique=False)
    op.create_index('ix_alert_delivery', 'alert', ['delivery', 'id'], unique=False)
    op.create_index('ix_job_waiting', 'job', ['queue', 'updated_at'], unique=False,
                    sqlite_where=sa.text(WAITING), postgresql_where=sa.text(WAITING))
    op.create_index('ix_job_due', 'job', ['queue', 'scheduled_for'], unique=False,
                    sqlite_where=sa.text(DUE), postgresql_where=sa.text(DUE))


def downgrade():
    op.drop_index('ix_job_due', table_name='job')
    op.drop_index('ix_job_waiting', table_name='job')
    op.drop_index('ix_alert_delivery', table_name='alert')
    op.drop_index('ix_alert_state', table_name='alert')
    op.drop_index('uq_alert_firing', table_name='alert')
    op.drop_table('alert')

"""Operations: worker heartbeats, attempt logs, cancel requests, idempotency keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 16:05:51.359765

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('worker',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('concurrency', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen', sa.DateTime(), nullable=False),
    sa.Column('stopped_at', sa.DateTime(), nullable=True),
    sa.Column('processed', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('current', sa.JSON(), nullable=False),
    sa.Column('leader', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_worker'))
    )
    op.create_table('attempt_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('level', sa.String(length=10), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], name=op.f('fk_attempt_log_job_id_job'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_attempt_log'))
    )
    with op.batch_alter_table('attempt_log', schema=None) as batch_op:
        batch_op.create_index('ix_attempt_log_job', ['job_id', 'number', 'id'], unique=False)

    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error_type', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('attempt_base', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('timeout', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('cancel_requested_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=200), nullable=True))
        batch_op.create_index('ix_job_queue_finished', ['queue', 'finished_at'], unique=False)
        batch_op.create_index('uq_job_idempotency_key', ['idempotency_key'], unique=True)


def downgrade():
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('uq_job_idempotency_key')
        batch_op.drop_index('ix_job_queue_finished')
        batch_op.drop_column('idempotency_key')
        batch_op.drop_column('cancel_requested_at')
        batch_op.drop_column('timeout')
        batch_op.drop_column('attempt_base')
        batch_op.drop_column('error_type')

    with op.batch_alter_table('attempt_log', schema=None) as batch_op:
        batch_op.drop_index('ix_attempt_log_job')

    op.drop_table('attempt_log')
    op.drop_table('worker')

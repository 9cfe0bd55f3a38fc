"""The ledger: a job row per job, an attempt row per execution.

Revision ID: 0001
Revises: 
Create Date: 2026-11-28 14:06:17.071766

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('job',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('task', sa.String(length=64), nullable=False),
    sa.Column('queue', sa.String(length=32), nullable=False),
    sa.Column('params', sa.JSON(none_as_null=True), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('progress', sa.Double(), nullable=True),
    sa.Column('progress_message', sa.String(length=200), nullable=True),
    sa.Column('result', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('retries', sa.Integer(), nullable=False),
    sa.Column('retry_delay', sa.Double(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('scheduled_for', sa.DateTime(), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job'))
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index('ix_job_created', ['created_at', 'id'], unique=False)
        batch_op.create_index('ix_job_queue_created', ['queue', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_job_queue_state', ['queue', 'state'], unique=False)
        batch_op.create_index('ix_job_state_created', ['state', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_job_task_created', ['task', 'created_at', 'id'], unique=False)

    op.create_table('attempt',
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('number', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('duration', sa.Double(), nullable=True),
    sa.Column('error_type', sa.String(length=200), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('traceback', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], name=op.f('fk_attempt_job_id_job'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'number', name=op.f('pk_attempt'))
    )


def downgrade():
    op.drop_table('attempt')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_task_created')
        batch_op.drop_index('ix_job_state_created')
        batch_op.drop_index('ix_job_queue_state')
        batch_op.drop_index('ix_job_queue_created')
        batch_op.drop_index('ix_job_created')

    op.drop_table('job')

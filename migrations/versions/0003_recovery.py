"""Recovery: job events, and controls kept in the ledger rather than the broker.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 12:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('job_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], name=op.f('fk_job_event_job_id_job'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_event'))
    )
    with op.batch_alter_table('job_event', schema=None) as batch_op:
        batch_op.create_index('ix_job_event_job', ['job_id', 'id'], unique=False)
    op.create_table('control',
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('value', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_control'))
    )


def downgrade():
    op.drop_table('control')
    with op.batch_alter_table('job_event', schema=None) as batch_op:
        batch_op.drop_index('ix_job_event_job')
    op.drop_table('job_event')

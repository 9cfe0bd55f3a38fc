"""The run time of a job's latest ended attempt, kept on its row, and the index of the run-time order.

``job.run_seconds`` is the ``duration`` of the job's latest attempt that
ended; the ledger's writer keeps it from now on, and this migration fills
it from the attempts already recorded. ``ix_job_run`` (partial: finished
jobs with a run time), and its three companions within a state, queue or
task, are walked by the run-time order of the jobs list, which before
sorted every finished job by ``finished_at - started_at``.

SQLite adds the column without copying the table, and its triggers (of
migration 0008) watch other columns. On PostgreSQL the counters' row
trigger is held off during the fill: the run time moves no counter.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 16:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

RAN = 'finished_at IS NOT NULL AND run_seconds IS NOT NULL'
# The run-time order alone, and within one state, queue or task.
RUN_INDEXES = {'ix_job_run': ['run_seconds', 'id'],
               'ix_job_state_run': ['state', 'run_seconds', 'id'],
               'ix_job_queue_run': ['queue', 'run_seconds', 'id'],
               'ix_job_task_run': ['task', 'run_seconds', 'id']}
# The duration of each job's latest attempt that ended (attempts are keyed
# (job_id, number): one index probe a job).
FILL = ('UPDATE job SET run_seconds = (SELECT a.duration FROM attempt a '
        'WHERE a.job_id = job.id AND a.finished_at IS NOT NULL '
        'ORDER BY a.number DESC LIMIT 1) WHERE job.attempts > 0')


def upgrade():
    postgres = op.get_bind().dialect.name == 'postgresql'
    op.add_column('job', sa.Column('run_seconds', sa.Double(), nullable=True))
    if postgres:
        op.execute('ALTER TABLE job DISABLE TRIGGER job_tally')
    op.execute(FILL)
    if postgres:
        op.execute('ALTER TABLE job ENABLE TRIGGER job_tally')
    for name, columns in RUN_INDEXES.items():
        op.create_index(name, 'job', columns, unique=False,
                        sqlite_where=sa.text(RAN), postgresql_where=sa.text(RAN))


def downgrade():
    for name in RUN_INDEXES:
        op.drop_index(name, table_name='job')
    # A plain DROP COLUMN (SQLite 3.35+): a batch would copy the table and
    # lose the triggers of migration 0008.
    op.drop_column('job', 'run_seconds')

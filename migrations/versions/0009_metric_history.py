"""Metric history: per-minute rollups of attempts, run and wait times, queue depth; totals.

``metric_minute`` (attempts ended per minute, queue, task and outcome, and
how many of them ended their job), ``timing_minute`` (run and wait times per
minute, queue and task, in the fixed buckets of
``app.models.TIMING_BUCKETS``) and ``depth_minute`` (the broker's depth of
each queue, sampled by the leader once a minute) hold the history behind
the charts; the leader deletes rows older than ``METRICS_RETENTION``.
``metric_total`` and ``timing_total`` hold the same sums over all time
(never pruned, untouched by purges): the counters and histograms of
``/metrics``. The ledger's writer adds to them with each batch; nothing is
filled from the rows already there (the history starts with this upgrade).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 09:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def _key(*minute):
    return [*minute, sa.Column('queue', sa.String(length=32), nullable=False),
            sa.Column('task', sa.String(length=64), nullable=False)]


def _counts():
    return [sa.Column('outcome', sa.String(length=16), nullable=False),
            sa.Column('shard', sa.Integer(), autoincrement=False, nullable=False),
            sa.Column('attempts', sa.BigInteger(), nullable=False),
            sa.Column('finished', sa.BigInteger(), nullable=False)]


def _timings():
    return [sa.Column('timing', sa.String(length=8), nullable=False),
            sa.Column('bucket', sa.SmallInteger(), autoincrement=False, nullable=False),
            sa.Column('shard', sa.Integer(), autoincrement=False, nullable=False),
            sa.Column('n', sa.BigInteger(), nullable=False),
            sa.Column('seconds', sa.Float(), nullable=False)]


def _minute():
    return sa.Column('minute', sa.DateTime(), nullable=False)


def upgrade():
    op.create_table('metric_minute', *_key(_minute()), *_counts(),
                    sa.PrimaryKeyConstraint('minute', 'queue', 'task', 'outcome', 'shard',
                                            name=op.f('pk_metric_minute')))
    op.create_table('timing_minute', *_key(_minute()), *_timings(),
                    sa.PrimaryKeyConstraint('minute', 'queue', 'task', 'timing', 'bucket',
                                            'shard', name=op.f('pk_timing_minute')))
    op.create_table('metric_total', *_key(), *_counts(),
                    sa.PrimaryKeyConstraint('queue', 'task', 'outcome', 'shard',
                                            name=op.f('pk_metric_total')))
    op.create_table('timing_total', *_key(), *_timings(),
                    sa.PrimaryKeyConstraint('queue', 'task', 'timing', 'bucket', 'shard',
                                            name=op.f('pk_timing_total')))
    op.create_table('depth_minute', _minute(),
                    sa.Column('queue', sa.String(length=32), nullable=False),
                    sa.Column('ready', sa.BigInteger(), nullable=False),
                    sa.Column('scheduled', sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint('minute', 'queue', name=op.f('pk_depth_minute')))
    if op.get_bind().dialect.name == 'postgresql':
        # The totals are updated by every batch: room for HOT updates, and a
        # vacuum every 1,000 dead rows (as the counters of migration 0008).
        for table in ('metric_total', 'timing_total'):
            op.get_bind().exec_driver_sql(
                f'ALTER TABLE {table} SET (fillfactor = 50, '
                'autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)')


def downgrade():
    for table in ('depth_minute', 'timing_total', 'metric_total', 'timing_minute',
                  'metric_minute'):
        op.drop_table(table)

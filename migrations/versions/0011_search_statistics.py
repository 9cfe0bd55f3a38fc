"""Search statistics on PostgreSQL: how many jobs a text matches, known well enough to plan by.

A search with many matches is read a window of the list at a time (see
``app.queries``): the jobs of a range of the list's index whose text the
trigram index matches. PostgreSQL answers that with both indexes at once
(a BitmapAnd: only the window's candidates are read from the table) when
it expects the trigram index to match many rows; with the default
statistics it expected a few dozen where thousands matched, and read every
candidate in the ledger to find a window's few (200 ms for a common word
at a million jobs). A larger sample of the indexed text (statistics target
1,000) puts its estimates within about 15%. SQLite: nothing changes.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 12:00:00

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

# The sample ANALYZE takes of the indexed text: 300 rows per unit.
STATISTICS = 1000


def _search_index(bind):
    return bind.exec_driver_sql(
        "SELECT 1 FROM pg_indexes WHERE indexname = 'ix_job_search'").first() is not None


def upgrade():
    bind = op.get_bind()
    if bind.dialect.name != 'postgresql' or not _search_index(bind):
        return  # SQLite, or no pg_trgm (migration 0008): search scans
    bind.exec_driver_sql(
        f'ALTER INDEX ix_job_search ALTER COLUMN 1 SET STATISTICS {STATISTICS}')
    bind.exec_driver_sql('ANALYZE job')


def downgrade():
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql' and _search_index(bind):
        bind.exec_driver_sql('ALTER INDEX ix_job_search ALTER COLUMN 1 SET STATISTICS -1')

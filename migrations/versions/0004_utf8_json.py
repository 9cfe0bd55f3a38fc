"""JSON as UTF-8 text: rewrite parameters, results and worker lists without ASCII escapes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 11:02:40.519203

Earlier versions stored JSON with every non-ASCII character escaped
(``"\\u00e9"`` for ``é``), which text search cannot find. Each value is
decoded and written again as UTF-8 text; a lone surrogate escape, which no
UTF-8 text can hold once decoded, becomes the six characters of its escape.
Values that are not valid JSON are left as they are (the application reads
them as unreadable instead of failing). No schema change: downgrading
leaves the rewritten values, which earlier versions read the same.
"""
import json
import re

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

BATCH = 500
COLUMNS = {'job': ('params', 'result'), 'worker': ('queues', 'current')}
_SURROGATE = re.compile('[\ud800-\udfff]')


def _not_json_constant(name):
    raise ValueError(name)


def _utf8(raw):
    """``raw`` stored JSON as UTF-8 text, or None to leave it as it is."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode('utf-8', 'replace')
    if not isinstance(raw, str):
        return None
    try:
        value = json.loads(raw, parse_constant=_not_json_constant)
    except (ValueError, RecursionError):
        return None
    new = json.dumps(value, ensure_ascii=False)
    if _SURROGATE.search(new):
        new = new.encode('utf-16-le', 'surrogatepass').decode('utf-16-le', 'surrogatepass')
        new = _SURROGATE.sub(lambda m: f'\\\\u{ord(m.group()):04x}', new)
    return new if new != raw else None


def _rewrite(conn, table, columns):
    postgres = conn.dialect.name == 'postgresql'
    # json -> text gives PostgreSQL's stored text as it is; SQLite stores text.
    read = ', '.join(f'CAST({c} AS TEXT)' if postgres else c for c in columns)
    last = ''
    while True:
        rows = conn.execute(sa.text(
            f'SELECT id, {read} FROM {table} WHERE id > :last ORDER BY id LIMIT {BATCH}'),
            {'last': last}).all()
        if not rows:
            return
        for row in rows:
            changes = {c: _utf8(raw) for c, raw in zip(columns, row[1:]) if raw is not None}
            changes = {c: v for c, v in changes.items() if v is not None}
            if changes:
                assign = ', '.join(f'{c} = CAST(:{c} AS json)' if postgres else f'{c} = :{c}'
                                   for c in changes)
                conn.execute(sa.text(f'UPDATE {table} SET {assign} WHERE id = :id'),
                             {**changes, 'id': row[0]})
        last = rows[-1][0]


def upgrade():
    conn = op.get_bind()
    for table, columns in COLUMNS.items():
        _rewrite(conn, table, columns)


def downgrade():
    pass

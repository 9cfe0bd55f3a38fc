"""The audit log: every state-changing action, taken or refused, kept in the ledger.

Who (user name, or None for the local user of a login-free ``make run``),
as what role and through what (session, token, local), which action, on
what (a job id, a queue or periodic task, a bulk action's filter or ids),
how many jobs, from which address, when, and the outcome ("done", or the
refusal). Jobs submitted from Python (:mod:`app.producer`) are recorded
``via='python'``, with the submitting process as the address. Oban Web keeps such a log; so do we, in SQL, shown at ``/audit``
to admins and served at ``GET /api/audit``.
"""
import sqlalchemy as sa

from . import events
from .extensions import db
from .ledger import sql as ledger_sql
from .models import AuditEntry, utcnow

MAX_TARGET = 500  # characters of a target kept (a long filter is cut)


def entry(*, user, role, via, action, target=None, count=None, address=None, outcome='done'):
    """One entry, not yet written: for a command that commits it with its own change
    (:func:`app.jobs.submit_many` takes one) and announces it. Text is cut to its column."""
    return AuditEntry(at=utcnow(), user=user, role=role, via=via[:16], action=action[:32],
                      target=None if target is None else str(target)[:MAX_TARGET],
                      count=count, address=(address or '')[:64] or None,
                      outcome=outcome[:64])


# The columns an entry is written with ("user" quoted: a reserved word on PostgreSQL).
_COLUMNS = ('at', 'user', 'role', 'via', 'action', 'target', 'count', 'address', 'outcome')
_QUOTED = ', '.join(f'"{c}"' for c in _COLUMNS)
_INSERT = f'INSERT INTO audit_entry ({_QUOTED}) VALUES ({", ".join("?" * len(_COLUMNS))})'


def insert(written):
    """Add ``written`` (entries from :func:`entry`) to the current transaction; not committed.

    The caller commits them with its own change, then announces them
    (``events.publish(audit=True)``). The driver's own INSERT over plain
    tuples: every API submission writes one, and SQLAlchemy's processing of
    the values was a sixteenth of a submission's CPU time.
    """
    if written:
        conn = db.session.connection()
        d = ledger_sql.dialect(conn)
        conn.exec_driver_sql(_INSERT if d.mark == '?' else _INSERT.replace('?', '%s'), [
            (d.ts(e.at), e.user, e.role, e.via, e.action, e.target, e.count, e.address,
             e.outcome) for e in written])


def prune(before, limit):
    """Delete up to ``limit`` entries older than ``before`` (naive UTC), oldest first, in
    the caller's transaction; return how many. The leader calls it with
    ``AUDIT_RETENTION`` (:data:`app.reaper.PRUNE_BATCH` a pass); the ``at`` index
    finds them."""
    oldest = (sa.select(AuditEntry.id).where(AuditEntry.at < before)
              .order_by(AuditEntry.at).limit(limit))
    return db.session.execute(
        sa.delete(AuditEntry).where(AuditEntry.id.in_(oldest.scalar_subquery()))
        .execution_options(synchronize_session=False)).rowcount


def record(**fields):
    """Write one entry (the fields of :func:`entry`) and announce it to open audit pages;
    returns it."""
    written = entry(**fields)
    db.session.add(written)
    db.session.commit()
    events.publish(audit=True)
    return written


def entries(limit=200, before=None):
    """The newest entries first, at most ``limit``; ``before``: only ids below it (paging)."""
    stmt = sa.select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before is not None:
        stmt = stmt.where(AuditEntry.id < before)
    return db.session.scalars(stmt).all()

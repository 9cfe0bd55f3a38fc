"""The audit log: every state-changing action, taken or refused, kept in the ledger.

Who (user name, or None for the local user of a login-free ``make run``),
as what role and through what (session, token, local), which action, on
what (a job id, a queue or periodic task, a bulk action's filter or ids),
how many jobs, from which address, when, and the outcome ("done", or the
refusal). Oban Web keeps such a log; so do we, in SQL, shown at ``/audit``
to admins and served at ``GET /api/audit``.
"""
import sqlalchemy as sa

from . import events
from .extensions import db
from .models import AuditEntry, utcnow

MAX_TARGET = 500  # characters of a target kept (a long filter is cut)


def record(*, user, role, via, action, target=None, count=None, address=None, outcome='done'):
    """Write one entry (and announce it to open audit pages); returns it."""
    entry = AuditEntry(at=utcnow(), user=user, role=role, via=via, action=action[:32],
                       target=None if target is None else str(target)[:MAX_TARGET],
                       count=count, address=(address or '')[:64] or None,
                       outcome=outcome[:64])
    db.session.add(entry)
    db.session.commit()
    events.publish(audit=True)
    return entry


def entries(limit=200, before=None):
    """The newest entries first, at most ``limit``; ``before``: only ids below it (paging)."""
    stmt = sa.select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before is not None:
        stmt = stmt.where(AuditEntry.id < before)
    return db.session.scalars(stmt).all()

"""Values the deployment keeps in the ledger: operators' switches and the broker's history.

The broker (Redis) may lose its data; the ledger does not. So what an
operator switched (a paused queue, a paused periodic task) and what the
leader learned about the broker (its identity marker, when it last lost its
data and how many jobs were restored, how many repairs were made) live here,
in the ``control`` table, as JSON values under these keys.
"""
import sqlalchemy as sa

from .extensions import db
from .models import Control, utcnow

QUEUE_PAUSED = 'queue.paused:{}'
PERIODIC_PAUSED = 'periodic.paused:{}'
PERIODIC_WATERMARK = 'periodic.watermark'  # the last minute the leader started ticks for
BROKER_EPOCH = 'broker.epoch'              # the marker the leader last saw in the broker
BROKER_LOSS = 'broker.loss'                # {"at", "restored"}: the latest data loss
BROKER_REPAIRS = 'broker.repairs'          # jobs re-enqueued by the reconciler, ever
BROKER_CLOCK = 'broker.clock'              # the broker's pass counter as the leader last saw it


def get(key, default=None):
    """The value stored under ``key``, or ``default``."""
    row = db.session.get(Control, key)
    return default if row is None else row.value


def put(key, value):
    """Store ``value`` (JSON) under ``key`` in the current transaction (not committed)."""
    row = db.session.get(Control, key)
    if row is None:
        db.session.add(Control(key=key, value=value, updated_at=utcnow()))
    else:
        row.value, row.updated_at = value, utcnow()
    db.session.flush()


def add(key, amount):
    """Add ``amount`` to the number under ``key`` (0 if unset), in the current transaction."""
    put(key, (get(key) or 0) + amount)


def matching(prefix):
    """``{key: value}`` for every key starting with ``prefix``."""
    rows = db.session.execute(sa.select(Control.key, Control.value)
                              .where(Control.key.startswith(prefix, autoescape=True))).all()
    return dict(rows)


def paused_queues():
    """Names of the queues an operator paused."""
    prefix = QUEUE_PAUSED.format('')
    return {key[len(prefix):] for key, value in matching(prefix).items() if value}


def paused_periodic():
    """Names of the periodic tasks an operator paused."""
    prefix = PERIODIC_PAUSED.format('')
    return {key[len(prefix):] for key, value in matching(prefix).items() if value}

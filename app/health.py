"""``GET /healthz``: whether this web process can reach the broker and the database.

For load balancers and orchestrators (a 503 takes the process out of
rotation); documented in the API contract like the rest of the API.
"""
from flask import Blueprint, current_app

from . import auth, broker, reconcile
from .extensions import db
from .openapi import declare

bp = Blueprint('health', __name__)


@bp.get('/healthz')
@auth.public
@declare(responses={200: ('Health', 'The broker and the database answer'),
                    503: ('Health', 'The broker or the database did not answer')})
def healthz():
    """Whether the broker and the database answer."""
    checks, ok = {}, True
    try:
        broker.ping()
        checks['broker'] = 'ok'
    except broker.BrokerUnavailable as exc:
        checks['broker'], ok = f'unreachable: {exc}', False
    checks['broker_kind'] = 'sqlite (embedded)' if current_app.config['EMBEDDED'] else 'redis'
    try:
        db.session.execute(db.text('SELECT 1'))
        checks['database'] = 'ok'
    except Exception as exc:
        db.session.rollback()
        checks['database'], ok = f'unreachable: {exc.__class__.__name__}', False
    else:
        # Not a failure (the ledger restored what it lost), but worth telling.
        loss = reconcile.loss_notice()
        if loss:
            checks['broker_loss'] = loss
    return {'status': 'ok' if ok else 'unavailable', **checks}, 200 if ok else 503

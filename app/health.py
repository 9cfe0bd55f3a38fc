"""``GET /healthz`` and ``GET /metrics``: for load balancers, orchestrators and monitoring.

``/healthz`` says whether this web process can reach the broker and the
database (a 503 takes the process out of rotation); ``/metrics`` is the
Prometheus exposition (:mod:`app.metrics`). Both are documented in the API
contract like the rest of the API.
"""
from flask import Blueprint, Response, current_app

from . import auth, broker, metrics, reconcile
from .extensions import db
from .openapi import TEXT, declare

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


@bp.get('/metrics')
@auth.action('view')
@auth.scrape_token('METRICS_TOKEN')
@declare(responses={200: (TEXT, 'Metrics in the Prometheus text format (version 0.0.4)')})
def prometheus_metrics():
    """Metrics in the Prometheus text format."""
    body = metrics.exposition(current_app.config)
    return Response(body, content_type=metrics.CONTENT_TYPE,
                    headers={'Cache-Control': 'no-store'})

"""Error handlers: JSON for the API, pages or fragments (for htmx) for people."""
import logging

from flask import jsonify, render_template, request
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException, InternalServerError

from . import broker, catalog, queries, states
from .extensions import db

logger = logging.getLogger(__name__)


def _wants_json():
    return request.path.startswith('/api/') or request.path in ('/healthz', '/metrics')


def respond(status, message, **extra):
    """An error answer: JSON under /api/, /healthz and /metrics, else a page (a fragment for htmx).

    ``extra`` goes into the JSON object; ``fields`` ({field: message}) is
    listed on the page too.
    """
    if _wants_json():
        return jsonify({'error': message, **extra}), status
    template = '_error.html' if request.headers.get('HX-Request') else 'error.html'
    return render_template(template, status=status, message=message,
                           fields=extra.get('fields') or {}), status


# Why a database refused a statement it could otherwise run: PostgreSQL's
# SQLSTATEs for a deadlock victim, a serialization failure and a lock not
# available (its manual, Appendix A), and SQLite's words for a lock held past
# the busy timeout.
BUSY_SQLSTATES = frozenset({'40P01', '40001', '55P03'})
BUSY_SQLITE = ('database is locked', 'database table is locked', 'database is busy')


def ledger_busy(exc):
    """Whether ``exc`` (a SQLAlchemy ``DBAPIError``) says the database was busy, not away.

    Busy: other transactions held what this one needed (a deadlock, a
    serialization failure, a lock wait that timed out), so the same request
    can succeed a moment later; anything else (a refused connection, a
    closed socket, a full disk) counts as unreachable.
    """
    orig = getattr(exc, 'orig', None)
    if getattr(orig, 'sqlstate', None) in BUSY_SQLSTATES:
        return True
    return str(orig).startswith(BUSY_SQLITE)


def register(app):
    @app.errorhandler(catalog.ValidationError)
    def invalid(exc):
        # Many submissions at once: also each bad field by index, and the
        # list is there (empty) when what is wrong is the body as a whole
        # (a missing "jobs", a bad query string), so a client reads one shape.
        if exc.errors or getattr(app.view_functions.get(request.endpoint), 'errors_by_index',
                                 False):
            return respond(400, exc.message, fields=exc.fields, errors=exc.errors)
        return respond(400, exc.message, fields=exc.fields)

    @app.errorhandler(queries.BadQuery)
    def bad_query(exc):
        # The parameter at fault under ``fields``, as the declared parameters'
        # checks name theirs ({"limit": "must be at most 500"}); a page says
        # it once, in its message.
        message = str(exc)
        fields = {exc.field: message.removeprefix(exc.field + ' ')} \
            if exc.field and _wants_json() else {}
        return respond(400, message, fields=fields)

    @app.errorhandler(states.StateConflict)
    def conflict(exc):
        db.session.rollback()
        return respond(409, str(exc), state=exc.state)

    @app.errorhandler(broker.BrokerUnavailable)
    def unavailable(exc):
        db.session.rollback()
        logger.warning('broker unavailable: %s', exc)
        if exc.recorded:
            # Jobs with idempotency keys whose messages the broker may hold:
            # their rows were kept, so each runs once and a retry finds it.
            logger.warning('broker unavailable: %d job(s) recorded unconfirmed: %s',
                           len(exc.recorded), ', '.join(exc.recorded[:20]))
            others = len(exc.unconfirmed) > len(exc.recorded)
            return respond(503, 'the job broker is unreachable; the jobs in "recorded" '
                                '(submitted with idempotency keys) were recorded and run once '
                                'when it is back: submitting again with their keys returns '
                                'them' + ('; no other job was recorded, but if it took the '
                                          'messages of the other jobs in "unconfirmed" before '
                                          'it failed, they run when it is back' if others else ''),
                           detail=str(exc), unconfirmed=exc.unconfirmed, recorded=exc.recorded)
        if exc.unconfirmed:
            # Handed over before the refusal, and not taken back: they run if
            # the broker kept them. Said, and named, rather than "nothing".
            logger.warning('broker unavailable: %d message(s) may remain: %s',
                           len(exc.unconfirmed), ', '.join(exc.unconfirmed[:20]))
            return respond(503, 'the job broker is unreachable; no job was recorded, but if it '
                                'took the messages of the jobs in "unconfirmed" before it '
                                'failed, they run when it is back', detail=str(exc),
                           unconfirmed=exc.unconfirmed)
        return respond(503, 'the job broker is unreachable; nothing was changed, '
                             'try again shortly', detail=str(exc))

    @app.errorhandler(sa_exc.OperationalError)
    @app.errorhandler(sa_exc.DisconnectionError)
    def ledger_unavailable(exc):
        # The database is away, or busy past its timeout: a 503 the client
        # can retry, not a bug's 500. A bad statement is not this.
        try:
            db.session.rollback()
        except Exception:
            pass
        logger.warning('ledger unavailable on %s %s: %s', request.method, request.path,
                       (str(exc).splitlines() or ['(no message)'])[0][:300])
        if ledger_busy(exc):
            body, status = respond(503, 'the ledger database is busy with other writers; '
                                        'nothing was changed, try again shortly')
            return body, status, {'Retry-After': '1'}
        return respond(503, 'the ledger database is unreachable; try again shortly')

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if exc.code == 413:
            limit = request.max_content_length  # the route's own, or MAX_CONTENT_LENGTH
            return respond(413, f'request body larger than {limit} bytes')
        body, status = respond(exc.code, exc.description)
        # A 405 says which methods the URL does take (RFC 9110).
        return body, status, {k: v for k, v in exc.get_headers() if k == 'Allow'}

    @app.errorhandler(Exception)
    def server_error(exc):
        db.session.rollback()
        logger.exception('unhandled error on %s %s', request.method, request.path)
        return respond(500, InternalServerError.description)

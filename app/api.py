"""The JSON API: the contract for programs, on the same services as the pages."""
from flask import Blueprint, current_app, jsonify, request, url_for

from . import broker, catalog, jobs
from .extensions import db

bp = Blueprint('api', __name__, url_prefix='/api')
health = Blueprint('health', __name__)


def _limit():
    raw = request.args.get('limit')
    maximum = current_app.config['MAX_PAGE_SIZE']
    if raw in (None, ''):
        return current_app.config['PAGE_SIZE']
    try:
        limit = int(raw)
    except ValueError:
        raise jobs.BadQuery('limit must be a whole number') from None
    if not 1 <= limit <= maximum:
        raise jobs.BadQuery(f'limit must be between 1 and {maximum}')
    return limit


@bp.post('/jobs')
def submit_job():
    """Submit a job."""
    data = request.get_json(silent=True)
    if data is None:
        raise catalog.ValidationError(
            {'body': 'must be a JSON object (Content-Type: application/json)'}, 'invalid request')
    job = jobs.submit(catalog.validate(data, current_app.config))
    response = jsonify(job.to_dict(attempts=[]))
    response.headers['Location'] = url_for('api.get_job', job_id=job.id)
    return response, 201


@bp.get('/jobs')
def list_jobs():
    """Jobs newest first, filtered; ``next`` is the cursor of the following page."""
    args = request.args
    page, next_cursor = jobs.list_jobs(
        state=args.get('state') or None, queue=args.get('queue') or None,
        task=args.get('task') or None, q=args.get('q') or None,
        limit=_limit(), cursor=args.get('cursor') or None, with_result=True)
    return {'jobs': [j.to_dict() for j in page], 'next': next_cursor}


@bp.get('/jobs/<job_id>')
def get_job(job_id):
    """One job with all its attempts."""
    job = jobs.get(job_id)
    return job.to_dict(attempts=jobs.attempts(job))


@bp.post('/jobs/<job_id>/retry')
def retry_job(job_id):
    """Retry a failed or canceled job."""
    job = jobs.retry(job_id)
    return job.to_dict(attempts=jobs.attempts(job))


@bp.post('/jobs/<job_id>/cancel')
def cancel_job(job_id):
    """Cancel a queued, scheduled or retrying job."""
    job = jobs.cancel(job_id)
    return job.to_dict(attempts=jobs.attempts(job))


@bp.delete('/jobs/<job_id>')
def delete_job(job_id):
    """Delete a finished job."""
    jobs.delete(job_id)
    return '', 204


@bp.get('/tasks')
def list_tasks():
    """Declared task types and their parameters."""
    return {'tasks': [t.to_dict(current_app.config) for t in catalog.TASKS.values()],
            'queues': current_app.config['QUEUES']}


@bp.get('/stats')
def stats():
    """Counts of jobs by state and by queue."""
    return jobs.stats()


@bp.get('/workers')
def list_workers():
    """Every consumer that reported in: online ones first, then offline."""
    lost_after = current_app.config['LOST_AFTER']
    return {'workers': [w.to_dict(lost_after) for w in jobs.workers(lost_after)]}


@health.get('/healthz')
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
    return {'status': 'ok' if ok else 'unavailable', **checks}, 200 if ok else 503

"""The JSON API: the contract for programs, on the same services as the pages."""
from flask import Blueprint, current_app, jsonify, request, url_for

from . import broker, catalog, jobs, periodic, queues, reconcile
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
    response = jsonify(job.to_dict(attempts=jobs.attempts(job) if not job.created else []))
    response.headers['Location'] = url_for('api.get_job', job_id=job.id)
    # An idempotency key already used: the existing job, 200 instead of 201.
    return response, 201 if job.created else 200


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


@bp.get('/jobs/<job_id>/log')
def job_log(job_id):
    """What each attempt of the job logged."""
    job = jobs.get(job_id)
    return {'attempts': {str(n): [line.to_dict() for line in lines]
                         for n, lines in jobs.logs(job).items()}}


@bp.post('/jobs/<job_id>/retry')
def retry_job(job_id):
    """Retry a failed or canceled job."""
    job = jobs.retry(job_id)
    return job.to_dict(attempts=jobs.attempts(job))


@bp.post('/jobs/<job_id>/cancel')
def cancel_job(job_id):
    """Cancel a waiting job, or ask a running one to stop (202)."""
    job = jobs.cancel(job_id)
    return job.to_dict(attempts=jobs.attempts(job)), 202 if job.state == 'running' else 200


@bp.post('/jobs/<job_id>/run-now')
def run_job_now(job_id):
    """Run a scheduled job, or one waiting for its retry, at once."""
    job = jobs.run_now(job_id)
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


@bp.post('/jobs/bulk')
def bulk_action():
    """Retry, cancel or delete the jobs named (``ids``) or matching a ``filter``."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise catalog.ValidationError({'body': 'must be a JSON object'}, 'invalid request')
    fields = {}
    action, ids, filters = data.get('action'), data.get('ids'), data.get('filter')
    if action not in jobs.ACTIONS:
        fields['action'] = 'must be one of ' + ', '.join(jobs.ACTIONS)
    if (ids is None) == (filters is None):
        fields['ids'] = 'give ids or filter, not both'
    elif ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        fields['ids'] = 'must be a list of job ids'
    elif filters is not None:
        if not isinstance(filters, dict) or set(filters) - {'state', 'queue', 'task', 'q'}:
            fields['filter'] = 'must be an object with state, queue, task or q'
    for key in set(data) - {'action', 'ids', 'filter'}:
        fields[key] = 'unknown field'
    if fields:
        raise catalog.ValidationError(fields, 'invalid bulk action')
    return jobs.bulk(action, ids=ids, filters=filters)


@bp.get('/failures')
def failures():
    """Failed jobs grouped by task and error type."""
    return {'groups': [dict(g, latest=g['latest'].to_dict())
                       for g in jobs.failures(request.args.get('queue') or None)]}


@bp.get('/scheduled')
def scheduled():
    """Jobs waiting for their time or their retry, soonest first."""
    return {'jobs': [j.to_dict() for j in jobs.scheduled(request.args.get('queue') or None,
                                                        limit=_limit())]}


@bp.get('/queues')
def list_queues():
    """Every queue: paused, depth, running, scheduled, failed, throughput."""
    return {'queues': queues.overview(current_app.config)}


@bp.post('/queues/<name>/pause')
def pause_queue(name):
    """Pause a queue: its jobs stay queued, no worker takes one."""
    return queues.pause(current_app.config, name, True)


@bp.post('/queues/<name>/resume')
def resume_queue(name):
    """Resume a paused queue."""
    return queues.pause(current_app.config, name, False)


def _periodic_dict(row):
    from .models import isoformat
    last = row['last']
    return dict(row, next_run=isoformat(row['next_run']),
                last=None if last is None else {'id': last.id, 'state': last.state,
                                                'created_at': isoformat(last.created_at)})


@bp.get('/periodic')
def list_periodic():
    """Periodic tasks: schedule, paused, last job, next run."""
    return {'periodic': [_periodic_dict(r) for r in periodic.overview()]}


@bp.post('/periodic/<name>/pause')
def pause_periodic(name):
    """Stop starting a periodic task on its schedule."""
    return _periodic_dict(periodic.pause(name, True))


@bp.post('/periodic/<name>/resume')
def resume_periodic(name):
    """Start a paused periodic task on its schedule again."""
    return _periodic_dict(periodic.pause(name, False))


@bp.post('/periodic/<name>/trigger')
def trigger_periodic(name):
    """Start a periodic task now, as an ordinary job."""
    job = periodic.trigger(name, current_app.config)
    return job.to_dict(attempts=[]), 201


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
    else:
        # Not a failure (the ledger restored what it lost), but worth telling.
        loss = reconcile.loss_notice()
        if loss:
            checks['broker_loss'] = loss
    return {'status': 'ok' if ok else 'unavailable', **checks}, 200 if ok else 503

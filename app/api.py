"""The JSON API: the contract for programs, on the same services as the pages.

Every view declares its query parameters, body and responses
(:func:`app.openapi.declare`); ``GET /api/openapi.json`` is generated from
those declarations, and the query parameters are parsed by them.
"""
from flask import Blueprint, current_app, jsonify, request, url_for

from . import (alerts, audit, auth, catalog, errors, inputs, jobs, openapi, periodic, queries,
               queues, states)
from .models import isoformat
from .openapi import Query, declare

bp = Blueprint('api', __name__, url_prefix='/api')

# Query parameters, declared once: parsed by the views, documented by openapi.
STATE = Query('state', choices=states.JOB_STATES, help='Only jobs in this state')
QUEUE = Query('queue', max_length=queries.MAX_FILTER, help='Only jobs of this queue')
TASK = Query('task', max_length=queries.MAX_FILTER, help='Only jobs of this task type')
SEARCH = Query('q', max_length=queries.MAX_FILTER, help='An id prefix, or text in the parameters, the error or the result '
                         '(ASCII letters in any case, anything else as typed)')
FINISHED_FROM = Query('finished_from', max_length=40,
                      help='Only jobs finished at or after this time (ISO 8601, UTC, '
                           'such as 2026-03-01T12:00:00Z)')
FINISHED_TO = Query('finished_to', max_length=40,
                    help='Only jobs finished before this time (ISO 8601, UTC)')
LIMIT = Query('limit', int, minimum=1, maximum='MAX_PAGE_SIZE',
              help='Jobs per page (default PAGE_SIZE)')
CURSOR = Query('cursor', help='The `next` value of the previous page')
SORT = Query('sort', choices=queries.SORTS,
             help='newest (the default) or oldest first by creation, or runtime: finished '
                  'jobs, the longest last attempt first; a cursor belongs to its order')
# The jobs list's filters, in queries.FILTER_KEYS order (a KeyError here if a
# key has no declaration): checked by these, picked by queries.parse_filters.
FILTERS = tuple({q.name: q for q in (STATE, QUEUE, TASK, SEARCH, FINISHED_FROM, FINISHED_TO)}[k]
                for k in queries.FILTER_KEYS)


def _query(*params):
    return openapi.parse_query(params, request.args, current_app.config)


def _limit(value):
    return current_app.config['PAGE_SIZE'] if value is None else value


@bp.get('/openapi.json')
@auth.public  # the contract itself holds nothing of the deployment's
@declare(responses={200: ('OpenAPI', 'This document: the API as OpenAPI 3.1')})
def openapi_document():
    """The API as an OpenAPI 3.1 document."""
    return openapi.document(current_app)


@bp.post('/jobs')
@auth.action(auth.on_task('submit'))
@declare(body=catalog.submission_schema,
         responses={201: ('JobWithAttempts', 'The job, queued or scheduled'),
                    200: ('JobWithAttempts', 'The job an idempotency key already named'),
                    503: 'Error'},
         headers={201: {'Location': 'The URL of the job'}})
def submit_job():
    """Submit a job."""
    data = inputs.json_object('invalid job')
    job = jobs.submit(catalog.validate(data, current_app.config), audit=auth.audit_entry())
    response = jsonify(job.to_dict(attempts=queries.attempts(job) if not job.created else []))
    response.headers['Location'] = url_for('api.get_job', job_id=job.id)
    # An idempotency key already used: the existing job, 200 instead of 201.
    return response, 201 if job.created else 200


def batch_schema(config):
    """The body of ``POST /api/jobs/batch`` as a JSON Schema: ``jobs``, each a submission."""
    return {'type': 'object', 'required': ['jobs'], 'additionalProperties': False,
            'properties': {'jobs': {
                'type': 'array', 'minItems': 1, 'maxItems': jobs.MAX_BATCH,
                'items': catalog.submission_schema(config),
                'description': f'Up to {jobs.MAX_BATCH} jobs, each what POST /api/jobs takes'}}}


@bp.post('/jobs/batch')
@inputs.body_limit('MAX_BATCH_CONTENT_LENGTH')  # a thousand jobs are larger than one
@auth.action('submit')
@declare(body=batch_schema,
         responses={201: ('JobBatch', 'The jobs in order, queued or scheduled'),
                    200: ('JobBatch', 'Every job was one an idempotency key already named'),
                    403: 'Error', 503: 'Error'})
def submit_batch():
    """Submit many jobs at once: all of them, or none."""
    try:
        data = inputs.json_object('invalid jobs')
    except catalog.ValidationError as exc:  # text that cannot be stored: by job, too
        raise exc.by_job() from None
    items = data.get('jobs')
    unknown = {key: 'unknown field' for key in data if key != 'jobs'}
    if unknown:
        raise catalog.ValidationError(unknown, 'invalid jobs')
    if isinstance(items, list) and len(items) > jobs.MAX_BATCH:
        return errors.respond(413, f'at most {jobs.MAX_BATCH} jobs a call (got {len(items)}): '
                                   f'split the batch', fields={'jobs': 'too many jobs'})
    subs = catalog.validate_many(items, current_app.config, jobs.MAX_BATCH)
    allowed = {name: auth.can('submit', name) for name in {sub.task.name for sub in subs}}
    refused = [i for i, sub in enumerate(subs) if not allowed[sub.task.name]]
    if refused:
        # All or nothing: one job this role may not submit refuses the batch.
        reason = auth.refusal('admin-task')
        return errors.respond(403, reason, errors=[
            {'index': i, 'field': 'task', 'message': reason} for i in refused])
    names = sorted({sub.task.name for sub in subs})
    slots = jobs.submit_many(subs, audit=auth.audit_entry(
        count=len(subs), target='tasks ' + ', '.join(names)))
    body = {'jobs': [job.to_dict() for job, _created in slots],
            'created': [created for _job, created in slots]}
    return body, 201 if any(body['created']) else 200


# Every 400 of this route carries "errors" (app.errors), empty when the body
# as a whole is at fault, even one raised before the view runs.
submit_batch.errors_by_index = True


@bp.get('/jobs')
@declare(query=FILTERS + (SORT, LIMIT, CURSOR),
         responses={200: ('JobPage', 'Jobs newest first, or in the order asked for')})
def list_jobs():
    """Jobs newest first (or oldest first, or longest run first), filtered.

    ``next`` is the cursor of the following page. A page may hold fewer
    than ``limit`` jobs and still have a ``next`` (see
    :func:`app.queries.list_jobs`): follow ``next`` until it is null.
    """
    args = _query(*FILTERS, SORT, LIMIT, CURSOR)
    page, next_cursor = queries.list_jobs(
        **queries.parse_filters(args), limit=_limit(args['limit']), cursor=args['cursor'],
        sort=args['sort'], with_result=True)
    return {'jobs': [j.to_dict() for j in page], 'next': next_cursor}


@bp.get('/jobs/<job_id>')
@declare(responses={200: ('JobWithAttempts', 'The job with every attempt')})
def get_job(job_id):
    """One job with all its attempts."""
    job = queries.get(job_id)
    return job.to_dict(attempts=queries.attempts(job))


@bp.get('/jobs/<job_id>/log')
@declare(responses={200: ('JobLog', 'Log lines by attempt number')})
def job_log(job_id):
    """What each attempt of the job logged."""
    job = queries.get(job_id)
    return {'attempts': {str(n): [line.to_dict() for line in lines]
                         for n, lines in queries.logs(job).items()}}


@bp.post('/jobs/<job_id>/retry')
@auth.action(auth.on_task('retry'))
@declare(responses={200: ('JobWithAttempts', 'The job, queued again'), 409: 'Error',
                    503: 'Error'})
def retry_job(job_id):
    """Retry a failed or canceled job."""
    job = jobs.retry(job_id)
    return job.to_dict(attempts=queries.attempts(job))


@bp.post('/jobs/<job_id>/cancel')
@auth.action('cancel')
@declare(responses={200: ('JobWithAttempts', 'The job, canceled'),
                    202: ('JobWithAttempts', 'The job was running: it is asked to stop'),
                    409: 'Error', 503: 'Error'})
def cancel_job(job_id):
    """Cancel a waiting job, or ask a running one to stop (202)."""
    job = jobs.cancel(job_id)
    return job.to_dict(attempts=queries.attempts(job)), 202 if job.state == 'running' else 200


@bp.post('/jobs/<job_id>/run-now')
@auth.action(auth.on_task('run-now'))
@declare(responses={200: ('JobWithAttempts', 'The job, queued'), 409: 'Error', 503: 'Error'})
def run_job_now(job_id):
    """Run a scheduled job, or one waiting for its retry, at once."""
    job = jobs.run_now(job_id)
    return job.to_dict(attempts=queries.attempts(job))


@bp.delete('/jobs/<job_id>')
@auth.action('delete')
@declare(responses={204: (None, 'Deleted, with its attempts'), 409: 'Error'})
def delete_job(job_id):
    """Delete a finished job."""
    jobs.delete(job_id)
    return '', 204


@bp.get('/tasks')
@declare(responses={200: ('Tasks', 'Task types and queues')})
def list_tasks():
    """Declared task types and their parameters."""
    return {'tasks': [t.to_dict(current_app.config) for t in catalog.TASKS.values()],
            'queues': current_app.config['QUEUES']}


@bp.get('/stats')
@declare(responses={200: ('Stats', 'Counts by state, and by queue and state')})
def stats():
    """Counts of jobs by state and by queue."""
    return queries.stats()


AUDIT_LIMIT = Query('limit', int, minimum=1, maximum=1000, help='Entries per page (default 200)')
AUDIT_BEFORE = openapi.BEFORE


@bp.get('/audit')
@auth.action('audit')
@declare(query=(AUDIT_LIMIT, AUDIT_BEFORE),
         responses={200: ('Audit', 'Actions taken or refused, newest first (admins only)')})
def audit_log():
    """The audit log, newest first, a page at a time."""
    args = _query(AUDIT_LIMIT, AUDIT_BEFORE)
    limit = args['limit'] or 200
    entries = audit.entries(limit=limit, before=args['before'])
    return {'entries': [e.to_dict() for e in entries],
            'next': entries[-1].id if len(entries) == limit else None}


ALERT_STATE = Query('state', choices=(alerts.FIRING, alerts.RESOLVED),
                    help='Only alerts in this state')
ALERT_LIMIT = Query('limit', int, minimum=1, maximum=1000, help='Alerts per page (default 50)')
ALERT_BEFORE = openapi.BEFORE


@bp.get('/alerts')
@declare(query=(ALERT_STATE, ALERT_LIMIT, ALERT_BEFORE),
         responses={200: ('Alerts', 'Alerts newest first, and how many fire now')})
def list_alerts():
    """Alerts newest first, a page at a time; ``firing`` counts those firing now."""
    args = _query(ALERT_STATE, ALERT_LIMIT, ALERT_BEFORE)
    limit = args['limit'] or 50
    rows = alerts.history(limit=limit, before=args['before'], state=args['state'])
    return {'alerts': [a.to_dict() for a in rows], 'firing': len(alerts.firing()),
            'next': rows[-1].id if len(rows) == limit else None}


@bp.get('/workers')
@declare(responses={200: ('Workers', 'Consumers, online first')})
def list_workers():
    """Every consumer that reported in: online ones first, then offline."""
    lost_after = current_app.config['LOST_AFTER']
    return {'workers': [w.to_dict(lost_after) for w in queries.workers(lost_after)]}


def _empty_allowed(schema):
    # As in the list's query string, an empty filter is no filter.
    if 'enum' in schema:
        schema['enum'] = schema['enum'] + ['']
    return schema


def bulk_schema(config):
    """The body of ``POST /api/jobs/bulk`` as a JSON Schema."""
    return {'type': 'object', 'required': ['action'], 'additionalProperties': False,
            'properties': {
                'action': {'type': 'string', 'enum': list(jobs.ACTIONS)},
                'ids': {'type': ['array', 'null'], 'items': {'type': 'string'},
                        'maxItems': jobs.MAX_BULK, 'description': 'The jobs to act on'},
                'filter': {'type': ['object', 'null'], 'additionalProperties': False,
                           'properties': {q.name: _empty_allowed(q.param(config).json_schema())
                                          for q in FILTERS},
                           'description': "Every job matching the jobs list's filters"}},
            # One of the two, the other absent or null.
            'oneOf': [{'required': ['ids'], 'properties': {'ids': {'type': 'array'}}},
                      {'required': ['filter'], 'properties': {'filter': {'type': 'object'}}}]}


@bp.post('/jobs/bulk')
@auth.action(auth.on_bulk)
@declare(body=bulk_schema, responses={200: ('BulkResult', 'What was done and skipped'),
                                      503: 'Error'})
def bulk_action():
    """Retry, cancel or delete the jobs named (``ids``) or matching a ``filter``."""
    data = inputs.json_object('invalid bulk action')
    fields = {}
    action, ids, filters = data.get('action'), data.get('ids'), data.get('filter')
    filter_keys = [q.name for q in FILTERS]
    if not isinstance(action, str) or action not in jobs.ACTIONS:
        fields['action'] = 'must be one of ' + ', '.join(jobs.ACTIONS)
    if (ids is None) == (filters is None):
        fields['ids'] = 'give ids or filter, not both'
    elif ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        fields['ids'] = 'must be a list of job ids'
    elif filters is not None:
        if not isinstance(filters, dict) or set(filters) - set(filter_keys):
            fields['filter'] = 'must be an object with ' + ', '.join(filter_keys)
        else:
            # The jobs list's own filters, checked by their declarations.
            for q in FILTERS:
                value = filters.get(q.name)
                try:
                    q.param(current_app.config).parse(None if value == '' else value)
                except ValueError as exc:
                    fields[f'filter.{q.name}'] = str(exc)
    for key in set(data) - {'action', 'ids', 'filter'}:
        fields[key] = 'unknown field'
    if fields:
        raise catalog.ValidationError(fields, 'invalid bulk action')
    if filters is not None:
        filters = queries.parse_filters(filters)
    result = jobs.bulk(action, ids=ids, filters=filters, spare_tasks=auth.out_of_reach(action))
    auth.note(count=result['done'])
    return result


@bp.get('/failures')
@declare(query=(QUEUE,), responses={200: ('Failures', 'Groups, largest first')})
def failures():
    """Failed jobs grouped by task and error type."""
    args = _query(QUEUE)
    return {'groups': [dict(g, latest=g['latest'].to_dict())
                       for g in queries.failures(args['queue'])]}


@bp.get('/scheduled')
@declare(query=(QUEUE, LIMIT), responses={200: ('JobList', 'Soonest first')})
def scheduled():
    """Jobs waiting for their time or their retry, soonest first."""
    args = _query(QUEUE, LIMIT)
    return {'jobs': [j.to_dict() for j in queries.scheduled(args['queue'],
                                                        limit=_limit(args['limit']))]}


@bp.get('/queues')
@declare(responses={200: ('Queues', 'Every configured queue')})
def list_queues():
    """Every queue: paused, depth, running, scheduled, failed, throughput."""
    return {'queues': queues.overview(current_app.config)}


@bp.post('/queues/<name>/pause')
@auth.action('pause')
@declare(responses={200: ('Queue', 'The queue, paused'), 503: 'Error'})
def pause_queue(name):
    """Pause a queue: its jobs stay queued, no worker takes one."""
    return queues.pause(current_app.config, name)


@bp.post('/queues/<name>/resume')
@auth.action('resume')
@declare(responses={200: ('Queue', 'The queue, resumed'), 503: 'Error'})
def resume_queue(name):
    """Resume a paused queue."""
    return queues.resume(current_app.config, name)


def _periodic_dict(row):
    last = row['last']
    return dict(row, next_run=isoformat(row['next_run']),
                last=None if last is None else {'id': last.id, 'state': last.state,
                                                'created_at': isoformat(last.created_at)})


@bp.get('/periodic')
@declare(responses={200: ('PeriodicList', 'Every declared periodic task')})
def list_periodic():
    """Periodic tasks: schedule, paused, last job, next run."""
    return {'periodic': [_periodic_dict(r) for r in periodic.overview()]}


@bp.post('/periodic/<name>/pause')
@auth.action('pause')
@declare(responses={200: ('Periodic', 'The periodic task, paused'), 503: 'Error'})
def pause_periodic(name):
    """Stop starting a periodic task on its schedule."""
    return _periodic_dict(periodic.pause(name))


@bp.post('/periodic/<name>/resume')
@auth.action('resume')
@declare(responses={200: ('Periodic', 'The periodic task, resumed'), 503: 'Error'})
def resume_periodic(name):
    """Start a paused periodic task on its schedule again."""
    return _periodic_dict(periodic.resume(name))


@bp.post('/periodic/<name>/trigger')
@auth.action(auth.on_task('trigger'))
@declare(responses={201: ('JobWithAttempts', 'The new job'), 503: 'Error'})
def trigger_periodic(name):
    """Start a periodic task now, as an ordinary job."""
    job = periodic.trigger(name, current_app.config)
    return job.to_dict(attempts=[]), 201

"""HTML pages and the fragments they are made of."""
import logging

from flask import (Blueprint, current_app, flash, redirect, render_template, request,
                   url_for)
from werkzeug.exceptions import NotFound

from . import auth, catalog, errors, fragments, jobs, periodic, queries, queues, states, text
from .fragments import PAGES, Scope
from .extensions import db
from .live import socket_url
from .models import utcnow

bp = Blueprint('pages', __name__)
logger = logging.getLogger(__name__)


# Each job action of :data:`app.states.ALLOWED` and the page endpoint that does it.
JOB_ACTIONS = {'retry': 'pages.retry_job', 'cancel': 'pages.cancel_job',
               'run_now': 'pages.run_now_job', 'delete': 'pages.delete_job'}


@bp.app_template_global('action_url')
def action_url(action, job_id):
    """The URL a page form posts to for ``action`` (a key of :data:`JOB_ACTIONS`) on a job."""
    return url_for(JOB_ACTIONS[action], job_id=job_id)


# Pausing and resuming, by kind of thing paused, and the endpoints that do it.
PAUSE_ACTIONS = {('queue', 'pause'): 'pages.pause_queue', ('queue', 'resume'): 'pages.resume_queue',
                 ('periodic', 'pause'): 'pages.pause_periodic',
                 ('periodic', 'resume'): 'pages.resume_periodic'}


@bp.app_template_global('pause_url')
def pause_url(kind, verb, name):
    """The URL a page form posts to to ``verb`` (pause, resume) a ``kind`` (queue, periodic)."""
    return url_for(PAUSE_ACTIONS[kind, verb], name=name)


@bp.record_once
def _template_globals(setup):
    # Globals, not a context processor: a template imported without
    # context (``_macros.html``) sees them too, and Jinja then renders it
    # once, instead of once per import (once per row of a jobs list).
    setup.app.jinja_env.globals.update(states=states, allows=states.allows, now=utcnow)


# The submit form's own fields besides the task and its parameters: the
# options it folds away (opened when one holds a value or an error).
_FORM_OPTIONS = ('queue', 'priority', 'delay', 'eta', 'retries', 'retry_delay')


def _form_context(values=None, errors=None, task_name=None):
    tasks = catalog.TASKS
    task_name = task_name or (values or {}).get('task') or request.args.get('task')
    if task_name not in tasks:
        task_name = 'sleep' if 'sleep' in tasks else next(iter(tasks))
    errors = errors or {}
    placed = {'task', *_FORM_OPTIONS, *(f'params.{p.name}' for p in tasks[task_name].params)}
    values = values or {}
    queues_ = current_app.config['QUEUES']
    # The options open when one of them is marked, or holds what is not its default.
    options_open = any(errors.get(o) for o in _FORM_OPTIONS) or any(
        values.get(o) not in (None, '') and not (o == 'queue' and values[o] == queues_[0])
        for o in _FORM_OPTIONS)
    return {'tasks': tasks, 'task': tasks[task_name], 'values': values,
            'errors': errors, 'queues': queues_, 'options': _FORM_OPTIONS,
            'options_open': options_open,
            # Task types started on a schedule, offered apart (catalog.PERIODIC).
            'periodic_tasks': [n for n in tasks if n in catalog.PERIODIC],
            # Errors of fields the form has no place for (sent by hand): shown on top.
            'unplaced': {k: v for k, v in errors.items() if k not in placed},
            'limits': {'priority': catalog.MAX_PRIORITY, 'retries': catalog.MAX_RETRIES,
                       'delay': catalog.MAX_DELAY, 'retry_delay': catalog.MAX_RETRY_DELAY}}


def _page(name, template, params=None, **context):
    """``template`` for the live page ``name`` (a key of :data:`app.fragments.PAGES`).

    ``params`` are the page's parameters (by default parsed from the query
    string, which raises :class:`~app.queries.BadQuery` for a bad filter or
    cursor); the template gets each of the page's fragments, rendered, as
    ``fragments.<slot>``, the live indicator (``live_status``, whose id is
    ``live_status_id``) and the URL of its socket (``live_url``), besides
    ``context``.
    """
    page = PAGES[name]
    params = page.parse(request.args) if params is None else params
    status = fragments.LIVE_STATUS
    return render_template(template, fragments=page.render(Scope(params)),
                           live_status=status.render(live=False, node=None),
                           live_status_id=status.dom_id({}),
                           live_url=socket_url(name, **params), **context)


@bp.get('/')
def dashboard():
    """Counts by state, the submit form and the newest jobs."""
    return _page('dashboard', 'dashboard.html', **_form_context())


@bp.get('/stats')
def stats_fragment():
    """The counts-by-state fragment."""
    return fragments.QUEUE_STATS.render()


@bp.get('/jobs')
def job_list():
    """Jobs, filtered and paged newest first."""
    params = PAGES['jobs'].parse(request.args)
    return _page('jobs', 'jobs.html', params, filters=fragments.filters_of(params),
                 sort=params['sort'], task_names=queries.task_names(), queues=current_app.config['QUEUES'])


@bp.get('/jobs/new')
def new_job():
    """The submit form on a page of its own."""
    return render_template('submit.html', **_form_context(values=request.args.to_dict()))


@bp.get('/jobs/new/fields')
def task_fields():
    """The parameter fields of one task type (swapped in when the task changes)."""
    return render_template('_task_fields.html', **_form_context())


def _form_errors(values, fields):
    """The submit form again, with what was typed and a message by each bad field."""
    context = _form_context(values=values, errors=fields)
    if request.headers.get('HX-Request'):
        return render_template('_submit_form.html', **context), 400
    return render_template('submit.html', **context), 400


@bp.errorhandler(catalog.ValidationError)
def refused_input(exc):
    """Input refused at the edge: the submit form comes back marked, any other page is a 400."""
    if request.endpoint == 'pages.create_job':
        # What was typed goes back into the fields, made visible (\x00).
        return _form_errors({k: text.clean(v) for k, v in request.form.items()}, exc.fields)
    return errors.respond(400, exc.message, fields=exc.fields)


@bp.post('/jobs')
@auth.action(auth.on_task('submit'))
def create_job():
    """Submit from the form; errors re-render it with messages by the fields."""
    values = request.form.to_dict()
    try:
        sub = catalog.validate(values, current_app.config, from_form=True)
    except catalog.ValidationError as exc:
        return _form_errors(values, exc.fields)
    job = jobs.submit(sub)
    url = url_for('pages.job_page', job_id=job.id)
    if request.headers.get('HX-Request') and values.get('stay'):
        # The dashboard keeps its form: a fresh one, saying what was submitted.
        context = _form_context(values={'task': job.task, 'stay': '1'})
        return render_template('_submit_form.html', submitted=job, **context), 201
    flash(f'Submitted {job.task} job {job.id[:8]}.', 'ok')
    if request.headers.get('HX-Request'):
        return '', 200, {'HX-Redirect': url}
    return redirect(url, 303)


@bp.get('/jobs/<job_id>')
def job_page(job_id):
    """One job: parameters, state, progress, result and every attempt."""
    job = queries.get(job_id)
    return _page('job', 'job.html', {'id': job.id}, job=job)


@bp.get('/jobs/<job_id>/row')
def job_row(job_id):
    """One job's row in a list."""
    return render_template('_job_row.html', job=queries.get(job_id))


@bp.get('/jobs/<job_id>/summary')
def job_summary(job_id):
    """The job page's state, progress and actions."""
    return fragments.JOB_SUMMARY.render(Scope({'id': job_id}))


@bp.get('/jobs/<job_id>/attempts')
def job_attempts(job_id):
    """The job page's attempt timeline."""
    return fragments.JOB_ATTEMPTS.render(Scope({'id': job_id}))


def _back(job_id=None):
    target = auth.safe_path(request.form.get('next'))
    if target:
        return redirect(target, 303)
    if job_id:
        return redirect(url_for('pages.job_page', job_id=job_id), 303)
    return redirect(url_for('pages.job_list'), 303)


@bp.post('/jobs/<job_id>/retry')
@auth.action(auth.on_task('retry'))
def retry_job(job_id):
    """Retry a failed or canceled job."""
    job = jobs.retry(job_id)
    flash(f'Job {job.id[:8]} queued again.', 'ok')
    return redirect(url_for('pages.job_page', job_id=job.id), 303)


@bp.post('/jobs/<job_id>/cancel')
@auth.action('cancel')
def cancel_job(job_id):
    """Cancel a waiting job, or ask a running one to stop."""
    job = jobs.cancel(job_id)
    if job.state == states.RUNNING:
        flash(f'Job {job.id[:8]} was asked to stop; it stops at its next progress report.', 'ok')
    else:
        flash(f'Job {job.id[:8]} canceled.', 'ok')
    return _back(job.id)


@bp.post('/jobs/<job_id>/run-now')
@auth.action(auth.on_task('run-now'))
def run_now_job(job_id):
    """Run a scheduled job, or one waiting for its retry, at once."""
    job = jobs.run_now(job_id)
    flash(f'Job {job.id[:8]} queued to run now.', 'ok')
    return _back(job.id)


# Jobs a confirmation names one by one; it counts the rest.
CONFIRM_NAMED = 10


@bp.post('/jobs/bulk')
@auth.action(auth.on_bulk)
def bulk_jobs():
    """Retry, cancel or delete the ticked jobs or every job matching the filter."""
    form = request.form
    action = form.get('action')
    if action not in jobs.ACTIONS:
        raise queries.BadQuery('choose retry, cancel or delete', 'action')
    filters = queries.parse_filters(form, prefix='f.')
    back = url_for('pages.job_list', **{k: v for k, v in filters.items() if v})
    if form.get('scope') == 'filter':
        ids = None
        count = queries.count_matching(filters, jobs.MAX_BULK)
        # The count the operator agreed to: jobs that came to match the
        # filter after the question was asked are not theirs to lose.
        fields = [('action', action), ('scope', 'filter'), ('expected', count)] + [
            (f'f.{k}', v) for k, v in filters.items() if v]
    else:
        ids = form.getlist('ids')
        if not ids:
            flash('Tick the jobs first, or choose every job matching the filter.', 'error')
            return redirect(back, 303)
        count = len(ids)
        fields = [('action', action), ('scope', 'selected')] + [('ids', i) for i in ids] + [
            (f'f.{k}', v) for k, v in filters.items() if v]
    agreed = form.get('expected')
    changed = (ids is None and form.get('confirmed') and agreed is not None
               and agreed != str(count))
    if action in ('cancel', 'delete') and (not form.get('confirmed') or changed):
        auth.note(count=count, outcome='asked to confirm')
        named = queries.jobs_by_id(ids[:CONFIRM_NAMED]) if ids is not None else None
        return render_template('confirm.html', action=action, count=count, fields=fields,
                               back=back, post_to=url_for('pages.bulk_jobs'),
                               filters=filters if ids is None else None, named=named,
                               limit=jobs.MAX_BULK, changed_from=agreed if changed else None,
                               unnamed=count - len(named) if named is not None else 0)
    result = jobs.bulk(action, ids=ids, filters=None if ids is not None else filters,
                       spare_tasks=auth.out_of_reach(action))
    auth.note(count=result['done'])
    skipped = ', '.join(f'{n} {state}' for state, n in sorted(result['skipped'].items()))
    verb = {'retry': 'retried', 'cancel': 'canceled (or asked to stop)', 'delete': 'deleted'}[action]
    flash(f'{result["done"]} of {result["matched"]} jobs {verb}'
          + (f'; skipped: {skipped}' if skipped else '')
          + ('; more match: run it again' if result['truncated'] else '') + '.', 'ok')
    return redirect(back, 303)


@bp.get('/queues')
def queues_page():
    """Every queue: waiting, running, failed, throughput; pause and resume."""
    return _page('queues', 'queues.html')


@bp.get('/queues/<name>')
def queue_page(name):
    """One queue's charts: throughput, wait and run time, depth."""
    if not queries.known_queue(name, current_app.config['QUEUES']):
        raise NotFound(f'no queue named {name}')
    params = PAGES['queue'].parse({**request.args.to_dict(), 'queue': name})
    return _page('queue', 'queue.html', params, queue=name)


@bp.get('/tasks/<path:name>', merge_slashes=False)
def task_page(name):
    """One task type's charts: throughput, wait and run time.

    ``path``: a task name may hold ``/`` (a job enqueued around the API
    names its task as its producer does), and its page is still one URL;
    slashes within it are kept as they are (``a//b``). A name that starts
    with ``/``, or holds ``.`` or ``..`` segments (which a browser rewrites
    before it asks), has no page.
    """
    if not queries.known_task(name):
        raise NotFound(f'no task type named {name}')
    params = PAGES['task'].parse({**request.args.to_dict(), 'task': name})
    return _page('task', 'task.html', params, task=name, declared=catalog.TASKS.get(name))


@bp.get('/charts')
def charts_fragment():
    """The charts fragment for ``window``, narrowed by ``queue`` or ``task`` (one of them)."""
    queue, task = request.args.get('queue') or None, request.args.get('task') or None
    if queue and not queries.known_queue(queue, current_app.config['QUEUES']):
        raise NotFound(f'no queue named {queue}')
    if task and not queries.known_task(task):
        raise NotFound(f'no task type named {task}')
    params = {'queue': None if task else queue, 'task': task,
              **PAGES['dashboard'].parse(request.args)}
    return fragments.CHARTS.render(Scope(params))


@bp.post('/queues/<name>/pause')
@auth.action('pause')
def pause_queue(name):
    """Pause a queue."""
    queues.pause(current_app.config, name)
    flash(f'Queue {name} paused: its jobs wait until it is resumed.', 'ok')
    return redirect(url_for('pages.queues_page'), 303)


@bp.post('/queues/<name>/resume')
@auth.action('resume')
def resume_queue(name):
    """Resume a queue."""
    queues.resume(current_app.config, name)
    flash(f'Queue {name} resumed.', 'ok')
    return redirect(url_for('pages.queues_page'), 303)


@bp.get('/audit')
@auth.action('audit')
def audit_page():
    """The audit log: who did what, from where, when (admins only)."""
    return _page('audit', 'audit.html', rows=fragments.AUDIT_ROWS)


@bp.get('/alerts')
def alerts_page():
    """Alerts firing now, and every past one, newest first, paged."""
    return _page('alerts', 'alerts.html')


@bp.get('/alerts/banner')
def alert_banner_fragment():
    """The banner of firing alerts that every page carries."""
    return fragments.ALERT_BANNER.render()


@bp.app_template_global('alert_banner')
def alert_banner():
    """The alert banner for a page that is not live (Markup; empty for who may not see it).

    Never raises: a page must not fail for its banner (the database away
    on an error page, say); the failure is logged.
    """
    try:
        if not auth.can('view'):
            return ''
        return fragments.ALERT_BANNER.render()
    except Exception:
        logger.exception('the alert banner could not be rendered')
        db.session.rollback()
        return ''


@bp.get('/workers')
def workers_page():
    """Every consumer: online or not, what it runs, its counts."""
    return _page('workers', 'workers.html')


@bp.get('/failures')
def failures_page():
    """Failed jobs grouped by task and error type."""
    params = PAGES['failures'].parse(request.args)
    return _page('failures', 'failures.html', params, queue=params['queue'])


@bp.get('/scheduled')
def scheduled_list():
    """Jobs waiting for their time or their retry."""
    params = PAGES['scheduled'].parse(request.args)
    return _page('scheduled', 'scheduled.html', params, queue=params['queue'])


@bp.get('/periodic')
def periodic_page():
    """Periodic tasks: schedule, last and next run; pause, resume, run now."""
    return _page('periodic', 'periodic.html')


@bp.post('/periodic/<name>/pause')
@auth.action('pause')
def pause_periodic(name):
    """Stop starting a periodic task on its schedule."""
    periodic.pause(name)
    flash(f'{name} paused: it is not started on its schedule until resumed.', 'ok')
    return redirect(url_for('pages.periodic_page'), 303)


@bp.post('/periodic/<name>/resume')
@auth.action('resume')
def resume_periodic(name):
    """Start a periodic task on its schedule again."""
    periodic.resume(name)
    flash(f'{name} resumed.', 'ok')
    return redirect(url_for('pages.periodic_page'), 303)


@bp.post('/periodic/<name>/trigger')
@auth.action(auth.on_task('trigger'))
def trigger_periodic(name):
    """Start a periodic task now."""
    job = periodic.trigger(name, current_app.config)
    flash(f'{name} started as job {job.id[:8]}.', 'ok')
    return redirect(url_for('pages.job_page', job_id=job.id), 303)


@bp.post('/jobs/<job_id>/delete')
@auth.action('delete')
def delete_job(job_id):
    """Delete a finished job, once confirmed (a page asks first when the form did not)."""
    job = queries.get(job_id)
    if not request.form.get('confirmed') and states.allows(job.state, 'delete'):
        # Without JavaScript the form's own question is never asked: ask here.
        auth.note(outcome='asked to confirm')
        return render_template('confirm.html', action='delete', count=1, named=[job], unnamed=0,
                               filters=None, fields=[], post_to=url_for('pages.delete_job',
                                                                        job_id=job.id),
                               back=url_for('pages.job_page', job_id=job.id))
    jobs.delete(job_id)
    flash(f'Job {job_id[:8]} deleted.', 'ok')
    return redirect(url_for('pages.job_list'), 303)

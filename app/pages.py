"""HTML pages and the fragments they are made of."""
import json

from flask import (Blueprint, current_app, flash, redirect, render_template, request,
                   url_for)

from . import catalog, jobs, states
from .models import isoformat, utcnow

bp = Blueprint('pages', __name__)

RECENT = 20


@bp.app_template_filter('ts')
def format_ts(value):
    return '' if value is None else value.strftime('%Y-%m-%d %H:%M:%S')


@bp.app_template_filter('iso')
def format_iso(value):
    return '' if value is None else value.isoformat(timespec='seconds') + 'Z'


# Millisecond precision, as in the JSON API (the benchmark reads it).
bp.app_template_filter('iso_ms')(lambda value: isoformat(value) or '')


@bp.app_template_filter('duration')
def format_duration(seconds):
    if seconds is None:
        return ''
    if seconds < 1:
        return f'{seconds * 1000:.0f} ms'
    if seconds < 120:
        return f'{seconds:.2f} s'
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h {minutes:02d}m {secs:02d}s' if hours else f'{minutes}m {secs:02d}s'


@bp.app_template_filter('pretty_json')
def pretty_json(value):
    # A plain str, so Jinja's autoescaping shows markup in values as text.
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


@bp.app_template_filter('brief')
def brief(value, width=60):
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 1] + '…'


@bp.app_context_processor
def template_globals():
    return {'states': states, 'allows': states.allows, 'now': utcnow}


def _form_context(values=None, errors=None, task_name=None):
    tasks = catalog.TASKS
    task_name = task_name or (values or {}).get('task') or request.args.get('task')
    if task_name not in tasks:
        task_name = 'sleep' if 'sleep' in tasks else next(iter(tasks))
    return {'tasks': tasks, 'task': tasks[task_name], 'values': values or {},
            'errors': errors or {}, 'queues': current_app.config['QUEUES'],
            'limits': {'priority': catalog.MAX_PRIORITY, 'retries': catalog.MAX_RETRIES,
                       'delay': catalog.MAX_DELAY, 'retry_delay': catalog.MAX_RETRY_DELAY}}


@bp.get('/')
def dashboard():
    """Counts by state, the submit form and the newest jobs."""
    recent, _ = jobs.list_jobs(limit=RECENT)
    return render_template('dashboard.html', stats=jobs.stats(), recent=recent,
                           live_url=url_for('live.live_socket', view='dashboard'),
                           **_form_context())


@bp.get('/stats')
def stats_fragment():
    """The counts-by-state fragment."""
    return render_template('_stats.html', stats=jobs.stats())


@bp.get('/jobs')
def job_list():
    """Jobs, filtered and paged newest first."""
    args = request.args
    filters = {k: args.get(k) or None for k in ('state', 'queue', 'task', 'q')}
    limit = current_app.config['PAGE_SIZE']
    page, next_cursor = jobs.list_jobs(**filters, limit=limit, cursor=args.get('cursor') or None)
    cursor = args.get('cursor') or None
    live = {k: v for k, v in filters.items() if v}
    return render_template('jobs.html', jobs=page, next_cursor=next_cursor, filters=filters,
                           cursor=cursor, task_names=jobs.task_names(),
                           queues=current_app.config['QUEUES'],
                           live_url=url_for('live.live_socket', view='jobs', cursor=cursor, **live))


@bp.get('/jobs/new')
def new_job():
    """The submit form on a page of its own."""
    return render_template('submit.html', **_form_context(values=request.args.to_dict()))


@bp.get('/jobs/new/fields')
def task_fields():
    """The parameter fields of one task type (swapped in when the task changes)."""
    return render_template('_task_fields.html', **_form_context())


@bp.post('/jobs')
def create_job():
    """Submit from the form; errors re-render it with messages by the fields."""
    values = request.form.to_dict()
    try:
        sub = catalog.validate(values, current_app.config, from_form=True)
    except catalog.ValidationError as exc:
        context = _form_context(values=values, errors=exc.fields)
        if request.headers.get('HX-Request'):
            return render_template('_submit_form.html', **context), 400
        return render_template('submit.html', **context), 400
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
    job = jobs.get(job_id)
    return render_template('job.html', job=job, attempts=jobs.attempts(job),
                           live_url=url_for('live.live_socket', view='job', id=job.id))


@bp.get('/jobs/<job_id>/row')
def job_row(job_id):
    """One job's row in a list."""
    return render_template('_job_row.html', job=jobs.get(job_id))


@bp.get('/jobs/<job_id>/summary')
def job_summary(job_id):
    """The job page's state, progress and actions."""
    return render_template('_job_summary.html', job=jobs.get(job_id))


@bp.get('/jobs/<job_id>/attempts')
def job_attempts(job_id):
    """The job page's attempt timeline."""
    job = jobs.get(job_id)
    return render_template('_attempts.html', job=job, attempts=jobs.attempts(job))


def _back(job_id=None):
    target = request.form.get('next') or request.referrer
    if target and target.startswith('/') and not target.startswith('//'):
        return redirect(target, 303)
    if job_id:
        return redirect(url_for('pages.job_page', job_id=job_id), 303)
    return redirect(url_for('pages.job_list'), 303)


@bp.post('/jobs/<job_id>/retry')
def retry_job(job_id):
    """Retry a failed or canceled job."""
    job = jobs.retry(job_id)
    flash(f'Job {job.id[:8]} queued again.', 'ok')
    return redirect(url_for('pages.job_page', job_id=job.id), 303)


@bp.post('/jobs/<job_id>/cancel')
def cancel_job(job_id):
    """Cancel a waiting job."""
    job = jobs.cancel(job_id)
    flash(f'Job {job.id[:8]} canceled.', 'ok')
    return _back(job.id)


@bp.post('/jobs/<job_id>/delete')
def delete_job(job_id):
    """Delete a finished job."""
    jobs.delete(job_id)
    flash(f'Job {job_id[:8]} deleted.', 'ok')
    return redirect(url_for('pages.job_list'), 303)

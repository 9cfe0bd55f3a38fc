"""The live fragments, each declared once: DOM id, template, data and what changes it.

A live fragment is a Jinja partial whose root element carries a stable DOM
id. Its page includes it, a plain GET returns it and the WebSocket pushes it
(:mod:`app.live`); all three render it from its :class:`Fragment` here, so
the id, the template and the data cannot drift apart.

- A fragment's template is named after its id: ``queue-stats`` is
  ``_queue-stats.html``; an id with parameters drops them
  (``job-{id}-summary`` is ``_job-summary.html``).
- The template gets its id as ``fragment_id``: no template and no other module
  writes a fragment's id (``tests/test_fragments.py`` checks both ways).
- Fragments are grouped by the :class:`Page` that shows them. A page's
  parameters come from its query string (:meth:`Page.parse`); they are the
  query of its socket URL (``/ws?view=<page name>&...``) and the key of its
  live view.
"""
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple

from flask import current_app, has_request_context, render_template, request
from markupsafe import Markup

from . import alerts, audit, catalog, charts, openapi, periodic, queries, queues, states

RECENT = 20  # rows in the dashboard's newest jobs
AUDIT_ROWS = 200  # entries on the audit page
ALERT_ROWS = 50  # past alerts per page of /alerts
BANNER_ROWS = 5  # firing alerts the banner names; it counts the rest
CHART_EVERY = 5.0  # least seconds between two pushes of a live view's charts
DRAWN = 16  # fragments' HTML kept per app for reuse (Fragment.key)

_PARAMETER = re.compile(r'-?\{(\w+)\}')


class Change(NamedTuple):
    """What one event says changed (the event's shape is in :mod:`app.events`).

    ``jobs``: ``[{'id', 'state', 'queue', 'task', ...}]``; a field left out
    (None) might be anything. ``deleted``: ids of deleted jobs. ``event``:
    the whole event, whose flags (``queues``, ``workers``, ``periodic``) say
    what else changed.
    """
    jobs: list
    deleted: list
    event: dict

    @classmethod
    def of(cls, event):
        """The change an event (a dict) announces."""
        return cls(event.get('jobs') or [], event.get('deleted') or [], event)


class Scope:
    """One render of a page's fragments: its parameters and the reads they share.

    Made afresh for every render (a page, a fragment GET, a live view's
    render), so nothing read from the ledger outlives it. ``params`` is the
    page's ``{name: str or None}``; ``shown`` is the job ids a list fragment
    showed (a frozenset), or None if none did.
    """

    def __init__(self, params=None):
        self.params = dict(params or {})
        self.shown = None
        self._reads = {}

    def once(self, name, read):
        """``read()``, called at most once per scope under ``name`` (exceptions are not kept)."""
        if name not in self._reads:
            self._reads[name] = read()
        return self._reads[name]

    def show(self, rows):
        """Note the jobs (rows with ``.id``) a fragment lists."""
        self.shown = frozenset(j.id for j in rows)


@dataclass(frozen=True)
class Fragment:
    """One live fragment.

    ``id``: its DOM id, with ``{name}`` for each page parameter it holds
    (``'job-{id}-summary'``). ``build(scope)``: the template's context (a
    dict) from the page's parameters and the ledger; raises
    :class:`~werkzeug.exceptions.NotFound` when what it shows does not
    exist (a 404 for a page or a GET). ``concerns(change, view)``: whether a
    :class:`Change` may alter it on a live view that has ``params`` and
    ``displayed`` (the job ids its last render showed); None: never, the
    fragment is sent only with a snapshot. ``gone``: a live view shows
    ``_<name>-gone.html`` when ``build`` raises NotFound (else it leaves the
    fragment out). ``every``: the least seconds between two renders of it
    for a live view (0: whenever its page renders); the changes that concern
    it in between go out together once it is due (:mod:`app.live`).
    ``key(scope)``: for a fragment dearer to draw than to read (the charts),
    a hashable value that is the same whenever its HTML would be; while it
    is, the HTML drawn last is reused (:class:`Drawn`), ``build`` not called.
    """
    id: str
    build: Callable[[Scope], dict] | None
    concerns: Callable[[Change, object], bool] | None
    gone: bool = False
    every: float = 0.0
    key: Callable[[Scope], object] | None = None

    @property
    def name(self):
        """The id without its parameters: ``'job-{id}-summary'`` is ``'job-summary'``."""
        return _PARAMETER.sub('', self.id).strip('-')

    @property
    def template(self):
        """The template's file name, ``_<name>.html``."""
        return f'_{self.name}.html'

    @property
    def gone_template(self):
        """What a live view shows when ``build`` raises NotFound (None: nothing)."""
        return f'_{self.name}-gone.html' if self.gone else None

    def dom_id(self, params):
        """The id for a page's ``params``; raises KeyError if one it holds is missing."""
        return self.id.format(**params)

    def render(self, scope=None, **context):
        """Its HTML (Markup) for ``scope`` (a :class:`Scope`), with ``context`` added to what
        ``build`` returns; a page places it as it is.

        Raises whatever ``build`` or the template raises.
        """
        scope = scope or Scope()
        if self.key is None or context:
            return self._draw(scope, context)
        # Its links are made from the page's parameters (those given) and the app's root path.
        given = frozenset((k, v) for k, v in scope.params.items() if v is not None)
        root = request.script_root if has_request_context() else ''
        key = (self.id, given, root, self.key(scope))
        drawn = current_app.extensions.setdefault('qm.drawn', Drawn())
        html = drawn.get(key)
        if html is None:
            html = drawn.put(key, self._draw(scope, context))
        return html

    def _draw(self, scope, context):
        data = self.build(scope) if self.build else {}
        return Markup(render_template(self.template, fragment_id=self.dom_id(scope.params),
                                      **data, **context))

    def render_gone(self, scope):
        """The :attr:`gone_template` for ``scope`` (Markup)."""
        return Markup(render_template(self.gone_template, fragment_id=self.dom_id(scope.params)))

    def changed_by(self, change, view):
        """Whether ``change`` concerns it on ``view`` (False if it has no ``concerns``)."""
        return self.concerns is not None and self.concerns(change, view)


class Drawn:
    """The HTML last drawn for each of the last :data:`DRAWN` keys of fragments with a
    ``key`` (one per app, shared by its threads): a least-recently-used map of
    ``key -> Markup``."""

    def __init__(self, size=None):
        self.size = size or DRAWN
        self._html = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        """The HTML drawn for ``key``, or None."""
        with self._lock:
            html = self._html.get(key)
            if html is not None:
                self._html.move_to_end(key)
            return html

    def put(self, key, html):
        """Keep ``html`` for ``key`` (forgetting the least recently used beyond the size);
        return it."""
        with self._lock:
            self._html[key] = html
            self._html.move_to_end(key)
            while len(self._html) > self.size:
                self._html.popitem(last=False)
        return html


@dataclass(frozen=True)
class Page:
    """A page that shows live fragments, and the live view (``/ws?view=name``) that pushes them.

    ``fragments``: ``{slot: Fragment}``, in render order; the page's
    template places each as ``{{ fragments.<slot> }}``. ``action``: the
    action (:mod:`app.roles`) its page and its socket need. ``parse(args)``:
    the page's parameters, ``{name: str or None}`` (always the same names,
    in the same order), from a query string (a mapping); raises ValueError
    (:class:`~app.queries.BadQuery` for a filter or cursor) for values it
    cannot show.
    """
    name: str
    fragments: dict
    parse: Callable[[object], dict]
    action: str = 'view'  # what seeing it takes (app.roles): the audit log is for admins

    def render(self, scope):
        """``{slot: Markup}``: every fragment's HTML; raises what a fragment raises."""
        return {slot: fragment.render(scope) for slot, fragment in self.fragments.items()}


# -- the job list's filters ---------------------------------------------------

def filters_of(params):
    """The job-list filters (``queries.FILTER_KEYS``) among a page's parameters."""
    return {k: params[k] for k in queries.FILTER_KEYS}


def _job_list_params(args):
    filters = queries.parse_filters(args)
    queries.check_filters(filters)
    sort = queries.check_sort(args.get('sort'))
    cursor = args.get('cursor') or None
    if cursor:
        queries.check_cursor(cursor, sort)
    # The default order is left out, so the plain list keeps its plain URL.
    return {**filters, 'sort': None if sort == 'newest' else sort, 'cursor': cursor}


def _job_params(args):
    job_id = args.get('id', '')
    if not job_id or len(job_id) > 36:
        raise ValueError('view=job needs an id')
    return {'id': job_id}


def _queue_param(args):
    return {'queue': args.get('queue') or None}


def _no_params(args):
    return {}


def _window_param(args):
    return {'window': charts.window_of(args.get('window'))}


def _named(key):
    def parse(args):
        name = args.get(key) or ''
        if not name or len(name) > queries.MAX_FILTER:
            raise ValueError(f'view={key} needs a {key} of at most {queries.MAX_FILTER} characters')
        return {key: name, **_window_param(args)}
    return parse


def _alert_params(args):
    # Read as GET /api/alerts reads it, so that the page and the API take
    # the same cursors and refuse the same (its bounds are fixed: no
    # configuration, and pages are read outside a request too).
    try:
        before = openapi.BEFORE.parse(args, {})
    except catalog.ValidationError as exc:
        raise queries.BadQuery(exc.message, 'before') from None
    return {'before': before}


# -- what fragments show --------------------------------------------------------

def _stats(scope):
    return {'stats': queries.stats()}


def _recent_jobs(scope):
    recent, _ = queries.list_jobs(limit=RECENT)
    scope.show(recent)
    return {'jobs': recent, 'filtered': False}


def _job_page(scope):
    # One read for the rows and the pager (which needs the next cursor).
    params = scope.params
    return scope.once('job page', lambda: queries.list_jobs(
        **filters_of(params), cursor=params['cursor'], sort=params['sort'] or 'newest',
        limit=current_app.config['PAGE_SIZE']))


def _jobs_page_rows(scope):
    page, _ = _job_page(scope)
    scope.show(page)
    return {'jobs': page, 'filtered': any(filters_of(scope.params).values()),
            'selectable': True}


def _pager(scope):
    page, next_cursor = _job_page(scope)
    # A search the index cannot narrow looks at a window of jobs per page:
    # a short page with more to come says how far it has looked (back to a
    # creation time, or down to a run time).
    partial = next_cursor is not None and len(page) < current_app.config['PAGE_SIZE']
    sort = scope.params['sort']
    searched_to = None
    if partial:
        searched_to = (queries.decode_run_cursor(next_cursor) if sort == 'runtime'
                       else queries.decode_cursor(next_cursor, sort))[0]
    return {'filters': filters_of(scope.params), 'cursor': scope.params['cursor'],
            'next_cursor': next_cursor, 'sort': sort, 'searched_to': searched_to}


def _job_count(scope):
    count = queries.count_jobs(filters_of(scope.params))
    return {'count': count, 'filtered': any(filters_of(scope.params).values()),
            'shown': len(_job_page(scope)[0])}


def _job(scope):
    return scope.once('job', lambda: queries.get(scope.params['id']))


def _job_summary(scope):
    return {'job': _job(scope)}


def _job_attempts(scope):
    job = _job(scope)
    return {'job': job, 'attempts': queries.attempts(job), 'logs': queries.logs(job)}


def _queues(scope):
    config = current_app.config
    return {'queues': queues.overview(config),
            'consumers': queries.consumers_of(config['QUEUES'], config['LOST_AFTER']),
            'latency': queries.oldest_waiting(config['QUEUES'])}


def _workers(scope):
    lost_after = current_app.config['LOST_AFTER']
    rows = queries.workers(lost_after)
    return {'workers': rows, 'lost_after': lost_after,
            'running': queries.running_on(rows, lost_after)}


def _failures(scope):
    queue = scope.params['queue']
    return {'groups': queries.failures(queue), 'queue': queue}


def _scheduled(scope):
    return {'jobs': queries.scheduled(scope.params['queue'],
                                   limit=current_app.config['MAX_PAGE_SIZE'])}


def _periodic(scope):
    return {'periodic': periodic.overview()}


def _audit_log(scope):
    return {'entries': audit.entries(limit=AUDIT_ROWS)}


def _firing(scope):
    return scope.once('firing', alerts.firing)


def _alert_banner(scope):
    firing = _firing(scope)
    return {'alerts': firing[:BANNER_ROWS], 'more': max(0, len(firing) - BANNER_ROWS)}


def _alerts_firing(scope):
    return {'alerts': _firing(scope)}


def _alert_history(scope):
    before = scope.params['before']
    rows = alerts.history(limit=ALERT_ROWS + 1, before=before)
    return {'alerts': rows[:ALERT_ROWS], 'before': before,
            'next': rows[ALERT_ROWS - 1].id if len(rows) > ALERT_ROWS else None}


def _chart_points(scope):
    params = scope.params
    return scope.once('chart points', lambda: charts.series(
        params['window'], queue=params.get('queue'), task=params.get('task')))


def _charts_key(scope):
    # The charts show their window's points and nothing else that changes:
    # a dashboard reloaded, or open in several tabs, draws them once a change.
    return repr(_chart_points(scope))


def _charts(scope):
    params = scope.params
    queue, task = params.get('queue'), params.get('task')
    if task:
        endpoint, args = 'pages.task_page', {'name': task}
    elif queue:
        endpoint, args = 'pages.queue_page', {'name': queue}
    else:
        endpoint, args = 'pages.dashboard', {}
    window = params['window']
    return {'charts': charts.charts(window, queue=queue, task=task, points=_chart_points(scope)),
            'window': window,
            'window_label': charts.WINDOW_LABELS[window], 'window_labels': charts.WINDOW_LABELS,
            'step_label': charts.STEP_LABELS[charts.WINDOWS[window][1]],
            'queue': queue, 'task': task, 'page_endpoint': endpoint, 'page_args': args,
            'geometry': {'width': charts.WIDTH, 'height': charts.HEIGHT, 'left': charts.LEFT,
                         'right': charts.RIGHT, 'top': charts.TOP, 'bottom': charts.BOTTOM}}


# -- what changes them ------------------------------------------------------------

def _any_job(change, view):
    return bool(change.jobs or change.deleted)  # every change moves a count


def _listed(change, view):
    if view.displayed & (set(change.deleted) | {c['id'] for c in change.jobs}):
        return True
    params = view.params
    if params['cursor']:  # older pages only follow the rows they show
        return False
    # A field the event leaves out (None) might match.
    return any(all(not params[k] or c.get(k) in (params[k], None)
                   for k in ('state', 'queue', 'task')) for c in change.jobs)


def _counted(change, view):
    # Any change of a job the filter may count, on any page of the list.
    if change.deleted:
        return True
    params = view.params
    return any(all(not params[k] or c.get(k) in (params[k], None)
                   for k in ('queue', 'task')) for c in change.jobs)


def _the_job(change, view):
    job_id = view.params['id']
    return job_id in change.deleted or any(c['id'] == job_id for c in change.jobs)


def _any_job_or_queue(change, view):
    # Consumers coming and going change which queues are served.
    return bool(change.jobs or change.deleted or change.event.get('queues')
                or change.event.get('workers'))


def _workers_changed(change, view):
    return bool(change.event.get('workers'))


def _failed_or_gone(change, view):
    return bool(change.deleted) or any(c.get('state') in (states.FAILED, states.QUEUED, None)
                                       for c in change.jobs)


def _waiting_for_time(change, view):
    return bool(change.deleted) or any(
        c.get('state') in (states.SCHEDULED, states.RETRYING, states.QUEUED, states.RUNNING,
                           states.CANCELED, None) for c in change.jobs)


def _audited(change, view):
    return bool(change.event.get('audit'))


def _alerted(change, view):
    return bool(change.event.get('alerts'))


def _charted(change, view):
    # A job of the charts' queue or task moved: a rollup or the depth may have.
    queue, task = view.params.get('queue'), view.params.get('task')
    return any((not queue or c.get('queue') in (queue, None))
               and (not task or c.get('task') in (task, None)) for c in change.jobs)


def _periodic_jobs(change, view):
    return bool(change.event.get('periodic')) or any(
        c.get('task') in catalog.PERIODIC or c.get('task') is None for c in change.jobs)


# -- the registry -------------------------------------------------------------------

QUEUE_STATS = Fragment('queue-stats', _stats, _any_job)
RECENT_JOBS = Fragment('recent-jobs', _recent_jobs, _any_job)
JOBS_PAGE_ROWS = Fragment('jobs-page-rows', _jobs_page_rows, _listed)
PAGER = Fragment('pager', _pager, _listed)
JOB_COUNT = Fragment('job-count', _job_count, _counted)
JOB_SUMMARY = Fragment('job-{id}-summary', _job_summary, _the_job, gone=True)
JOB_ATTEMPTS = Fragment('job-{id}-attempts', _job_attempts, _the_job)
QUEUES = Fragment('queues', _queues, _any_job_or_queue)
WORKERS = Fragment('workers', _workers, _workers_changed)
FAILURES = Fragment('failures', _failures, _failed_or_gone)
SCHEDULED = Fragment('scheduled', _scheduled, _waiting_for_time)
PERIODIC = Fragment('periodic', _periodic, _periodic_jobs)
AUDIT_LOG = Fragment('audit-log', _audit_log, _audited)
# On every page (see PAGES below; base.html places it on the others).
ALERT_BANNER = Fragment('alert-banner', _alert_banner, _alerted)
ALERTS_FIRING = Fragment('alerts-firing', _alerts_firing, _alerted)
ALERT_HISTORY = Fragment('alert-history', _alert_history, _alerted)
# Rollups move by the minute: a chart is re-rendered at most every CHART_EVERY s.
CHARTS = Fragment('charts', _charts, _charted, every=CHART_EVERY, key=_charts_key)
# The live indicator in every live page's header: rendered with ``live`` and
# ``node`` by its caller, sent with each snapshot, never refreshed.
LIVE_STATUS = Fragment('live-status', None, None)

FRAGMENTS = (QUEUE_STATS, RECENT_JOBS, JOBS_PAGE_ROWS, PAGER, JOB_COUNT, JOB_SUMMARY, JOB_ATTEMPTS,
             QUEUES, WORKERS, FAILURES, SCHEDULED, PERIODIC, AUDIT_LOG, ALERT_BANNER,
             ALERTS_FIRING, ALERT_HISTORY, CHARTS, LIVE_STATUS)


def _with_banner(page):
    # Every live page carries the alert banner, pushed as its other fragments are.
    return Page(page.name, {**page.fragments, 'banner': ALERT_BANNER}, page.parse, page.action)


PAGES = {page.name: _with_banner(page) for page in (
    Page('dashboard', {'stats': QUEUE_STATS, 'charts': CHARTS, 'recent': RECENT_JOBS},
         _window_param),
    Page('jobs', {'rows': JOBS_PAGE_ROWS, 'pager': PAGER, 'count': JOB_COUNT},
         _job_list_params),
    Page('job', {'summary': JOB_SUMMARY, 'attempts': JOB_ATTEMPTS}, _job_params),
    Page('queues', {'queues': QUEUES}, _no_params),
    Page('queue', {'charts': CHARTS}, _named('queue')),
    Page('task', {'charts': CHARTS}, _named('task')),
    Page('workers', {'workers': WORKERS}, _no_params),
    Page('failures', {'failures': FAILURES}, _queue_param),
    Page('scheduled', {'scheduled': SCHEDULED}, _queue_param),
    Page('periodic', {'periodic': PERIODIC}, _no_params),
    Page('audit', {'log': AUDIT_LOG}, _no_params, action='audit'),
    Page('alerts', {'firing': ALERTS_FIRING, 'history': ALERT_HISTORY}, _alert_params),
)}

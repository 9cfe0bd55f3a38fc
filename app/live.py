"""Live pages: a WebSocket per page that pushes re-rendered fragments.

Each web process runs one relay thread: it listens on the event channel and
tells the :class:`Hub`, which bumps the version of every *view* (a page with
its filters) the event concerns and wakes that view's sockets. Each socket's
own thread then re-renders the view's fragments from the ledger (shared by
every socket on the same view) and sends them as ``<hx-partial>`` swaps.

Pressure: each socket has a token bucket of ``BURST`` messages refilled at
``RATE`` per second. A change reaching an idle socket goes out at once (so do
the few that follow it closely, such as a short job's queued, running and
succeeded); under a stream of changes the socket sends ``RATE`` messages a
second, each carrying everything that changed since the last. A view's
renders are shared by its sockets and limited the same way (``RENDER_RATE``),
whatever number of sockets show it, and nothing queues per socket but "its
view changed", so a burst of events costs a few messages per client and
constant memory. A slow client only blocks its own thread.
"""
import logging
import socket
import threading
import time

from flask import Blueprint, current_app, render_template, request
from simple_websocket import ConnectionClosed

from . import catalog, events, jobs, periodic, queues, states
from .extensions import db, sock
from .leader import process_name
from .models import Job

logger = logging.getLogger(__name__)

bp = Blueprint('live', __name__)

RATE = 4.0         # sustained messages per second per socket
BURST = 3          # messages an idle socket may send back to back
RENDER_RATE = 5.0  # sustained renders per second per view (BURST back to back)
IDLE_WAKE = 5.0    # how often an idle socket checks that its peer is still there
RECENT = 20        # rows in the dashboard's recent list
CLOSE_RESTART = 1012
CLOSE_POLICY = 1008


class ReaderThread(threading.Thread):
    """simple-websocket's per-socket reader, as a daemon thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.daemon = True


def socket_url(view, **params):
    """The page-relative URL of the socket for ``view``.

    Flask builds WebSocket URLs as absolute ws:// ones; relative, the browser
    picks ws or wss to match the page (behind a TLS proxy too).
    """
    from urllib.parse import urlsplit
    from flask import url_for
    parts = urlsplit(url_for('live.live_socket', view=view,
                             **{k: v for k, v in params.items() if v}))
    return parts.path + ('?' + parts.query if parts.query else '')


def partial(target, html):
    """Wrap a fragment so htmx swaps it for the element with id ``target``."""
    return f'<hx-partial hx-target="#{target}" hx-swap="outerHTML">{html}</hx-partial>'


class Bucket:
    """A token bucket: ``burst`` at once, then ``rate`` per second."""
    __slots__ = ('rate', 'burst', 'tokens', 'at')

    def __init__(self, rate, burst):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), time.monotonic()

    def wait(self):
        """Seconds until a token is free (0: now)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self):
        self.tokens -= 1


class View:
    """What one kind of page shows; sockets on the same view share renders."""

    def __init__(self, key):
        self.key = key
        self.version = 0
        self.clients = set()
        self.displayed = frozenset()  # job ids in the last render
        self._lock = threading.Lock()
        self._cache = (-1, '')  # (version, html)
        self._renders = Bucket(RENDER_RATE, BURST)

    def concerns(self, changed, deleted, event):
        raise NotImplementedError

    def render_html(self):
        raise NotImplementedError

    def render(self):
        """``(version, html)``: current, or the last render when renders are rationed."""
        with self._lock:
            version, html = self._cache
            if version == self.version or (version >= 0 and self._renders.wait() > 0):
                return version, html
            self._renders.take()
            version = self.version  # read first: a change during render stays pending
            try:
                html = self.render_html()
            finally:
                db.session.rollback()  # no transaction (or stale objects) between renders
            self._cache = (version, html)
            return version, html


class DashboardView(View):
    def concerns(self, changed, deleted, event):
        return bool(changed or deleted)  # every change moves a count

    def render_html(self):
        recent, _ = jobs.list_jobs(limit=RECENT)
        self.displayed = frozenset(j.id for j in recent)
        return (partial('queue-stats', render_template('_stats.html', stats=jobs.stats()))
                + partial('recent-jobs', render_template(
                    '_job_rows.html', jobs=recent, tbody_id='recent-jobs', filtered=False)))


class ListView(View):
    def __init__(self, key, filters, cursor):
        super().__init__(key)
        self.filters, self.cursor = filters, cursor

    def concerns(self, changed, deleted, event):
        if self.displayed & (set(deleted) | {c['id'] for c in changed}):
            return True
        if self.cursor:  # older pages only follow the rows they show
            return False
        f = self.filters
        # A field the event leaves out (None) might match.
        return any((not f['state'] or c.get('state') in (f['state'], None))
                   and (not f['queue'] or c.get('queue') in (f['queue'], None))
                   and (not f['task'] or c.get('task') in (f['task'], None)) for c in changed)

    def render_html(self):
        page, next_cursor = jobs.list_jobs(**self.filters, cursor=self.cursor,
                                           limit=current_app.config['PAGE_SIZE'])
        self.displayed = frozenset(j.id for j in page)
        filtered = any(self.filters.values())
        return (partial('jobs-page-rows', render_template(
                    '_job_rows.html', jobs=page, tbody_id='jobs-page-rows', filtered=filtered,
                    selectable=True))
                + partial('pager', render_template(
                    '_pager.html', filters=self.filters, cursor=self.cursor,
                    next_cursor=next_cursor)))


class JobView(View):
    def __init__(self, key, job_id):
        super().__init__(key)
        self.job_id = job_id
        self.displayed = frozenset({job_id})

    def concerns(self, changed, deleted, event):
        return self.job_id in deleted or any(c['id'] == self.job_id for c in changed)

    def render_html(self):
        job = db.session.get(Job, self.job_id)
        if job is None:
            return partial(f'job-{self.job_id}-summary', render_template(
                '_job_gone.html', job_id=self.job_id))
        return (partial(f'job-{job.id}-summary', render_template('_job_summary.html', job=job))
                + partial(f'job-{job.id}-attempts', render_template(
                    '_attempts.html', job=job, attempts=jobs.attempts(job), logs=jobs.logs(job))))


class PageView(View):
    """A page of its own (queues, workers, ...): one fragment, one render function."""

    def __init__(self, key, target, render, concerns):
        super().__init__(key)
        self.target, self._render, self._concerns = target, render, concerns

    def concerns(self, changed, deleted, event):
        return self._concerns(changed, deleted, event)

    def render_html(self):
        return partial(self.target, self._render())


def _any_job(changed, deleted, event):
    return bool(changed or deleted or event.get('queues'))


def _queues():
    return render_template('_queues_table.html', queues=queues.overview(current_app.config))


def _workers():
    lost_after = current_app.config['LOST_AFTER']
    return render_template('_workers_table.html', workers=jobs.workers(lost_after),
                           lost_after=lost_after)


def _failures(queue):
    return lambda: render_template('_failures_table.html', groups=jobs.failures(queue),
                                   queue=queue)


def _scheduled(queue):
    return lambda: render_template('_scheduled_rows.html', jobs=jobs.scheduled(
        queue, limit=current_app.config['MAX_PAGE_SIZE']))


def _periodic():
    return render_template('_periodic_table.html', periodic=periodic.overview())


def _failed_or_gone(changed, deleted, event):
    return bool(deleted) or any(c.get('state') in (states.FAILED, states.QUEUED, None)
                                for c in changed)


def _waiting_for_time(changed, deleted, event):
    return bool(deleted) or any(
        c.get('state') in (states.SCHEDULED, states.RETRYING, states.QUEUED, states.RUNNING,
                           states.CANCELED, None) for c in changed)


def _periodic_jobs(changed, deleted, event):
    return bool(event.get('periodic')) or any(
        c.get('task') in catalog.PERIODIC or c.get('task') is None for c in changed)


def _workers_changed(changed, deleted, event):
    return bool(event.get('workers'))


PAGES = {
    'queues': ('queues', lambda q: _queues, _any_job),
    'workers': ('workers', lambda q: _workers, _workers_changed),
    'failures': ('failures', _failures, _failed_or_gone),
    'scheduled': ('scheduled', _scheduled, _waiting_for_time),
    'periodic': ('periodic', lambda q: _periodic, _periodic_jobs),
}


def view_for(args, config):
    """The view a socket asks for in its query string; ValueError if malformed."""
    kind = args.get('view')
    if kind == 'dashboard':
        return ('dashboard',), DashboardView
    if kind == 'job':
        job_id = args.get('id', '')
        if not job_id or len(job_id) > 36:
            raise ValueError('view=job needs an id')
        return ('job', job_id), lambda key: JobView(key, job_id)
    if kind == 'jobs':
        filters = {k: args.get(k) or None for k in ('state', 'queue', 'task', 'q')}
        if filters['state'] and filters['state'] not in states.JOB_STATES:
            raise ValueError('unknown state')
        cursor = args.get('cursor') or None
        if cursor:
            jobs.decode_cursor(cursor)
        key = ('jobs', *filters.values(), cursor)
        return key, lambda key: ListView(key, filters, cursor)
    if kind in PAGES:
        target, render, concerns = PAGES[kind]
        queue = args.get('queue') or None
        return (kind, queue), lambda key: PageView(key, target, render(queue), concerns)
    raise ValueError('view must be dashboard, jobs, job, ' + ', '.join(PAGES))


class Client:
    __slots__ = ('view', 'wake', 'sent_version', 'sends')

    def __init__(self, view):
        self.view = view
        self.wake = threading.Event()
        self.sent_version = -1
        self.sends = Bucket(RATE, BURST)


class Hub:
    """This process's live sockets, grouped by view."""

    def __init__(self):
        self._lock = threading.Lock()
        self.views = {}
        self.stopping = threading.Event()
        self.relay = None
        self.connected = False  # whether the event channel is reachable

    def join(self, key, factory):
        with self._lock:
            view = self.views.get(key)
            if view is None:
                view = self.views[key] = factory(key)
            client = Client(view)
            view.clients.add(client)
            return client

    def leave(self, client):
        with self._lock:
            view = client.view
            view.clients.discard(client)
            if not view.clients and self.views.get(view.key) is view:
                del self.views[view.key]

    @property
    def sockets(self):
        with self._lock:
            return sum(len(v.clients) for v in self.views.values())

    def on_event(self, event):
        """Called for every event; cheap: bump versions, wake sockets."""
        changed = event.get('jobs') or []
        deleted = event.get('deleted') or []
        with self._lock:
            views = list(self.views.values())
        for view in views:
            try:
                relevant = view.concerns(changed, deleted, event)
            except Exception:
                logger.exception('live: relevance check failed; refreshing %s', view.key)
                relevant = True
            if relevant:
                self.touch(view)

    def touch(self, view):
        view.version += 1
        for client in list(view.clients):
            client.wake.set()

    def resync(self):
        """Refresh every view: events may have been missed."""
        with self._lock:
            views = list(self.views.values())
        for view in views:
            self.touch(view)

    def shutdown(self):
        """Ask every socket to close with 1012 so its page reconnects elsewhere."""
        self.stopping.set()
        with self._lock:
            views = list(self.views.values())
        for view in views:
            for client in list(view.clients):
                client.wake.set()

    def start(self, app):
        """Start listening for events (once per process)."""
        with self._lock:
            if self.relay is not None:
                return
            bus = events.bus
            bus.subscribe(self.on_event)
            if isinstance(bus, events.RedisBus):
                self.relay = threading.Thread(target=self._relay, args=(bus,), name='live-relay',
                                              daemon=True)
                self.relay.start()
            else:
                self.relay = 'local'
                self.connected = True

    def _relay(self, bus):
        failures = 0
        while not self.stopping.is_set():
            pubsub = bus.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(events.CHANNEL)
                if failures:
                    logger.info('live: event channel back after %d failed attempts', failures)
                    self.resync()  # what happened meanwhile was not heard
                failures = 0
                self.connected = True
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message['type'] == 'message':
                        bus.deliver(message['data'])
            except Exception as exc:
                failures += 1
                if self.connected:
                    logger.warning('live: event channel lost (%s); retrying', exc)
                self.connected = False
                self.stopping.wait(min(5.0, 0.2 * 2 ** min(failures, 5)))
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass


hub = Hub()


def _hang_up(ws):
    # The close frame is out; end the connection too, so the server need not
    # wait for the client to answer it before it exits.
    try:
        ws.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _send(ws, client, html):
    client.sends.take()
    ws.send(html)


@sock.route('/ws', bp=bp)
def live_socket(ws):
    """Push the fragments of the page that opened this socket as they change."""
    try:
        key, factory = view_for(request.args, current_app.config)
    except ValueError as exc:
        ws.close(CLOSE_POLICY, f'bad view: {exc}'[:120])
        return
    hub.start(current_app._get_current_object())
    client = hub.join(key, factory)
    view = client.view
    try:
        # A fresh snapshot on every (re)connect heals whatever was missed.
        version, html = view.render()
        _send(ws, client, partial('live-status', render_template(
            '_live_status.html', node=process_name(), live=True)) + html)
        client.sent_version = version
        while True:
            if hub.stopping.is_set():
                ws.close(CLOSE_RESTART, 'server restarting')
                _hang_up(ws)
                return
            if not ws.connected:
                return
            if client.sent_version < view.version:
                wait = client.sends.wait()
                if wait > 0:
                    # Whatever else changes meanwhile goes out in one message.
                    hub.stopping.wait(wait)
                    continue
                version, html = view.render()
                if version > client.sent_version:
                    _send(ws, client, html)
                    client.sent_version = version
                else:  # the view's renders are rationed; take the next one
                    hub.stopping.wait(1 / RENDER_RATE / 2)
                continue
            client.wake.wait(IDLE_WAKE)
            client.wake.clear()
    except ConnectionClosed:
        pass
    finally:
        hub.leave(client)

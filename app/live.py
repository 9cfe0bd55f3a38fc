"""Live pages: a WebSocket per page that pushes re-rendered fragments.

Every open socket lives on this process's event loop (:mod:`app.sockets`),
not on a thread of its own, so open pages never hold up HTTP requests. Each
web process runs one relay thread that listens on the event channel and
tells the :class:`Hub`, which bumps the version of every *view* (a page with
its filters) the event concerns and wakes that view's sockets. What a view
shows, and which events concern it, come from its page's fragments in
:mod:`app.fragments`. A view's fragments are re-rendered from the ledger on a small pool of threads, once
for all the sockets that show it, and the encoded message is written to each
of them.

Pressure: each socket has a token bucket of ``BURST`` messages refilled at
``RATE`` per second. A change reaching an idle socket goes out at once (so do
the few that follow it closely, such as a short job's queued, running and
succeeded); under a stream of changes the socket sends ``RATE`` messages a
second, each carrying everything that changed since the last. A view's
renders are shared by its sockets and limited the same way (``RENDER_RATE``),
whatever number of sockets show it, and nothing queues per socket but "its
view changed", so a burst of events costs a few messages per client and
constant memory. A slow client only holds up its own messages.

A fragment declared with ``every`` (the charts) is re-rendered at most once
in that many seconds per view: a change that concerns it sooner marks it
stale and a render is scheduled for when it is due; renders in between reuse
its last HTML. Messages to a socket that already holds that HTML leave it
out (the lean frame); a socket that does not gets everything.

Capacity: a process holds at most ``LIVE_SOCKETS`` sockets; one more is
answered and closed at once with code 1013 (try again later), and its page
polls ``GET /ws?view=...`` (the same fragments, from the same shared
renders) until a socket is accepted.
"""
import asyncio
import logging
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import NotFound

from . import events, fragments, sockets
from . import websocket as ws
from .extensions import db
from .leader import process_name

logger = logging.getLogger(__name__)

bp = Blueprint('live', __name__)

RATE = 4.0          # sustained messages per second per socket
BURST = 3           # messages an idle socket may send back to back
RENDER_RATE = 5.0   # sustained renders per second per view (BURST back to back)
RENDER_THREADS = 4  # threads rendering fragments (database reads), per process
POLL_KEEP = 30.0    # s a view only polled (no socket) stays cached after its last poll
RECHECK = 10.0      # s between checks that each open socket's session or token still holds
# File descriptors kept for everything but live sockets: gunicorn's worker
# connections (1000, gunicorn.conf.py), the database and broker, logs.
FD_RESERVE = 1200
CLOSE_POLICY = ws.POLICY           # a view that does not exist
CLOSE_RESTART = ws.RESTART         # shutting down: reconnect elsewhere
CLOSE_FULL = ws.TRY_AGAIN_LATER    # LIVE_SOCKETS reached: poll, reconnect later
FULL_REASON = 'too many live pages on this server; try again later'


def socket_url(view, **params):
    """The page-relative URL of the socket for ``view``.

    Flask builds WebSocket URLs as absolute ws:// ones; relative, the browser
    picks ws or wss to match the page (behind a TLS proxy too). A plain GET
    of the same URL returns the fragments once (the polling fallback).
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


class Render(NamedTuple):
    """A view's fragments as of ``version``: the HTML and its encoded frame (None if empty).

    ``lean``: the frame without the throttled fragments this render reused
    (None if empty); ``kept_at``: the version of the render that last
    re-rendered them. A socket sent a render of ``kept_at`` or later holds
    them already, and is sent ``lean``.
    """
    version: int
    html: str
    frame: bytes | None
    lean: bytes | None = None
    kept_at: int = -1

    def frame_for(self, sent_version):
        """The frame for a socket last sent the render of ``sent_version``."""
        return self.lean if sent_version >= self.kept_at else self.frame


class Kept(NamedTuple):
    """A throttled fragment's last HTML (wrapped), when it was rendered (monotonic s), and the
    view version of that render."""
    html: str
    at: float
    version: int


class View:
    """A page's live view: its fragments for one set of parameters, shared by its sockets and polls.

    Lives on the loop thread, except :meth:`render_html`, which runs on a
    render thread inside a request context.
    """

    def __init__(self, key, environ, page, params):
        self.key = key
        self.environ = environ  # the request that opened it, for url_for in templates
        self.page = page        # its entry in app.fragments.PAGES
        self.params = params    # {name: str or None}, from Page.parse
        self.version = 0
        self.clients = set()
        self.displayed = frozenset()  # job ids listed by the last render
        self.polled = None  # loop time of the last poll
        self._cache = Render(-1, '', None)
        self._rendering = None  # the render task in flight
        self._renders = Bucket(RENDER_RATE, BURST)
        self.kept = {}  # slot -> Kept, for fragments with ``every``
        self.stale = set()  # those slots a change concerned since their last render
        self._due = None  # the timer that renders stale ones when due (loop thread)

    def concerns(self, change):
        """Whether a :class:`~app.fragments.Change` may alter any of its fragments.

        A throttled fragment (``every``) it concerns is marked stale.
        """
        hit = False
        for slot, fragment in self.page.fragments.items():
            if fragment.changed_by(change, self):
                hit = True
                if fragment.every:
                    self.stale.add(slot)
        return hit

    def due(self, now):
        """``(slots, wait)``: the throttled slots to render now, and the seconds until the next
        stale one is due (None: none waits). Unrendered ones are always due."""
        slots, wait = set(), None
        for slot, fragment in self.page.fragments.items():
            if not fragment.every:
                continue
            kept = self.kept.get(slot)
            if kept is None:
                slots.add(slot)
            elif slot in self.stale:
                left = kept.at + fragment.every - now
                if left <= 0:
                    slots.add(slot)
                else:
                    wait = left if wait is None else min(wait, left)
        return slots, wait

    def render_html(self, refresh=None, version=0):
        """Every fragment that renders, wrapped for htmx; one that raises is logged and left out.

        A fragment whose subject is gone (its build raises NotFound) shows
        its gone template if it has one, else is left out silently. A
        throttled fragment (``every``) not in ``refresh`` (slots; None: all)
        that was rendered before is reused as it was.
        """
        return ''.join(self.render_parts(refresh, version)[0])

    def render_parts(self, refresh=None, version=0):
        """``(parts, reused)``: every fragment's wrapped HTML, and which of them were reused
        (see :meth:`render_html`); ``version`` is recorded with what is rendered afresh."""
        scope = fragments.Scope(self.params)
        parts, reused = [], set()
        for slot, fragment in self.page.fragments.items():
            target = fragment.dom_id(self.params)
            kept = self.kept.get(slot) if fragment.every else None
            if kept is not None and refresh is not None and slot not in refresh:
                parts.append(kept.html)
                reused.add(len(parts) - 1)
                continue
            try:
                try:
                    html = fragment.render(scope)
                except NotFound:
                    if not fragment.gone:
                        continue
                    html = fragment.render_gone(scope)
                parts.append(partial(target, html))
                if fragment.every:
                    self.kept[slot] = Kept(parts[-1], time.monotonic(), version)
            except Exception:
                logger.exception('live: rendering #%s of %s failed', target, self.key)
                db.session.rollback()
        if scope.shown is not None:
            self.displayed = scope.shown
        return parts, reused

    async def latest(self, hub):
        """The newest :class:`Render`, no older than this view's version when called.

        At most one render of a view runs at a time, and renders start at
        most ``RENDER_RATE`` a second: everyone waiting shares the next one.
        """
        wanted = self.version  # not chased: changes during the wait go out next time
        while self._cache.version < wanted:
            if self._rendering is None:
                delay = self._renders.wait()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                self._renders.take()
                self._rendering = asyncio.get_running_loop().create_task(self._render(hub))
            await asyncio.shield(self._rendering)
        return self._cache

    async def _render(self, hub):
        version = self.version  # read first: a change during the render stays pending
        loop = asyncio.get_running_loop()
        refresh, wait = self.due(time.monotonic())
        self.stale -= refresh  # a change during the render marks them again
        try:
            parts, reused = await loop.run_in_executor(
                hub.renderer, hub.render, self, refresh, version)
        except Exception:
            logger.exception('live: rendering %s failed', self.key)
            parts, reused = [], set()
        finally:
            self._rendering = None
        if wait is not None and self._due is None:
            self._due = loop.call_later(wait, hub.render_due, self)
        html = ''.join(parts)
        lean = ''.join(p for i, p in enumerate(parts) if i not in reused)
        kept_at = max((k.version for k in self.kept.values()), default=-1)
        frames = hub.server.frames
        self._cache = Render(version, html, frames.text(html) if html else None,
                             frames.text(lean) if lean else None, kept_at)


def view_for(args, config):
    """``(key, factory)`` for the view a socket or poll asks for in its query string.

    ``args`` is the query string (a mapping): ``view`` names a page of
    :data:`app.fragments.PAGES`, the rest are its parameters. The key is a
    tuple, equal for requests that show the same thing; ``factory(key,
    environ)`` builds the :class:`View`. Raises ValueError if malformed.
    """
    page = fragments.PAGES.get(args.get('view'))
    if page is None:
        raise ValueError('view must be ' + ', '.join(fragments.PAGES))
    params = page.parse(args)
    key = (page.name, *params.values())
    return key, lambda key, environ: View(key, environ, page, params)


class Client:
    """One socket's place in a view: what it was last sent, and its pacing."""
    __slots__ = ('view', 'wake', 'sent_version', 'sends')

    def __init__(self, view):
        self.view = view
        self.wake = asyncio.Event()
        self.sent_version = -1
        self.sends = Bucket(RATE, BURST)


def _request_environ(environ):
    # What url_for needs to build links as the page's own request would
    # (host, scheme, script name); nothing that holds the connection.
    return {k: v for k, v in environ.items() if isinstance(v, str)}


class Hub:
    """This process's live views and sockets (one per app, made by :func:`hub_for`).

    Its state lives on the socket server's loop thread; other threads reach
    it through :meth:`on_event`, :meth:`adopt`, :meth:`poll` and :meth:`stop`.
    """

    def __init__(self, app):
        self.app = app
        self.views = {}
        self.credentials = {}  # open socket -> what it was let in with (loop thread)
        self.server = None
        self.renderer = None
        self.status_html = None  # the live indicator every snapshot starts with
        self.relay = None
        self.stopping = threading.Event()
        self._unsubscribe = None
        self._lock = threading.Lock()

    # -- start and stop (any thread) --

    def start(self):
        """Start the socket loop, the render threads and the event relay (once)."""
        with self._lock:
            if self.server is not None:
                return
            limit = self.app.config['LIVE_SOCKETS']
            files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if files != resource.RLIM_INFINITY and files - FD_RESERVE < limit:
                logger.warning('live: %d open files allowed (ulimit -n), so at most %d live '
                               'sockets instead of LIVE_SOCKETS=%d', files,
                               max(0, files - FD_RESERVE), limit)
                limit = max(0, files - FD_RESERVE)
            self.renderer = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix='live-render')
            server = sockets.SocketServer(limit, FULL_REASON)
            server.start()
            server.call_soon(lambda: server.loop.create_task(self._sweep()))
            server.call_soon(lambda: server.loop.create_task(self._recheck()))
            self.server = server
            bus = events.bus
            self._unsubscribe = bus.subscribe(self.on_event)
            # What happened while the channel was lost was not heard: every
            # view is re-rendered once it is back.
            self.relay = threading.Thread(
                target=bus.listen, args=(self.stopping,),
                kwargs={'every': 1.0, 'on_reconnect': self.resync}, name='live-relay',
                daemon=True)
            self.relay.start()

    def shutdown(self):
        """Close every socket with 1012 so its page reconnects elsewhere (returns at once)."""
        self.stopping.set()
        if self.server is not None:
            self.server.close_all(CLOSE_RESTART, 'server restarting')

    def stop(self, timeout=3.0):
        """Close every socket with 1012, waiting up to ``timeout`` s for the close frames."""
        self.stopping.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.server is not None:
            self.server.stop(CLOSE_RESTART, 'server restarting', timeout)
        if self.renderer is not None:
            self.renderer.shutdown(wait=False, cancel_futures=True)

    # -- from other threads --

    def on_event(self, event):
        """Called for every event, on the publishing or relay thread: hands it to the loop."""
        self.server.call_soon(self._on_event, event)

    def resync(self):
        """Refresh every view: events may have been missed."""
        self.server.call_soon(self._resync)

    def adopt(self, environ, key, factory, credential=None):
        """Hand a WebSocket request over to the loop (see :meth:`SocketServer.adopt`).

        ``credential``: what the socket was let in with (an
        :class:`app.auth.Credential`: its ``user``, and ``ended()``, the
        reason it no longer holds or None), re-checked while it is open; None
        for none.
        """
        environ_copy = _request_environ(environ)
        self.server.adopt(environ,
                          lambda conn: self._serve(conn, key, factory, environ_copy, credential))

    def refuse(self, environ, reason):
        """Accept a WebSocket request only to close it with 1008 and ``reason``."""
        async def close(conn):
            conn.close(CLOSE_POLICY, reason)
        self.server.adopt(environ, close)

    def poll(self, key, factory, environ, timeout=30.0):
        """The view's fragments now (HTML), from its shared render (on a request thread)."""
        return self.server.call(self._poll(key, factory, _request_environ(environ)), timeout)

    def render(self, view, refresh=None, version=0):
        """Render ``view``'s fragments (on a render thread): :meth:`View.render_parts`."""
        with self.app.request_context(view.environ):
            return view.render_parts(refresh, version)

    def render_due(self, view):
        """A view's throttled fragments are due: render and send them (loop thread)."""
        view._due = None
        if self.views.get(view.key) is view and view.stale:
            self._touch(view)

    # -- on the loop thread --

    def _view(self, key, factory, environ):
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = factory(key, environ)
        return view

    async def _poll(self, key, factory, environ):
        view = self._view(key, factory, environ)
        view.polled = asyncio.get_running_loop().time()
        return (await view.latest(self)).html

    async def _serve(self, conn, key, factory, environ, credential=None):
        """The relay: subscribe, send the snapshot, then each change; unsubscribe when done."""
        view = self._view(key, factory, environ)
        client = Client(view)
        view.clients.add(client)
        conn.on_lost = client.wake.set
        if credential is not None:
            self.credentials[conn] = credential
        try:
            # A fresh snapshot on every (re)connect heals whatever was missed.
            render = await view.latest(self)
            if not await conn.send(self.server.frames.text(self.status_html + render.html)):
                return
            client.sent_version = render.version
            while conn.open:
                if client.sent_version < view.version:
                    wait = client.sends.wait()
                    if wait > 0:
                        # Whatever else changes meanwhile goes out in one message.
                        await asyncio.sleep(wait)
                        continue
                    render = await view.latest(self)
                    frame = render.frame_for(client.sent_version)
                    if frame is not None:
                        client.sends.take()
                        if not await conn.send(frame):
                            return
                    client.sent_version = render.version
                    continue
                await client.wake.wait()
                client.wake.clear()
        finally:
            view.clients.discard(client)
            self._forget(view)
            self.credentials.pop(conn, None)

    def _forget(self, view):
        loop = asyncio.get_running_loop()
        if (not view.clients and self.views.get(view.key) is view
                and (view.polled is None or loop.time() - view.polled > POLL_KEEP)):
            del self.views[view.key]

    async def _sweep(self):
        # Views kept only for polls go once nobody has polled them for a while.
        while True:
            await asyncio.sleep(POLL_KEEP / 3)
            for view in list(self.views.values()):
                self._forget(view)

    async def _recheck(self):
        # Every socket's credential is checked again now and then, so one
        # whose session expired or ended, or whose token was revoked, closes
        # even when no event said so (a change made by another process, say).
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RECHECK)
            held = list(self.credentials.items())
            if not held:
                continue
            try:
                ended = await loop.run_in_executor(self.renderer, self._ended, held)
            except Exception:
                logger.exception('live: socket credentials not checked')
                continue
            for conn, reason in ended:
                conn.close(CLOSE_POLICY, reason)

    def _ended(self, held):
        """``[(conn, reason)]`` of the sockets whose credential no longer holds (a render thread)."""
        with self.app.app_context():
            try:
                return [(conn, reason) for conn, credential in held
                        if (reason := credential.ended()) is not None]
            finally:
                db.session.remove()

    def _on_event(self, event):
        # A user's sessions ended (logged out, a new role or password,
        # deleted): their open sockets end too, and the page says why.
        ended = set(event.get('sessions') or ())
        if ended:
            for conn, credential in list(self.credentials.items()):
                if credential.user in ended:
                    conn.close(CLOSE_POLICY, SESSION_ENDED)
        change = fragments.Change.of(event)
        for view in list(self.views.values()):
            try:
                relevant = view.concerns(change)
            except Exception:
                logger.exception('live: relevance check failed; refreshing %s', view.key)
                relevant = True
            if relevant:
                self._touch(view)

    def _touch(self, view):
        view.version += 1
        for client in view.clients:
            client.wake.set()

    def _resync(self):
        for view in list(self.views.values()):
            self._touch(view)



def hub_for(app):
    """The app's :class:`Hub`, started on first use."""
    hub = app.extensions.get('live')
    if hub is None:
        hub = app.extensions.setdefault('live', Hub(app))
    hub.start()
    return hub


def stop(app, timeout=3.0):
    """Close the app's live sockets with 1012 and stop its loop (if it ever started)."""
    hub = app.extensions.get('live')
    if hub is not None:
        hub.stop(timeout)


def shutdown(app):
    """Start closing the app's live sockets with 1012; returns at once (signal handlers)."""
    hub = app.extensions.get('live')
    if hub is not None:
        hub.shutdown()


SESSION_ENDED = 'your session ended: log in again'
# Where a live render's request keeps the role of the sockets it serves.
ROLE_KEY = 'queue_manager.role'


def refuse_socket(reason):
    """The answer to a WebSocket handshake refused for ``reason``: accepted, then closed with 1008.

    A browser shows no HTTP status for a refused handshake; a close code and
    reason it does (the page says why). Falls back to a plain 403.
    """
    try:
        hub_for(current_app._get_current_object()).refuse(request.environ, reason[:120])
        return _HandedOver()
    except (ws.HandshakeError, RuntimeError):
        return Response(reason, 403, mimetype='text/plain')


class _HandedOver(Response):
    # The socket now belongs to the loop: gunicorn must write nothing and
    # close its (replaced) descriptor, which this tells its gthread worker.
    def __call__(self, environ, start_response):
        raise StopIteration


# Two rules for one view: werkzeug matches a WebSocket upgrade only to a
# rule marked websocket, and a plain GET only to one that is not.
@bp.get('/ws', websocket=True)
@bp.get('/ws')
def live_socket():
    """The page's live fragments: pushed over a WebSocket, or once for a plain GET (polling)."""
    upgrade = request.url_rule.websocket  # werkzeug matched the upgrade to its rule
    hub = hub_for(current_app._get_current_object())
    try:
        key, factory = view_for(request.args, current_app.config)
        # Renders are shared by the sockets that show the same thing to the
        # same role (the actions shown depend on it); the render's request
        # carries the role (app.auth reads it there).
        role = getattr(g.get('principal'), 'role', None)
        key = (role, *key)
        request.environ[ROLE_KEY] = role or ''
    except ValueError as exc:
        if upgrade:
            try:
                hub.refuse(request.environ, f'bad view: {exc}'[:120])
                return _HandedOver()
            except (ws.HandshakeError, RuntimeError):
                pass
        return Response(f'bad view: {exc}', 400, mimetype='text/plain')
    if not upgrade:
        return Response(hub.poll(key, factory, request.environ), mimetype='text/html',
                        headers={'Cache-Control': 'no-store'})
    if hub.status_html is None:
        status = fragments.LIVE_STATUS
        hub.status_html = partial(status.dom_id({}), status.render(node=process_name(), live=True))
    try:
        hub.adopt(request.environ, key, factory, credential=g.get('socket_credential'))
    except ws.HandshakeError as exc:
        return Response(str(exc), exc.status, exc.headers, mimetype='text/plain')
    except RuntimeError as exc:
        # No raw socket (a development server) or the process is exiting:
        # the page polls instead.
        return Response(str(exc), 503, mimetype='text/plain')
    return _HandedOver()

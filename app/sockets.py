"""Live sockets on one event loop: no OS thread per open WebSocket.

gunicorn's threads (gthread) serve HTTP. A WebSocket request is answered by
one of them only long enough to be handed over: :meth:`SocketServer.adopt`
takes the connection's file descriptor out of gunicorn's hands and gives it
to this process's event-loop thread, which writes the ``101`` answer and
then owns the socket until it closes. An idle socket costs a few KiB and no
thread, so open pages never hold up pages, the API or ``/healthz``.

Everything here runs on the loop thread except :meth:`SocketServer.adopt`,
:meth:`SocketServer.call` and :meth:`SocketServer.stop`, which other threads
call. What a socket sends is decided by a coroutine the caller supplies (the
relay of :mod:`app.live`); this module only moves frames, pings and closes.
The WebSocket protocol itself is wsproto's (see :mod:`app.websocket`).
"""
import asyncio
import logging
import os
import socket
import threading
import time

from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping

from . import websocket as ws

logger = logging.getLogger(__name__)

PING_INTERVAL = 25.0   # s between pings; a peer silent for two is gone
PING_SLOTS = 25        # pings go out in this many batches, spread over the interval
HIGH_WATER = 64 * 1024  # bytes queued for a slow peer before its relay waits


class Connection(asyncio.Protocol):
    """One adopted WebSocket: frames out, pings and pongs, the closing handshake.

    ``ws`` is the connection's wsproto state (see
    :func:`app.websocket.handshake`): it reads the peer's frames and writes
    our control frames. ``closed`` is a future, done once the TCP connection
    is gone; relays wait on it alongside their own events.
    """

    def __init__(self, server, ws_connection):
        self.server = server
        self.ws = ws_connection
        self.slot = 0             # which batch of pings it belongs to
        self.transport = None
        self.closed = server.loop.create_future()
        self.incoming = 0         # bytes (characters of text) of the message being received
        self.heard = True         # anything received since the last ping
        self.on_lost = None       # called once the connection is gone
        self._drained = None      # a future while the transport is paused

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data):
        self.heard = True
        if self.ws.state is not ConnectionState.OPEN:
            return  # our close frame is out: nothing more is read
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, Ping):
                self.write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                # Either the peer's close or a protocol error wsproto found
                # in what it sent (its code: 1002, 1007...). The response is
                # the close frame owed: the peer's code echoed (RFC 6455
                # 5.5.1), or the error's. Then hang up: the server closes
                # the TCP connection first.
                self._close_with(event.response())
                return
            elif isinstance(event, Message):
                # Pages send nothing we act on; a message is dropped as it
                # arrives, and a long one ends the connection.
                self.incoming += len(event.data)
                if self.incoming > ws.MAX_MESSAGE:
                    self.close(ws.TOO_BIG, 'message too big')
                    return
                if event.message_finished:
                    self.incoming = 0
            # Pongs need nothing: any data counts as heard.

    def eof_received(self):
        return False  # the peer is gone: close our side too

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        self.server.ping_slots[self.slot].discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self):
        self._drained = self.server.loop.create_future()

    def resume_writing(self):
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    @property
    def open(self):
        """Whether frames may still be sent."""
        return self.ws.state is ConnectionState.OPEN and not self.closed.done()

    def write(self, frame):
        """Queue a frame (bytes) now, whatever the peer's backlog."""
        if not self.closed.done():
            self.transport.write(frame)

    async def send(self, frame):
        """Send a data frame (bytes) once the peer has taken what it was sent before.

        ``frame`` comes from :class:`app.websocket.SharedFrames`, encoded once
        for every socket showing the same view; it bypasses ``self.ws``,
        which is sound as a final data frame changes no connection state.

        A slow client so holds up only its own relay, and at most
        ``HIGH_WATER`` bytes plus one message wait for it. Returns whether the
        frame went out (False once the connection is closing).
        """
        while self._drained is not None and not self.closed.done():
            await asyncio.wait([self._drained, self.closed], return_when=asyncio.FIRST_COMPLETED)
        if not self.open:
            return False
        self.transport.write(frame)
        return True

    def close(self, code=ws.NORMAL, reason=None):
        """Send a close frame and hang up (the buffered frames go out first)."""
        self._close_with(CloseConnection(code, reason))

    def _close_with(self, event):
        if self.ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING) \
                or self.closed.done():
            return
        self.transport.write(self.ws.send(event))
        # Hang up once the close frame is out instead of waiting for the
        # client's answer: nothing more is read, so nothing can be lost.
        self.transport.close()

    def ping(self):
        """Ping the peer; close the connection if it said nothing since the last ping."""
        if not self.open:
            return
        if not self.heard:
            self.transport.abort()
            return
        self.heard = False
        self.write(self.ws.send(Ping()))


class SocketServer:
    """The event-loop thread of one web process and the sockets it holds.

    ``limit``: the most sockets held at once; one more is answered and closed
    at once with ``1013`` and ``refusal`` as its reason.
    """

    def __init__(self, limit, refusal='server full'):
        self.limit, self.refusal = limit, refusal
        self.connections = set()
        self.frames = ws.SharedFrames()  # every data frame sent, on the loop thread
        self.ping_slots = [set() for _ in range(PING_SLOTS)]
        self._next_slot = 0
        self.refused = 0
        self.loop = None
        self._thread = None
        self._ready = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()

    def start(self):
        """Start the loop thread (once; later calls do nothing)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name='live-sockets', daemon=True)
            self._thread.start()
        self._ready.wait()

    @property
    def running(self):
        """Whether the loop is up (it still answers new sockets while stopping: with 1012)."""
        return self.loop is not None and not self.loop.is_closed()

    def _run(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.create_task(self._pinger())
        self._ready.set()
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self.loop.close()

    async def _pinger(self):
        # A slice of the sockets every PING_INTERVAL / PING_SLOTS s rather
        # than all at once: 10,000 pings (and their pongs) in one go would
        # hold up the HTTP threads for a noticeable moment.
        tick = 0
        while True:
            await asyncio.sleep(PING_INTERVAL / PING_SLOTS)
            for conn in list(self.ping_slots[tick % PING_SLOTS]):
                conn.ping()
            tick += 1

    def adopt(self, environ, relay):
        """Take over the WebSocket request in ``environ`` (called on a gunicorn thread).

        Checks the handshake (raises :class:`app.websocket.HandshakeError`
        before touching the socket), then moves the connection to the loop
        and returns at once; the loop answers ``101`` and runs
        ``relay(connection)``, a coroutine function, for the connection's
        lifetime (or refuses it with 1013 when ``limit`` sockets are open).
        Raises RuntimeError when the server cannot take sockets (not
        started, stopping, or no raw socket in ``environ``).
        """
        answer, ws_connection = ws.handshake(environ)
        raw = environ.get('gunicorn.socket')
        if raw is None or not self.running:
            raise RuntimeError('live sockets need gunicorn and a running socket server')
        # Our own descriptor for the connection, and gunicorn's pointed at a
        # fresh unconnected socket: gunicorn then "closes" that one (its
        # graceful close would otherwise shut the connection down for us
        # too), and its thread is free for the next request.
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        with socket.socket(raw.family, raw.type) as dummy:
            os.dup2(dummy.fileno(), raw.fileno())
        sock.setblocking(False)
        try:
            self.loop.call_soon_threadsafe(self._accept, sock, answer, ws_connection, relay)
        except RuntimeError:  # the loop closed meanwhile (the process is exiting)
            sock.close()
            raise

    def _accept(self, sock, answer, ws_connection, relay):
        self.loop.create_task(self._serve(sock, answer, ws_connection, relay))

    async def _serve(self, sock, answer, ws_connection, relay):
        try:
            _, conn = await self.loop.connect_accepted_socket(
                lambda: Connection(self, ws_connection), sock)
        except OSError:
            sock.close()
            return
        conn.write(answer)
        # Counted here, on the loop thread, after the last await: two sockets
        # arriving together cannot both take the last place.
        full = self._stopping or len(self.connections) >= self.limit
        if full:
            self.refused += 1
            conn.close(ws.RESTART if self._stopping else ws.TRY_AGAIN_LATER,
                       'server restarting' if self._stopping else self.refusal)
            return
        self.connections.add(conn)
        conn.slot = self._next_slot = (self._next_slot + 1) % PING_SLOTS
        self.ping_slots[conn.slot].add(conn)
        try:
            await relay(conn)
        except Exception:
            # One page's failure must not reach the others; its page
            # reconnects and gets a fresh snapshot.
            logger.exception('live socket relay failed')
            conn.close(ws.INTERNAL_ERROR, 'internal error')
        finally:
            conn.close(ws.NORMAL)

    def call(self, coro, timeout=None):
        """Run a coroutine on the loop from another thread; its result (or exception)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, callback, *args):
        """Run ``callback(*args)`` on the loop thread, soon (from any thread)."""
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop closed meanwhile: nobody to tell
                pass

    def close_all(self, code=ws.RESTART, reason='server restarting'):
        """Close every socket and refuse new ones from now on (from any thread; returns at once)."""
        self._stopping = True

        def close():
            for conn in list(self.connections):
                conn.close(code, reason)
        self.call_soon(close)

    def stop(self, code=ws.RESTART, reason='server restarting', timeout=3.0):
        """Close every socket with ``code`` and stop the loop (from another thread).

        Waits up to ``timeout`` s for the close frames to be written, so pages
        hear why before the process exits.
        """
        with self._lock:
            if self._thread is None or self.loop.is_closed():
                return
            self._stopping = True

        async def close_all():
            for conn in list(self.connections):
                conn.close(code, reason)
            deadline = time.monotonic() + timeout
            while self.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for conn in list(self.connections):
                conn.transport.abort()
        try:
            self.call(close_all(), timeout + 1)
        except Exception:
            logger.exception('live sockets did not close cleanly')
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)

"""The event loop that holds the live sockets: adopting a connection from
gunicorn's thread, relays, refusals, pings, a slow peer's backlog, and
stopping. Real TCP connections on 127.0.0.1 stand in for gunicorn's; the
client end is wsproto's, in the test's thread; no process is started."""
import asyncio
import logging
import socket
import threading
import time

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, CloseConnection, Ping, Request, TextMessage)

from helpers import wait_for

from app import sockets
from app import websocket as ws
from app.sockets import SocketServer


def tcp_pair(small_buffers=False):
    """``(client, server)`` ends of a TCP connection on a free port of 127.0.0.1.

    ``small_buffers``: the kernel holds little of what the server sends the
    client, so a client that does not read fills them in a few frames.
    """
    with socket.create_server(('127.0.0.1', 0)) as listener:
        client = socket.socket()
        if small_buffers:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        raw, _ = listener.accept()
    if small_buffers:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.settimeout(5)
    return client, raw


def upgrade_environ(request, raw=None):
    """The WSGI environ gunicorn would build for the upgrade request ``request`` (bytes)."""
    environ = {'REQUEST_METHOD': 'GET', 'PATH_INFO': '/ws'}
    if raw is not None:
        environ['gunicorn.socket'] = raw
    for line in request.decode('latin-1').split('\r\n')[1:]:
        if line:
            name, value = line.split(': ', 1)
            environ['HTTP_' + name.upper().replace('-', '_')] = value
    return environ


class Client:
    """A WebSocket client whose connection ``server`` adopts, running ``relay``."""

    def __init__(self, server, relay, small_buffers=False):
        self.sock, raw = tcp_pair(small_buffers)
        self.ws = WSConnection(ConnectionType.CLIENT)
        server.adopt(upgrade_environ(self.ws.send(Request(host='localhost', target='/ws')), raw),
                     relay)
        self.gunicorn_peer = peer_address(raw)  # what gunicorn's descriptor points at now
        raw.close()  # as gunicorn does once the view returns
        self.hung_up = False
        self.accepted = self.read_until(AcceptConnection)

    def send(self, event):
        self.sock.sendall(self.ws.send(event))

    def read_until(self, kind, timeout=5.0):
        """The next event of ``kind`` (None once the server has hung up)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.ws.events():
                if isinstance(event, kind):
                    return event
            if time.monotonic() > deadline:  # pings alone would keep us reading
                raise AssertionError(f'no {kind.__name__} within {timeout} s')
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b''
            if not data:
                self.hung_up = True
                return None
            self.ws.receive_data(data)

    def close_code(self):
        """The code and reason of the server's close frame, once it has hung up too."""
        close = self.read_until(CloseConnection)
        assert close is not None, 'the server hung up without a close frame'
        assert self.read_until(CloseConnection) is None and self.hung_up, \
            'the server did not hang up after its close frame'
        return close.code, close.reason


def peer_address(sock):
    """The address ``sock`` is connected to, or None."""
    try:
        return sock.getpeername()
    except OSError:
        return None


class Relays:
    """Relays that record the connections they serve."""

    def __init__(self):
        self.conns = []
        self.sent = 0  # frames ``flood`` has sent
        self.ended = threading.Event()

    def serving(self, count=1):
        """The connections served, once ``count`` relays have started.

        The ``101`` goes out just before the relay starts, so a client can
        read it a moment before the relay has run.
        """
        wait_for(lambda: len(self.conns) >= count, 5, 0.005, f'{count} relays to start')
        return list(self.conns)

    async def hold(self, conn):
        self.conns.append(conn)
        await conn.closed

    async def flood(self, conn):
        """Send 8 KiB frames for as long as the peer is there, counting them."""
        self.conns.append(conn)
        frame = conn.server.frames.text('x' * 8192)
        while await conn.send(frame):
            self.sent += 1
            await asyncio.sleep(0)  # a real relay waits for its events between frames
        self.ended.set()


def send_text(server, conn, text):
    """Send ``text`` on ``conn`` from the loop thread; whether it went out."""
    async def send():
        return await conn.send(server.frames.text(text))
    return server.call(send(), 5)


def backlog(server, conn):
    """Bytes the loop holds for ``conn`` that the kernel has not taken yet."""
    async def size():
        return conn.transport.get_write_buffer_size()
    return server.call(size(), 5)


@pytest.fixture
def server():
    server = SocketServer(limit=2, refusal='full up')
    server.start()
    yield server
    server.stop(timeout=1)


# -- adopting a connection --

def test_an_adopted_connection_is_answered_101_and_its_relay_reaches_the_client(server):
    relays = Relays()
    client = Client(server, relays.hold)
    assert client.accepted is not None  # wsproto checked the 101 and its accept key
    conn, = relays.serving()
    assert server.connections == {conn} and conn.open
    assert send_text(server, conn, 'héllo') is True
    assert client.read_until(TextMessage).data == 'héllo'


def test_adopting_leaves_gunicorns_descriptor_unconnected_and_the_socket_working(server):
    relays = Relays()
    client = Client(server, relays.hold)
    # gunicorn's descriptor now names a fresh socket, so its close (done in
    # Client) shut nothing down; the loop's own descriptor carries on
    assert client.gunicorn_peer is None
    assert send_text(server, relays.serving()[0], 'still here') is True
    assert client.read_until(TextMessage).data == 'still here'


def test_a_bad_upgrade_is_refused_before_the_socket_is_touched(server):
    client, raw = tcp_pair()
    with client, raw:
        request = WSConnection(ConnectionType.CLIENT).send(Request(host='localhost', target='/ws'))
        environ = upgrade_environ(request, raw)
        del environ['HTTP_SEC_WEBSOCKET_KEY']
        with pytest.raises(ws.HandshakeError) as err:
            server.adopt(environ, Relays().hold)
        assert err.value.status == 400
        # gunicorn can still answer on its descriptor
        raw.sendall(b'HTTP/1.1 400 Bad Request\r\n\r\n')
        assert client.recv(100).startswith(b'HTTP/1.1 400')
    assert not server.connections


def test_adopting_needs_gunicorns_socket_and_a_running_server():
    request = WSConnection(ConnectionType.CLIENT).send(Request(host='localhost', target='/ws'))
    stopped = SocketServer(limit=1)
    client, raw = tcp_pair()
    with client, raw:
        assert not stopped.running
        with pytest.raises(RuntimeError, match='running socket server'):
            stopped.adopt(upgrade_environ(request, raw), Relays().hold)
        assert peer_address(raw) == client.getsockname()  # left connected, for gunicorn to answer
        stopped.start()
        try:
            with pytest.raises(RuntimeError, match='need gunicorn'):
                stopped.adopt(upgrade_environ(request), Relays().hold)
        finally:
            stopped.stop(timeout=1)


# -- relays --

def test_a_relay_that_returns_closes_its_socket_normally(server):
    async def done(conn):
        pass
    client = Client(server, done)
    assert client.close_code() == (ws.NORMAL, '')
    wait_for(lambda: not server.connections and not any(server.ping_slots), 5, 0.01,
             'the server to forget the socket')


def test_a_relay_that_fails_closes_only_its_socket_with_1011_and_is_logged(server, caplog):
    async def broken(conn):
        raise LookupError('no such view')
    relays = Relays()
    healthy = Client(server, relays.hold)
    with caplog.at_level(logging.ERROR, logger='app.sockets'):
        assert Client(server, broken).close_code() == (ws.INTERNAL_ERROR, 'internal error')
    record, = [r for r in caplog.records if r.name == 'app.sockets']
    assert record.getMessage() == 'live socket relay failed'
    assert record.exc_info[0] is LookupError
    assert send_text(server, relays.serving()[0], 'unaffected') is True
    assert healthy.read_until(TextMessage).data == 'unaffected'


def test_sockets_over_the_limit_are_refused_with_1013_and_never_reach_a_relay(server):
    relays = Relays()
    held = [Client(server, relays.hold) for _ in range(2)]
    assert Client(server, relays.hold).close_code() == (ws.TRY_AGAIN_LATER, 'full up')
    assert (len(relays.serving(2)), server.refused) == (2, 1)
    # a place that frees up is taken again
    held[0].send(CloseConnection(1001, 'leaving'))
    assert held[0].close_code() == (1001, 'leaving')
    wait_for(lambda: len(server.connections) == 1, 5, 0.01, 'the closed socket to leave')
    newcomer = Client(server, relays.hold)
    assert newcomer.accepted is not None
    assert (len(relays.serving(3)), len(server.connections), server.refused) == (3, 2, 1)


def test_a_peer_that_hangs_up_ends_its_relay_and_leaves_nothing_behind(server):
    lost, late_sends = threading.Event(), []

    async def relay(conn):
        conn.on_lost = lost.set
        await conn.closed
        # a frame sent after the peer has gone goes nowhere, and says so
        late_sends.append(await conn.send(conn.server.frames.text('too late')))
    client = Client(server, relay)
    client.sock.shutdown(socket.SHUT_WR)
    assert client.read_until(CloseConnection) is None and client.hung_up
    assert lost.wait(5)
    wait_for(lambda: late_sends == [False], 5, 0.01, 'the relay to end')
    assert not server.connections and not any(server.ping_slots)


def test_sockets_are_spread_over_the_ping_slots(server):
    relays = Relays()
    clients = [Client(server, relays.hold) for _ in range(2)]  # held open till the end
    first, second = relays.serving(2)
    assert all(client.accepted for client in clients)
    assert second.slot == (first.slot + 1) % sockets.PING_SLOTS
    assert {c for slot in server.ping_slots for c in slot} == {first, second}
    assert first in server.ping_slots[first.slot] and second in server.ping_slots[second.slot]


# -- what a peer sends --

def test_messages_are_counted_one_by_one_against_the_size_limit(server):
    from wsproto.events import Pong
    client = Client(server, Relays().hold)
    for _ in range(3):  # more than the limit in all, each well under it
        client.send(TextMessage('x' * (ws.MAX_MESSAGE // 2)))
    client.send(Ping(b'still there?'))
    assert client.read_until(Pong).payload == b'still there?'
    client.send(TextMessage('x' * (ws.MAX_MESSAGE + 1)))
    assert client.close_code() == (ws.TOO_BIG, 'message too big')


# -- pings --

@pytest.fixture
def pinging_server(monkeypatch):
    """A server pinging every socket every 0.3 s instead of every 25 s."""
    monkeypatch.setattr(sockets, 'PING_INTERVAL', 0.3)
    server = SocketServer(limit=5)
    server.start()
    yield server
    server.stop(timeout=1)


def answer_pings(client, answered):
    """Answer each ping with its pong, as a browser does, until the server hangs up."""
    while (ping := client.read_until(Ping)) is not None:
        client.send(ping.response())
        answered.append(time.monotonic())


def test_pings_keep_an_answering_peer_and_drop_a_silent_one(pinging_server):
    relays = Relays()
    answering = Client(pinging_server, relays.hold)
    answered = []
    threading.Thread(target=answer_pings, args=(answering, answered), daemon=True).start()
    silent = Client(pinging_server, relays.hold)
    assert silent.read_until(Ping) is not None
    # the silent peer is gone at the next round, without a close frame: it is not listening
    assert silent.read_until(CloseConnection) is None and silent.hung_up
    wait_for(lambda: len(answered) >= 4, 5, 0.01, 'four rounds of pings')
    assert pinging_server.connections == {relays.serving(2)[0]}


# -- a slow peer --

def test_a_slow_peer_holds_up_only_its_own_relay_with_a_bounded_backlog(server):
    slow_relay, other_relay = Relays(), Relays()
    slow = Client(server, slow_relay.flood, small_buffers=True)
    other = Client(server, other_relay.hold)
    conn, = slow_relay.serving()
    frame_size = len(server.frames.text('x' * 8192))
    # the peer reads nothing: the relay sends until the loop holds HIGH_WATER
    # bytes for it, then waits
    wait_for(lambda: backlog(server, conn) > sockets.HIGH_WATER, 5, 0.01,
             'the slow peer backlog to pass the high-water mark')
    held = slow_relay.sent
    assert backlog(server, conn) <= sockets.HIGH_WATER + frame_size
    assert send_text(server, other_relay.serving()[0], 'meanwhile') is True
    assert other.read_until(TextMessage).data == 'meanwhile'
    assert slow_relay.sent == held  # still waiting: nothing was drained

    # once the peer reads, the relay carries on
    def reading():
        slow.sock.recv(1 << 20)
        return slow_relay.sent > held + 20
    wait_for(reading, 5, 0, 'the relay to resume once the peer reads')
    # and a peer that goes away ends it
    slow.sock.close()
    assert slow_relay.ended.wait(5)


# -- the loop --

def test_call_and_call_soon_run_on_the_loop_thread_and_start_is_once(server):
    loop, thread = server.loop, server._thread
    server.start()
    assert (server.loop, server._thread) == (loop, thread)

    async def where():
        return threading.current_thread().name

    async def fails():
        raise KeyError('from the loop')
    assert server.call(where(), 5) == 'live-sockets'
    with pytest.raises(KeyError, match='from the loop'):
        server.call(fails(), 5)
    ran = []
    done = threading.Event()
    server.call_soon(lambda *args: (ran.append((threading.current_thread().name, args)),
                                    done.set()), 1, 2)
    assert done.wait(5) and ran == [('live-sockets', (1, 2))]


def test_close_all_closes_every_socket_with_1012_and_refuses_new_ones(server):
    held = [Client(server, Relays().hold) for _ in range(2)]
    # both taken over by the loop first: only the socket opened later is refused
    wait_for(lambda: len(server.connections) == 2, 5, 0.01, 'both sockets to be held')
    server.close_all()
    for client in held:
        assert client.close_code() == (ws.RESTART, 'server restarting')
    wait_for(lambda: not server.connections, 5, 0.01, 'the sockets to close')
    assert server.running
    assert Client(server, Relays().hold).close_code() == (ws.RESTART, 'server restarting')
    assert server.refused == 1


def test_stop_says_why_to_every_socket_then_ends_the_loop(server):
    held = [Client(server, Relays().hold) for _ in range(2)]
    server.stop(ws.POLICY, 'going away for good', timeout=5)
    for client in held:
        assert client.close_code() == (ws.POLICY, 'going away for good')
    assert not server.running and not server._thread.is_alive()
    server.stop()  # again: nothing to do
    server.call_soon(print, 'a stopped loop runs nothing, and calling it raises nothing')
    client, raw = tcp_pair()
    with client, raw:
        request = WSConnection(ConnectionType.CLIENT).send(Request(host='localhost', target='/ws'))
        with pytest.raises(RuntimeError):
            server.adopt(upgrade_environ(request, raw), Relays().hold)
        assert peer_address(raw) == client.getsockname()


def test_stop_hangs_up_on_a_peer_that_does_not_take_its_close_frame(server):
    relays = Relays()
    stuck = Client(server, relays.flood, small_buffers=True)
    conn, = relays.serving()
    wait_for(lambda: backlog(server, conn) > sockets.HIGH_WATER, 5, 0.01,
             'the stuck peer backlog to pass the high-water mark')
    started = time.monotonic()
    server.stop(timeout=0.2)
    assert time.monotonic() - started < 2
    assert not server.connections and not server.running
    # what was queued for it is dropped: it reads to the end without a close frame
    assert stuck.read_until(CloseConnection) is None and stuck.hung_up

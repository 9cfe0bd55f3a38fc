"""Our use of wsproto: the handshake we answer, the close codes we send, the
frames we share, and what a socket on the event loop does with what a peer
sends (a socket pair stands in for gunicorn's connection; no process)."""
import socket

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, CloseConnection, Ping, Pong, Request,
                            TextMessage)
from wsproto.frame_protocol import FrameProtocol

from helpers import wait_for

from app import websocket as ws
from app.sockets import SocketServer


def upgrade(**headers):
    environ = {'REQUEST_METHOD': 'GET', 'HTTP_HOST': 'localhost', 'HTTP_UPGRADE': 'websocket',
               'HTTP_CONNECTION': 'keep-alive, Upgrade', 'HTTP_SEC_WEBSOCKET_VERSION': '13',
               'HTTP_SEC_WEBSOCKET_KEY': 'dGhlIHNhbXBsZSBub25jZQ==',
               'HTTP_COOKIE': 'session=' + 'x' * 20_000}
    environ.update(headers)
    return {k: v for k, v in environ.items() if v is not None}


def test_handshake_answers_with_the_rfc_accept_key():
    answer, conn = ws.handshake(upgrade())
    assert answer.startswith(b'HTTP/1.1 101 Switching Protocols\r\n')
    # the worked example of RFC 6455, section 1.3
    assert b'Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n' in answer
    assert answer.endswith(b'\r\n\r\n')
    assert b'Sec-WebSocket-Extensions' not in answer  # no compression context per socket
    # the connection handed back reads what a client sends next
    conn.receive_data(FrameProtocol(client=True, extensions=[]).send_data('hi'))
    assert [e.data for e in conn.events()] == ['hi']


@pytest.mark.parametrize('headers, status', [
    ({'HTTP_UPGRADE': None}, 400), ({'HTTP_CONNECTION': 'keep-alive'}, 400),
    ({'HTTP_SEC_WEBSOCKET_KEY': None}, 400), ({'REQUEST_METHOD': 'POST'}, 400),
    ({'HTTP_HOST': None}, 400), ({'HTTP_SEC_WEBSOCKET_VERSION': '8'}, 426)])
def test_handshake_refuses_what_is_not_a_version_13_upgrade(headers, status):
    with pytest.raises(ws.HandshakeError) as err:
        ws.handshake(upgrade(**headers))
    assert err.value.status == status and str(err.value)
    if status == 426:  # RFC 6455 4.4: say which version we speak
        assert err.value.headers == [('Sec-WebSocket-Version', '13')]


def test_a_shared_frame_depends_only_on_its_message():
    frames = ws.SharedFrames()
    first = frames.text('héllo')
    assert not first[1] & 0x80  # not masked
    frames.text('x' * 70_000)
    assert frames.text('héllo') == first
    reader = FrameProtocol(client=True, extensions=[])
    reader.receive_bytes(first)
    frame, = reader.received_frames()
    assert (frame.payload, frame.message_finished) == ('héllo', True)


# -- a socket on the event loop, fed by a client over a socket pair --

class Peer:
    """A client end: wsproto's client handshake, then frames in and out."""

    def __init__(self, server, relay):
        ours, self.sock = socket.socketpair()
        self.sock.settimeout(10)
        self.ws = WSConnection(ConnectionType.CLIENT)
        request = self.ws.send(Request(host='localhost', target='/ws?view=dashboard'))
        environ = {'REQUEST_METHOD': 'GET', 'gunicorn.socket': ours}
        for line in request.decode('latin-1').split('\r\n')[1:]:
            if line:
                name, value = line.split(': ', 1)
                environ['HTTP_' + name.upper().replace('-', '_')] = value
        server.adopt(environ, relay)
        ours.close()  # what gunicorn does with its descriptor once it is handed over
        self.events = []
        self.hung_up = False
        self.read_until(lambda e: isinstance(e, AcceptConnection))

    def send(self, event_or_bytes):
        data = event_or_bytes
        if not isinstance(data, bytes):
            data = self.ws.send(data)
        self.sock.sendall(data)

    def read_until(self, done):
        """Read until ``done(event)`` for some new event; return it (None: the server hung up)."""
        while True:
            for event in self.ws.events():
                self.events.append(event)
                if done(event):
                    return event
            data = self.sock.recv(65536)
            if not data:
                self.hung_up = True
                return None
            self.ws.receive_data(data)

    def close_code(self):
        """The code of the server's close frame, once it has also hung up."""
        close = self.read_until(lambda e: isinstance(e, CloseConnection))
        assert close is not None, 'the server hung up without a close frame'
        assert self.sock.recv(1) == b'', 'the server did not hang up after closing'
        return close.code, close.reason


async def hold(conn):
    await conn.closed


@pytest.fixture
def server():
    server = SocketServer(limit=2, refusal='full up')
    server.start()
    yield server
    server.stop(timeout=1)


def test_a_socket_is_sent_shared_frames_and_answers_pings(server):
    async def greet(conn):
        await conn.send(conn.server.frames.text('hello'))
        await conn.closed
    peers = [Peer(server, greet) for _ in range(2)]
    for peer in peers:
        assert peer.read_until(lambda e: isinstance(e, TextMessage)).data == 'hello'
    peer = peers[0]
    peer.send(Ping(b'are you there'))
    assert peer.read_until(lambda e: isinstance(e, Pong)).payload == b'are you there'
    # a client's close is echoed with its code, and the server hangs up first
    peer.send(CloseConnection(1001, 'leaving'))
    assert peer.close_code() == (1001, 'leaving')


@pytest.mark.parametrize('frame, code', [
    (b'\x81\x02hi', 1002),                            # a client frame without a mask
    (b'\x89\xfe' + b'\0' * 130, 1002),                # a control frame over 125 bytes
    (b'\x80\x80\0\0\0\0', 1002),                      # a continuation of nothing
    (b'\x81\x82\0\0\0\0\xff\xfe', 1007),              # text that is not UTF-8
    (b'\x88\x82\0\0\0\0\x03\xe7', 1002),              # a close with code 999
])
def test_a_protocol_error_closes_the_socket_with_wsprotos_code(server, frame, code):
    peer = Peer(server, hold)
    peer.send(frame)
    assert peer.close_code()[0] == code


def test_a_message_over_the_limit_closes_with_1009(server):
    peer = Peer(server, hold)
    # in fragments, each under the limit: the message as a whole counts
    for _ in range(3):
        peer.send(TextMessage('x' * (ws.MAX_MESSAGE // 2), message_finished=False))
    assert peer.close_code() == (1009, 'message too big')


def test_one_socket_over_the_limit_is_refused_with_1013_and_shutdown_closes_with_1012(server):
    held = [Peer(server, hold) for _ in range(2)]
    assert Peer(server, hold).close_code() == (ws.TRY_AGAIN_LATER, 'full up')
    server.stop(ws.RESTART, 'server restarting', timeout=5)
    for peer in held:
        assert peer.close_code() == (ws.RESTART, 'server restarting')


def test_a_closed_socket_leaves_nothing_behind(server):
    peers = [Peer(server, hold) for _ in range(2)]
    # the loop thread files a socket once its handshake is answered
    wait_for(lambda: sum(map(len, server.ping_slots)) == 2, 5, 0.01,
             'both sockets in the ping slots')
    for peer in peers:
        peer.send(CloseConnection(1000))
        assert peer.close_code()[0] == 1000
    # connection_lost runs on the loop thread once the server has hung up
    wait_for(lambda: not server.connections and not any(server.ping_slots), 5, 0.01,
             'the server to drop its sockets from its set and its ping slots')

"""The WebSocket protocol (RFC 6455) of our live sockets, done by wsproto.

wsproto checks the upgrade request and writes the ``101`` answer, parses and
validates what pages send (masking, fragments, control frames, UTF-8 text,
close codes) and encodes every frame we send. What is ours is the glue to our
server model, with no I/O (:mod:`app.sockets` owns the connections and the
event loop): the upgrade request gunicorn already parsed handed to wsproto,
one encoder whose frames go to every socket of a view, and the close codes
we send, named with the reason we send each.

No extension is negotiated (permessage-deflate in particular): a compression
context costs hundreds of KiB per connection, which is the memory budget of
hundreds of idle sockets, and the fragments we send are small.
"""
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.frame_protocol import CloseReason, FrameProtocol
from wsproto.utilities import RemoteProtocolError

# Close codes we send (RFC 6455 section 7.4 and the IANA registry); wsproto
# picks its own for a peer that breaks the protocol (1002, 1007).
NORMAL = CloseReason.NORMAL_CLOSURE
POLICY = CloseReason.POLICY_VIOLATION     # a request we will never serve (a bad view)
TOO_BIG = CloseReason.MESSAGE_TOO_BIG     # a message over MAX_MESSAGE
INTERNAL_ERROR = CloseReason.INTERNAL_ERROR  # the relay failed: reconnect for a fresh snapshot
RESTART = CloseReason.SERVICE_RESTART     # the server is restarting: reconnect
TRY_AGAIN_LATER = CloseReason.TRY_AGAIN_LATER  # this server is full: reconnect later

# Pages send us nothing but control frames. wsproto hands a message over as
# it arrives and never holds it whole, so this is not about memory: a peer
# that streams data at us is closed instead of being read for ever.
MAX_MESSAGE = 64 * 1024

# What wsproto needs to judge an upgrade; the rest (cookies...) is not its
# business, and leaving it out keeps the request under h11's size limit.
_HANDSHAKE_HEADERS = ('HOST', 'UPGRADE', 'CONNECTION', 'SEC_WEBSOCKET_KEY',
                      'SEC_WEBSOCKET_VERSION')


class HandshakeError(ValueError):
    """The request is not a WebSocket upgrade we accept.

    Answer it with ``status`` (400, or 426 for an unsupported version) and
    ``headers``, a list of ``(name, value)`` strings, as wsproto advises.
    """

    def __init__(self, message, status=400, headers=()):
        super().__init__(message)
        self.status, self.headers = status, list(headers)


def handshake(environ):
    """Accept the WebSocket upgrade in a WSGI ``environ``.

    Returns ``(answer, connection)``: the ``101 Switching Protocols``
    response (bytes), and the server side of the connection, a
    :class:`wsproto.connection.Connection`, to read the peer's frames and
    write control frames with. Raises :class:`HandshakeError` when the
    request is not a version 13 WebSocket upgrade.
    """
    # gunicorn has parsed the request; wsproto reads it again as the bytes
    # of an HTTP/1.1 request head (as simple-websocket's Server does), so a
    # malformed one is its RemoteProtocolError like any other refusal. The
    # path is not wsproto's concern: the route has matched it already.
    head = [f'{environ.get("REQUEST_METHOD", "GET")} / HTTP/1.1']
    head += [f'{name.replace("_", "-")}: {environ["HTTP_" + name]}'
             for name in _HANDSHAKE_HEADERS if 'HTTP_' + name in environ]
    conn = WSConnection(ConnectionType.SERVER)
    try:
        # WSGI strings carry the request's bytes as latin-1.
        conn.receive_data(('\r\n'.join(head) + '\r\n\r\n').encode('latin-1'))
        requests = [e for e in conn.events() if isinstance(e, Request)]
    except (RemoteProtocolError, UnicodeEncodeError) as exc:
        hint = getattr(exc, 'event_hint', None)
        raise HandshakeError(str(exc), getattr(hint, 'status_code', 400),
                             [(k.decode(), v.decode()) for k, v in getattr(hint, 'headers', ())]
                             ) from None
    if not requests:
        raise HandshakeError('incomplete upgrade request')
    answer = conn.send(AcceptConnection())
    # Only the connection is kept: the handshake's HTTP parser (a few KiB)
    # has done its work, and an idle socket should cost as little as it can.
    return answer, conn.connection


class SharedFrames:
    """Encodes a text message into one frame that any number of sockets can be sent.

    That is sound with wsproto because, on the server side and with no
    extension, a frame depends on nothing but its message: server frames
    are not masked (``FrameProtocol._serialize_frame`` masks only when
    ``client``), the only state ``FrameProtocol.send_data`` keeps is the
    opcode of an unfinished fragmented message, which a final frame
    (``fin=True``) resets, and no extension (no compression context) runs.
    Not thread-safe: one per process, used on the event-loop thread.
    """

    def __init__(self):
        self._protocol = FrameProtocol(client=False, extensions=[])

    def text(self, message):
        """``message`` (str) as one final, unmasked text frame (bytes)."""
        return bytes(self._protocol.send_data(message, fin=True))

"""The WebSocket protocol (RFC 6455), as bytes in and bytes out.

No I/O here: :mod:`app.sockets` owns the connections and the event loop.
Frames a server sends are not masked, so one encoded message can be written
to every socket that shows the same view; that is why this is a few dozen
lines of our own rather than a per-connection protocol object.

No extension is negotiated (permessage-deflate in particular): a compression
context costs hundreds of KiB per connection, which is the memory budget of
hundreds of idle sockets, and the fragments we send are small.
"""
import base64
import hashlib
import os
import struct
from typing import NamedTuple

GUID = b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11'

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL = (CLOSE, PING, PONG)

# Close codes we send (RFC 6455 section 7.4 and the IANA registry).
NORMAL = 1000
PROTOCOL_ERROR = 1002
POLICY = 1008        # a request we will never serve (a bad view)
TOO_BIG = 1009
RESTART = 1012       # the server is restarting: reconnect
TRY_AGAIN_LATER = 1013  # this server is full: reconnect later


class HandshakeError(ValueError):
    """The request is not a WebSocket upgrade we can accept (answer 400)."""


class ProtocolError(ValueError):
    """The peer broke the framing rules; close with ``code``."""

    def __init__(self, message, code=PROTOCOL_ERROR):
        super().__init__(message)
        self.code = code


class Frame(NamedTuple):
    """One frame received: its opcode, whether it ends a message, its payload."""
    opcode: int
    fin: bool
    payload: bytes


def accept_key(key):
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key`` (str)."""
    return base64.b64encode(hashlib.sha1(key.encode('ascii') + GUID).digest()).decode('ascii')


def is_upgrade(environ):
    """Whether a WSGI request asks to become a WebSocket."""
    return (environ.get('HTTP_UPGRADE', '').lower() == 'websocket'
            and 'upgrade' in environ.get('HTTP_CONNECTION', '').lower())


def handshake(environ):
    """The ``101 Switching Protocols`` response (bytes) to a WSGI upgrade request.

    Raises :class:`HandshakeError` when the request is not a version 13
    WebSocket upgrade with a well-formed key.
    """
    if environ.get('REQUEST_METHOD') != 'GET' or not is_upgrade(environ):
        raise HandshakeError('not a WebSocket upgrade')
    if environ.get('HTTP_SEC_WEBSOCKET_VERSION') != '13':
        raise HandshakeError('unsupported WebSocket version (13 only)')
    key = environ.get('HTTP_SEC_WEBSOCKET_KEY', '')
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HandshakeError('bad Sec-WebSocket-Key') from None
    return ('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
            f'Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n').encode('ascii')


def encode(opcode, payload, mask=False):
    """One final frame (bytes). Servers send unmasked frames; clients mask theirs."""
    if isinstance(payload, str):
        payload = payload.encode('utf-8')
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack('!BB', 0x80 | opcode, mask_bit | n)
    elif n < 1 << 16:
        head = struct.pack('!BBH', 0x80 | opcode, mask_bit | 126, n)
    else:
        head = struct.pack('!BBQ', 0x80 | opcode, mask_bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _unmask(payload, key)


def text(message):
    """A text message (str) as one frame."""
    return encode(TEXT, message)


def close(code, reason=''):
    """A close frame with ``code`` and a reason of at most 123 bytes."""
    return encode(CLOSE, struct.pack('!H', code) + reason.encode('utf-8')[:123])


def close_reason(payload):
    """``(code, reason)`` from a close frame's payload; ``(1005, '')`` if it has none."""
    if len(payload) < 2:
        return 1005, ''
    return struct.unpack('!H', payload[:2])[0], payload[2:].decode('utf-8', 'replace')


def _unmask(data, key):
    # XOR four bytes at a time through one big integer: fast enough for the
    # short control frames browsers send us, with no per-byte Python loop.
    if not data:
        return data
    repeated = (key * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, 'big') ^ int.from_bytes(repeated, 'big')).to_bytes(len(data), 'big')


class Parser:
    """Splits a byte stream from a peer into :class:`Frame` s.

    ``masked``: whether the peer must mask its frames (true for a server
    reading a client). ``max_size``: the largest payload accepted, in bytes;
    a bigger frame raises :class:`ProtocolError` with code 1009.
    """

    def __init__(self, masked=True, max_size=64 * 1024):
        self.masked, self.max_size = masked, max_size
        self._buffer = b''

    def feed(self, data):
        """Add received bytes; return the complete frames they finish (a list).

        Raises :class:`ProtocolError` on a malformed or oversized frame.
        """
        buf = self._buffer + data
        frames = []
        while True:
            if len(buf) < 2:
                break
            b0, b1 = buf[0], buf[1]
            fin, opcode, masked, n = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
            if b0 & 0x70:
                raise ProtocolError('reserved bits set')
            if masked != self.masked:
                raise ProtocolError('frame masking is wrong for this side')
            if opcode in CONTROL and (not fin or n > 125):
                raise ProtocolError('bad control frame')
            if opcode not in CONTROL and opcode not in (CONTINUATION, TEXT, BINARY):
                raise ProtocolError(f'unknown opcode {opcode}')
            at = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, at = struct.unpack('!H', buf[2:4])[0], 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, at = struct.unpack('!Q', buf[2:10])[0], 10
            if n > self.max_size:
                raise ProtocolError(f'frame of {n} bytes', TOO_BIG)
            end = at + (4 if masked else 0) + n
            if len(buf) < end:
                break
            payload = buf[end - n:end]
            if masked:
                payload = _unmask(payload, buf[at:at + 4])
            frames.append(Frame(opcode, fin, payload))
            buf = buf[end:]
        self._buffer = buf
        return frames

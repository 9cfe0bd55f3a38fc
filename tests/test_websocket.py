"""The WebSocket codec: handshake, frames out, frames in (no I/O)."""
import os

import pytest

from app import websocket as ws


def upgrade(**headers):
    environ = {'REQUEST_METHOD': 'GET', 'HTTP_UPGRADE': 'websocket',
               'HTTP_CONNECTION': 'keep-alive, Upgrade', 'HTTP_SEC_WEBSOCKET_VERSION': '13',
               'HTTP_SEC_WEBSOCKET_KEY': 'dGhlIHNhbXBsZSBub25jZQ=='}
    environ.update(headers)
    return environ


def test_handshake_answers_with_the_rfc_accept_key():
    answer = ws.handshake(upgrade())
    assert answer.startswith(b'HTTP/1.1 101 Switching Protocols\r\n')
    # the worked example of RFC 6455, section 1.3
    assert b'Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n' in answer
    assert answer.endswith(b'\r\n\r\n')


@pytest.mark.parametrize('headers', [
    {'HTTP_UPGRADE': ''}, {'HTTP_SEC_WEBSOCKET_VERSION': '8'},
    {'HTTP_SEC_WEBSOCKET_KEY': 'short'}, {'REQUEST_METHOD': 'POST'}])
def test_handshake_refuses_what_is_not_a_version_13_upgrade(headers):
    with pytest.raises(ws.HandshakeError):
        ws.handshake(upgrade(**headers))


@pytest.mark.parametrize('size', [0, 125, 126, 65535, 65536, 200_000])
def test_frames_of_every_length_class_read_back(size):
    payload = os.urandom(size)
    server_frame = ws.encode(ws.BINARY, payload)
    assert ws.Parser(masked=False, max_size=size).feed(server_frame) == [
        ws.Frame(ws.BINARY, True, payload)]
    client_frame = ws.encode(ws.BINARY, payload, mask=True)
    assert client_frame[1] & 0x80  # the mask bit
    assert ws.Parser(max_size=size).feed(client_frame) == [ws.Frame(ws.BINARY, True, payload)]


def test_parser_takes_frames_split_anywhere():
    stream = (ws.encode(ws.TEXT, 'héllo', mask=True) + ws.encode(ws.PING, b'p', mask=True)
              + ws.encode(ws.TEXT, 'x' * 300, mask=True))
    parser = ws.Parser()
    frames = []
    for i in range(len(stream)):
        frames += parser.feed(stream[i:i + 1])
    assert [(f.opcode, f.payload) for f in frames] == [
        (ws.TEXT, 'héllo'.encode()), (ws.PING, b'p'), (ws.TEXT, b'x' * 300)]


def test_a_client_frame_without_a_mask_is_a_protocol_error():
    with pytest.raises(ws.ProtocolError) as err:
        ws.Parser().feed(ws.encode(ws.TEXT, 'hi'))
    assert err.value.code == ws.PROTOCOL_ERROR


def test_an_oversized_frame_is_refused_before_it_arrives():
    header_only = ws.encode(ws.TEXT, b'x' * 70_000, mask=True)[:14]
    with pytest.raises(ws.ProtocolError) as err:
        ws.Parser(max_size=65536).feed(header_only)
    assert err.value.code == ws.TOO_BIG


def test_close_frame_carries_code_and_reason():
    frame = ws.Parser(masked=False).feed(ws.close(ws.TRY_AGAIN_LATER, 'full'))[0]
    assert frame.opcode == ws.CLOSE
    assert ws.close_reason(frame.payload) == (1013, 'full')
    assert ws.close_reason(b'') == (1005, '')

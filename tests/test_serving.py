"""app.serving: gunicorn's workers take new connections in turn, and a worker that
stops leaves no connection it took, or that waited for it, unanswered."""
import ctypes
import fcntl
import http.client
import os
import signal
import socket
import threading
import time

import pytest
from helpers import (LISTEN, connections_by_worker, cpu_ticks, grant_admin, migrate,
                     service_env, socket_inodes, start_web, wait_for, wait_workers_serving,
                     worker_pids)


@pytest.fixture
def served(redis_server, tmp_path):
    """``(gunicorn Process, port)``: 2 workers, returned once both take connections."""
    env = service_env(tmp_path, redis_server.url)
    migrate(env, tmp_path)
    web, api = start_web(env, tmp_path, workers=2)
    yield web, int(api.base.rsplit(':', 1)[1])
    web.stop()


def test_keep_alive_clients_are_spread_over_the_workers(served):
    web, port = served
    clients = []
    try:
        assert len(worker_pids(web.pid)) == 2
        assert len(socket_inodes(port, LISTEN)) == 1  # one socket, shared
        for _ in range(16):
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
            conn.request('GET', '/healthz')
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            clients.append(conn)  # kept open: a keep-alive client
        held = connections_by_worker(web.pid, port)
        assert sum(held.values()) == 16, held
        # Taken in turn: 8 each, give or take the moment an acceptor's wait
        # times out. gthread's own accept gave one worker 16 of 16; a socket
        # per worker (SO_REUSEPORT) spreads them by a hash of the client's
        # port, as unevenly as chance has it.
        assert max(held.values()) - min(held.values()) <= 2, held
    finally:
        for conn in clients:
            conn.close()


def test_connections_opened_while_the_workers_restart_are_all_answered(served):
    web, port = served
    answers, failures, stop = [], [], threading.Event()

    def client():  # a new connection for every request, as a health checker opens
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
                conn.request('GET', '/healthz')
                answers.append(conn.getresponse().status)
                conn.close()
            except OSError as exc:
                failures.append(repr(exc))
            time.sleep(0.005)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    try:
        before = set(worker_pids(web.pid))
        for thread in threads:
            thread.start()
        wait_for(lambda: len(answers) > 20, 20, message='answers before the restart')
        web.send_signal(signal.SIGHUP)  # gunicorn: new workers, the old ones stop gracefully
        wait_for(lambda: (len(now := set(worker_pids(web.pid))) == 2 and not now & before),
                 30, message='both workers to be replaced')
        wait_workers_serving(web.pid, port)
        answered = len(answers)
        wait_for(lambda: len(answers) > answered + 20, 20, message='answers after the restart')
    finally:
        stop.set()
        for thread in threads:
            thread.join(35)
    assert failures == []
    assert set(answers) == {200}, sorted(set(answers))


def test_a_request_sent_in_pieces_is_answered(served):
    # An accepted socket inherits the listening socket's accept timeout
    # (0.5 s): it must not cut off a client that pauses mid-request.
    _web, port = served
    for _ in range(2):  # one connection to each worker
        with socket.create_connection(('127.0.0.1', port), timeout=10) as conn:
            conn.sendall(b'GET /healthz HTTP/1.1\r\nHost: x\r\n')
            time.sleep(1.2)
            conn.sendall(b'Connection: close\r\n\r\n')
            answer = b''
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b'HTTP/1.1 200'), answer[:200]


def _borrow_fd(pid, fd):
    """A copy, in this process, of file descriptor ``fd`` of process ``pid`` (Linux's
    pidfd_getfd, 5.6 and later; needs the right to trace ``pid``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        if copy < 0:
            raise OSError(ctypes.get_errno(), 'pidfd_getfd')
        return copy
    finally:
        os.close(pidfd)


def test_a_socket_made_non_blocking_by_another_process_does_not_spin_the_acceptors(served):
    # A USR2 re-exec's master makes the shared listening socket non-blocking
    # again (whether a socket blocks is shared by all who hold it) until its
    # own workers start; the acceptors must wait, not spin on EAGAIN.
    web, port = served
    listening = socket_inodes(port, LISTEN)
    fd = next(int(name) for name in os.listdir(f'/proc/{web.pid}/fd')
              if os.readlink(f'/proc/{web.pid}/fd/{name}') in {f'socket:[{i}]' for i in listening})
    copy = _borrow_fd(web.pid, fd)
    workers = worker_pids(web.pid)
    try:
        fcntl.fcntl(copy, fcntl.F_SETFL, fcntl.fcntl(copy, fcntl.F_GETFL) | os.O_NONBLOCK)
        before = {pid: cpu_ticks(pid) for pid in workers}
        time.sleep(2)
        spent = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
        # Spinning took 84 and 86 ticks of 2 s (about 40% of a core each); idle, about 0.
        assert all(ticks < 20 for ticks in spent.values()), spent
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        conn.request('GET', '/healthz')
        assert conn.getresponse().status == 200  # still taken, from select()
        conn.close()
    finally:
        fcntl.fcntl(copy, fcntl.F_SETFL, fcntl.fcntl(copy, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        os.close(copy)


@pytest.fixture
def served_admin(redis_server, tmp_path):
    """``(port, token)``: gunicorn with one worker, and an admin's API token."""
    env = service_env(tmp_path, redis_server.url)
    migrate(env, tmp_path)
    token = grant_admin(env)
    web, api = start_web(env, tmp_path, workers=1)
    yield int(api.base.rsplit(':', 1)[1]), token
    web.stop()


def test_a_filter_of_the_longest_length_in_any_script_reaches_the_app(served_admin):
    # gunicorn's default request line (4,094 bytes) answered its own 414
    # page to a search the app takes (500 characters, 12 bytes each
    # percent-encoded when 4-byte UTF-8).
    import json
    import urllib.parse
    port, token = served_admin
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
        for q, status in (('\U0001F389' * 500, 200), ('\u6771' * 500, 200), ('x' * 501, 400)):
            conn.request('GET', f'/api/jobs?q={urllib.parse.quote(q)}&state=failed',
                         headers={'Authorization': f'Bearer {token}'})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == status, body[:300]
            assert resp.getheader('Content-Type') == 'application/json'
            if status == 400:
                assert json.loads(body)['fields'] == {'q': 'must be at most 500 characters'}
    finally:
        conn.close()


def test_a_chunked_body_has_the_same_size_limits_as_one_with_a_length(served_admin):
    # Werkzeug reads a body sent without Content-Length only up to the
    # route's limit, silently: it reached the view cut short (a 400 "not
    # valid JSON" where a 413 was due).
    import json
    port, token = served_admin

    def chunked(path, body):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        try:
            pieces = (body[i:i + 8192] for i in range(0, len(body), 8192))
            conn.request('POST', path, body=pieces, encode_chunked=True, headers={
                'Content-Type': 'application/json', 'Authorization': f'Bearer {token}',
                'Transfer-Encoding': 'chunked'})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    big = json.dumps({'task': 'fail', 'params': {'message': 'x' * 100_000}}).encode()
    assert chunked('/api/jobs', big) == (413, {'error': 'request body larger than 65536 bytes'})
    small = json.dumps({'task': 'fail', 'params': {'message': 'x' * 400}}).encode()
    status, job = chunked('/api/jobs', small)
    assert status == 201 and job['params']['message'] == 'x' * 400, job
    # The batch route's own limit (4 MiB): 100 KB is read whole, 5 MB is too large.
    jobs = [{'task': 'fail', 'params': {'message': f'{n} ' + 'y' * 450}} for n in range(200)]
    body = json.dumps({'jobs': jobs}).encode()
    assert len(body) > 65536
    status, made = chunked('/api/jobs/batch', body)
    assert status == 201 and len(made['jobs']) == 200, made
    assert made['jobs'][199]['params']['message'] == jobs[199]['params']['message']
    huge = json.dumps({'jobs': [{'task': 'noop', 'params': {}, 'idempotency_key': 'k' * 200}]
                               * 1000 + [{'task': 'noop', 'x': 'z' * 5_000_000}]}).encode()
    status, answer = chunked('/api/jobs/batch', huge)
    assert status == 413 and answer['error'] == f'request body larger than {4 * 1024 * 1024} bytes'

"""Live updates over /ws: scoping, coalescing, fan-out, resilience.

WebSocket clients here are plain ones (simple-websocket); the browser tests
drive the same endpoint through htmx in Chromium.
"""
import re
import signal
import socket
import subprocess
import time

import helpers
import pytest
from helpers import Deployment, wait_for

from wsproto.events import CloseConnection, TextMessage

from app import live

# Every test here starts real processes: the full suite only (make test).
pytestmark = pytest.mark.processes

ROW = re.compile(r'<tr id="job-([0-9a-f-]+)" data-state="(\w+)"')


class Socket(helpers.Socket):
    """A dashboard or page socket, read as the rows and node it shows."""

    def rows(self):
        """job id -> latest state seen in any pushed row."""
        seen = {}
        for _, msg in self.messages:
            seen.update(ROW.findall(msg))
        return seen

    def node(self):
        return re.search(r'data-node="([^"]+)"', self.messages[0][1]).group(1)


@pytest.fixture(scope='module')
def stack(tmp_path_factory):
    dep = Deployment('distributed', tmp_path_factory.mktemp('live'), web_workers=2)
    yield dep
    dep.close()


def test_snapshot_on_connect_carries_what_the_page_shows(stack):
    job = stack.api.wait_state(stack.api.submit('noop')['id'], 'succeeded')
    sock = Socket(f'{stack.ws_base}/ws?view=dashboard')
    try:
        wait_for(lambda: sock.messages, 10, message='the snapshot')
        first = sock.messages[0][1]
        assert '<hx-partial hx-target="#live-status"' in first and 'class="live live-on"' in first
        assert '<hx-partial hx-target="#queue-stats"' in first
        assert '<hx-partial hx-target="#recent-jobs"' in first
        assert sock.rows()[job['id']] == 'succeeded'
    finally:
        sock.close()


def test_every_socket_on_every_worker_sees_every_change(stack):
    # Which worker accepts a connection is the kernel's choice: open sockets
    # until both workers hold some.
    sockets = []
    try:
        while len({s.node() for s in sockets}) < 2 and len(sockets) < 60:
            batch = [Socket(f'{stack.ws_base}/ws?view=dashboard') for _ in range(6)]
            wait_for(lambda: all(s.messages for s in batch), 30, message='snapshots')
            sockets += batch
        nodes = {s.node() for s in sockets}
        assert len(nodes) == 2, f'{len(sockets)} sockets landed on one worker only: {nodes}'
        ids = [stack.api.submit('flaky', {'failures': 1}, retry_delay=0)['id'] for _ in range(5)]
        for s in sockets:
            wait_for(lambda: all(s.rows().get(i) == 'succeeded' for i in ids), 30,
                     message=f'socket on {s.node()} to see every job succeed')
    finally:
        for s in sockets:
            s.close()


def test_a_job_page_only_hears_about_its_job(stack):
    job = stack.api.submit('sleep', {'seconds': 30, 'steps': 30})
    watched = Socket(f'{stack.ws_base}/ws?view=job&id={job["id"]}')
    try:
        wait_for(lambda: watched.messages, 10, message='the snapshot')
        for _ in range(3):
            stack.api.wait_state(stack.api.submit('noop')['id'], 'succeeded')
        before = len(watched.messages)
        other = stack.api.submit('noop')
        stack.api.wait_state(other['id'], 'succeeded')
        # the sleeping job reports progress every second, so messages do come,
        # but never about another job
        assert all(other['id'] not in m for _, m in watched.messages[before:])
        assert all(f'job-{job["id"]}-' in m for _, m in watched.messages[1:])
        progress = wait_for(lambda: re.findall(r'aria-valuenow="(\d+)"', watched.messages[-1][1]),
                            15, message='progress on the job page')
        assert progress
    finally:
        watched.close()
        stack.api.post(f'/api/jobs/{job["id"]}/cancel')


def test_flaky_attempts_arrive_one_by_one(stack):
    job = stack.api.submit('flaky', {'failures': 2}, retry_delay=1)
    sock = Socket(f'{stack.ws_base}/ws?view=job&id={job["id"]}')
    try:
        def counts():
            return [int(c) for _, m in sock.messages
                    for c in re.findall(r'class="panel attempts" data-count="(\d+)"', m)]
        wait_for(lambda: 3 in counts(), 30, message='three attempts')
        assert {1, 2, 3} <= set(counts()), counts()
        # The third attempt's start and its success may be written (and sent) apart.
        wait_for(lambda: 'data-state="succeeded"' in sock.messages[-1][1], 10,
                 message='the success')
    finally:
        sock.close()


def test_a_burst_of_500_jobs_sends_a_bounded_number_of_messages(stack):
    sock = Socket(f'{stack.ws_base}/ws?view=dashboard')
    try:
        wait_for(lambda: sock.messages, 10, message='the snapshot')
        start = time.monotonic()
        before = stack.api.get('/api/stats')[1]['states']['succeeded']
        for _ in range(500):
            stack.api.submit('noop')
        wait_for(lambda: stack.api.get('/api/stats')[1]['states']['succeeded'] >= before + 500,
                 120, 0.2, 'the burst to finish')
        # the last change reaches the socket too
        wait_for(lambda: f'data-state="succeeded">{before + 500}<' in sock.messages[-1][1], 10,
                 message='final counts on the socket')
        elapsed = time.monotonic() - start
        sent = [t for t, _ in sock.messages if t >= start]
        assert len(sent) <= live.BURST + elapsed * live.RATE + 1, (len(sent), elapsed)
        # after the first burst, messages are spaced by the sustained rate
        gaps = [b - a for a, b in zip(sent[live.BURST:], sent[live.BURST + 1:])]
        assert sum(gaps) / len(gaps) >= 0.8 / live.RATE, gaps
    finally:
        sock.close()


def test_an_idle_socket_gets_a_short_jobs_changes_at_once(stack):
    sock = Socket(f'{stack.ws_base}/ws?view=dashboard')
    try:
        wait_for(lambda: sock.messages, 10, message='the snapshot')
        time.sleep(live.BURST / live.RATE)  # let the socket go idle: the condition under test
        sent_at = time.monotonic()
        job = stack.api.submit('noop')
        wait_for(lambda: sock.rows().get(job['id']) == 'succeeded', 5, 0.01, 'the job to succeed')
        arrived = next(t for t, m in sock.messages if f'id="job-{job["id"]}" data-state="succeeded"' in m)
        # queued, then running and succeeded: all inside the burst, none held back
        assert arrived - sent_at < 1 / live.RATE, arrived - sent_at
    finally:
        sock.close()


def test_pausing_a_periodic_task_reaches_open_periodic_pages(stack):
    sock = Socket(f'{stack.ws_base}/ws?view=periodic')
    try:
        wait_for(lambda: sock.messages, 10, message='the snapshot')
        assert 'id="periodic-report" data-paused="false"' in sock.messages[-1][1]
        stack.api.post('/api/periodic/report/pause')
        wait_for(lambda: 'id="periodic-report" data-paused="true"' in sock.messages[-1][1], 10,
                 message='the paused row')
    finally:
        stack.api.post('/api/periodic/report/resume')
        sock.close()


def test_a_bad_view_is_refused_with_1008(stack):
    sock = Socket(f'{stack.ws_base}/ws?view=everything')
    assert sock.closed.wait(10)
    assert sock.close_code == 1008 and sock.messages == []


def upgrade_answer(port, **headers):
    """The answer to a raw upgrade request for the dashboard: its head, and its body if any."""
    fields = {'Host': f'127.0.0.1:{port}', 'Upgrade': 'websocket', 'Connection': 'Upgrade',
              'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==', 'Sec-WebSocket-Version': '13',
              **helpers.auth_headers(f'http://127.0.0.1:{port}')}
    fields.update(headers)
    request = 'GET /ws?view=dashboard HTTP/1.1\r\n' + ''.join(
        f'{k}: {v}\r\n' for k, v in fields.items() if v is not None) + '\r\n'
    with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
        s.sendall(request.encode())
        answer = b''
        while b'\r\n\r\n' not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        length = re.search(rb'\r\nContent-Length: (\d+)\r\n', answer, re.I)
        while length and len(answer.split(b'\r\n\r\n', 1)[1]) < int(length.group(1)):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode('latin-1')


def test_a_bad_upgrade_request_is_answered_with_a_4xx_and_why(stack):
    port = int(stack.api.base.rsplit(':', 1)[1])
    assert upgrade_answer(port).startswith('HTTP/1.1 101 ')
    refused = upgrade_answer(port, **{'Sec-WebSocket-Key': None})
    assert refused.startswith('HTTP/1.1 400 ') and 'Sec-WebSocket-Key' in refused
    old = upgrade_answer(port, **{'Sec-WebSocket-Version': '8'})
    assert old.startswith('HTTP/1.1 426 ') and '\r\nSec-WebSocket-Version: 13\r\n' in old


def test_a_socket_without_credentials_or_from_another_site_is_closed_with_1008_and_why(stack):
    url = f'{stack.ws_base}/ws?view=dashboard'
    for headers, reason in (
            ({}, 'log in first'),
            ({**helpers.auth_headers(url), 'Origin': 'http://evil.example'},
             'a socket opened from another site (http://evil.example) is refused'),
            ({'Authorization': 'Bearer qm_revoked'}, 'unknown or revoked token')):
        sock = helpers.Socket(url, headers=headers)
        assert sock.closed.wait(10), 'the refusal'
        assert (sock.close_code, sock.ws.close_message, sock.messages) == (1008, reason, [])
    # The same socket with the page's own origin and credentials is served
    # (simple-websocket's Host header leaves the port out, so its Origin does).
    sock = helpers.Socket(url, headers={**helpers.auth_headers(url), 'Origin': 'http://127.0.0.1'})
    wait_for(lambda: sock.messages, 10, message='the snapshot')
    assert sock.messages[0][1].startswith('<hx-partial')
    sock.close()


def test_redis_restart_resumes_the_relay_without_restarting_web(tmp_path):
    dep = Deployment('distributed', tmp_path, web_workers=1)
    try:
        sock = Socket(f'{dep.ws_base}/ws?view=dashboard')
        wait_for(lambda: sock.messages, 10, message='the snapshot')
        dep.redis.stop()
        dep.redis.start()
        job = dep.api.submit('noop')
        wait_for(lambda: sock.rows().get(job['id']) == 'succeeded', 60, message='the relay to resume')
        assert dep.web.alive()
        sock.close()
    finally:
        dep.close()


def test_shutdown_closes_sockets_with_1012_and_clients_reconnect(tmp_path):
    dep = Deployment('distributed', tmp_path, web_workers=1)
    try:
        sock = Socket(f'{dep.ws_base}/ws?view=dashboard')
        wait_for(lambda: sock.messages, 10, message='the snapshot')
        started = time.monotonic()
        dep.web.send_signal(signal.SIGTERM)
        assert sock.closed.wait(10)
        assert sock.close_code == 1012
        assert dep.web.wait(30) == 0, dep.web.log()
        # gunicorn waits up to 30 s (graceful_timeout) for open connections;
        # with the sockets closed and hung up it has none to wait for (it
        # takes under a second; the bound leaves room for a busy machine)
        elapsed = time.monotonic() - started
        assert elapsed < 10, f'the web process took {elapsed:.1f} s to stop'
        dep.restart_web()
        again = Socket(f'{dep.ws_base}/ws?view=dashboard')
        wait_for(lambda: again.messages, 10, message='a snapshot after restart')
        again.close()
    finally:
        dep.close()


def test_a_plain_get_of_the_socket_url_returns_the_fragments_it_would_push(stack):
    job = stack.api.wait_state(stack.api.submit('noop')['id'], 'succeeded')
    status, html = stack.api.get('/ws?view=dashboard')
    assert status == 200
    assert '<hx-partial hx-target="#queue-stats"' in html
    assert f'<tr id="job-{job["id"]}" data-state="succeeded"' in html
    assert 'id="live-status"' not in html  # the indicator is the page's own business
    status, page = stack.api.get(f'/ws?view=job&id={job["id"]}')
    assert status == 200 and f'hx-target="#job-{job["id"]}-attempts"' in page
    assert stack.api.get('/ws?view=everything')[0] == 400


def test_an_open_socket_leaves_the_only_web_thread_free(tmp_path):
    dep = Deployment('embedded', tmp_path, WEB_THREADS=1)
    try:
        sock = Socket(f'{dep.ws_base}/ws?view=dashboard')
        wait_for(lambda: sock.messages, 10, message='the snapshot')
        started = time.monotonic()
        assert dep.api.get('/healthz')[0] == 200
        assert time.monotonic() - started < 2
        # the thread served the request and the socket is still live
        job = dep.api.submit('noop')
        wait_for(lambda: sock.rows().get(job['id']) == 'succeeded', 15, message='the job on the socket')
        sock.close()
    finally:
        dep.close()


def test_healthz_and_stats_answer_at_once_with_1000_sockets_open(tmp_path):
    dep = Deployment('embedded', tmp_path)
    crowd = None
    try:
        crowd = helpers.SocketCrowd(f'{dep.ws_base}/ws?view=dashboard', 1000)
        firsts = crowd.first_events()
        assert all(isinstance(f, TextMessage) and '#queue-stats' in f.data for f in firsts)
        for path in ('/healthz', '/api/stats', '/healthz'):
            started = time.monotonic()
            assert dep.api.get(path)[0] == 200
            took = time.monotonic() - started
            assert took < 2, f'{path} took {took:.2f} s with 1000 sockets open'
        assert crowd.still_open() == 1000
    finally:
        if crowd:
            crowd.close()
        dep.close()


def first_message(url):
    """The first message on a new socket: a snapshot (TextMessage) or a CloseConnection."""
    crowd = helpers.SocketCrowd(url, 1)
    try:
        return crowd.first_events()[0]
    finally:
        crowd.close()


def test_a_socket_over_the_limit_is_refused_with_1013_and_healthz_still_answers(tmp_path):
    dep = Deployment('distributed', tmp_path, web_workers=1, LIVE_SOCKETS=3)
    held = []
    try:
        held = [Socket(f'{dep.ws_base}/ws?view=dashboard') for _ in range(3)]
        wait_for(lambda: all(s.messages for s in held), 10, message='three snapshots')
        # a plain client, so the close frame is read whatever way it arrives
        extra = helpers.SocketCrowd(f'{dep.ws_base}/ws?view=dashboard', 1)
        close = extra.first_events()[0]
        assert isinstance(close, CloseConnection)
        assert (close.code, close.reason) == (live.CLOSE_FULL, live.FULL_REASON)
        assert live.CLOSE_FULL == 1013
        wait_for(lambda: extra.still_open() == 0, 10, message='the refused socket to be closed')
        assert dep.api.get('/healthz')[0] == 200
        # the held sockets are untouched, and a freed place is taken again
        job = dep.api.submit('noop')
        for s in held:
            wait_for(lambda: s.rows().get(job['id']) == 'succeeded', 15, message='the job')
        held.pop().close()
        wait_for(lambda: isinstance(first_message(f'{dep.ws_base}/ws?view=dashboard'),
                                    TextMessage), 15, 0.2, 'a socket in the freed place')
    finally:
        for s in held:
            s.close()
        dep.close()


def test_a_fragment_that_fails_to_render_leaves_the_socket_and_other_pages_live(tmp_path):
    dep = Deployment('embedded', tmp_path)
    dep.web.stop()  # one embedded process at a time on this ledger and queue
    dep.processes.remove(dep.web)
    env = dict(dep.env, PORT=str(helpers.free_port()), HOST='127.0.0.1',
               PYTHONPATH=str(helpers.ROOT / 'tests'))
    web = helpers.Process('web-failing-render', [str(helpers.BIN / 'gunicorn'), '-c',
                                                 'gunicorn.conf.py', 'wsgi_failing_render:app'],
                          env, tmp_path)
    dep.processes.append(web)
    api = helpers.Api(f'http://127.0.0.1:{env["PORT"]}')
    ws_base = api.base.replace('http://', 'ws://')
    wait_for(lambda: api.healthy() or not web.alive(), 30, 0.1, 'the web process')
    try:
        job = api.submit('flaky', {'failures': 1}, retry_delay=0.5)
        page = Socket(f'{ws_base}/ws?view=job&id={job["id"]}')
        dash = Socket(f'{ws_base}/ws?view=dashboard')
        wait_for(lambda: page.messages and dash.messages, 10, message='snapshots')
        # the summary goes out without the attempts, again at every change
        wait_for(lambda: 'data-state="succeeded"' in page.messages[-1][1], 20,
                 message='the job page to follow the job to success')
        assert all(f'hx-target="#job-{job["id"]}-summary"' in m for _, m in page.messages)
        assert not any(f'hx-target="#job-{job["id"]}-attempts"' in m for _, m in page.messages)
        assert not page.closed.is_set()
        # The dashboard's own update of the row may come a moment after the job page's.
        wait_for(lambda: dash.rows().get(job['id']) == 'succeeded', 15,
                 message='the dashboard to follow the job to success')
        assert f'rendering #job-{job["id"]}-attempts' in web.log()
        other = api.submit('noop')
        wait_for(lambda: dash.rows().get(other['id']) == 'succeeded', 15, message='the dashboard')
        page.close()
        dash.close()
    finally:
        dep.close()


def test_a_users_open_sockets_close_when_their_sessions_end(stack):
    url = f'{stack.ws_base}/ws?view=dashboard'
    token = helpers.add_user(stack.env, 'olly', 'operator', 'long enough', token=True)
    sock = helpers.Socket(url, headers={'Authorization': f'Bearer {token}'})
    wait_for(lambda: sock.messages, 10, message='the snapshot')
    admin = helpers.Socket(url)  # another user's socket stays
    wait_for(lambda: admin.messages, 10, message='the snapshot')
    run = subprocess.run([str(helpers.BIN / 'flask'), '--app', 'wsgi', 'users', 'set-role', 'olly',
                          'viewer'], env=stack.env, cwd=helpers.ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sock.closed.wait(10), 'the socket to close'
    assert (sock.close_code, sock.ws.close_message) == (1008, 'your session ended: log in again')
    assert not admin.closed.is_set()
    admin.close()


def test_a_socket_closes_when_its_token_is_revoked_by_another_process(tmp_path):
    # Embedded: the CLI's change is not announced to the web process; the
    # socket's credential is checked again every live.RECHECK seconds.
    dep = Deployment('embedded', tmp_path)
    try:
        token = helpers.add_user(dep.env, 'bot', 'viewer', 'long enough', token=True)
        sock = helpers.Socket(f'{dep.ws_base}/ws?view=dashboard',
                              headers={'Authorization': f'Bearer {token}'})
        wait_for(lambda: sock.messages, 10, message='the snapshot')
        run = subprocess.run([str(helpers.BIN / 'flask'), '--app', 'wsgi', 'tokens', 'revoke', '1'],
                             env=dep.env, cwd=helpers.ROOT, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
        assert sock.closed.wait(30), 'the socket to close'
        assert (sock.close_code, sock.ws.close_message) == (1008, 'your token was revoked')
    finally:
        dep.close()


def test_charts_render_at_most_every_few_seconds_per_view_and_lean_frames_leave_them_out(app):
    from app import fragments
    from app.ledger import history
    from app.extensions import db
    from app.models import utcnow
    args = {'view': 'dashboard'}
    with app.test_request_context('/ws', query_string=args) as ctx:
        key, factory = live.view_for(args, app.config)
        view = factory(key, ctx.request.environ)
        first, reused = view.render_parts(None, 0)
        assert reused == set() and view.due(time.monotonic()) == (set(), None)
        with app.app_context():
            history.add(db.session.connection(), [history.Ended(
                'default', 'noop', 'succeeded', utcnow(), True, 0.1)])
            db.session.commit()
        change = fragments.Change([{'id': 'x', 'queue': 'default', 'task': 'noop'}], [], {})
        assert view.concerns(change) and view.stale == {'charts'}
        slots, wait = view.due(time.monotonic())
        assert slots == set() and 0 < wait <= fragments.CHART_EVERY
        again, reused = view.render_parts(slots, 1)
        charts_at = [i for i, part in enumerate(again) if 'hx-target="#charts"' in part]
        assert reused == set(charts_at) and again[charts_at[0]] == first[charts_at[0]]
        slots, wait = view.due(time.monotonic() + fragments.CHART_EVERY)
        assert slots == {'charts'} and wait is None
        fresh, reused = view.render_parts(slots, 2)
        assert reused == set() and fresh[charts_at[0]] != first[charts_at[0]]
        assert 'data-value="1"' in fresh[charts_at[0]]
        other = fragments.Change([{'id': 'y', 'queue': 'reports', 'task': 'noop'}], [], {})
        queue_view = live.view_for({'view': 'queue', 'queue': 'default'}, app.config)[1](
            ('q',), ctx.request.environ)
        assert not queue_view.concerns(other) and queue_view.stale == set()
    render = live.Render(5, 'all', b'full', b'lean', kept_at=3)
    assert (render.frame_for(2), render.frame_for(3), render.frame_for(4)) == (
        b'full', b'lean', b'lean')

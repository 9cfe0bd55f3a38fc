"""Test helpers: waiting with deadlines, real processes, a tiny JSON client."""
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import redis
import simple_websocket
import sqlalchemy as sa
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Ping, RejectConnection, Request, TextMessage

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


CHROMIUM = '/usr/bin/chromium'  # Debian's; never a downloaded browser
# Chromium's own background traffic is refused on this network; keep it quiet.
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']


def need(condition, reason):
    """Skip on a developer machine that lacks something; fail loudly in CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f'{reason} (CI must provide it)', pytrace=False)
    pytest.skip(reason)


def wait_for(predicate, timeout=20.0, interval=0.05, message='condition'):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f'timed out after {timeout} s waiting for {message}; last value: {last!r}')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def broker_locked():
    """Hold the embedded broker's write lock, as a stuck writer would."""
    from app import broker
    huey = broker.hueys['default']
    kept = huey.storage, huey.storage_kwargs
    # A storage that waits 0.2 s for the lock (Huey's SqliteStorage ``timeout``).
    huey.storage_kwargs = {**huey.storage_kwargs, 'timeout': 0.2}
    huey.storage = huey.create_storage()
    blocker = sqlite3.connect(huey.storage.filename, isolation_level=None)
    blocker.execute('BEGIN EXCLUSIVE')
    try:
        yield
    finally:
        blocker.rollback()
        blocker.close()
        huey.storage.close()
        huey.storage, huey.storage_kwargs = kept


class Process:
    """A child process with its output in a log file, stopped on request."""

    def __init__(self, name, args, env, log_dir, cwd=ROOT):
        self.name = name
        self.log_path = Path(log_dir) / f'{name}.log'
        self._log = open(self.log_path, 'ab')
        self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log(self):
        return self.log_path.read_text(errors='replace')

    def send_signal(self, signum):
        if self.alive():
            os.kill(self.proc.pid, signum)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        """SIGKILL the process and everything it started: a crash."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def stop(self, signum=signal.SIGTERM, timeout=20):
        """Stop gracefully; kill the whole process group if it does not exit."""
        if self.alive():
            os.kill(self.proc.pid, signum)
            if self.wait(timeout) is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


class RedisServer:
    """A private redis-server on a free port; never someone else's Redis."""

    def __init__(self, workdir):
        exe = shutil.which('redis-server')
        need(exe, 'redis-server is not installed (apt-get install redis-server)')
        self.exe = exe
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f'redis://127.0.0.1:{self.port}/0'
        self.process = None
        self.start()

    def start(self):
        self.process = Process(f'redis-{self.port}', [
            self.exe, '--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
            '--appendonly', 'no', '--dir', str(self.dir)], dict(os.environ), self.dir)
        wait_for(self.ping, 10, message=f'redis-server on port {self.port}')

    def ping(self):
        try:
            with socket.create_connection(('127.0.0.1', self.port), timeout=0.5) as s:
                s.sendall(b'PING\r\n')
                return s.recv(16).startswith(b'+PONG')
        except OSError:
            return False

    def stop(self):
        if self.process is not None:
            self.process.stop(signal.SIGTERM, 10)
            wait_for(lambda: not self.ping(), 10, message='redis-server to stop')
            self.process = None


# host:port of a test deployment -> the admin's API token there; the test
# clients below (Api, Socket, SocketCrowd) send it to that deployment.
CREDENTIALS = {}
ADMIN = ('admin', 'admin-password')  # the user grant_admin creates


def auth_headers(url):
    """``{'Authorization': 'Bearer ...'}`` for the deployment serving ``url``, or ``{}``."""
    token = CREDENTIALS.get(urllib.parse.urlsplit(url).netloc)
    return {'Authorization': f'Bearer {token}'} if token else {}


@contextlib.contextmanager
def ledger(env):
    """A connection to ``env``'s ledger database, in one transaction (committed on leaving)."""
    engine = sa.create_engine(env['DATABASE_URL'])
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def add_user(env, name, role, password, token=False):
    """Create a user in ``env``'s ledger (and an API token for it if ``token``); the token or None.

    Written straight into the database (as ``flask users create`` and
    ``flask tokens create`` would write it), so no process is started.
    """
    import hashlib
    import secrets

    from werkzeug.security import generate_password_hash
    with ledger(env) as conn:
        user_id = conn.execute(sa.text(
            "INSERT INTO app_user (name, password_hash, role, session_epoch, created_at) "
            "VALUES (:name, :hash, :role, 1, CURRENT_TIMESTAMP) RETURNING id"),
            {'name': name, 'role': role,
             'hash': generate_password_hash(password, method='scrypt')}).scalar()
        if not token:
            return None
        value = 'qm_' + secrets.token_urlsafe(32)
        conn.execute(sa.text(
            "INSERT INTO api_token (user_id, name, token_hash, created_at) "
            "VALUES (:user, 'tests', :hash, CURRENT_TIMESTAMP)"),
            {'user': user_id, 'hash': hashlib.sha256(value.encode()).hexdigest()})
        return value


def grant_admin(env):
    """Create the admin user (:data:`ADMIN`) and an API token in ``env``'s ledger; the token."""
    return add_user(env, *ADMIN[:1], 'admin', ADMIN[1], token=True)


class Api:
    """A minimal JSON client over urllib (no extra dependency); sends the deployment's token."""

    def __init__(self, base_url):
        self.base = base_url.rstrip('/')

    def request(self, method, path, body=None, headers=None, raw=None, timeout=30):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header('Content-Type', 'application/json')
        for k, v in {**auth_headers(self.base), **(headers or {})}.items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        return status, payload

    def get(self, path):
        return self.request('GET', path)

    def post(self, path, body=None, **kw):
        return self.request('POST', path, body, **kw)

    def delete(self, path):
        return self.request('DELETE', path)

    def submit(self, task, params=None, **options):
        status, job = self.post('/api/jobs', {'task': task, 'params': params or {}, **options})
        assert status == 201, (status, job)
        return job

    def job(self, job_id):
        status, job = self.get(f'/api/jobs/{job_id}')
        assert status == 200, (status, job)
        return job

    def wait_state(self, job_id, states, timeout=30):
        states = (states,) if isinstance(states, str) else tuple(states)
        return wait_for(lambda: (lambda j: j if j['state'] in states else None)(self.job(job_id)),
                        timeout, 0.1, message=f'job {job_id} to reach {states}')

    def healthy(self):
        try:
            return self.get('/healthz')[0] == 200
        except OSError:
            return False


def service_env(tmp, redis_url=None, database_url=None, **extra):
    """Environment for a web or consumer process of one test deployment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('REDIS_URL', 'DATABASE_URL', 'QUEUE', 'QUEUES')}
    # PERIODIC=0: no report or purge job appears at the top of an hour in a
    # test that counts jobs; the periodic tests turn it on.
    env.update({'INSTANCE_PATH': str(tmp), 'SECRET_KEY': 'test-secret', 'PERIODIC': '0',
                'LOG_LEVEL': 'INFO', 'PYTHONUNBUFFERED': '1',
                'DATABASE_URL': database_url or f'sqlite:///{tmp}/ledger.db'})
    if redis_url:
        env['REDIS_URL'] = redis_url
    env.update({k: str(v) for k, v in extra.items()})
    return env


def migrate(env, log_dir):
    proc = Process('migrate', [str(BIN / 'flask'), '--app', 'wsgi', 'db', 'upgrade'], env, log_dir)
    assert proc.wait(120) == 0, proc.log()
    proc.stop()


def start_web(env, log_dir, name='web', workers=None):
    """gunicorn on a free port, once every one of its workers takes connections:
    ``(Process, Api)``."""
    port = free_port()
    env = dict(env, PORT=str(port), HOST='127.0.0.1')
    if workers is not None:
        env['WEB_CONCURRENCY'] = str(workers)
    proc = Process(name, [str(BIN / 'gunicorn'), '-c', 'gunicorn.conf.py', 'wsgi:app'], env, log_dir)
    api = Api(f'http://127.0.0.1:{port}')
    _started(proc, lambda: api.healthy())
    try:
        wait_workers_serving(proc.pid, port)
    except AssertionError:
        proc.stop()
        raise
    return proc, api


ESTABLISHED, LISTEN = '01', '0A'  # the state column of /proc/net/tcp


def socket_inodes(port, state):
    """Inodes of the IPv4 sockets on local ``port`` in ``state`` (``ESTABLISHED``, ``LISTEN``)."""
    inodes = set()
    for line in Path('/proc/net/tcp').read_text().splitlines()[1:]:
        fields = line.split()
        local, wanted, inode = fields[1], fields[3], fields[9]
        if wanted == state and int(local.rsplit(':', 1)[1], 16) == port:
            inodes.add(inode)
    return inodes


def sockets_of(pid):
    """Socket inodes among the open files of process ``pid``."""
    fd_dir = Path(f'/proc/{pid}/fd')
    out = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith('socket:['):
            out.add(target[len('socket:['):-1])
    return out


def proc_stat_fields(pid):
    """/proc/<pid>/stat after the command name: fields 3 onward (state, ppid, pgrp,
    session, ...; ``[11]`` and ``[12]`` are utime and stime in clock ticks)."""
    raw = Path(f'/proc/{pid}/stat').read_text()
    return raw[raw.rindex(')') + 2:].split()


def cpu_ticks(pid):
    """CPU time process ``pid`` has used so far (user and system), in clock ticks."""
    fields = proc_stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def worker_pids(master_pid):
    """The pids of a gunicorn master's workers (its children)."""
    return [int(pid) for pid in
            Path(f'/proc/{master_pid}/task/{master_pid}/children').read_text().split()]


def connections_by_worker(master_pid, port):
    """``{worker pid: connections it holds on local port}`` for a gunicorn master's workers."""
    accepted = socket_inodes(port, ESTABLISHED)
    return {pid: len(sockets_of(pid) & accepted) for pid in worker_pids(master_pid)}


def wait_workers_serving(master_pid, port, timeout=30):
    """Wait until every worker of a gunicorn master takes new connections.

    A worker's first answer comes a moment after its siblings' (each loads
    the app after its fork), and until then the others take every new
    connection: a test or benchmark that opens its keep-alive clients
    earlier has them all on one worker. Opens connections one after
    another (each asks ``/healthz``, any answer will do) and keeps them
    until each worker holds one; then closes them.
    """
    opened = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            held = connections_by_worker(master_pid, port)
            if held and all(held.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f'not every worker took a connection in {timeout} s: {held}')
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
            conn.request('GET', '/healthz')
            conn.getresponse().read()
            opened.append(conn)
            time.sleep(0.02)
    finally:
        for conn in opened:
            conn.close()


def _started(proc, ready, timeout=30):
    """Wait until ``proc`` is ready; stop it (and say why) if it never is."""
    try:
        wait_for(lambda: ready() or not proc.alive(), timeout, 0.1, message=f'{proc.name} to start')
        assert proc.alive(), f'{proc.name} exited:\n{proc.log()}'
    except AssertionError:
        proc.stop()
        raise


def start_consumer(env, log_dir, name='consumer', workers=4, extra_args=()):
    proc = Process(name, [str(BIN / 'huey_consumer'), 'huey_tasks.huey', '--workers', str(workers),
                          '--worker-type', 'thread', *extra_args], env, log_dir)
    _started(proc, lambda: 'Huey consumer started' in proc.log())
    return proc


class Deployment:
    """A whole deployment in one mode, with its logs printed on close.

    distributed: a private redis-server, gunicorn and huey_consumer sharing a
    SQLite ledger; embedded: gunicorn alone, consumers in-process.
    """

    def __init__(self, mode, tmp, web_workers=2, **env):
        self.mode, self.tmp, self.processes = mode, tmp, []
        self.redis = RedisServer(tmp / 'redis') if mode == 'distributed' else None
        self.env = service_env(tmp, self.redis.url if self.redis else None,
                               WEB_CONCURRENCY=web_workers, **env)
        migrate(self.env, tmp)
        # The distributed mode always asks for a login; the embedded one
        # (make run) needs none while no user exists, and is left so.
        self.token = grant_admin(self.env) if mode == 'distributed' else None
        self.web, self.api = start_web(self.env, tmp)
        self.port = int(self.api.base.rsplit(':', 1)[1])
        if self.token:
            CREDENTIALS[f'127.0.0.1:{self.port}'] = self.token
        self.processes.append(self.web)
        if self.redis:
            self.processes.append(start_consumer(self.env, tmp))

    @property
    def ws_base(self):
        return self.api.base.replace('http://', 'ws://')

    def sql(self, query, **params):
        """Rows of ``query`` on the deployment's ledger."""
        with ledger(self.env) as conn:
            return conn.execute(sa.text(query), params).all()

    def open(self, page, path, user=ADMIN):
        """Open ``path`` in ``page`` (Playwright), logged in as ``user`` ``(name, password)``
        where login is asked for.

        The distributed mode asks: the first visit logs in through the login
        form, which then leads to ``path``.
        """
        page.goto(self.api.base + path)
        if urllib.parse.urlsplit(page.url).path == '/login':
            page.fill('#login-name', user[0])
            page.fill('#login-password', user[1])
            page.click('.login button[type=submit]')
            page.wait_for_url(lambda url: urllib.parse.urlsplit(url).path != '/login')

    def restart_web(self, signum=signal.SIGTERM):
        """Stop the web server and start another on the same port."""
        self.web.stop(signum)
        self.processes.remove(self.web)
        env = dict(self.env, PORT=str(self.port), HOST='127.0.0.1')
        self.web = Process('web-restarted', [str(BIN / 'gunicorn'), '-c', 'gunicorn.conf.py',
                                             'wsgi:app'], env, self.tmp)
        self.processes.append(self.web)
        wait_for(lambda: self.api.healthy() or not self.web.alive(), 30, 0.1, 'web to restart')
        assert self.web.alive(), self.web.log()

    def close(self):
        CREDENTIALS.pop(f'127.0.0.1:{self.port}', None)
        for proc in reversed(self.processes):
            proc.stop()
            print(f'--- {proc.name} log (tail) ---\n{proc.log()[-3000:]}')
        if self.redis:
            self.redis.stop()


class _Client(simple_websocket.Client):
    """simple-websocket's client, keeping what arrives with the handshake answer.

    Its handshake reads the ``101`` answer and stops at the first event, so a
    message (or a close) that came in the same read waited, unseen, until the
    next one arrived; a server that sends its snapshot at once triggers that.
    """

    def handshake(self):
        super().handshake()
        self._handle_events()
        # A close among them is recorded; the reader thread then finds the
        # connection ended, and the constructor must not fail meanwhile.
        self.connected = True


class Socket:
    """A WebSocket client that reads every message on a thread of its own."""

    def __init__(self, url, headers=None):
        """Connect to ``url`` with ``headers`` (default: the deployment's token)."""
        headers = auth_headers(url) if headers is None else headers
        self.ws = _Client.connect(url, headers=headers or None)
        self.messages = []  # (monotonic time, text)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def on_message(self, msg):
        self.messages.append((time.monotonic(), msg))

    def _read(self):
        try:
            while True:
                msg = self.ws.receive()
                if msg is None:
                    break
                self.on_message(msg)
        except simple_websocket.ConnectionClosed:
            pass
        self.closed.set()

    @property
    def close_code(self):
        return self.ws.close_reason

    def close(self):
        try:
            self.ws.close()
        except simple_websocket.ConnectionClosed:
            pass


class SocketCrowd:
    """Many idle WebSocket clients on plain sockets: no thread each, for capacity tests.

    Opens ``count`` sockets to ``url`` one after another, each through
    wsproto's client handshake (which checks the server's ``101`` answer).
    Call :meth:`pump` (or :meth:`hold`) now and then: it reads what the
    server pushed and answers its pings, as a browser would, so the server
    keeps the sockets open.
    """

    def __init__(self, url, count, timeout=10.0):
        import resource
        from urllib.parse import urlsplit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < count + 512 and hard != soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
        parts = urlsplit(url)
        path = parts.path + ('?' + parts.query if parts.query else '')
        self.sockets, self.first, self.closed = [], [], []
        self._conns, self._parts = [], []
        for _ in range(count):
            s = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
            conn = WSConnection(ConnectionType.CLIENT)
            s.sendall(conn.send(Request(host=parts.netloc, target=path,
                                        extra_headers=list(auth_headers(url).items()))))
            i = len(self.sockets)
            self.sockets.append(s)
            self.first.append(None)
            self.closed.append(False)
            self._conns.append(conn)
            self._parts.append([])
            while conn.state is ConnectionState.CONNECTING:
                chunk = s.recv(4096)
                assert chunk, 'the server hung up during the handshake'
                self._take(i, chunk)
            assert conn.state is not ConnectionState.REJECTING, 'the upgrade was refused'
            s.setblocking(False)

    def _take(self, i, data):
        conn = self._conns[i]
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, RejectConnection):
                raise AssertionError(f'the upgrade was refused with {event.status_code}')
            if isinstance(event, Ping):
                try:
                    self.sockets[i].sendall(conn.send(event.response()))
                except OSError:
                    self.closed[i] = True
            elif self.first[i] is None:
                if isinstance(event, TextMessage):
                    self._parts[i].append(event.data)
                    if event.message_finished:
                        self.first[i] = TextMessage(''.join(self._parts[i]))
                        self._parts[i] = None
                elif isinstance(event, CloseConnection):
                    self.first[i] = event
            if isinstance(event, CloseConnection):
                return  # wsproto reads nothing after a close

    def pump(self):
        """Read whatever arrived on every socket; answer pings. Returns how many are open."""
        for i, s in enumerate(self.sockets):
            while not self.closed[i]:
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    break
                except OSError:
                    chunk = b''
                if not chunk:
                    self.closed[i] = True
                    break
                if self._conns[i].state is ConnectionState.OPEN:
                    self._take(i, chunk)
        return self.closed.count(False)

    def hold(self, seconds):
        """Keep the sockets open for ``seconds``, answering pings."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump()
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def first_events(self, timeout=60.0):
        """Each socket's first message: a whole ``TextMessage``, a ``CloseConnection``
        (wsproto events), or None if the server hung up without one."""
        wait_for(lambda: self.pump() is not None and all(
            f is not None or c for f, c in zip(self.first, self.closed)), timeout, 0.05,
            'a first message on every socket')
        return list(self.first)

    def still_open(self):
        """How many sockets the server has not closed."""
        return self.pump()

    def close(self):
        for s in self.sockets:
            s.close()
        self.sockets = []


class Stack:
    """Redis, a web process and any number of consumers, on one SQLite ledger.

    Consumers renew their lease every 0.5 s and count as dead 3 s after the
    last renewal, and the leader looks every second (``FAST``), so recovery
    happens within seconds.
    """
    FAST = dict(HEARTBEAT_INTERVAL=0.5, LOST_AFTER=3, REAP_INTERVAL=1)

    def __init__(self, tmp, **env):
        self.tmp = tmp
        self.redis = RedisServer(tmp / 'redis')
        self.env = service_env(tmp, self.redis.url, **{**self.FAST, **env})
        migrate(self.env, tmp)
        self.token = grant_admin(self.env)
        self.web, self.api = start_web(self.env, tmp, workers=1)
        CREDENTIALS[self.api.base.split('//', 1)[1]] = self.token
        self.consumers = []
        self.count = 0

    def consumer(self, ready=True, **env):
        """Start a consumer; with ``ready``, wait until its ledger writer has reported in."""
        self.count += 1
        proc = start_consumer(dict(self.env, **{k: str(v) for k, v in env.items()}), self.tmp,
                              name=f'consumer-{self.count}')
        self.consumers.append(proc)
        if ready:
            me = f'{socket.gethostname()}:{proc.pid}-'  # then the start id
            wait_for(lambda: any(w['id'].startswith(me)
                                 for w in self.api.get('/api/workers')[1]['workers']),
                     30, 0.05, f'{proc.name} to report in')
        return proc

    def sql(self, query, **params):
        with ledger(self.env) as conn:
            return conn.execute(sa.text(query), params).all()

    def execute(self, query, **params):
        with ledger(self.env) as conn:
            conn.execute(sa.text(query), params)

    @property
    def client(self):
        return redis.Redis.from_url(self.redis.url)

    def outcomes(self, job_id):
        return [a['state'] for a in self.api.job(job_id)['attempts']]

    def close(self):
        CREDENTIALS.pop(self.api.base.split('//', 1)[1], None)
        for proc in [*self.consumers, self.web]:
            proc.stop()
            print(f'--- {proc.name} ---\n{proc.log()[-4000:]}')
        self.redis.stop()

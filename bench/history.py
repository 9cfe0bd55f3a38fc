"""History at scale: every read, and the live pages' CPU, at a small and a large ledger.

For each size (``--small`` and ``--large`` jobs) the script seeds a fresh
ledger with ``bench/seed.py`` (the large SQLite file is kept between runs in
``$TMPDIR/qm-bench-history/``, keyed by its size, the migrations and the
seeding and writing code, and copied for each run; on PostgreSQL a seeded database is
kept as a template, ``qm_hist_<key>``), starts the product on each as
``make run`` does (``gunicorn -c gunicorn.conf.py wsgi:app``, embedded
mode, no ``REDIS_URL``; an admin token is made only if the server asks for
a login), both at once, and measures:

1. every page, fragment and API read: the median of ``--samples`` requests
   on one keep-alive connection per server (fewer when a read is slow: at
   most ``--budget`` seconds each, and at least 5), after a warm-up pass;
   the two servers are asked in turn, request by request, so that whatever
   else the shared machine does weighs on both sizes alike (measured one
   size after the other, minutes apart, ratios of reads of a few
   milliseconds moved by up to 2x between runs);
2. the web process's CPU (gunicorn and everything it started, embedded
   consumers included: utime + stime from /proc, as % of one core) while
   ``--rate`` jobs a second are submitted through ``POST /api/jobs`` for
   ``--flow-seconds``: first with no page open, then with three live pages
   open as WebSocket clients the way the browser opens them (``/ws?view=``
   dashboard, queues, failures; with an ``Origin`` header); the difference is
   what the open pages cost. The flows take turns: the small ledger's, the
   large one's, then the same with the pages open.

It prints one table with both figures, the ratio large/small, and whether
each read is under 50 ms at the large size and within 1.5x of the small.

Usage: python bench/history.py [--database-url URL] [--small 1000] [--large 1000000]
       [--samples 20] [--rate 60] [--flow-seconds 60] [--queues default,critical,bulk]

``--database-url postgresql://user@host/db`` runs both ledgers on that
PostgreSQL server (databases are created next to ``db`` and dropped after;
the seeded templates stay: drop them with ``dropdb qm_hist_...``).
"""
import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
sys.path.insert(0, str(ROOT))
from helpers import (BIN, CREDENTIALS, Process, Socket, add_user, auth_headers,  # noqa: E402
                     cpu_ticks, free_port, proc_stat_fields, wait_for)

CACHE = Path(tempfile.gettempdir()) / 'qm-bench-history'
NO_MATCH = 'zq-no-such-text-7f3a'
MATCH = 'gateway'  # in the error of every payment that timed out at the gateway
# In the parameters of about one job in seven (payments in euros): a search
# that fills a page at both sizes, where MATCH finds a handful of jobs in
# the small ledger and a page of them in the large one.
COMMON = 'EUR'
LIVE_PAGES = ('dashboard', 'queues', 'failures')
TARGET_MS, TARGET_RATIO = 50.0, 1.5


# -- ledgers ------------------------------------------------------------------------------

def migration_head():
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    cfg = Config()
    cfg.set_main_option('script_location', str(ROOT / 'migrations'))
    return ScriptDirectory.from_config(cfg).get_current_head()


def cache_key(n, queues, seed):
    """What a seeded ledger depends on: its size, the schema (the migrations' head and
    text), the seeding and writing code (``bench/seed.py``, ``app/ledger/``), queues, seed."""
    code = hashlib.sha256()
    for path in [ROOT / 'bench' / 'seed.py',
                 *sorted((ROOT / 'migrations' / 'versions').glob('*.py')),
                 *sorted((ROOT / 'app' / 'ledger').glob('*.py'))]:
        code.update(path.read_bytes())
    return f'{n}_{migration_head()}_{code.hexdigest()[:10]}_{queues.replace(",", "-")}_s{seed}'


def run_seed(url, n, queues, seed, instance):
    """``bench/seed.py`` into ``url``; its last line (the summary)."""
    env = _clean_env(INSTANCE_PATH=str(instance), LOG_LEVEL='WARNING')
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / 'bench' / 'seed.py'), '--jobs', str(n),
                          '--database-url', url, '--queues', queues, '--seed', str(seed)],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'seeding failed:\n{out.stdout}\n{out.stderr}')
    line = out.stdout.strip().splitlines()[-1]
    print(f'  seeded in {time.monotonic() - started:.0f} s: {line}', flush=True)
    return line


class SqliteLedgers:
    """Seeded SQLite files: made once per key (large ones kept), copied for each run."""

    def __init__(self, work, keep_above=10_000):
        self.work = work
        self.keep_above = keep_above

    def fresh(self, n, queues, seed):
        """A fresh copy of a seeded ledger of ``n`` jobs: ``(url, cleanup)``."""
        run = Path(tempfile.mkdtemp(prefix=f'run-{n}-', dir=self.work))
        target = run / 'ledger.db'
        key = cache_key(n, queues, seed)
        cached = CACHE / key / 'ledger.db'
        if n > self.keep_above and cached.exists():
            print(f'  ledger of {n} jobs from the cache ({cached})', flush=True)
            shutil.copyfile(cached, target)
            _on_disk(target)
        else:
            run_seed(f'sqlite:///{target}', n, queues, seed, run)
            _checkpoint(target)
            if n > self.keep_above:
                cached.parent.mkdir(parents=True, exist_ok=True)
                partial = cached.with_suffix(f'.{os.getpid()}')
                shutil.copyfile(target, partial)
                _on_disk(partial)
                partial.rename(cached)
        return f'sqlite:///{target}', lambda: None

    def close(self):
        pass


def _on_disk(path):
    """Wait until a copied file is written out: the kernel writing 2 GB of a copy back
    while reads are timed slowed every one of them, ``/healthz`` included, by a third."""
    with open(path, 'rb+') as f:
        os.fsync(f.fileno())


def _checkpoint(path):
    """Everything in the database file itself (none in a -wal beside it), for copying."""
    conn = sqlite3.connect(path)
    try:
        conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    finally:
        conn.close()


class PostgresLedgers:
    """Seeded databases kept as templates on one server; each run gets a copy, dropped after."""

    def __init__(self, url):
        self.url = url.replace('postgresql+psycopg://', 'postgresql://', 1)
        self.base = self.url.rpartition('/')[0]
        self.runs = 0

    def _admin(self, sql):
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql).fetchall() if sql.lstrip().startswith('SELECT') else \
                conn.execute(sql)

    def fresh(self, n, queues, seed):
        key = hashlib.sha256(cache_key(n, queues, seed).encode()).hexdigest()[:12]
        template = f'qm_hist_{key}'
        exists = self._admin(f"SELECT 1 FROM pg_database WHERE datname = '{template}'")
        if exists:
            print(f'  ledger of {n} jobs from the template database {template}', flush=True)
        else:
            self._admin(f'CREATE DATABASE {template}_partial')
            try:
                run_seed(f'{self.base}/{template}_partial', n, queues, seed,
                         Path(tempfile.mkdtemp(prefix='qm-seed-')))
                self._admin(f'ALTER DATABASE {template}_partial RENAME TO {template}')
            except BaseException:
                self._admin(f'DROP DATABASE IF EXISTS {template}_partial WITH (FORCE)')
                raise
        self.runs += 1  # two copies of one size may be open at once
        name = f'qm_hist_run_{os.getpid()}_{n}_{self.runs}'
        self._admin(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
        self._admin(f'CREATE DATABASE {name} TEMPLATE {template}')
        return (f'{self.base}/{name}',
                lambda: self._admin(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)'))

    def close(self):
        pass


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ('REDIS_URL', 'DATABASE_URL', 'QUEUE', 'QUEUES')}
    env.update(extra)
    return env


# -- the server ---------------------------------------------------------------------------

class Server:
    """The product as ``make run`` starts it, on ``url``'s ledger."""

    def __init__(self, url, queues, run_dir):
        self.port = free_port()
        self.env = _clean_env(INSTANCE_PATH=str(run_dir), DATABASE_URL=url, QUEUES=queues,
                              HOST='127.0.0.1', PORT=str(self.port), SECRET_KEY='bench-history',
                              PYTHONUNBUFFERED='1')
        self.base = f'http://127.0.0.1:{self.port}'
        self.proc = Process('web', [str(BIN / 'gunicorn'), '-c', 'gunicorn.conf.py', 'wsgi:app'],
                            self.env, run_dir)
        wait_for(lambda: self._healthy() or not self.proc.alive(), 120, 0.2, 'gunicorn to start')
        if not self.proc.alive():
            raise RuntimeError(f'gunicorn exited:\n{self.proc.log()[-3000:]}')
        status = self.get_status('/api/stats')
        if status in (401, 403):
            # Login is asked for (AUTH=login in the environment, say): an admin token.
            CREDENTIALS[f'127.0.0.1:{self.port}'] = add_user(
                self.env, 'bench', 'admin', 'bench-password', token=True)

    def _healthy(self):
        try:
            return self.get_status('/healthz') == 200
        except OSError:
            return False

    def get_status(self, path):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
        try:
            conn.request('GET', path, headers=auth_headers(self.base))
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def pids(self):
        """gunicorn's master and every process it started (its session)."""
        out = []
        for entry in Path('/proc').iterdir():
            if entry.name.isdigit():
                try:
                    fields = proc_stat_fields(entry.name)
                except OSError:
                    continue
                if int(fields[3]) == self.proc.pid:  # session id (field 6)
                    out.append(int(entry.name))
        return out

    def cpu_seconds(self):
        """utime + stime of every process of the server so far."""
        tick = os.sysconf('SC_CLK_TCK')
        total = 0
        for pid in self.pids():
            try:
                total += cpu_ticks(pid)
            except OSError:
                continue
        return total / tick

    def stop(self):
        CREDENTIALS.pop(f'127.0.0.1:{self.port}', None)
        # SIGINT: running jobs go back to the queue at once (as Ctrl-C does).
        self.proc.stop(signal.SIGINT, timeout=30)


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, server):
        self.server = server
        self.conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=120)
        self.headers = {**auth_headers(server.base), 'Accept': 'text/html,application/json'}

    def request(self, method, path, body=None):
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers['Content-Type'] = 'application/json'
        for retry in (False, True):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if retry:
                    raise
                self.conn.close()  # the server closed the idle connection: a new one

    def get_json(self, path):
        status, body = self.request('GET', path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def close(self):
        self.conn.close()


# -- measuring ----------------------------------------------------------------------------

def reads(client):
    """``[(label, path)]``: every page, fragment and API read, on jobs that exist."""
    failed = client.get_json('/api/jobs?state=failed&limit=50')['jobs']
    job = max(failed, key=lambda j: j['attempt_count'])['id'] if failed else \
        client.get_json('/api/jobs?limit=1')['jobs'][0]['id']
    page2 = client.get_json('/api/jobs?limit=50').get('next')
    longest2 = client.get_json('/api/jobs?sort=runtime&limit=50').get('next')
    q = urllib.parse.quote
    return [
        ('page /', '/'),
        ('page /jobs', '/jobs'),
        ('page /jobs?q=<no match>', f'/jobs?q={q(NO_MATCH)}'),
        (f'page /jobs?q={MATCH}', f'/jobs?q={MATCH}'),
        (f'page /jobs?q={COMMON}', f'/jobs?q={COMMON}'),
        ('page /jobs?state=failed', '/jobs?state=failed'),
        ('page /jobs?queue=critical', '/jobs?queue=critical'),
        ('page /jobs?task=payment', '/jobs?task=payment'),
        ('page /jobs, page 2', f'/jobs?cursor={q(page2)}' if page2 else '/jobs'),
        ('page /jobs?sort=oldest', '/jobs?sort=oldest'),
        ('page /jobs?sort=runtime', '/jobs?sort=runtime'),
        (f'page /jobs?sort=runtime&q={COMMON}', f'/jobs?sort=runtime&q={COMMON}'),
        ('page /jobs?sort=runtime, page 2',
         f'/jobs?sort=runtime&cursor={q(longest2)}' if longest2 else '/jobs?sort=runtime'),
        ('page /jobs/<id>', f'/jobs/{job}'),
        ('page /queues', '/queues'),
        ('page /failures', '/failures'),
        ('page /scheduled', '/scheduled'),
        ('page /workers', '/workers'),
        ('page /periodic', '/periodic'),
        ('page /audit', '/audit'),
        ('page /jobs/new', '/jobs/new'),
        ('fragment /stats', '/stats'),
        ('fragment /jobs/<id>/row', f'/jobs/{job}/row'),
        ('fragment /jobs/<id>/summary', f'/jobs/{job}/summary'),
        ('fragment /jobs/<id>/attempts', f'/jobs/{job}/attempts'),
        ('poll /ws?view=dashboard', '/ws?view=dashboard'),
        ('poll /ws?view=jobs', '/ws?view=jobs'),
        ('poll /ws?view=queues', '/ws?view=queues'),
        ('poll /ws?view=failures', '/ws?view=failures'),
        ('poll /ws?view=scheduled', '/ws?view=scheduled'),
        ('api /api/jobs', '/api/jobs'),
        ('api /api/jobs?q=<no match>', f'/api/jobs?q={q(NO_MATCH)}'),
        (f'api /api/jobs?q={MATCH}', f'/api/jobs?q={MATCH}'),
        (f'api /api/jobs?q={COMMON}', f'/api/jobs?q={COMMON}'),
        ('api /api/jobs?state=failed', '/api/jobs?state=failed'),
        ('api /api/jobs?sort=runtime', '/api/jobs?sort=runtime'),
        ('api /api/jobs?sort=runtime&state=failed', '/api/jobs?sort=runtime&state=failed'),
        (f'api /api/jobs?sort=runtime&q={MATCH}', f'/api/jobs?sort=runtime&q={MATCH}'),
        ('api /api/jobs/<id>', f'/api/jobs/{job}'),
        ('api /api/jobs/<id>/log', f'/api/jobs/{job}/log'),
        ('api /api/stats', '/api/stats'),
        ('api /api/failures', '/api/failures'),
        ('api /api/scheduled', '/api/scheduled'),
        ('api /api/queues', '/api/queues'),
        ('api /api/workers', '/api/workers'),
        ('api /api/periodic', '/api/periodic'),
        ('api /api/tasks', '/api/tasks'),
        ('/healthz', '/healthz'),
    ]


def time_reads(sides, samples, budget):
    """``{side: {label: median seconds}}`` of each read on each side, interleaved.

    ``sides`` is ``{side: (client, paths)}`` with the same labels on every
    side. Each sample asks every side in turn (the order alternating from
    one sample to the next), so that what else the shared machine does
    meanwhile weighs on all sides alike; ``samples`` per read and side, or
    as many as ``budget`` s allow (at least 5).
    """
    for client, paths in sides.values():  # warm-up pass: caches, compiled statements, templates
        for _label, path in paths:
            status, body = client.request('GET', path)
            assert status == 200, (path, status, body[:300])
    names = list(sides)
    out = {name: {} for name in names}
    for k, label in enumerate(label for label, _path in sides[names[0]][1]):
        times = {name: [] for name in names}
        spent = 0.0
        while len(times[names[0]]) < samples and (len(times[names[0]]) < 5 or spent < budget):
            turn = names if len(times[names[0]]) % 2 == 0 else names[::-1]
            for name in turn:
                client, paths = sides[name]
                path = paths[k][1]
                started = time.perf_counter()
                status, _ = client.request('GET', path)
                took = time.perf_counter() - started
                assert status == 200, (path, status)
                times[name].append(took)
                spent += took
        for name in names:
            out[name][label] = statistics.median(times[name])
    return out


FLOW = (('noop', {}, {}), ('noop', {}, {}), ('noop', {}, {}), ('noop', {}, {}),
        ('noop', {}, {}), ('noop', {}, {}), ('noop', {}, {}), ('noop', {}, {}),
        ('noop', {}, {}), ('noop', {}, {}), ('noop', {}, {}), ('noop', {}, {}),
        ('noop', {}, {}), ('noop', {}, {}), ('noop', {}, {}), ('noop', {}, {}),
        ('payment', {'failure_rate': 0.2, 'latency': 0.05}, {}),
        ('payment', {'failure_rate': 0.2, 'latency': 0.05}, {}),
        ('payment', {'failure_rate': 0.2, 'latency': 0.05}, {}),
        ('fail', {'message': 'bench: a job that fails'}, {'retries': 0}))


def job_flow(server, rate, seconds, threads=4):
    """Submit ``rate`` jobs a second for ``seconds`` through the API; ``(ids, CPU s, wall s)``.

    The mix: mostly noop, some payments (a fifth time out and are retried),
    a few that fail for good (the failures page changes too).
    """
    submitted = [[] for _ in range(threads)]
    errors = []
    start = time.monotonic() + 0.2
    period = threads / rate

    def submit(k):
        client = Client(server)
        try:
            i = 0
            while True:
                due = start + (k / rate) + i * period
                if due >= start + seconds:
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                task, params, options = FLOW[(i * threads + k) % len(FLOW)]
                status, body = client.request('POST', '/api/jobs',
                                              {'task': task, 'params': params, **options})
                if status != 201:
                    errors.append((status, body[:200]))
                else:
                    submitted[k].append(json.loads(body)['id'])
                i += 1
        finally:
            client.close()

    workers = [threading.Thread(target=submit, args=(k,)) for k in range(threads)]
    cpu0, wall0 = server.cpu_seconds(), time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    cpu, wall = server.cpu_seconds() - cpu0, time.monotonic() - wall0
    if errors:
        print(f'  {len(errors)} submissions refused, e.g. {errors[0]}', flush=True)
    return [i for ids in submitted for i in ids], cpu, wall


def drained(client, ids, timeout=60):
    """Wait until the last jobs of a flow have run (the consumers are idle again)."""
    def idle():
        return all(client.get_json(f'/api/jobs/{i}')['state'] not in ('queued', 'running')
                   for i in ids[-8:])
    try:
        wait_for(idle, timeout, 0.5, 'the jobs to drain')
    except AssertionError as exc:
        print(f'  (not drained: {exc})', flush=True)


class Page(Socket):
    """A live page's socket, as the browser opens it: counts what arrives."""

    def __init__(self, url, origin):
        self.received = 0
        super().__init__(url, headers={**auth_headers(url), 'Origin': origin})

    def on_message(self, msg):
        self.received += len(msg)
        super().on_message(msg)


def flow_cpu(server, client, rate, seconds):
    """CPU % of one core under the job flow, no page open: ``(jobs, percent)``."""
    ids, cpu, wall = job_flow(server, rate, seconds)
    drained(client, ids)
    return len(ids), 100 * cpu / wall


def pages_cpu(server, client, rate, seconds):
    """CPU % of one core under the job flow with three live pages open:
    ``(jobs, percent, messages per page, close codes of sockets that closed)``."""
    ws = server.base.replace('http://', 'ws://')
    # The Origin a browser sends names the page's host, as the Host header does;
    # simple-websocket's Host leaves the port out, so the Origin does too.
    pages = [Page(f'{ws}/ws?view={view}', 'http://127.0.0.1') for view in LIVE_PAGES]
    try:
        wait_for(lambda: all(p.messages for p in pages), 30, 0.1, 'every page\'s snapshot')
        before = [len(p.messages) for p in pages]
        ids, cpu, wall = job_flow(server, rate, seconds)
        messages = [len(p.messages) - b for p, b in zip(pages, before)]
        closed = [p.close_code for p in pages if p.closed.is_set()]
    finally:
        for p in pages:
            p.close()
    drained(client, ids)
    return len(ids), 100 * cpu / wall, messages, closed


class Side:
    """One size's ledger and server, started; :meth:`close` stops both."""

    def __init__(self, ledgers, n, args, work):
        print(f'\n{n} jobs:', flush=True)
        self.url, self.cleanup = ledgers.fresh(n, args.queues, args.seed)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f'web-{n}-', dir=work))
        self.server = self.client = None
        try:
            self.server = Server(self.url, args.queues, self.run_dir)
            self.client = Client(self.server)
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
        self.cleanup()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def measure(ledgers, args, work):
    """Both sizes' servers at once: their reads interleaved (:func:`time_reads`), then the
    live CPU, the flows taking turns (small, large, small with pages, large with pages).
    Returns ``(small, large)``, each ``(reads, live)``."""
    sides = {}  # by 'small' and 'large' (the sizes may be equal: a check of the noise)
    try:
        for name, n in (('small', args.small), ('large', args.large)):
            sides[name] = Side(ledgers, n, args, work)
        time.sleep(2)  # the embedded consumers start; the reapers' first passes
        paths = {name: reads(side.client) for name, side in sides.items()}
        print(f'\ntiming {len(paths["small"])} reads on both, interleaved', flush=True)
        timed = time_reads({name: (side.client, paths[name]) for name, side in sides.items()},
                           args.samples, args.budget)
        print(f'live pages under {args.rate} jobs/s for {args.flow_seconds:g} s, '
              f'the sizes taking turns', flush=True)
        live = {name: {} for name in sides}
        for name, side in sides.items():
            live[name]['flow_jobs'], live[name]['flow_cpu'] = flow_cpu(
                side.server, side.client, args.rate, args.flow_seconds)
        for name, side in sides.items():
            (live[name]['pages_jobs'], live[name]['pages_cpu'], live[name]['messages'],
             live[name]['closed']) = pages_cpu(side.server, side.client, args.rate,
                                               args.flow_seconds)
    finally:
        for side in sides.values():
            side.close()
    return (timed['small'], live['small']), (timed['large'], live['large'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--database-url', help='a PostgreSQL server (default: SQLite files)')
    parser.add_argument('--small', type=int, default=1000)
    parser.add_argument('--large', type=int, default=1_000_000)
    parser.add_argument('--samples', type=int, default=20, help='requests per read (median)')
    parser.add_argument('--budget', type=float, default=10.0,
                        help='seconds at most per read (5 requests at least)')
    parser.add_argument('--rate', type=float, default=60.0, help='jobs submitted per second')
    parser.add_argument('--flow-seconds', type=float, default=60.0)
    parser.add_argument('--queues', default='default,critical,bulk')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix='qm-bench-history-'))
    if args.database_url and args.database_url.startswith(('postgres://', 'postgresql')):
        url = args.database_url.replace('postgres://', 'postgresql://', 1)
        ledgers = PostgresLedgers(url)
    else:
        ledgers = SqliteLedgers(work)
    try:
        small, large = measure(ledgers, args, work)
    finally:
        ledgers.close()
        shutil.rmtree(work, ignore_errors=True)
    report(args, small, large)


def report(args, small, large):
    (reads_s, live_s), (reads_l, live_l) = small, large
    ms = lambda s: f'{s * 1000:8.1f}'  # noqa: E731
    width = max(len(label) for label in reads_s) + 2
    print(f'\nReads: median of up to {args.samples} requests (keep-alive), ms')
    print(f'{"":{width}}{args.small:>9}{args.large:>9}{"ratio":>8}  <{TARGET_MS:.0f} ms  '
          f'<={TARGET_RATIO}x')
    misses = 0
    for label, small_s in reads_s.items():
        large_s = reads_l[label]
        ratio = large_s / small_s if small_s else float('inf')
        fast, flat = large_s * 1000 < TARGET_MS, ratio <= TARGET_RATIO
        misses += not (fast and flat)
        print(f'{label:{width}}{ms(small_s)} {ms(large_s)}{ratio:8.2f}  '
              f'{"yes" if fast else "NO":>6}  {"yes" if flat else "NO":>6}')
    print(f'{misses} of {len(reads_s)} reads miss a target')
    print(f'\nLive: web process CPU, % of one core, at {args.rate:g} jobs/s for '
          f'{args.flow_seconds:g} s')
    print(f'{"":32}{args.small:>9}{args.large:>9}{"ratio":>8}')
    rows = [('job flow, no page open', 'flow_cpu'),
            ('job flow + 3 live pages', 'pages_cpu')]
    for label, key in rows:
        a, b = live_s[key], live_l[key]
        print(f'{label:32}{a:9.1f}{b:9.1f}{b / a if a else float("inf"):8.2f}')
    pa, pb = live_s['pages_cpu'] - live_s['flow_cpu'], live_l['pages_cpu'] - live_l['flow_cpu']
    print(f'{"the 3 pages (difference)":32}{pa:9.1f}{pb:9.1f}'
          f'{pb / pa if pa > 0 else float("nan"):8.2f}')
    for name, live in (('small', live_s), ('large', live_l)):
        print(f'  {name}: {live["flow_jobs"]} and {live["pages_jobs"]} jobs submitted; '
              f'messages to {", ".join(LIVE_PAGES)}: {", ".join(map(str, live["messages"]))}'
              + (f'; sockets closed: {live["closed"]}' if live['closed'] else ''))


if __name__ == '__main__':
    main()

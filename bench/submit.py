"""Submission rate: raw Huey's enqueue against queue-manager's ways in, in one run.

Every side runs against its own private redis-server and, for
queue-manager, its own SQLite ledger (distributed mode: the web processes
and the producers share them, as a deployment's do). No consumer runs: what
is measured is how fast jobs get in, each one recorded (its row committed)
and its message in the broker before the call that submitted it returns.

- raw Huey: a plain ``PriorityRedisHuey`` (results off), ``noop()`` called
  one by one in one process: a message per call, nothing recorded.
- single POST: ``POST /api/jobs`` with ``{"task": "noop"}``, gunicorn with
  2 workers (``WEB_CONCURRENCY=2``), 8 client threads each on one keep-alive
  connection, an admin's API token; every answer must be a 201.
- batch: ``POST /api/jobs/batch`` with 1,000 jobs a call, 2 client threads.
- Python producer: ``noop.submit()`` one by one, then ``submit_many`` with
  1,000 jobs a call, in a process started with the deployment's environment.
- baseline (``--baseline REV``): single POST as above, served by the
  project as it was at commit ``REV`` (its files from ``git archive``, run
  with this checkout's virtualenv and its own test helpers), so that a
  speed-up is a ratio measured in one run on one machine, not a figure
  from another day. ``ed7bcee`` is the last commit before the ledger kept
  its counters and submissions were grouped: the single POST the target
  (3x) is set against.

Each side's figure is jobs/s over its whole run, the best of ``--repeat``
runs (sides alternate, so load drifting on a shared machine favours none).
Single POST also reports the web workers' CPU time per request (from
``/proc``, microseconds). Afterwards the ledger of the queue-manager sides is
checked: every job answered has its row, and the broker holds as many
messages.

Usage: python bench/submit.py [--jobs 20000] [--repeat 3] [--only raw,single,batch,python]
       [--baseline REV]
"""
import argparse
import http.client
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
sys.path.insert(0, str(ROOT))
import helpers  # noqa: E402

SIDES = ('raw', 'single', 'batch', 'python')
BATCH = 1000

# Raw Huey, one enqueue per call; prints the jobs/s it took.
RAW = '''
import os, sys, time
from huey import PriorityRedisHuey
huey = PriorityRedisHuey('raw', results=False, url=os.environ['RAW_REDIS_URL'])

@huey.task()
def noop():
    return None

n = int(sys.argv[1])
noop()  # the connection opened before the clock starts, as the others' are
start = time.perf_counter()
for _ in range(n):
    noop()
print(n / (time.perf_counter() - start))
'''

# The Python producer API, one by one then in batches; prints {kind: jobs/s}.
PRODUCER = '''
import json, sys, time
import huey_tasks
from app import producer
n, batch = int(sys.argv[1]), int(sys.argv[2])
huey_tasks.noop.submit()  # the process's app built before the clock starts
start = time.perf_counter()
for _ in range(n):
    huey_tasks.noop.submit()
one = n / (time.perf_counter() - start)
start = time.perf_counter()
for _ in range(n // batch):
    producer.submit_many([huey_tasks.noop.job() for _ in range(batch)])
many = (n // batch * batch) / (time.perf_counter() - start)
print(json.dumps({'submit': one, 'submit_many': many}))
'''


def raw_rate(tmp, jobs):
    redis = helpers.RedisServer(tmp / f'redis-raw-{time.monotonic_ns()}')
    try:
        work = Path(tempfile.mkdtemp(dir=tmp))
        (work / 'raw_tasks.py').write_text(RAW)
        out = subprocess.run([sys.executable, str(work / 'raw_tasks.py'), str(jobs)],
                             env=dict(os.environ, RAW_REDIS_URL=redis.url), cwd=work,
                             check=True, capture_output=True, text=True)
        return float(out.stdout.split()[-1])
    finally:
        redis.stop()


class Deployment:
    """A private redis-server, a migrated SQLite ledger, an admin token; gunicorn on demand.

    ``kit``: the test helpers of the checkout to deploy (this one's by
    default; a baseline's own, which start its processes in its tree).
    """

    def __init__(self, tmp, kit=helpers):
        self.kit = kit
        self.tmp = Path(tempfile.mkdtemp(dir=tmp))
        self.redis = kit.RedisServer(self.tmp / 'redis')
        self.env = kit.service_env(self.tmp, self.redis.url, LOG_LEVEL='WARNING',
                                   WEB_CONCURRENCY=2)
        kit.migrate(self.env, self.tmp)
        self.token = kit.grant_admin(self.env)
        self.web = None

    def start_web(self):
        self.web, api = self.kit.start_web(self.env, self.tmp, workers=2)
        self.port = int(api.base.rsplit(':', 1)[1])
        self.kit.CREDENTIALS[f'127.0.0.1:{self.port}'] = self.token

    def workers_cpu(self):
        """Seconds of CPU the web workers have used so far (user and system)."""
        ticks = sum(helpers.cpu_ticks(pid) for pid in helpers.worker_pids(self.web.pid))
        return ticks / os.sysconf('SC_CLK_TCK')

    def rows(self):
        import sqlalchemy as sa
        engine = sa.create_engine(self.env['DATABASE_URL'])
        with engine.connect() as conn:
            count = conn.execute(sa.text('SELECT count(*) FROM job')).scalar()
        engine.dispose()
        return count

    def messages(self):
        import redis
        return redis.Redis.from_url(self.redis.url).zcard('huey.redis.qm.default')

    def close(self):
        if self.web is not None:
            self.web.stop()
        self.redis.stop()


def post_all(port, token, path, bodies, threads):
    """POST each of ``bodies`` (bytes) from ``threads`` keep-alive clients; (seconds, answers)."""
    headers = {'Content-Type': 'application/json', 'Authorization': f'Bearer {token}'}
    answers, errors = [], []
    shares = [bodies[i::threads] for i in range(threads)]
    start_line = threading.Barrier(threads + 1)

    def client(share):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        start_line.wait()
        try:
            for body in share:
                conn.request('POST', path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 201:
                    errors.append((resp.status, data[:300]))
                    return
                answers.append(data)
        except Exception as exc:  # reported below, with the others
            errors.append(('client', repr(exc)))
        finally:
            conn.close()

    workers = [threading.Thread(target=client, args=(s,)) for s in shares]
    for w in workers:
        w.start()
    start_line.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    took = time.perf_counter() - start
    if errors:
        raise SystemExit(f'{len(errors)} requests failed, e.g. {errors[0]}')
    return took, answers


def single_rate(dep, jobs, threads=8):
    """``(jobs/s, answers, workers' CPU microseconds per request)`` of single POSTs."""
    body = json.dumps({'task': 'noop'}).encode()
    post_all(dep.port, dep.token, '/api/jobs', [body] * 50, threads)  # warm both workers
    cpu = dep.workers_cpu()
    took, answers = post_all(dep.port, dep.token, '/api/jobs', [body] * jobs, threads)
    return jobs / took, len(answers), (dep.workers_cpu() - cpu) / jobs * 1e6


def baseline_kit(tmp, rev):
    """The test helpers of the project at commit ``rev``, in a copy of its files under
    ``tmp``; raises SystemExit when git cannot give that commit."""
    tree = Path(tempfile.mkdtemp(dir=tmp, prefix='baseline-'))
    archive = subprocess.run(['git', '-C', str(ROOT), 'archive', '--format=tar', rev],
                             capture_output=True)
    if archive.returncode:
        raise SystemExit(f'--baseline {rev}: {archive.stderr.decode(errors="replace").strip()}')
    subprocess.run(['tar', '-x', '-C', str(tree)], input=archive.stdout, check=True)
    if not (tree / 'tests' / 'helpers.py').is_file():
        raise SystemExit(f'--baseline {rev}: that commit has no tests/helpers.py to deploy it with')
    spec = importlib.util.spec_from_file_location('baseline_helpers', tree / 'tests' / 'helpers.py')
    kit = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(tree / 'tests'))  # for what its helpers import beside them
    try:
        spec.loader.exec_module(kit)
    finally:
        sys.path.remove(str(tree / 'tests'))
    return kit


def batch_rate(dep, jobs, threads=2):
    body = json.dumps({'jobs': [{'task': 'noop'}] * BATCH}).encode()
    post_all(dep.port, dep.token, '/api/jobs/batch', [body] * 2, threads)
    calls = max(1, jobs // BATCH)
    took, answers = post_all(dep.port, dep.token, '/api/jobs/batch', [body] * calls, threads)
    assert all(len(json.loads(a)['jobs']) == BATCH for a in answers)
    return calls * BATCH / took, calls * BATCH


def python_rates(dep, jobs):
    out = subprocess.run([sys.executable, '-c', PRODUCER, str(jobs), str(BATCH)], env=dep.env,
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f'the producer failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=int, default=20000, help='jobs per side and run')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--only', default=','.join(SIDES),
                        help='comma-separated sides to run: ' + ', '.join(SIDES))
    parser.add_argument('--baseline', metavar='REV',
                        help='also single POST as served at this commit (e.g. ed7bcee)')
    args = parser.parse_args()
    sides = [s for s in args.only.split(',') if s]
    for side in sides:
        if side not in SIDES:
            parser.error(f'unknown side {side!r}')

    tmp = Path(tempfile.mkdtemp(prefix='qm-bench-submit-'))
    try:
        kit = baseline_kit(tmp, args.baseline) if args.baseline else None
        best, cpu = {}, {}
        for i in range(args.repeat):
            if kit is not None:
                dep = Deployment(tmp, kit)
                try:
                    dep.start_web()
                    rate, _n, us = single_rate(dep, args.jobs)
                finally:
                    dep.close()
                best['baseline'] = max(best.get('baseline', 0), rate)
                cpu.setdefault('baseline', []).append(us)
                print(f'  run {i + 1}: single POST at {args.baseline:9} {rate:8.0f} jobs/s'
                      f'  ({us:.0f} us of workers\' CPU a request)', flush=True)
            if 'raw' in sides:
                rate = raw_rate(tmp, args.jobs)
                best['raw'] = max(best.get('raw', 0), rate)
                print(f'  run {i + 1}: raw Huey enqueue        {rate:8.0f} jobs/s', flush=True)
            if not set(sides) - {'raw'}:
                continue
            dep = Deployment(tmp)
            expected = 0
            try:
                if {'single', 'batch'} & set(sides):
                    dep.start_web()
                if 'single' in sides:
                    rate, n, us = single_rate(dep, args.jobs)
                    expected += n + 50
                    best['single'] = max(best.get('single', 0), rate)
                    cpu.setdefault('single', []).append(us)
                    print(f'  run {i + 1}: single POST            {rate:8.0f} jobs/s'
                          f'  ({us:.0f} us of workers\' CPU a request)', flush=True)
                if 'batch' in sides:
                    rate, n = batch_rate(dep, args.jobs)
                    expected += n + 2 * BATCH
                    best['batch'] = max(best.get('batch', 0), rate)
                    print(f'  run {i + 1}: batch POST (1,000)     {rate:8.0f} jobs/s', flush=True)
                if 'python' in sides:
                    rates = python_rates(dep, args.jobs)
                    expected += args.jobs + 1 + args.jobs // BATCH * BATCH
                    for kind, rate in rates.items():
                        best[kind] = max(best.get(kind, 0), rate)
                        print(f'  run {i + 1}: Python {kind:15} {rate:8.0f} jobs/s', flush=True)
                rows, messages = dep.rows(), dep.messages()
                if rows != expected or messages != expected:
                    raise SystemExit(f'expected {expected} jobs recorded and queued; the ledger '
                                     f'holds {rows} rows, the broker {messages} messages')
            finally:
                dep.close()

        print(f'\nSubmission rate, noop jobs, {args.jobs} per side and run, best of {args.repeat}')
        labels = {'raw': 'raw Huey, enqueue one by one',
                  'baseline': f'POST /api/jobs at {args.baseline} (8 clients)',
                  'single': 'POST /api/jobs (8 clients)',
                  'batch': 'POST /api/jobs/batch (1,000 a call)',
                  'submit': 'Python noop.submit() one by one',
                  'submit_many': 'Python submit_many (1,000 a call)'}
        for key, label in labels.items():
            if key not in best:
                continue
            ratios = []
            if 'raw' in best and key not in ('raw', 'baseline'):
                ratios.append(f'{best[key] / best["raw"]:.2f}x raw')
            if 'single' in best and key not in ('raw', 'single', 'baseline'):
                ratios.append(f'{best[key] / best["single"]:.1f}x single POST')
            if key == 'single' and 'baseline' in best:
                ratios.append(f'{best[key] / best["baseline"]:.2f}x at {args.baseline}')
            if key in cpu:
                ratios.append(f'workers\' CPU {min(cpu[key]):.0f} us a request at best')
            print(f'  {label:44} {best[key]:8.0f} jobs/s  {", ".join(ratios)}')
        print('  targets: batch >= 2x raw Huey; single POST >= 3x the single POST of ed7bcee '
              '(about 333 jobs/s on the day it was set, so 1,000 jobs/s)')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ledgers and Redis files of every run


if __name__ == '__main__':
    main()

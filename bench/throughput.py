"""Throughput: raw Huey against the same jobs through queue-manager, in one run.

Both sides run the same consumer (one ``huey_consumer`` process, 4 worker
threads, ``-q``) on the same storage class (PriorityRedisHuey, results off)
against a private redis-server, on a backlog of ``noop`` jobs enqueued before
the consumer starts. Raw Huey's time is taken by a signal handler counting
completions (first start to last finish); queue-manager's from the ledger
(min started_at to max finished_at over the jobs), so each side is measured
by what it itself records. Sides alternate and the best of ``--repeat`` runs
of each is reported, which keeps a noisy shared machine from favouring one.

Then pickup latency (enqueue to start): with each side's consumer idle, a
producer enqueues ``--pickup`` jobs one at a time, 20 ms apart; each side
records when every job started (raw: a signal handler; queue-manager: the
ledger's ``started_at``), against the wall-clock time of its enqueue.

Usage: python bench/throughput.py [--jobs 20000] [--repeat 3] [--pickup 300]
                                  [--database-url URL]
"""
import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
sys.path.insert(0, str(ROOT))
from helpers import BIN, Process, RedisServer, service_env, wait_for  # noqa: E402

RAW_TASKS = '''
import os, time
from huey import PriorityRedisHuey, signals
huey = PriorityRedisHuey('raw', results=False, url=os.environ['RAW_REDIS_URL'])

@huey.task()
def noop():
    return None

_n, _first, _total = 0, None, int(os.environ['RAW_JOBS'])

@huey.signal(signals.SIGNAL_EXECUTING)
def _started(signal, task):
    global _first
    if _first is None:
        _first = time.time()

@huey.signal(signals.SIGNAL_COMPLETE)
def _done(signal, task):
    global _n
    _n += 1
    if _n == _total:
        with open(os.environ['RAW_DONE'], 'w') as f:
            f.write(f'{_first} {time.time()}')
'''


RAW_PICKUP = '''
import json, os, time
from huey import PriorityRedisHuey, signals
huey = PriorityRedisHuey('raw', results=False, url=os.environ['RAW_REDIS_URL'])
_out = open(os.environ['RAW_PICKUP_OUT'], 'a', buffering=1)

@huey.task()
def stamped(enqueued_at):
    return None

@huey.signal(signals.SIGNAL_EXECUTING)
def _started(signal, task):
    _out.write(json.dumps([task.args[0], time.time()]) + '\\n')
'''

# Enqueues argv[1] noop jobs, argv[3] seconds apart (0.02 by default), each as
# the API would (row, message, commit), writing [job id, enqueue time] to argv[2].
PICKUP_FILL = '''
import json, sys, time, uuid
from app import broker, create_app
from app.extensions import db
from app.models import Job, utcnow
app = create_app()
out = open(sys.argv[2], 'w')
with app.app_context():
    for _ in range(int(sys.argv[1])):
        now = utcnow()
        job = Job(id=str(uuid.uuid4()), task='noop', queue='default', params={}, state='queued',
                  priority=0, retries=2, retry_delay=5.0, attempts=0, created_at=now,
                  updated_at=now, version=1)
        db.session.add(job)
        db.session.flush()
        at = time.time()
        broker.enqueue(job)
        db.session.commit()
        out.write(json.dumps([job.id, at]) + '\\n')
        out.flush()
        time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0.02)
'''


def percentile(values, p):
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def raw_pickup(tmp, redis, count, workers):
    """Raw Huey: seconds from each enqueue to its task starting, on an idle consumer."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    (work / 'raw_pickup.py').write_text(RAW_PICKUP)
    out = work / 'pickup.jsonl'
    env = dict(os.environ, RAW_REDIS_URL=redis.url, RAW_PICKUP_OUT=str(out), PYTHONPATH=str(work))
    proc = Process('raw-pickup', consumer_args('raw_pickup.huey', workers, quiet=False), env, work, cwd=work)
    try:
        wait_for(lambda: 'Huey consumer started' in proc.log() or not proc.alive(), 30, 0.05,
                 'the raw consumer')
        subprocess.run([sys.executable, '-c',
                        'import time, raw_pickup\n'
                        f'for _ in range({count}):\n'
                        '    raw_pickup.stamped(time.time()); time.sleep(0.02)'],
                       env=env, cwd=work, check=True)
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= count, 60, 0.05,
                 'raw Huey to start every job')
    finally:
        proc.stop()
    return [b - a for a, b in map(json.loads, out.read_text().splitlines())]


def tracked_pickup(tmp, redis, count, workers, database_url):
    """queue-manager: seconds from each enqueue to the ledger's started_at."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    env = service_env(work, redis.url, database_url, LOG_LEVEL='WARNING')
    migrate_env = subprocess.run([sys.executable, '-c',
                                  'from flask_migrate import upgrade\nfrom app import create_app\n'
                                  'app = create_app()\nwith app.app_context(): upgrade()'],
                                 env=env, cwd=ROOT, capture_output=True, text=True)
    if migrate_env.returncode:
        raise SystemExit(migrate_env.stderr)
    proc = Process('tracked-pickup', consumer_args('huey_tasks.huey', workers, quiet=False), env, work)
    out = work / 'pickup.jsonl'
    try:
        wait_for(lambda: 'Huey consumer started' in proc.log() or not proc.alive(), 30, 0.05,
                 'the consumer')
        subprocess.run([sys.executable, '-c', PICKUP_FILL, str(count), str(out)], env=env,
                       cwd=ROOT, check=True)
        import sqlalchemy as sa
        url = env['DATABASE_URL'].replace('postgresql://', 'postgresql+psycopg://', 1)
        engine = sa.create_engine(url)

        def started():
            with engine.connect() as conn:
                return dict(conn.execute(sa.text(
                    'SELECT id, started_at FROM job WHERE started_at IS NOT NULL')).all())
        rows = wait_for(lambda: (lambda r: r if len(r) >= count else None)(started()), 60, 0.1,
                        'queue-manager to start every job')
        engine.dispose()
    finally:
        proc.stop()
    latencies = []
    for job_id, at in map(json.loads, out.read_text().splitlines()):
        when = rows[job_id]
        when = when if isinstance(when, dt.datetime) else dt.datetime.fromisoformat(when)
        latencies.append(when.replace(tzinfo=dt.timezone.utc).timestamp() - at)
    return latencies


def consumer_args(module, workers, quiet=True):
    # -q keeps per-task logging out of the throughput runs; the pickup runs
    # need the "consumer started" line to know when to begin.
    return [str(BIN / 'huey_consumer'), module, '--workers', str(workers),
            '--worker-type', 'thread', *(['-q'] if quiet else [])]


def raw_run(tmp, redis, jobs, workers):
    """Raw Huey: jobs/s from the first task start to the last completion."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    (work / 'raw_tasks.py').write_text(RAW_TASKS)
    done = work / 'done'
    env = dict(os.environ, RAW_REDIS_URL=redis.url, RAW_JOBS=str(jobs), RAW_DONE=str(done),
               PYTHONPATH=str(work))
    subprocess.run([sys.executable, '-c',
                    f'import raw_tasks\nfor _ in range({jobs}): raw_tasks.noop()'],
                   env=env, cwd=work, check=True)
    proc = Process('raw-consumer', consumer_args('raw_tasks.huey', workers), env, work, cwd=work)
    try:
        wait_for(done.exists, 600, 0.05, 'raw Huey to drain the backlog')
    finally:
        proc.stop()
    first, last = map(float, done.read_text().split())
    return jobs / (last - first)


def tracked_run(tmp, redis, jobs, workers, database_url):
    """queue-manager: jobs/s from the ledger's first start to its last finish."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    env = service_env(work, redis.url, database_url, LOG_LEVEL='WARNING')
    # Rows and messages exactly as the API leaves them, written in bulk: the
    # submission path is not what is measured.
    fill = subprocess.run([sys.executable, '-c', FILL, str(jobs)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if fill.returncode:
        raise SystemExit(f'could not enqueue the jobs:\n{fill.stderr}')
    proc = Process('tracked-consumer', consumer_args('huey_tasks.huey', workers), env, work)
    try:
        import sqlalchemy as sa
        url = env['DATABASE_URL'].replace('postgresql://', 'postgresql+psycopg://', 1)
        engine = sa.create_engine(url)
        done = sa.text("SELECT count(*) FROM job WHERE state = 'succeeded'")

        def finished():
            with engine.connect() as conn:
                return conn.execute(done).scalar() >= jobs
        # Polled gently: the time comes from the ledger, and a busy poll would
        # take CPU from the consumer it measures.
        wait_for(finished, 600, 0.5, 'queue-manager to drain the backlog')
        with engine.connect() as conn:
            first, last = conn.execute(sa.text(
                'SELECT min(started_at), max(finished_at) FROM job')).one()
            bad = conn.execute(sa.text(
                "SELECT count(*) FROM job j WHERE j.attempts != 1 OR (SELECT count(*) FROM attempt a "
                "WHERE a.job_id = j.id AND a.outcome = 'succeeded') != 1")).scalar()
        engine.dispose()
    finally:
        proc.stop()
    if bad:
        raise SystemExit(f'{bad} jobs were not recorded as one succeeded attempt')
    first, last = (v if isinstance(v, dt.datetime) else dt.datetime.fromisoformat(v)
                   for v in (first, last))
    return jobs / (last - first).total_seconds()


FILL = '''
import sys, uuid
from flask_migrate import upgrade
from app import broker, create_app
from app.extensions import db
from app.models import Job, utcnow
app = create_app()
with app.app_context():
    upgrade()
    now = utcnow()
    rows = [Job(id=str(uuid.uuid4()), task='noop', queue='default', params={}, state='queued',
                priority=0, retries=2, retry_delay=5.0, attempts=0, created_at=now,
                updated_at=now, version=1) for _ in range(int(sys.argv[1]))]
    db.session.add_all(rows)
    db.session.flush()
    for job in rows:  # enqueued before the commit, as the API does
        broker.enqueue(job)
    db.session.commit()
'''


def fresh_postgres(url):
    import psycopg
    name = f'qm_bench_{uuid.uuid4().hex[:10]}'
    admin = url.replace('postgresql+psycopg://', 'postgresql://', 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE {name}')
    return f'{admin.rpartition("/")[0]}/{name}', lambda: _drop(admin, name)


def _drop(admin, name):
    import psycopg
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=int, default=20000)
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--pickup', type=int, default=300,
                        help='jobs enqueued one at a time for the pickup latency')
    parser.add_argument('--database-url', help='run the ledger on this PostgreSQL server')
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix='qm-bench-'))
    raw, tracked = [], []
    for i in range(args.repeat):
        for side in ('raw', 'tracked'):
            redis = RedisServer(tmp / f'redis-{side}-{i}')
            cleanup = None
            try:
                if side == 'raw':
                    raw.append(raw_run(tmp, redis, args.jobs, args.workers))
                else:
                    url = None
                    if args.database_url:
                        url, cleanup = fresh_postgres(args.database_url)
                    tracked.append(tracked_run(tmp, redis, args.jobs, args.workers, url))
            finally:
                redis.stop()
                if cleanup:
                    cleanup()
            print(f'  run {i + 1}: {side:8} {(raw if side == "raw" else tracked)[-1]:8.0f} jobs/s',
                  flush=True)

    ledger = 'PostgreSQL' if args.database_url else 'SQLite'
    best_raw, best_tracked = max(raw), max(tracked)
    print(f'\nThroughput, {args.jobs} noop jobs, 1 consumer x {args.workers} threads, '
          f'best of {args.repeat}')
    print(f'  raw Huey (PriorityRedisHuey)          {best_raw:8.0f} jobs/s')
    print(f'  queue-manager, ledger on {ledger:10}   {best_tracked:8.0f} jobs/s')
    print(f'  ratio {best_tracked / best_raw:.2f} (target >= 0.95)')

    if not args.pickup:
        return
    pickup = {'raw': [], 'tracked': []}
    for i in range(args.repeat):  # alternating, as for throughput: load drifts
        for side in ('raw', 'tracked'):
            redis = RedisServer(tmp / f'redis-pickup-{side}-{i}')
            cleanup = None
            try:
                if side == 'raw':
                    values = raw_pickup(tmp, redis, args.pickup, args.workers)
                else:
                    url = None
                    if args.database_url:
                        url, cleanup = fresh_postgres(args.database_url)
                    values = tracked_pickup(tmp, redis, args.pickup, args.workers, url)
            finally:
                redis.stop()
                if cleanup:
                    cleanup()
            pickup[side].append((percentile(values, 50), percentile(values, 99)))
            print(f'  pickup run {i + 1}: {side:8} p50 {pickup[side][-1][0] * 1000:5.1f} ms  '
                  f'p99 {pickup[side][-1][1] * 1000:5.1f} ms', flush=True)
    print(f'\nPickup latency, enqueue to start, {args.pickup} jobs one at a time, idle consumer, '
          f'best of {args.repeat}')
    best = {side: (min(p50 for p50, _ in runs), min(p99 for _, p99 in runs))
            for side, runs in pickup.items()}
    for side, label in (('raw', 'raw Huey (PriorityRedisHuey)'),
                        ('tracked', f'queue-manager, ledger on {ledger}')):
        print(f'  {label:38} p50 {best[side][0] * 1000:6.1f} ms   '
              f'p99 {best[side][1] * 1000:6.1f} ms')


if __name__ == '__main__':
    main()

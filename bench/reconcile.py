"""Reconciling the broker with the ledger at depth: its cost, and repair after a wipe.

Runs a private redis-server and one real ``huey_consumer`` (the leader) on a
SQLite ledger (or PostgreSQL with ``--database-url``), and measures:

1. pickup latency (enqueue to start) of probe jobs, one at a time, first
   with an empty ledger and then with ``--waiting`` jobs waiting in the
   schedule (an hour out), while the leader's regular passes compare them
   with the broker: the two are measured in the same run, as a ratio;
2. after ``FLUSHALL`` (the broker lost everything), how long until every
   waiting job is back in the broker, and the probes' pickup latency while
   the repair runs.

Usage: python bench/reconcile.py [--waiting 100000] [--probes 200] [--database-url URL]
"""
import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
sys.path.insert(0, str(ROOT))
from helpers import RedisServer, service_env, start_consumer, wait_for  # noqa: E402
from throughput import PICKUP_FILL, fresh_postgres, percentile  # noqa: E402

FILL = '''
import sys, uuid, datetime as dt
from flask_migrate import upgrade
from app import broker, create_app
from app.extensions import db
from app.models import Job, utcnow
app = create_app()
with app.app_context():
    upgrade()
    now = utcnow()
    later = now + dt.timedelta(hours=1)
    total = int(sys.argv[1])
    for start in range(0, total, 10000):
        rows = [Job(id=str(uuid.uuid4()), task='noop', queue='default', params={},
                    state='scheduled', priority=0, retries=2, retry_delay=5.0, attempts=0,
                    created_at=now, updated_at=now, scheduled_for=later, version=1)
                for _ in range(min(10000, total - start))]
        db.session.add_all(rows)
        db.session.flush()
        for job in rows:  # enqueued before the commit, as the API does
            broker.enqueue(job)
        db.session.commit()
'''

def sql(env, query):
    import sqlalchemy as sa
    url = env['DATABASE_URL'].replace('postgresql://', 'postgresql+psycopg://', 1)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(query)).all()
    finally:
        engine.dispose()


def probe(env, count, out):
    """Enqueue ``count`` probe jobs 50 ms apart; return their pickup latencies (s)."""
    subprocess.run([sys.executable, '-c', PICKUP_FILL, str(count), str(out), '0.05'], env=env,
                   cwd=ROOT, check=True)
    ids = dict(map(json.loads, Path(out).read_text().splitlines()))
    marks = ','.join(f"'{i}'" for i in ids)

    def started():
        rows = sql(env, f'SELECT id, started_at FROM job WHERE id IN ({marks}) '
                        f'AND started_at IS NOT NULL')
        return rows if len(rows) == len(ids) else None
    rows = wait_for(started, 120, 0.2, 'every probe to start')
    latencies = []
    for job_id, when in rows:
        when = when if isinstance(when, dt.datetime) else dt.datetime.fromisoformat(when)
        latencies.append(when.replace(tzinfo=dt.timezone.utc).timestamp() - ids[job_id])
    return latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--waiting', type=int, default=100_000)
    parser.add_argument('--probes', type=int, default=200)
    parser.add_argument('--database-url', help='run the ledger on this PostgreSQL server')
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix='qm-bench-reconcile-'))
    redis = RedisServer(tmp / 'redis')
    url, cleanup = (fresh_postgres(args.database_url) if args.database_url else (None, None))
    env = service_env(tmp, redis.url, url, LOG_LEVEL='WARNING')
    consumer = None
    try:
        subprocess.run([sys.executable, '-c', FILL, '0'], env=env, cwd=ROOT, check=True)
        consumer = start_consumer(env, tmp)
        empty = probe(env, args.probes, tmp / 'probe-empty.jsonl')

        started = time.monotonic()
        subprocess.run([sys.executable, '-c', FILL, str(args.waiting)], env=env, cwd=ROOT,
                       check=True)
        fill_seconds = time.monotonic() - started
        import redis as redis_client
        client = redis_client.Redis.from_url(redis.url)
        schedule = 'huey.schedule.qm.default'
        assert client.zcard(schedule) == args.waiting
        deep = probe(env, args.probes, tmp / 'probe-deep.jsonl')

        client.flushall()  # the broker lost everything
        wiped = time.monotonic()
        during = probe(env, min(args.probes, 100), tmp / 'probe-repair.jsonl')
        wait_for(lambda: client.zcard(schedule) >= args.waiting, 1800, 0.2,
                 'every waiting job to be restored')
        repaired = time.monotonic() - wiped
        restored = sql(env, "SELECT count(*) FROM job_event WHERE kind = 'restored'")[0][0]
        doubled = client.zcard(schedule) - args.waiting
    finally:
        if consumer is not None:
            consumer.stop()
        redis.stop()
        if cleanup:
            cleanup()

    ledger = 'PostgreSQL' if args.database_url else 'SQLite'
    ms = lambda v: f'{v * 1000:7.1f} ms'  # noqa: E731
    print(f'\nReconciling, ledger on {ledger}, {args.waiting} jobs waiting '
          f'(filled in {fill_seconds:.0f} s)')
    print(f'  {"pickup latency of probes":44} {"p50":>10} {"p99":>10}')
    for label, values in (('no jobs waiting', empty),
                          (f'{args.waiting} waiting, regular passes', deep),
                          ('while the wiped broker is repaired', during)):
        print(f'  {label:44} {ms(percentile(values, 50)):>10} {ms(percentile(values, 99)):>10}')
    print(f'  p99 ratio, deep / empty: {percentile(deep, 99) / percentile(empty, 99):.2f}')
    print(f'\nRepair after FLUSHALL: {args.waiting} waiting jobs back in the broker '
          f'{repaired:.1f} s after the wipe ({restored} restored, {doubled} extra messages)')


if __name__ == '__main__':
    main()

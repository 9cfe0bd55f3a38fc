"""Live-update benchmark: push latency and idle sockets per web process.

Runs a private redis-server, one gunicorn worker process and one huey_consumer
(4 threads), all real, and measures:

1. latency from a job's completion being recorded in the ledger (the row's
   ``updated_at``, written in the same transaction) to its fragment arriving
   at a WebSocket client, at light load (one job at a time) and while the
   consumer drains a backlog at full speed;
2. how many idle sockets one web process holds (each answering the
   server's pings, as a browser does), its memory and threads before, with
   them open, after they have idled 30 s (a whole ping interval) and after
   they closed, and the latency of ``GET /healthz`` before, while they are
   being opened and while they are open.

Usage: python bench/live.py [--light 200] [--burst 3000] [--sockets 5000]
"""
import argparse
import datetime as dt
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
sys.path.insert(0, str(ROOT))
from helpers import (CREDENTIALS, RedisServer, Socket, SocketCrowd, grant_admin,  # noqa: E402
                     migrate, service_env, start_consumer, start_web, wait_for)
from wsproto.events import TextMessage  # noqa: E402

ROW = re.compile(r'<tr id="job-([0-9a-f-]+)" data-state="(\w+)" data-version="\d+" '
                 r'data-updated="([^"]+)"')
SUMMARY = re.compile(r'id="job-([0-9a-f-]+)-summary" class="panel summary" data-state="(\w+)" '
                     r'data-version="\d+" data-updated="([^"]+)"')


def utc_seconds(text):
    when = dt.datetime.fromisoformat(text.rstrip('Z')).replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


class Listener(Socket):
    """A WebSocket client recording when each job is first seen succeeded."""

    def __init__(self, url, pattern):
        self.pattern = pattern
        self.seen = {}      # job id -> latency in seconds
        super().__init__(url)  # starts reading: set up first

    def on_message(self, msg):
        now = time.time()
        super().on_message(msg)
        for job_id, state, updated in self.pattern.findall(msg):
            if state == 'succeeded' and job_id not in self.seen:
                self.seen[job_id] = now - utc_seconds(updated)


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float('nan')
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def proc_status(pid, field):
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    return 0


def rss_kib(pid):
    return proc_status(pid, 'VmRSS')


def healthz_latency(port, count=300, pause=0.01):
    """``count`` sequential GET /healthz, each on a new connection (as a probe makes them)."""
    import http.client
    times = []
    for _ in range(count):
        started = time.perf_counter()
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        conn.request('GET', '/healthz')
        assert conn.getresponse().status == 200
        conn.close()
        times.append(time.perf_counter() - started)
        time.sleep(pause)
    return times


def worker_pid(master_pid):
    children = Path(f'/proc/{master_pid}/task/{master_pid}/children').read_text().split()
    return int(children[0])


def light_load(api, ws_base, count):
    """One job at a time: the dashboard and the job page each see it finish."""
    dash = Listener(f'{ws_base}/ws?view=dashboard', ROW)
    wait_for(lambda: dash.messages, 10, message='dashboard snapshot')
    page_latency = []
    for _ in range(count):
        job = api.submit('noop')
        page = Listener(f'{ws_base}/ws?view=job&id={job["id"]}', SUMMARY)
        wait_for(lambda: job['id'] in dash.seen and job['id'] in page.seen, 10, 0.005,
                 'the job to show as succeeded')
        page_latency.append(page.seen[job['id']])
        page.close()
        time.sleep(0.5)  # light load: let every socket go idle before the next job
    dash.close()
    return list(dash.seen.values()), page_latency


def burst(api, ws_base, count, consumer_factory):
    """A backlog drained at the consumer's full speed, watched from the dashboard.

    The jobs are submitted through the API while no consumer runs; then one
    starts and drains them as fast as it can.
    """
    ids = []
    lock = threading.Lock()

    def submit(n):
        for _ in range(n):
            job_id = api.submit('noop')['id']
            with lock:
                ids.append(job_id)

    threads = [threading.Thread(target=submit, args=(count // 8,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dash = Listener(f'{ws_base}/ws?view=dashboard', ROW)
    # Job pages for a sample spread over the backlog: their latencies are
    # taken while the consumer runs flat out, not only at the end.
    sample = ids[::max(1, len(ids) // 50)]
    pages = [Listener(f'{ws_base}/ws?view=job&id={job_id}', SUMMARY) for job_id in sample]
    wait_for(lambda: dash.messages and all(p.messages for p in pages), 30, message='snapshots')
    before = len(dash.messages)
    start = time.monotonic()
    consumer = consumer_factory()

    def drained():
        counts = api.get('/api/stats')[1]['states']
        return counts['queued'] == 0 and counts['running'] == 0
    wait_for(drained, 600, 0.1, 'the backlog to drain')
    elapsed = time.monotonic() - start
    wait_for(lambda: all(p.seen for p in pages), 30, 0.05, 'every sampled job page')
    dash.close()
    for p in pages:
        p.close()
    return ([lat for p in pages for lat in p.seen.values()],
            len(dash.messages) - before, elapsed, len(ids), consumer)


def idle_sockets(ws_base, web_pid, port, count):
    """Open ``count`` dashboard sockets on one web process and measure it.

    They are opened back to back by one client, which then answers pings
    (as browsers do) while they idle for 30 s.
    """
    pid = worker_pid(web_pid)
    base, base_threads = rss_kib(pid), proc_status(pid, 'Threads')
    health_before = healthz_latency(port)
    # /healthz sampled meanwhile, from another thread, until every socket is open
    opening, health_opening = threading.Event(), []

    def sample():
        while not opening.is_set():
            health_opening.extend(healthz_latency(port, 1, 0.02))
    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.monotonic()
    try:
        crowd = SocketCrowd(f'{ws_base}/ws?view=dashboard', count)
    finally:
        opening.set()
        sampler.join()
    opened = time.monotonic() - start
    first = crowd.first_events(120)
    snapshots = sum(1 for f in first if isinstance(f, TextMessage))
    with_sockets, threads = rss_kib(pid), proc_status(pid, 'Threads')
    # Idle for 30 s, a whole ping interval (the client answers every ping):
    # memory should hold steady, and /healthz is sampled all along.
    holding, health_open = threading.Event(), []

    def sample_open():
        while not holding.is_set():
            health_open.extend(healthz_latency(port, 1, 0.01))
    sampler = threading.Thread(target=sample_open)
    sampler.start()
    try:
        crowd.hold(30)
    finally:
        holding.set()
        sampler.join()
    idle = rss_kib(pid)
    alive = crowd.still_open()
    crowd.close()
    time.sleep(5)  # "after": 5 s after the client closed them
    after = rss_kib(pid)
    # The same number again: memory freed by the first crowd is reused, so
    # a second one should cost (next to) nothing more.
    again = SocketCrowd(f'{ws_base}/ws?view=dashboard', count)
    again.first_events(120)
    rss_again = rss_kib(pid)
    again.close()
    return {'sockets': count, 'snapshots': snapshots, 'alive_after_idle': alive,
            'open_seconds': opened, 'rss_base_mib': base / 1024,
            'rss_open_mib': with_sockets / 1024, 'rss_idle_mib': idle / 1024,
            'rss_closed_mib': after / 1024, 'rss_again_mib': rss_again / 1024, 'threads_before': base_threads,
            'threads_open': threads, 'health_before': health_before, 'health_open': health_open,
            'health_opening': health_opening}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--light', type=int, default=200, help='jobs at light load')
    parser.add_argument('--burst', type=int, default=3000, help='jobs in the full-speed burst')
    parser.add_argument('--sockets', type=int, default=5000, help='idle sockets to open')
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix='qm-bench-live-'))
    redis = RedisServer(tmp / 'redis')
    env = service_env(tmp, redis.url, WEB_CONCURRENCY=1, LOG_LEVEL='WARNING')
    migrate(env, tmp)
    token = grant_admin(env)  # the distributed mode asks for a login: the clients send a token
    web, api = start_web(env, tmp)
    CREDENTIALS[api.base.split('//', 1)[1]] = token
    consumer = start_consumer(env, tmp)
    ws_base = api.base.replace('http://', 'ws://')
    try:
        dash, page = light_load(api, ws_base, args.light)
        consumer.stop()
        burst_latency, burst_messages, burst_seconds, burst_jobs, consumer = burst(
            api, ws_base, args.burst, lambda: start_consumer(env, tmp, name='consumer-burst'))
        idle = idle_sockets(ws_base, web.pid, int(api.base.rsplit(':', 1)[1]), args.sockets)
    finally:
        consumer.stop()
        web.stop()
        redis.stop()

    ms = lambda s: f'{s * 1000:7.1f} ms'  # noqa: E731
    print('\nLive updates: ledger commit -> fragment at a WebSocket client')
    print(f'  {"":34} {"p50":>10} {"p99":>10} {"samples":>8}')
    for label, values in [('light load, job page', page), ('light load, dashboard', dash),
                          ('draining a backlog, job pages', burst_latency)]:
        print(f'  {label:34} {ms(percentile(values, 50)):>10} {ms(percentile(values, 99)):>10} '
              f'{len(values):>8}')
    print('  targets at light load: p50 < 50 ms, p99 < 250 ms')
    print(f'\nBurst: a backlog of {burst_jobs} jobs drained in {burst_seconds:.1f} s '
          f'({burst_jobs / burst_seconds:.0f} jobs/s); the dashboard socket got '
          f'{burst_messages} messages meanwhile ({burst_messages / burst_seconds:.1f}/s)')
    per_socket = (idle['rss_open_mib'] - idle['rss_base_mib']) * 1024 / idle['sockets']
    print(f'\nIdle sockets on one web process: {idle["sockets"]} opened in '
          f'{idle["open_seconds"]:.1f} s by one client, {idle["snapshots"]} got their snapshot, '
          f'{idle["alive_after_idle"]} still open after 30 s idle')
    print(f'  worker RSS: {idle["rss_base_mib"]:.1f} MiB before, {idle["rss_open_mib"]:.1f} MiB '
          f'with them open, {idle["rss_idle_mib"]:.1f} MiB after idling, '
          f'{idle["rss_closed_mib"]:.1f} MiB after they closed, {idle["rss_again_mib"]:.1f} MiB '
          f'with as many open again ({per_socket:.1f} KiB per socket)')
    print(f'  worker threads: {idle["threads_before"]} before, {idle["threads_open"]} with them open')
    hb, ho = idle['health_before'], idle['health_open']
    print(f'  GET /healthz, sequential: p50 {ms(percentile(hb, 50)).strip()} / p99 '
          f'{ms(percentile(hb, 99)).strip()} before ({len(hb)} samples); p50 '
          f'{ms(percentile(ho, 50)).strip()} / p99 {ms(percentile(ho, 99)).strip()} / max '
          f'{ms(max(ho)).strip()} with them open, over 30 s ({len(ho)} samples) '
          f'(p99 ratio {percentile(ho, 99) / percentile(hb, 99):.2f})')
    hs = idle['health_opening']
    print(f'  GET /healthz while they were being opened ({len(hs)} samples): p50 '
          f'{ms(percentile(hs, 50)).strip()} / p99 {ms(percentile(hs, 99)).strip()} / max '
          f'{ms(max(hs)).strip()}')
    print('  targets: at least 5,000 idle sockets per web process, flat memory, '
          '/healthz p99 under 100 ms while they are open')


if __name__ == '__main__':
    os.environ.pop('REDIS_URL', None)
    main()

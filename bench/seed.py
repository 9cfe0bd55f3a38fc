"""Fill a ledger with a realistic history, through the ledger's own write path.

Months of jobs of the task types ``huey_tasks.py`` declares, spread over the
configured queues (``QUEUES``): mostly succeeded, some failed (declined cards,
gateway timeouts, flaky and failing jobs, attempts timed out or lost with
their consumer) with the error types, messages and multi-line tracebacks the
recorder writes, retried jobs with several attempts, a few canceled (while
running, or while waiting), the odd log line, the periodic tasks at their
hours, and near "now" a few jobs queued, scheduled, running and waiting for a
retry. Every attempt has its ``Attempt`` row; the consumers that ran them have
their ``worker`` rows.

Rows are written as production leaves them, so whatever the schema keeps
in step with them (indexes, counters and rollups kept by triggers, the
search index) is as a real deployment would have it. A job that has run its
course (or was canceled while it waited) is written once, in its last
state: the row the ledger's insert for a job it has not seen
(``app/ledger/sql.py``) or ``jobs.submit`` wrote, as the writer's updates
for each of its attempts (:func:`app.ledger.apply.apply`), or
``jobs.change`` for a cancel, left it; its attempts and log lines with the
writer's statements; what its attempts add to the metric history with
:func:`app.ledger.history.tally` and ``write``, as the writer adds it.
``tests/test_bench_seed.py`` checks that this makes, row for row, the
ledger that writing every op through ``apply`` makes (``settled=False``),
which the jobs still queued, running or retrying near "now" and the
consumers' heartbeats always go through. Written op by op, a million jobs
took 240 s here (other work ran during its first minute); written settled,
88 s: the updates after each insert, their index changes and their
triggers were most of the time. 10,000 jobs
per transaction, the search index brought up to date in each. Runs the
migrations first. Refuses a ledger that already holds jobs unless
``--append`` is given (with another ``--seed``: the same seed makes the
same job ids).

The stories and their rows are made in a forked process while this one
writes (two cores: about half of the CPU time each), up to :data:`AHEAD`
chunks ahead. An empty SQLite ledger is written with its journal in
memory (``journal_mode=MEMORY``, ``synchronous=OFF``) and put back in WAL
mode at the end: a seeding cut short leaves a file to delete, not to use.
An empty ledger (SQLite or PostgreSQL) is written without the job table's
indexes, built once at the end (see :func:`_defer_indexes`). An
``--append`` keeps the ledger's write-ahead log and indexes.

The same ``--seed`` and ``--now`` make the same ledger. (``updated_at`` is
the time of the seeding, as the ledger writer stamps it.)

Usage: python bench/seed.py --jobs N [--database-url URL] [--days 180] [--seed 0]
                            [--now 2026-01-31T12:00:00] [--queues a,b,c] [--append]
"""
import argparse
import atexit
import bisect
import datetime as dt
import gc
import itertools
import math
import os
import queue
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from app import states  # noqa: E402
from app import message  # noqa: E402
from app.ledger import history  # noqa: E402
from app.ledger.apply import apply, job_end  # noqa: E402
from app.ledger.ops import (Finish, Heartbeat, Log, Progress, Scheduled, Start,  # noqa: E402
                            Stopped)
from app.ledger.sql import dialect  # noqa: E402

CHUNK = 10_000  # jobs per transaction
AHEAD = 16  # chunks made and not yet written, at most (about 7 MB each)

# Share of the history each task type takes (the periodic ones run at their
# hours, so their share is about what 180 days of them are at a million jobs).
TASK_MIX = (('noop', 30.0), ('sleep', 22.0), ('payment', 33.0), ('flaky', 8.0),
            ('fail', 2.0), ('report', 0.45), ('purge', 0.02))
# How often a job's attempts keep what they logged (sparse: the odd job's log).
LOG_SHARE = {'sleep': 0.05, 'payment': 0.1, 'report': 1.0, 'purge': 1.0}
LIVE_MAX = 20           # jobs queued, scheduled, running or retrying near now, at most
CANCEL_WAITING = 0.005  # share of jobs canceled before they ran
DELAYED = 0.02          # share submitted with a delay (or an eta)
DEPLOY_DAYS = 14        # consumers are replaced this often (a deploy)
CONSUMER_HOSTS = ('worker-1', 'worker-2')
THREADS = 4             # worker threads per consumer

SITE = '/srv/queue-manager/.venv/lib/python3.11/site-packages'
TASKS_FILE = '/srv/queue-manager/huey_tasks.py'
FAIL_MESSAGES = (
    'upstream returned HTTP 503 Service Unavailable',
    'could not connect to server: Connection refused (db-replica-2:5432)',
    "export row {n}: missing field 'customer_id'",
    'S3 PutObject failed: SlowDown (bucket reports-eu, key daily/{n}.csv.gz)',
    'invoice {n} is locked by another process',
    'rate limited by the CRM API: retry after 60 s',
    'this job always fails',
    'checksum mismatch in batch {n}',
)
TEST_CARDS = ('4242 4242 4242 4242', '4000 0566 5566 5556', '5555 5555 5555 4444',
              '3782 822463 10005', '6011 1111 1111 1117', '4000 0025 0000 3155')
DIGITS = {card: card.replace(' ', '') for card in TEST_CARDS}
CURRENCIES = ('EUR', 'EUR', 'EUR', 'USD', 'USD', 'GBP', 'JPY')


class Story(NamedTuple):
    """One job's whole history: its row as submitted, and the changes that followed.

    ``row`` is ``'ledger'`` (the ledger's insert) or ``'api'`` (the columns
    ``jobs.submit`` writes); ``ops`` are applied with the rest of its
    chunk, ``later`` in a second pass (an attempt still running, after the
    ones that ended); ``canceled_at`` cancels it while it waits. ``state``
    is the state it ends in.
    """
    id: str
    task: str
    queue: str
    params: dict
    secret: dict
    priority: int
    retries: int
    retry_delay: float
    created: dt.datetime
    row: str
    initial: str
    scheduled_for: dt.datetime | None
    timeout: float | None
    idempotency_key: str | None
    ops: list
    later: list
    canceled_at: dt.datetime | None
    state: str


class Consumer(NamedTuple):
    name: str
    host: str
    pid: int
    started_at: dt.datetime
    stopped_at: dt.datetime | None  # None: the current one


def _raise_lines():
    """``{statement: line number}`` of the statements huey_tasks.py raises with (tracebacks)."""
    lines = {}
    try:
        source = (ROOT / 'huey_tasks.py').read_text().splitlines()
    except OSError:
        return lines
    for number, line in enumerate(source, 1):
        stripped = line.strip()
        if stripped.startswith(('raise ', 'progress(')) or 'progress(step' in stripped:
            lines.setdefault(stripped, number)
    return lines


_LINES = _raise_lines()


def _frame(statement, func):
    number = _LINES.get(statement, 1)
    return f'  File "{TASKS_FILE}", line {number}, in {func}\n    {statement}\n'


_HUEY_FRAMES = (f'Traceback (most recent call last):\n'
                f'  File "{SITE}/huey/api.py", line 453, in _execute\n'
                f'    task_value = task.execute()\n'
                f'                 ^^^^^^^^^^^^^^\n'
                f'  File "{SITE}/huey/api.py", line 976, in execute\n'
                f'    return func(*args, **kwargs)\n'
                f'           ^^^^^^^^^^^^^^^^^^^^^\n')
_PROGRESS_FRAMES = ('  File "/srv/queue-manager/app/task_api.py", line 87, in progress\n'
                    '    checkpoint()\n')


def _traceback(task, statement, tail, etype, message):
    """A traceback as ``traceback.format_exception`` writes it for a task that raised."""
    return _HUEY_FRAMES + _frame(statement, task) + tail + f'{etype}: {message}\n'


def _timeout_tail():
    return (_PROGRESS_FRAMES
            + '  File "/srv/queue-manager/app/task_api.py", line 96, in checkpoint\n'
              '    job.task.check_timeout()\n'
              f'  File "{SITE}/huey/api.py", line 879, in check_timeout\n'
              "    raise TaskTimeout('timeout %ss' % self.timeout)\n")


def _cancel_tail():
    return (_PROGRESS_FRAMES
            + '  File "/srv/queue-manager/app/task_api.py", line 104, in checkpoint\n'
              "    raise Canceled(f'canceled by an operator{where}')\n")


class Outcome(NamedTuple):
    """One attempt as the task would run it: how it ends, how long it takes, what it logs."""
    outcome: str
    duration: float
    error_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    result: object = None
    logs: tuple = ()  # (seconds into the attempt, level, message)
    # Seconds before the next attempt when not a retry's delay; -1: none follows
    # (the task does not retry this error, or must not run twice).
    gap: float | None = None


class Generator:
    """Makes the stories of ``n`` jobs over the ``days`` days before ``now``; deterministic in ``seed``.

    ``config`` is the app's configuration (queues, retry policy, the lease's
    timing); ``tasks`` the declared task types by name (``catalog.TASKS``).
    """

    def __init__(self, n, days, now, seed, config, tasks):
        self.n, self.days, self.now = n, days, now
        self.rng = random.Random(seed)
        self.config = config
        self.tasks = tasks
        self.queues = list(config['QUEUES'])
        # The first queue takes most jobs, the others less and less.
        self.queue_cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(self.queues))))
        mix = [(name, w) for name, w in TASK_MIX if name in tasks]
        self.task_names = [name for name, _ in mix]
        self.task_cum = list(itertools.accumulate(w for _, w in mix))
        self.start = now - dt.timedelta(days=days)
        self.consumers = self._consumers()
        self.processed = Counter()  # consumer -> attempts it ended
        self.failed = Counter()     # consumer -> of those, not succeeded
        self.running = {}           # consumer -> ids of the jobs it runs now
        self.ticks = set()          # idempotency keys of the periodic jobs made
        self.secretive = {name for name, t in tasks.items() if any(p.secret for p in t.params)}

    # -- when and where ---------------------------------------------------------

    def _consumers(self):
        """The consumers over the period: two hosts, replaced every DEPLOY_DAYS days."""
        rng, out = self.rng, []
        span = self.days * 86400.0
        epochs = max(1, math.ceil(self.days / DEPLOY_DAYS))
        for e in range(epochs):
            begin = self.start + dt.timedelta(seconds=span * e / epochs)
            end = (self.start + dt.timedelta(seconds=span * (e + 1) / epochs)
                   if e < epochs - 1 else None)
            for host in CONSUMER_HOSTS:
                pid = rng.randrange(100, 60000)
                name = f'{host}:{pid}-{rng.getrandbits(24):06x}'
                out.append(Consumer(name, host, pid, begin - dt.timedelta(seconds=30), end))
        self._epoch_starts = [c.started_at for c in out[::len(CONSUMER_HOSTS)]]
        return out

    def _worker(self, at):
        """A worker thread (``consumer/Worker-n``) of a consumer running at ``at``."""
        epoch = max(0, bisect.bisect_right(self._epoch_starts, at) - 1)
        k = int(self.rng.random() * len(CONSUMER_HOSTS) * THREADS)
        consumer = self.consumers[epoch * len(CONSUMER_HOSTS) + k // THREADS]
        return consumer.name, f'{consumer.name}/Worker-{k % THREADS + 1}'

    def _offsets(self, count, newest):
        """``count`` creation times as seconds before now, oldest first.

        Busier by day than by night and on weekdays than at weekends, and
        growing over the period (twice the jobs at its end as at its start).
        """
        rng, span = self.rng, self.days * 86400.0 - newest
        weekday0 = self.start.weekday()
        out = []
        while len(out) < count:
            x = rng.random()  # 0: the start of the period, 1: its end
            t = x * span
            hour = (self.start.hour + t / 3600.0) % 24
            day = int((self.start.hour * 3600 + t) // 86400)
            weight = ((0.5 + 0.5 * x) * (0.35 + 0.65 * math.sin(math.pi * hour / 24) ** 2)
                      * (0.6 if (weekday0 + day) % 7 >= 5 else 1.0))
            if rng.random() < weight:
                out.append(span - t + newest)
        out.sort(reverse=True)
        return out

    def _split(self, task, params):
        """``(shown, secret)`` params, as the task type splits them."""
        if task in self.secretive:
            return self.tasks[task].split(params)
        return params, {}

    def _id(self):
        """A random (version 4) UUID, from this generator's random numbers."""
        h = f'{self.rng.getrandbits(128):032x}'
        return f'{h[:8]}-{h[8:12]}-4{h[13:16]}-{"89ab"[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}'

    # -- what each task does --------------------------------------------------

    def _submission(self, task):
        """``(params, retries, retry_delay, priority, timeout)`` as someone submitted them."""
        rng, tt = self.rng, self.tasks[task]
        params = {}
        timeout = None
        if task == 'sleep':
            params = {'seconds': rng.choice((0.5, 1.0, 2.0, 5.0, 5.0, 5.0, 10.0, 30.0, 60.0,
                                             round(rng.uniform(0.1, 120), 1))),
                      'steps': rng.choice((1, 5, 10, 10, 10, 20))}
            if rng.random() < 0.05:
                timeout = round(params['seconds'] * rng.uniform(0.3, 1.5), 1) or 0.1
        elif task == 'payment':
            declined = rng.random() < 0.015
            amount = (rng.uniform(10_000, 60_000) if declined
                      else min(9_999.0, math.exp(rng.gauss(3.4, 1.2))))
            params = {'amount': round(amount, 2), 'currency': rng.choice(CURRENCIES),
                      'card': rng.choice(TEST_CARDS),
                      'failure_rate': rng.choice((0.2, 0.2, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05,
                                                  0.0, 0.0)),
                      'latency': 0.0}
        elif task == 'flaky':
            params = {'failures': rng.choice((0, 1, 1, 2, 2, 3, 5))}
        elif task == 'fail':
            params = {'message': rng.choice(FAIL_MESSAGES).format(n=rng.randrange(1, 99999))}
        elif task == 'report':
            params = {'hours': 1}
        elif task == 'purge':
            params = {'days': 30}
        for p in tt.params:  # what validation fills in
            params.setdefault(p.name, p.default)
        retries = (self.config['DEFAULT_RETRIES'] if tt.retries is None else tt.retries)
        retry_delay = (self.config['DEFAULT_RETRY_DELAY'] if tt.retry_delay is None
                       else tt.retry_delay)
        if task not in ('report', 'purge') and rng.random() < 0.1:
            retries = rng.choice((0, 1, 3, 5))
            retry_delay = rng.choice((1.0, 5.0, 30.0, 60.0))
        priority = tt.priority if rng.random() < 0.85 else rng.choice((5, 10, 50))
        return params, retries, float(retry_delay), priority, timeout

    def _attempt(self, task, params, number, timeout):
        """How attempt ``number`` of a ``task`` job with ``params`` ends (an :class:`Outcome`)."""
        rng = self.rng
        if task == 'noop':
            if rng.random() < 0.002:
                return self._lost(rng.uniform(0.001, 0.01))
            if rng.random() < 0.003:
                return self._interrupted(rng.uniform(0.001, 0.01))
            return Outcome(states.ATTEMPT_SUCCEEDED, rng.uniform(0.0005, 0.01))
        if task == 'sleep':
            seconds, steps = params['seconds'], params['steps']
            per_step = seconds / steps

            def logs(upto=steps):  # made only for the attempts whose log is kept
                return tuple((per_step * (k + 1), 'INFO', f'step {k + 1} of {steps} done')
                             for k in range(min(upto, 20)))
            def stopped(outcome, done, error_type, message, tail):  # at step ``done``
                return Outcome(outcome, done * per_step + 0.001, error_type, message,
                               _traceback('sleep', "progress(step + 1, steps, f'step {step + 1} "
                                          "of {steps}')", tail, error_type, message),
                               logs=lambda: logs(done))
            if timeout is not None and timeout < seconds:
                return stopped(states.ATTEMPT_TIMEOUT, min(steps, math.ceil(timeout / per_step)),
                               'huey.exceptions.TaskTimeout', f'timeout {timeout}s',
                               _timeout_tail())
            if rng.random() < 0.02:
                done = rng.randrange(1, steps + 1)
                return stopped(states.ATTEMPT_CANCELED, done, 'app.task_api.Canceled',
                               f'canceled by an operator at {done / steps:.0%} '
                               f'(step {done} of {steps})', _cancel_tail())
            return Outcome(states.ATTEMPT_SUCCEEDED, seconds + rng.uniform(0.001, 0.02),
                           result={'slept': seconds}, logs=logs)
        if task == 'payment':
            digits = DIGITS[params['card']]
            logs = ((0.001, 'INFO', f'authorizing {params["amount"]:.2f} {params["currency"]} '
                                    f'on card ending {digits[-4:]}'),)
            if params['amount'] > 10_000:
                message = (f'issuer declined {params["amount"]:.2f} {params["currency"]}: '
                           f'over the card limit')
                return Outcome(states.ATTEMPT_FAILED, rng.uniform(0.001, 0.005),
                               'huey_tasks.CardDeclined', message,
                               _traceback('payment', "raise CardDeclined(f'issuer declined "
                                          "{amount:.2f} {currency}: over the card limit')", '',
                                          'huey_tasks.CardDeclined', message), gap=-1)
            if rng.random() < 0.001:
                return self._lost(rng.uniform(0.05, 0.3), rerun=False)
            if rng.random() < params['failure_rate']:
                message = 'no answer from the gateway within 30 s'
                return Outcome(states.ATTEMPT_FAILED, rng.uniform(0.05, 0.3),
                               'huey_tasks.GatewayTimeout', message,
                               _traceback('payment', "raise GatewayTimeout('no answer from the "
                                          "gateway within 30 s')", '',
                                          'huey_tasks.GatewayTimeout', message), logs=logs)
            return Outcome(states.ATTEMPT_SUCCEEDED, rng.uniform(0.07, 0.4), logs=logs, result={
                'charged': params['amount'], 'currency': params['currency'],
                'card': '**** ' + digits[-4:],
                'authorization': f'AUTH-{rng.getrandbits(32):08X}'})
        if task == 'flaky':
            failures = params['failures']
            if number <= failures:
                message = f'attempt {number} of a job set to fail {failures} times'
                return Outcome(states.ATTEMPT_FAILED, rng.uniform(0.0005, 0.003), 'RuntimeError',
                               message, _traceback(
                                   'flaky', "raise RuntimeError(f'attempt {attempt} of a job set "
                                   "to fail {failures} times')", '', 'RuntimeError', message))
            return Outcome(states.ATTEMPT_SUCCEEDED, rng.uniform(0.0005, 0.003),
                           result={'succeeded_on_attempt': number})
        if task == 'fail':
            message = params['message']
            return Outcome(states.ATTEMPT_FAILED, rng.uniform(0.0005, 0.003), 'RuntimeError',
                           message, _traceback('fail', 'raise RuntimeError(message)', '',
                                               'RuntimeError', message))
        if task == 'report':
            counts = {f'{name} {state}': rng.randrange(1, 400)
                      for name in ('noop', 'payment', 'sleep') for state in ('succeeded',)}
            counts[f'payment {states.FAILED}'] = rng.randrange(0, 12)
            logs = tuple((0.01, 'INFO', f'{k.split()[0]}: {v} {k.split()[1]}')
                         for k, v in sorted(counts.items()))
            return Outcome(states.ATTEMPT_SUCCEEDED, rng.uniform(0.02, 1.5), result=counts,
                           logs=logs)
        if task == 'purge':
            deleted = rng.randrange(0, 20_000)
            return Outcome(states.ATTEMPT_SUCCEEDED, rng.uniform(0.5, 30.0),
                           result={'deleted': deleted},
                           logs=((0.1, 'INFO', f'deleted {deleted} jobs finished more than '
                                              f'{params["days"]} days ago'),))
        return Outcome(states.ATTEMPT_SUCCEEDED, 0.001)

    def _lost(self, duration, rerun=True):
        """An attempt whose consumer died: the leader records it lost ~35 s later."""
        silent = self.config['LOST_AFTER'] + self.rng.uniform(1, self.config['REAP_INTERVAL'])
        message = (f'its consumer died (its lease ran out) before the outcome was recorded, '
                   f'{silent:.0f} s after its last heartbeat')
        if not rerun:
            message += ' (not safe to run twice)'
        return Outcome(states.ATTEMPT_LOST, duration + silent, 'WorkerLost', message,
                       gap=None if rerun else -1)

    def _interrupted(self, duration):
        message = 'the consumer stopped during this attempt; re-enqueued'
        return Outcome(states.ATTEMPT_INTERRUPTED, duration, 'RuntimeError', message,
                       gap=self.rng.uniform(5, 30))

    def _retry_delay(self, retry_delay, k):
        """Seconds before retry ``k`` (1, 2, ...): doubling, with jitter (the broker's policy)."""
        jitter = self.config['RETRY_JITTER']
        return (retry_delay * self.config['RETRY_BACKOFF'] ** (k - 1)
                * self.rng.uniform(1 - jitter, 1 + jitter))

    # -- stories ----------------------------------------------------------------

    def stories(self, chunk=CHUNK):
        """The stories of every job, oldest first, in lists of at most ``chunk``."""
        live = min(LIVE_MAX, self.n // 50) if self.n >= 200 else min(4, self.n // 10)
        history = self.n - live
        offsets = self._offsets(history, newest=120.0)
        names, cum = self.task_names, self.task_cum
        total, random_ = cum[-1], self.rng.random
        batch = []
        for offset in offsets:
            task = names[bisect.bisect(cum, random_() * total)]
            created = self.now - dt.timedelta(seconds=offset)
            batch.append(self._history(task, created))
            if len(batch) >= chunk:
                yield batch
                batch = []
        kinds = (states.SCHEDULED, states.QUEUED, states.RUNNING, states.RETRYING)
        for i in range(live):
            batch.append(self._live(kinds[i % len(kinds)]))
            if len(batch) >= chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    def _queue(self, task):
        if task in ('report', 'purge'):
            return 'default'
        return self.queues[bisect.bisect(self.queue_cum, self.rng.random() * self.queue_cum[-1])]

    def _history(self, task, created):
        """A job submitted at ``created`` that has run its course by now."""
        rng = self.rng
        # Periodic tasks start at their hour (report: every hour; purge: 03:00).
        if task == 'report':
            created = created.replace(minute=0, second=0, microsecond=0)
            if created < self.start:
                created += dt.timedelta(hours=1)
        elif task == 'purge':
            created = created.replace(hour=3, minute=0, second=0, microsecond=0)
            if created > self.now - dt.timedelta(hours=1):
                created -= dt.timedelta(days=1)
            if created < self.start:
                created += dt.timedelta(days=1)
        key = None
        if task in ('report', 'purge'):
            key = f'periodic:{task}:{created:%Y-%m-%dT%H:%M}Z'
            if key in self.ticks or not self.start <= created <= self.now:
                task, key = 'noop', None  # that tick has its job already
            else:
                self.ticks.add(key)
                created += dt.timedelta(seconds=rng.uniform(0.05, 2.0))
        params, retries, retry_delay, priority, timeout = self._submission(task)
        shown, secret = self._split(task, params)
        job_id = self._id()
        row, initial, eta = 'ledger', states.QUEUED, None
        if key is not None:
            row = 'api'
        if timeout is not None:
            row = 'api'
        if task not in ('report', 'purge') and rng.random() < DELAYED:
            row, initial = 'api', states.SCHEDULED
            eta = created + dt.timedelta(seconds=rng.choice((60, 300, 900, 3600, 86400)))
        queue = self._queue(task)
        if rng.random() < CANCEL_WAITING:
            at = (eta or created) + dt.timedelta(seconds=rng.uniform(0.2, 20))
            late = at - (self.now - dt.timedelta(seconds=5))
            if late > dt.timedelta(0):  # a delay that would end in the future: earlier
                at, created, eta = at - late, created - late, eta - late if eta else None
            return Story(job_id, task, queue, shown, secret, priority, retries, retry_delay,
                         created, row, initial, eta, timeout, key, [], [], at, states.CANCELED)
        # Picked up after a short wait; now and then a backlog held it for minutes.
        wait = rng.expovariate(8.0) if rng.random() < 0.99 else rng.uniform(10, 600)
        at = (eta or created) + dt.timedelta(seconds=wait)
        ops, state, last = self._run(job_id, task, queue, shown, secret, params, priority,
                                     retries, retry_delay, timeout, at, limit=None)
        # A history whose last attempt would end in the future is moved back.
        late = (last - (self.now - dt.timedelta(seconds=5))).total_seconds()
        if late > 0:
            shift = dt.timedelta(seconds=late)
            created -= shift
            eta = eta - shift if eta else None
            ops = [op._replace(at=op.at - shift) for op in ops]
        return Story(job_id, task, queue, shown, secret, priority, retries, retry_delay,
                     created, row, initial, eta, timeout, key, ops, [], None, state)

    def _run(self, job_id, task, queue, shown, secret, params, priority, retries, retry_delay,
             timeout, at, limit):
        """The attempts of a job first started at ``at``: ``(ops, state, when the last ended)``.

        ``limit`` stops after that many attempts (a job still retrying).
        """
        rng, ops = self.rng, []
        number = 0
        while True:
            number += 1
            consumer, worker = self._worker(at)
            o = self._attempt(task, params, number, timeout)
            end = at + dt.timedelta(seconds=o.duration)
            retries_left = retries - number + 1  # after this attempt, counting it
            # An interrupted attempt runs again whatever its retries (interrupted.requeue).
            final = o.outcome != states.ATTEMPT_INTERRUPTED and (
                o.outcome in (states.ATTEMPT_SUCCEEDED, states.ATTEMPT_CANCELED)
                or o.gap == -1 or retries_left <= 0)
            ops.append(Start(job_id, number, worker, at, task, queue, shown, priority, retries,
                             retry_delay, secret))
            if o.logs and rng.random() < LOG_SHARE.get(task, 0.0):
                ops.extend(Log(job_id, number, at + dt.timedelta(seconds=s), level, line)
                           for s, level, line in (o.logs() if callable(o.logs) else o.logs))
            ops.append(Finish(job_id, number, o.outcome, end, o.duration, o.error_type,
                              o.message, o.traceback, o.result, final, task, queue))
            self.processed[consumer] += 1
            if o.outcome != states.ATTEMPT_SUCCEEDED:
                self.failed[consumer] += 1
            if final:
                break
            if limit is not None and number >= limit:
                delay = self._retry_delay(retry_delay, number)
                ops.append(Scheduled(job_id, end + dt.timedelta(seconds=delay), task, queue))
                return ops, states.RETRYING, end
            gap = o.gap if o.gap is not None and o.gap >= 0 else self._retry_delay(
                retry_delay, number)
            at = end + dt.timedelta(seconds=gap + rng.expovariate(20.0))
        if o.outcome == states.ATTEMPT_SUCCEEDED:
            return ops, states.SUCCEEDED, end
        if o.outcome == states.ATTEMPT_CANCELED:
            return ops, states.CANCELED, end
        return ops, states.FAILED, end

    def _live(self, kind):
        """A job in ``kind`` (scheduled, queued, running, retrying) now.

        Short tasks only, and payments (never run twice) for the running
        ones: a server started on the ledger later runs the waiting ones and
        fails the running ones as lost, and none of that may hold its
        workers for long.
        """
        rng, now = self.rng, self.now
        task = {states.SCHEDULED: rng.choice(('noop', 'sleep', 'payment')),
                states.QUEUED: rng.choice(('noop', 'sleep', 'payment')),
                states.RUNNING: 'payment',
                states.RETRYING: rng.choice(('payment', 'flaky', 'fail'))}[kind]
        params, retries, retry_delay, priority, timeout = self._submission(task)
        if task == 'sleep':
            params['seconds'] = min(params['seconds'], 5.0)
            timeout = None
        if task == 'payment':
            params['amount'] = min(params['amount'], 9_999.0)
        if kind == states.RUNNING:
            params['latency'] = 60.0  # a slow gateway
        if kind == states.RETRYING:
            retries = max(retries, 2)
            retry_delay = 60.0
            if task == 'payment':
                params['failure_rate'] = 1.0
            elif task == 'flaky':
                params['failures'] = 3
        shown, secret = self._split(task, params)
        job_id, queue = self._id(), self._queue(task)
        row = 'api' if timeout is not None else 'ledger'
        if kind == states.SCHEDULED:
            created = now - dt.timedelta(seconds=rng.uniform(0, 6 * 3600))
            eta = now + dt.timedelta(seconds=rng.uniform(60, 2 * 86400))
            return Story(job_id, task, queue, shown, secret, priority, retries, retry_delay,
                         created, 'api', states.SCHEDULED, eta, timeout, None, [], [], None,
                         states.SCHEDULED)
        if kind == states.QUEUED:
            created = now - dt.timedelta(seconds=rng.uniform(0, 60))
            return Story(job_id, task, queue, shown, secret, priority, retries, retry_delay,
                         created, row, states.QUEUED, None, timeout, None, [], [], None,
                         states.QUEUED)
        if kind == states.RUNNING:
            created = now - dt.timedelta(seconds=rng.uniform(1, 40))
            at = created + dt.timedelta(seconds=rng.expovariate(8.0))
            consumer, worker = self._worker(now)
            self.running.setdefault(consumer, []).append(job_id)
            digits = DIGITS[params['card']]
            later = [Start(job_id, 1, worker, at, task, queue, shown, priority, retries,
                           retry_delay, secret),
                     Log(job_id, 1, at + dt.timedelta(milliseconds=1), 'INFO',
                         f'authorizing {params["amount"]:.2f} {params["currency"]} on card '
                         f'ending {digits[-4:]}'),
                     Progress(job_id, 1, 0.1, 'authorizing')]
            return Story(job_id, task, queue, shown, secret, priority, retries, retry_delay,
                         created, row, states.QUEUED, None, timeout, None, [], later, None,
                         states.RUNNING)
        # retrying: its first attempt failed moments ago; the retry is due in a minute
        created = now - dt.timedelta(seconds=rng.uniform(2, 20))
        at = created + dt.timedelta(seconds=rng.expovariate(8.0))
        ops, state, _ = self._run(job_id, task, queue, shown, secret, params, priority,
                                  retries, retry_delay, timeout, at, limit=1)
        return Story(job_id, task, queue, shown, secret, priority, retries, retry_delay,
                     created, row, states.QUEUED, None, timeout, None, ops, [], None, state)

    def heartbeats(self):
        """Every consumer's last heartbeat (the attempts it ended), and "stopped" for past ones."""
        ops = []
        for c in self.consumers:
            seen = c.stopped_at or self.now
            ops.append(Heartbeat(c.name, c.host, c.pid, self.queues, THREADS, c.started_at,
                                 seen, self.processed[c.name], self.failed[c.name],
                                 sorted(self.running.get(c.name, ())),
                                 c.host == CONSUMER_HOSTS[0]))
            if c.stopped_at is not None:
                ops.append(Stopped(c.name, c.stopped_at))
        return ops


# -- writing ------------------------------------------------------------------------------

class Chunk(NamedTuple):
    """One transaction's worth of stories, in the form the writes take.

    ``rows``: job rows (the values of :data:`JOB_COLUMNS`, as the driver takes them);
    ``submitted``: rows of the jobs ``jobs.submit`` writes (the columns it
    writes and :data:`JOB_COLUMNS`, by name); ``ops`` and ``later``: what
    :func:`apply` writes, in two passes; ``attempt_rows``, ``log_rows`` and
    ``history``: what the settled jobs' ops add (see :func:`settle`);
    ``cancels``: ``(job id, when)`` of the other jobs canceled while they
    waited; ``states`` (Counter), ``attempts`` and ``logs``: what it adds
    up to.
    """
    rows: list
    submitted: list
    ops: list
    later: list
    attempt_rows: list
    log_rows: list
    history: dict
    cancels: list
    states: Counter
    attempts: int
    logs: int


# A job's row: the columns the ledger's insert for a job it has not seen
# writes (``sql['job']``), and those its writer's updates set as attempts
# start and end (``sql['ran']``, ``sql['finish']``).
JOB_COLUMNS = ('id', 'task', 'queue', 'params', 'secret_params', 'priority', 'retries',
               'retry_delay', 'created_at', 'state', 'attempts', 'started_at', 'finished_at',
               'run_seconds', 'worker', 'result', 'error', 'error_type', 'progress', 'updated_at',
               'version')


def _settled(story):
    """True when ``story``'s ops take its job to the end (succeeded, failed or canceled
    by its last attempt) with nothing after them, or it was canceled while it waited:
    :func:`settle` writes its rows."""
    if story.canceled_at is not None:
        return not story.ops and not story.later
    return bool(story.ops) and not story.later and story.state in states.FINISHED


def settle(story, d, now, attempts, logs, ended, waited):
    """The job row of a settled story (see :func:`_settled`) as :func:`apply` leaves it
    after all its ops, as a dict of :data:`JOB_COLUMNS` (naive UTC datetimes, Python
    values); its attempt and log rows are appended to ``attempts`` and ``logs`` (the
    statements' values) and what the metric history learns to ``ended`` and ``waited``.

    Written in one insert, a job's row moves the counters, rollups and
    search index the database keeps once, to its last state, as the insert
    and the updates through :func:`apply` move them in all.
    ``tests/test_bench_seed.py`` checks that a ledger written so equals one
    written through :func:`apply`, row for row.
    ``now`` is the time of the writing (``updated_at``). A job canceled
    while it waited is its row as submitted, changed once as ``jobs.cancel``
    changes it (:func:`app.jobs.change`).
    """
    if story.canceled_at is not None:
        return {**_waiting(story), 'state': states.CANCELED, 'finished_at': story.canceled_at,
                'updated_at': now, 'version': 2}
    ts = d.ts
    # A job becomes due when submitted, or at its time (history.due_seconds).
    due = story.scheduled_for
    before = story.created  # its row's last change before the first attempt
    start = finish = None
    for op in story.ops:
        if type(op) is Start:
            start = op
            seconds = history.due_seconds(op.at, due, before)
            if seconds is not None:
                waited.append((op.job_id, history.Waited(op.queue, message.task_name(op.task),
                                                         op.at, seconds)))
        elif type(op) is Finish:
            finish = op
            attempts.append((op.job_id, op.number, start.worker, op.outcome, ts(start.at),
                             ts(op.at), op.duration, op.error_type, op.error_message,
                             op.traceback))
            ended.append(history.Ended(op.queue, message.task_name(op.task), op.outcome,
                                       op.at, op.final, op.duration))
            due, before = None, op.at  # a retry is due when this attempt ended
        elif type(op) is Log:
            logs.append((op.job_id, op.number, ts(op.at), op.level, op.message))
    state, finished, result, error, progress = job_end(finish)
    secret = story.secret or None
    return dict(
        id=story.id, task=story.task, queue=story.queue, params=story.params,
        secret_params=None if state == states.SUCCEEDED else secret, priority=story.priority,
        retries=story.retries, retry_delay=story.retry_delay, created_at=story.created,
        state=state, attempts=finish.number, started_at=start.at, finished_at=finished,
        run_seconds=finish.duration, worker=start.worker, result=result, error=error,
        error_type=finish.error_type, progress=progress, updated_at=now,
        version=1 + finish.number)


def _waiting(story):
    """The row of a job as submitted (no attempt yet), as a dict of :data:`JOB_COLUMNS`."""
    return dict(id=story.id, task=story.task, queue=story.queue, params=story.params,
                secret_params=story.secret or None, priority=story.priority,
                retries=story.retries, retry_delay=story.retry_delay, created_at=story.created,
                state=story.initial, attempts=0, started_at=None, finished_at=None,
                run_seconds=None, worker=None, result=None, error=None, error_type=None,
                progress=None, updated_at=story.created, version=1)


def chunk_of(stories, d, settled=True, now=None):
    """The :class:`Chunk` of ``stories``, with ``d`` (:func:`app.ledger.sql.dialect`)'s values.

    With ``settled``, jobs whose ops take them to the end, and those
    canceled while they waited, are written in their last state
    (:func:`settle`), the rest through :func:`apply`; without, every op
    goes through :func:`apply` (and every cancel through ``jobs.change``). ``now``: the time of the
    writing (default: now).
    """
    from app.models import utcnow

    ts, json = d.ts, d.json
    now = now or utcnow()
    stamp = ts(now)
    rows, submitted, attempts, logs, ended, waited, ops, cancels = [], [], [], [], [], [], [], []
    for s in stories:
        if settled and _settled(s):
            job = settle(s, d, now, attempts, logs, ended, waited)
        else:
            job = _waiting(s)
            ops.extend(s.ops)
            if s.canceled_at is not None:
                cancels.append((s.id, s.canceled_at))
        if s.row == 'ledger':
            rows.append((job['id'], job['task'], job['queue'], json(job['params']),
                         json(job['secret_params']), job['priority'], job['retries'],
                         job['retry_delay'], ts(job['created_at']), job['state'],
                         job['attempts'], ts(job['started_at']), ts(job['finished_at']),
                         job['run_seconds'], job['worker'], json(job['result']), job['error'],
                         job['error_type'], job['progress'],
                         stamp if job['updated_at'] is now else ts(job['updated_at']),
                         job['version']))
        else:
            job.update(attempt_base=0, timeout=s.timeout, idempotency_key=s.idempotency_key,
                       scheduled_for=s.scheduled_for if job['attempts'] == 0 else None)
            submitted.append(job)
    # The writer reads the rows it waits for in the order of their ids.
    waited.sort(key=lambda pair: pair[0])
    later = [op for s in stories for op in s.later]
    kinds = Counter(type(op) for op in itertools.chain(ops, later))
    return Chunk(rows, submitted, ops, later, attempts, logs,
                 history.tally(d, ended, [w for _id, w in waited]),
                 cancels,
                 Counter(s.state for s in stories), kinds[Start] + len(attempts),
                 kinds[Log] + len(logs))


def write(session, chunk):
    """Write a :class:`Chunk` in ``session``'s transaction (the caller commits)."""
    from app.jobs import change
    from app.models import Job

    conn = session.connection()
    d = dialect(conn)
    if chunk.rows:
        d.insert_rows(conn, 'job', JOB_COLUMNS, chunk.rows)
    if chunk.submitted:
        conn.execute(sa.insert(Job.__table__), chunk.submitted)
    if chunk.attempt_rows:
        conn.exec_driver_sql(d.sql['attempt'], chunk.attempt_rows)
    if chunk.log_rows:
        conn.exec_driver_sql(d.sql['log'], chunk.log_rows)
    if chunk.history:
        history.write(conn, chunk.history)
    if chunk.ops:
        apply(conn, chunk.ops)
    for job_id, at in chunk.cancels:  # as jobs.cancel does for a job that waits
        change(Job.id == job_id, Job.state.in_(states.WAITING), state=states.CANCELED,
               finished_at=at, progress_message=None)
    if chunk.later:
        apply(conn, chunk.later)


def _produce(out, n, days, now, seed_, config, tasks, chunk, d, settled=True, other_end=None):
    """The generating process: sends each :class:`Chunk` in order on ``out`` (a pipe's
    end), then the heartbeats.

    Messages are ``('chunk', tuple(Chunk))``, ``('beats', ops)`` last, or
    ``('error', text)`` if generating failed. Plain tuples: this module may
    be loaded under a name the receiving side cannot import by.
    """
    import traceback
    # Ended by the writing process (SIGTERM, as it is by default), or by its
    # pipe closing; Ctrl-C reaches the writing process, which ends this one.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if other_end is not None:
        # This process's copy of the receiving end, closed: when the writing
        # process dies, sending fails and this one ends (and with it the
        # copies it holds of that process's database connections).
        other_end.close()
    try:
        for kind, value in _made(n, days, now, seed_, config, tasks, chunk, d, settled):
            out.send((kind, tuple(value) if kind == 'chunk' else value))
    except (BrokenPipeError, ConnectionResetError):
        return  # the writing process is gone: nothing to send to
    except BaseException:
        out.send(('error', traceback.format_exc()))
    finally:
        out.close()


def _made(n, days, now, seed_, config, tasks, chunk, d, settled=True):
    """Yield ``('chunk', Chunk)`` for each transaction, then ``('beats', ops)``, made here
    (``settled``: see :func:`chunk_of`)."""
    gen = Generator(n, days, now, seed_, config, tasks)
    for stories in gen.stories(chunk):
        yield 'chunk', chunk_of(stories, d, settled)
    yield 'beats', gen.heartbeats()


def _chunks(app, n, days, now, seed_, chunk, d, fork, settled=True):
    """Yield ``('chunk', Chunk)`` for each transaction, then ``('beats', ops)``.

    With ``fork``, the stories are made (and turned into writes) by
    :func:`_produce` in a process of its own, forked from this one, so that
    generating them overlaps writing them: each takes about half of a
    core's time. Raises RuntimeError if that process fails or ends early;
    the process is ended when the caller stops early. Without, they are
    made here between the writes (the same chunks).
    """
    import multiprocessing

    from app import catalog

    if not fork:
        yield from _made(n, days, now, seed_, app.config, catalog.TASKS, chunk, d, settled)
        return
    ctx = multiprocessing.get_context('fork')
    receiving, sending = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_produce, args=(sending, n, days, now, seed_, dict(app.config),
                                               catalog.TASKS, chunk, d, settled, receiving),
                        daemon=True)
    child.start()
    sending.close()
    # Chunks are received by a thread of this process, up to AHEAD at a
    # time: a pipe holds about one, and the generator makes chunks at the
    # same pace throughout while writing them slows as the ledger grows, so
    # it works ahead while the ledger is small. (Receiving, mostly
    # unpickling, overlaps SQLite's own work, which runs without the GIL.)
    received, stop = queue.Queue(maxsize=AHEAD), threading.Event()

    def pump():
        while not stop.is_set():
            try:
                message = receiving.recv()
            except (EOFError, OSError):
                message = ('eof', None)
            while not stop.is_set():
                try:
                    received.put(message, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if message[0] in ('eof', 'error', 'beats'):
                return
    pumping = threading.Thread(target=pump, name='seed-receiver', daemon=True)
    pumping.start()
    try:
        while True:
            kind, value = received.get()
            if kind == 'eof':
                child.join()
                raise RuntimeError(f'the generating process ended (exit code '
                                   f'{child.exitcode}) before its last chunk')
            if kind == 'error':
                raise RuntimeError(f'generating the stories failed:\n{value}')
            yield kind, (Chunk(*value) if kind == 'chunk' else value)
            if kind == 'beats':
                break
    finally:
        stop.set()
        if child.is_alive():
            child.terminate()  # its end of the pipe closes: recv() returns
        child.join()
        pumping.join()
        receiving.close()


def _bulk_journal(conn):
    """Journal in memory while seeding an empty SQLite ledger; return the mode to restore.

    Returns ``'wal'`` when the mode was changed (the caller sets it back),
    None when left as it was (another open connection keeps SQLite from
    leaving WAL mode). Not called for a ledger that already holds jobs
    (``--append``): it keeps its write-ahead log, so a seeding cut short
    cannot damage it.
    """
    # Every page a transaction changes is written once, to the file, instead
    # of to the log and then again by a checkpoint: a third less CPU time
    # per job (the log's writes and its index's look-ups). A seeding cut
    # short leaves a file to delete.
    # (The driver opens a transaction only before a write: the mode can
    # change here, which SQLite allows outside a transaction only.)
    mode = conn.exec_driver_sql('PRAGMA journal_mode=MEMORY').scalar()
    return 'wal' if mode == 'memory' else None


def _defer_indexes(conn):
    """Drop the job table's indexes while an empty ledger is seeded; return them, to be
    built again once it is written (:func:`_build_indexes`). Not called for a ledger that
    already holds jobs (``--append``), whose indexes stay.

    The indexes the models declare, unique ones excepted (they check what is
    written). Built once from the whole table they hold the same entries as
    when kept row by row, for a fraction of the time: the run-time indexes,
    in the order of run times, cost 10 s each at a million jobs kept row by
    row.
    """
    from app.models import Job

    indexes = sorted((i for i in Job.__table__.indexes if not i.unique), key=lambda i: i.name)
    for index in indexes:
        index.drop(conn)
    return indexes


def _build_indexes(session, indexes):
    """Build ``indexes`` (from :func:`_defer_indexes`) again, and commit."""
    session.rollback()  # what a seeding cut short had not committed
    for index in indexes:
        index.create(session.connection())
    session.commit()


def seed(app, n, days=180, seed=0, now=None, chunk=CHUNK, report=None, fork=True,
         settled=True):
    """Write ``n`` jobs of history into ``app``'s ledger (migrated); return a summary.

    ``now`` (naive UTC) is the end of the period (default: now); ``report(done,
    n)`` is called after each transaction. The summary has ``jobs``,
    ``states`` (Counter), ``attempts``, ``logs``, ``now`` and ``seconds``.
    With ``fork`` the stories are made in a forked process (see
    :func:`_chunks`), the same ones as without. With ``settled`` (the
    default) the jobs that have run their course are written in their last
    state, without it op by op (see :func:`chunk_of`): the same rows.
    Raises RuntimeError if making them fails, and what the database driver
    raises.
    """
    from app.extensions import db
    from app.ledger import tallies
    from app.models import utcnow

    now = now or utcnow().replace(microsecond=0)
    summary = {'jobs': 0, 'states': Counter(), 'attempts': 0, 'logs': 0, 'now': now}
    started = time.monotonic()
    with app.app_context():
        restore = None
        empty = not db.session.connection().exec_driver_sql(
            'SELECT EXISTS (SELECT 1 FROM job)').scalar()
        if db.engine.dialect.name == 'sqlite':
            # A bigger page cache for this connection (1 GiB): the indexes outgrow the
            # default 2 MiB.
            conn = db.session.connection()
            conn.exec_driver_sql('PRAGMA cache_size=-1048576')
            # Fewer, larger checkpoints when the log is kept (an append); no fsync: a
            # seeding cut short is started again.
            conn.exec_driver_sql('PRAGMA wal_autocheckpoint=20000')
            conn.exec_driver_sql('PRAGMA synchronous=OFF')
            restore = _bulk_journal(conn) if empty else None
        deferred = _defer_indexes(db.session.connection()) if empty else []
        db.session.commit()
        chunks, cut_short = None, False
        try:
            d = dialect(db.session.connection())
            chunks = _chunks(app, n, days, now, seed, chunk, d, fork, settled)
            for kind, made in chunks:
                if kind == 'beats':
                    apply(db.session.connection(), made)
                    db.session.commit()
                    break
                write(db.session, made)
                # The search index brought up to date, as the ledger's writer
                # does about once a second (SQLite; PostgreSQL's is synchronous).
                while tallies.index_pending(db.session.connection()):
                    pass
                db.session.commit()
                summary['states'] += made.states
                summary['jobs'] = summary['states'].total()
                summary['attempts'] += made.attempts
                summary['logs'] += made.logs
                if report:
                    report(summary['jobs'], n)
        except KeyboardInterrupt:
            # Cut short (Ctrl-C, SIGTERM), raised again once the ledger is
            # whole. Not kept: the interrupt's traceback holds the statement
            # it stopped, and SQLite closes that statement's connection, and
            # lets go of its write lock, only once the statement is freed.
            cut_short = True
        finally:
            if chunks is not None:
                chunks.close()  # the generating process ends now
            if cut_short:
                gc.collect()  # the interrupted statement and its connection
            # Built even for a seeding cut short: the ledger it leaves is whole.
            _build_indexes(db.session, deferred)
            if restore:
                db.session.rollback()
                db.session.connection().exec_driver_sql(f'PRAGMA journal_mode={restore}')
            db.session.remove()
        if cut_short:
            raise KeyboardInterrupt
        if db.engine.dialect.name == 'postgresql':
            # What autovacuum does in months of history: the counters' dead
            # row versions cleared, statistics for the planner.
            with db.engine.connect().execution_options(isolation_level='AUTOCOMMIT') as conn:
                conn.exec_driver_sql('VACUUM (ANALYZE) job_count, job_minute, job')
    summary['seconds'] = time.monotonic() - started
    return summary


def job_count(app):
    from app.extensions import db
    with app.app_context():
        try:
            return db.session.execute(sa.text('SELECT count(*) FROM job')).scalar()
        finally:
            db.session.remove()


def make_app(database_url=None, queues=None):
    """The app on ``database_url`` (default: the configured ledger), migrated to the head.

    With a ``database_url`` and no ``INSTANCE_PATH`` in the environment, the
    app's instance folder is a temporary one, removed at exit: seeding a
    ledger elsewhere leaves nothing (a secret key, ``instance/``) in the
    checkout.
    """
    from flask_migrate import upgrade

    from app import create_app
    overrides = {'PERIODIC': 0, 'LOG_LEVEL': 'WARNING'}
    if database_url:
        overrides['DATABASE_URL'] = database_url
        if not os.environ.get('INSTANCE_PATH'):
            instance = tempfile.TemporaryDirectory(prefix='qm-seed-')
            atexit.register(instance.cleanup)
            overrides['INSTANCE_PATH'] = instance.name
    if queues:
        overrides['QUEUES'] = queues
    app = create_app(overrides)
    with app.app_context():
        upgrade()
    return app


def _url(value):
    """A path is a SQLite file; anything with ``://`` is a database URL (``:memory:`` too).

    A SQLite file named by a relative path, as a path or in a URL, is taken
    from the current folder (the app would take it from its instance folder,
    a temporary one here, removed at exit with the ledger in it).
    """
    if value is None:
        return value
    if '://' not in value:
        if value == ':memory:':
            return 'sqlite:///:memory:'
        return f'sqlite:///{Path(value).resolve()}'
    try:
        parsed = sa.engine.make_url(value)
    except sa.exc.ArgumentError:
        return value  # said when the app is made
    database = parsed.database or ''
    if parsed.get_backend_name() != 'sqlite' or _in_memory(value) or not database:
        return value
    uri = database.startswith('file:')
    path = database[len('file:'):] if uri else database
    if Path(path).is_absolute():
        return value
    absolute = str(Path(path).resolve())
    return parsed.set(database=f'file:{absolute}' if uri else absolute).render_as_string(
        hide_password=False)


def _in_memory(url):
    """True for a SQLite URL of an in-memory database (gone when the seeding ends):
    ``sqlite://``, ``:memory:``, or a URI one (``file::memory:``, ``?mode=memory``)."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return False
    if parsed.get_backend_name() != 'sqlite':
        return False
    database = parsed.database or ''
    return (database in ('', ':memory:') or parsed.query.get('mode') == 'memory'
            or database.startswith('file::memory:') or 'mode=memory' in database)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _shown_url(url):
    """A database URL as a message may show it: its password hidden, whether in its
    user part or in its query (libpq's ``?password=``)."""
    if not url:
        return '(the configured one)'
    try:
        parsed = sa.engine.make_url(_url(url))
    except sa.exc.ArgumentError:
        return '(the --database-url given)'
    if 'password' in parsed.query:
        parsed = parsed.update_query_dict({'password': '***'})
    return parsed.render_as_string(hide_password=True)


MAX_DAYS = 36_500  # --days at most: a century
EARLIEST, LATEST = dt.datetime(1970, 1, 1), dt.datetime(9000, 1, 1)  # a period's bounds


def _whole_number(text):
    """An argument's whole number, in ASCII digits (``int()`` also takes '1_000' and '٣')."""
    from app.catalog import whole_number
    try:
        return whole_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f'{text!r}: {exc} (ASCII digits)') from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=_whole_number, required=True, help='jobs to write')
    parser.add_argument('--database-url', help='the ledger (a URL or a SQLite file); default: '
                        "the app's configured one")
    parser.add_argument('--days', type=float, default=180, help='history spans this many days')
    parser.add_argument('--seed', type=_whole_number, default=0,
                        help='the same seed, the same ledger')
    parser.add_argument('--now', help='the end of the period (ISO 8601, UTC); default: now')
    parser.add_argument('--queues', help='queues to spread jobs over (default: QUEUES)')
    parser.add_argument('--append', action='store_true',
                        help='write into a ledger that already holds jobs')
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error('--jobs must be 0 or more')
    if not (math.isfinite(args.days) and 0 < args.days <= MAX_DAYS):
        parser.error(f'--days must be more than 0 and at most {MAX_DAYS:,} (a century)')
    now = None
    if args.now:
        from app.catalog import parse_eta
        try:
            now = parse_eta(args.now)
        except ValueError as exc:
            parser.error(f'--now: {exc}')
    # The period, and the retries and runs that go on past its end, stay
    # within the years a datetime (and the databases) can hold.
    end = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    if not EARLIEST + dt.timedelta(days=args.days) <= end <= LATEST:
        parser.error(f'--now and --days: the period must start after {EARLIEST:%Y-%m-%d} '
                     f'and end before {LATEST:%Y-%m-%d}')
    if args.database_url is not None and not args.database_url.strip():
        parser.error('--database-url: empty; give a file or a database URL, or leave it out '
                     "for the app's configured ledger")
    ledger_url = _url(args.database_url)
    if ledger_url and _in_memory(ledger_url):
        parser.error('--database-url: an in-memory ledger is gone when seeding ends; '
                     'give a file or a database URL')
    from app.config import ConfigError
    try:
        app = make_app(ledger_url, args.queues)
        existing = job_count(app)
    except ConfigError as exc:
        parser.error(str(exc))
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, sa.exc.DBAPIError,
            ImportError) as exc:
        # A URL that is no URL or whose options the driver refuses, a driver
        # not installed, a database that cannot be opened (or a file that is none).
        sys.exit(f'cannot open the ledger {_shown_url(args.database_url)}: '
                 f'{(str(getattr(exc, "orig", None) or exc).splitlines() or ["?"])[0]}')
    if existing and not args.append:
        sys.exit(f'the ledger already holds {existing} jobs: seed an empty one, or give '
                 f'--append (with another --seed)')
    url = _shown_url(app.config['DATABASE_URL'])
    print(f'seeding {args.jobs} jobs over {args.days:g} days into {url} '
          f'(queues: {", ".join(app.config["QUEUES"])})', flush=True)

    def report(done, total):
        if done % 100_000 < CHUNK or done == total:
            print(f'  {done} jobs', flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: the generating process is ended
    try:
        summary = seed(app, args.jobs, days=args.days, seed=args.seed, now=now, report=report)
    except sa.exc.IntegrityError:
        sys.exit('the ledger already holds jobs of this --seed: give --append another one')
    except KeyboardInterrupt:
        sys.exit(f'seeding interrupted: {url} holds part of a history (committed '
                 f'transactions of 10,000 jobs); delete it, or drop the database, and seed again')
    by_state = ', '.join(f'{summary["states"][s]} {s}' for s in states.JOB_STATES)
    rate = summary['jobs'] / summary['seconds'] if summary['seconds'] else 0
    print(f'seeded {summary["jobs"]} jobs ({by_state}), {summary["attempts"]} attempts, '
          f'{summary["logs"]} log lines in {summary["seconds"]:.1f} s ({rate:,.0f} jobs/s)')
    return summary


if __name__ == '__main__':
    main()

"""Every task type, and the Huey a consumer runs.

Run a consumer with ``huey_consumer huey_tasks.huey`` (the ``default`` queue;
``QUEUE=name`` picks another). Each task declares its parameters once; the
submit form, the API and validation are generated from these declarations.
Tasks raise to fail and let Huey retry; they report progress with
:func:`progress`.
"""
import logging
import random
import time

from app import consumer, jobs, queries
from app.catalog import Param, periodic, task
from app.task_api import current, progress


def __getattr__(name):
    # ``huey_consumer huey_tasks.huey`` asks for ``huey``: only then is this
    # process a consumer, whose configuration is loaded (once) and whose
    # Hueys are wired; a web process importing the tasks loads nothing here.
    if name == 'huey':
        return consumer.serve()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# What tasks log through this logger is kept with their attempt and shown on
# the job page (INFO and up, whatever the process's own log level).
log = logging.getLogger('huey_tasks')
log.setLevel(logging.INFO)


class CardDeclined(Exception):
    """The issuer refused the payment: retrying cannot help."""


class GatewayTimeout(Exception):
    """The payment gateway did not answer in time: worth retrying."""


@task()
def noop():
    """Do nothing: measures the queue itself."""
    return None


@task(params=[
    Param('seconds', float, default=5.0, min=0, max=3600, help='Total time to sleep'),
    Param('steps', int, default=10, min=1, max=1000, help='Progress reports along the way'),
])
def sleep(seconds, steps):
    """Sleep, reporting progress after each step."""
    for step in range(steps):
        time.sleep(seconds / steps)
        log.info('step %d of %d done', step + 1, steps)
        progress(step + 1, steps, f'step {step + 1} of {steps}')
    return {'slept': seconds}


@task(params=[
    Param('failures', int, default=2, min=0, max=100,
          help='Attempts that fail before one succeeds'),
])
def flaky(failures):
    """Fail the first `failures` attempts, then succeed."""
    running = current()
    attempt = running.attempt if running else 1
    if attempt <= failures:
        raise RuntimeError(f'attempt {attempt} of a job set to fail {failures} times')
    return {'succeeded_on_attempt': attempt}


@task(params=[
    Param('message', str, default='this job always fails', max_length=500,
          help='The error message to raise'),
])
def fail(message):
    """Always raise RuntimeError(message)."""
    raise RuntimeError(message)


# A charge must not run twice: if its worker is lost mid-run it fails
# visibly instead of being re-run (rerun=False).
@task(no_retry=(CardDeclined,), rerun=False, params=[
    Param('amount', float, default=25.0, min=0.01, max=1_000_000, help='Amount to charge'),
    Param('currency', str, default='EUR', choices=('EUR', 'USD', 'GBP', 'JPY')),
    # Secret: shown masked (**** 4242) everywhere; the task gets the real number.
    Param('card', str, default='4242 4242 4242 4242', max_length=32, help='Card number',
          secret=True),
    Param('failure_rate', float, default=0.2, min=0, max=1,
          help='Chance the gateway times out (retried)'),
    Param('latency', float, default=0, min=0, max=600,
          help='Seconds the gateway takes to authorize (0: 0.05 to 0.3 at random)'),
])
def payment(amount, currency, card, failure_rate, latency):
    """Charge a card through a simulated gateway: slow, sometimes times out.

    Amounts over 10,000 are declined by the issuer (fails at once, no retry);
    gateway timeouts happen at `failure_rate` and are retried.
    """
    digits = ''.join(ch for ch in card if ch.isdigit())
    if not 12 <= len(digits) <= 19:
        raise CardDeclined(f'card number has {len(digits)} digits')
    if amount > 10_000:
        raise CardDeclined(f'issuer declined {amount:.2f} {currency}: over the card limit')
    log.info('authorizing %.2f %s on card ending %s', amount, currency, digits[-4:])
    progress(0.1, message='authorizing')
    time.sleep(latency or random.uniform(0.05, 0.3))
    if random.random() < failure_rate:
        raise GatewayTimeout('no answer from the gateway within 30 s')
    progress(0.8, message='capturing')
    time.sleep(random.uniform(0.02, 0.1))
    return {'charged': round(amount, 2), 'currency': currency, 'card': '**** ' + digits[-4:],
            'authorization': f'AUTH-{random.randrange(16 ** 8):08X}'}


@periodic(minute='0', hour='3', run_with={'days': 30}, retries=1, role='admin', params=[
    Param('days', int, default=30, min=1, max=3650, help='Keep finished jobs this many days'),
])
def purge(days):
    """Delete finished jobs older than `days` days, with their attempts and logs."""
    # Jobs run inside the app's context: the ledger's models are at hand.
    deleted = jobs.purge_finished(days, report=lambda done, total: progress(done, total))
    log.info('deleted %d jobs finished more than %d days ago', deleted, days)
    return {'deleted': deleted}


@periodic(minute='0', run_with={'hours': 1}, params=[
    Param('hours', int, default=1, min=1, max=24 * 31, help='Look back this many hours'),
])
def report(hours):
    """Log how many jobs of each task finished in the last `hours` hours, by state."""
    counts = queries.finished_counts(hours)
    for (task_name, state), n in sorted(counts.items()):
        log.info('%s: %d %s', task_name, n, state)
    return {f'{task_name} {state}': n for (task_name, state), n in sorted(counts.items())}

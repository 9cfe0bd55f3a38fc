"""Configuration: documented defaults, then the environment, then a test override.

Each process reads it once, through :func:`load`, and passes it down: a web
process in ``create_app``; a consumer process when ``huey_consumer`` asks for
``huey_tasks.huey`` (:func:`app.consumer.serve`), whose app is then built from
that same configuration; the ledger's writer process receives its parent's.
A web process and a consumer started with the same environment agree on the
broker, the queues and the database.
"""
import os
import re
import secrets
from pathlib import Path

from . import rules as rules_module

ROOT = Path(__file__).resolve().parent.parent
QUEUE_NAME = re.compile(r'[a-z][a-z0-9_]{0,31}')

# Every key, its default, and how to parse it from the environment. The README's
# configuration table mirrors this list.
DEFAULTS = {
    # Redis for the Huey queues and the event channel. Unset: the embedded mode
    # (Huey on SQLite, consumer threads inside the web process).
    'REDIS_URL': None,
    # The ledger. SQLite (WAL) by default; postgresql://... when hosts share it.
    'DATABASE_URL': None,  # -> sqlite:///<INSTANCE_PATH>/queue-manager.db
    # Signs sessions and flashed messages. Unset: a random key is generated once
    # and kept in INSTANCE_PATH/secret_key, so restarts and workers agree.
    'SECRET_KEY': None,
    # Where gunicorn listens (gunicorn.conf.py reads these).
    'HOST': '127.0.0.1',
    'PORT': 8000,
    # gunicorn worker processes (distributed mode; embedded uses one) and
    # threads per process for HTTP requests. Open WebSockets hold no thread
    # (they live on an event loop), so requests need only a few.
    'WEB_CONCURRENCY': 2,
    'WEB_THREADS': 32,
    # Most live sockets (open pages) one web process holds; one more is
    # closed with code 1013 and its page polls until a place is free.
    'LIVE_SOCKETS': 10000,
    # Proxies in front of the web process that terminate TLS or rewrite the
    # address (nginx, Caddy, a load balancer): how many of their
    # X-Forwarded-For/-Proto/-Host/-Port/-Prefix headers to trust. 0: none,
    # the request is taken as it arrives (anyone can send those headers).
    'PROXY_FIX': 0,
    # https: the site is served over HTTPS only; the session cookie is Secure
    # even on a request that arrived as plain HTTP (a proxy not trusted with
    # PROXY_FIX), and links built outside a request use https.
    'PREFERRED_URL_SCHEME': 'http',
    # Local state: the SQLite ledger, the embedded Huey database, the secret key.
    'INSTANCE_PATH': str(ROOT / 'instance'),
    # Embedded mode only: the Huey SQLite file and worker threads per queue.
    'HUEY_SQLITE_PATH': None,  # -> <INSTANCE_PATH>/huey.db
    'EMBEDDED_WORKERS': 4,
    # Named queues, comma separated; each is its own Huey instance.
    'QUEUES': 'default',
    # The modules that declare the task types, comma separated, imported by
    # the app as it starts (``huey_consumer`` imports its own first).
    'TASK_MODULES': 'huey_tasks',
    # Largest accepted request body (bytes), forms and API alike; bigger get a 413.
    'MAX_CONTENT_LENGTH': 64 * 1024,
    # Largest accepted body of POST /api/jobs/batch (up to 1,000 jobs a call).
    'MAX_BATCH_CONTENT_LENGTH': 4 * 1024 * 1024,
    # Retry policy when neither the task nor the submission says otherwise:
    # 2 retries (3 attempts in all), first retry after 5 s, doubling, +-25%.
    'DEFAULT_RETRIES': 2,
    'DEFAULT_RETRY_DELAY': 5.0,
    'RETRY_BACKOFF': 2.0,
    'RETRY_JITTER': 0.25,
    # How often the consumer's ledger writer flushes buffered changes (s).
    'LEDGER_FLUSH_INTERVAL': 0.05,
    # Consumers renew their lease in the broker (and their row in the ledger)
    # this often (s); a consumer whose lease is LOST_AFTER s old is gone, and
    # the leader (looking every REAP_INTERVAL s) returns what it held: its
    # jobs run again within LOST_AFTER + REAP_INTERVAL s of its death.
    'HEARTBEAT_INTERVAL': 5.0,
    'LOST_AFTER': 30.0,
    'REAP_INTERVAL': 5.0,
    # The leader compares waiting jobs in the ledger with the broker this
    # often (s); a job the broker does not hold is re-enqueued once it has
    # been missing RECONCILE_GRACE s, unchanged (a few seconds after the
    # broker lost its data, which is noticed on every REAP_INTERVAL pass).
    'RECONCILE_INTERVAL': 60.0,
    'RECONCILE_GRACE': 10.0,
    # 1: the leader starts periodic tasks on their schedules; 0: none is
    # started on this deployment (a staging copy, say; "run now" still works).
    'PERIODIC': 1,
    # How far back (s) a new leader starts periodic ticks the old one missed.
    'PERIODIC_CATCH_UP': 300.0,
    # Offline consumers leave the workers page after this long (s).
    'WORKER_RETENTION': 3600.0,
    # On SIGTERM or SIGINT a consumer lets running jobs finish for this long
    # (s), then puts the rest back in the queue.
    'GRACE_PERIOD': 25.0,
    # Lines of log kept per attempt.
    'LOG_LINES': 1000,
    # Rows per page on the jobs list and the API's default/maximum limit.
    'PAGE_SIZE': 50,
    'MAX_PAGE_SIZE': 500,
    'LOG_LEVEL': 'INFO',
    # Who must log in. auto: everyone in the distributed mode, or when HOST is
    # not a loopback address, or for requests from other machines; on a
    # loopback-only embedded server (make run) only once a user exists.
    # login: always.
    'AUTH': 'auto',
    # A session unused this long (s) ends: its user logs in again.
    'SESSION_IDLE_TIMEOUT': 8 * 3600.0,
    # Alert rules, a JSON array (see app/rules.py and the README's "Alerts");
    # unset: none. Checked at start: a bad rule stops the process, named.
    'ALERT_RULES': None,
    # Where alerts are posted (JSON with a Slack-compatible "text"), once
    # when one fires and once when it resolves. Unset: shown on the pages only.
    'ALERT_WEBHOOK_URL': None,
    # The leader evaluates the rules this often (s).
    'ALERT_INTERVAL': 20.0,
    # Seconds a webhook delivery may take; one that fails is retried on the
    # next evaluation.
    'ALERT_WEBHOOK_TIMEOUT': 5.0,
    # Seconds of per-minute metric history kept (30 days); the leader deletes
    # older rollups. The totals /metrics exposes are kept for ever.
    'METRICS_RETENTION': 30 * 86400.0,
    # Seconds audit entries are kept (a year), and resolved alerts (90 days);
    # the leader deletes older ones. 0: kept for ever.
    'AUDIT_RETENTION': 365 * 86400.0,
    'ALERT_RETENTION': 90 * 86400.0,
    # A token a scraper (Prometheus) may send as "Authorization: Bearer <token>"
    # to read /metrics, and nothing else. Unset: /metrics asks for a viewer.
    'METRICS_TOKEN': None,
}

_INT = {'PERIODIC', 'PORT', 'PROXY_FIX', 'WEB_CONCURRENCY', 'WEB_THREADS', 'LIVE_SOCKETS', 'EMBEDDED_WORKERS', 'MAX_CONTENT_LENGTH',
        'MAX_BATCH_CONTENT_LENGTH', 'DEFAULT_RETRIES', 'LOG_LINES',
        'PAGE_SIZE', 'MAX_PAGE_SIZE'}
_FLOAT = {'DEFAULT_RETRY_DELAY', 'RETRY_BACKOFF', 'RETRY_JITTER',
          'LEDGER_FLUSH_INTERVAL', 'HEARTBEAT_INTERVAL', 'LOST_AFTER', 'REAP_INTERVAL',
          'RECONCILE_INTERVAL', 'RECONCILE_GRACE', 'PERIODIC_CATCH_UP', 'WORKER_RETENTION', 'GRACE_PERIOD',
          'SESSION_IDLE_TIMEOUT', 'ALERT_INTERVAL', 'ALERT_WEBHOOK_TIMEOUT',
          'METRICS_RETENTION', 'AUDIT_RETENTION', 'ALERT_RETENTION'}


MAX_RETENTION = 100 * 365 * 86400.0  # seconds: any retention longer is refused


class ConfigError(ValueError):
    """A configuration value from the environment could not be used."""


def _parse(key, raw):
    try:
        if key in _INT:
            return int(raw)
        if key in _FLOAT:
            return float(raw)
    except ValueError:
        raise ConfigError(f'{key}={raw!r} is not a number') from None
    return raw


def load(test_config=None, environ=None):
    """Return the configuration as a dict: defaults, environment, overrides.

    Derived values (the SQLite paths, the queue list, the secret key) are
    filled in here so every consumer of the config sees the same result.
    """
    environ = os.environ if environ is None else environ
    config = dict(DEFAULTS)
    for key in DEFAULTS:
        raw = environ.get(key)
        if raw not in (None, ''):
            config[key] = _parse(key, raw)
    config.update(test_config or {})

    instance = Path(config['INSTANCE_PATH'])
    config['INSTANCE_PATH'] = str(instance)
    if not config['DATABASE_URL']:
        config['DATABASE_URL'] = f'sqlite:///{instance / "queue-manager.db"}'
    if config['DATABASE_URL'].startswith('postgres://'):
        # The scheme Heroku-style platforms hand out; SQLAlchemy wants the long one.
        config['DATABASE_URL'] = 'postgresql://' + config['DATABASE_URL'][len('postgres://'):]
    if config['DATABASE_URL'].startswith('postgresql://'):
        # psycopg 3 is the driver we ship.
        config['DATABASE_URL'] = 'postgresql+psycopg://' + config['DATABASE_URL'][len('postgresql://'):]
    if not config['HUEY_SQLITE_PATH']:
        config['HUEY_SQLITE_PATH'] = str(instance / 'huey.db')

    queues = config['QUEUES']
    if isinstance(queues, str):
        queues = [q.strip() for q in queues.split(',') if q.strip()]
    for name in queues:
        if not QUEUE_NAME.fullmatch(name):
            raise ConfigError(f'queue name {name!r}: use a lowercase letter, then up to 31 '
                              f'lowercase letters, digits or _')
    if 'default' not in queues:
        queues.insert(0, 'default')
    config['QUEUES'] = list(dict.fromkeys(queues))
    modules = config['TASK_MODULES']
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(',') if m.strip()]
    config['TASK_MODULES'] = list(modules)
    if config['PROXY_FIX'] < 0:
        raise ConfigError(f"PROXY_FIX={config['PROXY_FIX']!r}: the number of trusted proxies, 0 or more")
    if config['PREFERRED_URL_SCHEME'] not in ('http', 'https'):
        raise ConfigError(f"PREFERRED_URL_SCHEME={config['PREFERRED_URL_SCHEME']!r}: http or https")
    config['EMBEDDED'] = not config['REDIS_URL']
    # Retentions are subtracted from now: past a century (or inf, nan) the
    # leader's date arithmetic fails on every pass.
    if not 0 < config['METRICS_RETENTION'] <= MAX_RETENTION:
        raise ConfigError(f"METRICS_RETENTION={config['METRICS_RETENTION']!r}: seconds, "
                          f"more than 0 and at most {MAX_RETENTION:.0f} (a century)")
    for key in ('AUDIT_RETENTION', 'ALERT_RETENTION'):
        if not 0 <= config[key] <= MAX_RETENTION:
            raise ConfigError(f'{key}={config[key]!r}: seconds, 0 (kept for ever) or more, '
                              f'at most {MAX_RETENTION:.0f} (a century)')
    if config['AUTH'] not in ('auto', 'login'):
        raise ConfigError(f"AUTH={config['AUTH']!r}: use auto or login")
    try:
        config['ALERT_RULES'] = rules_module.parse(config['ALERT_RULES'], config['QUEUES'])
    except rules_module.RuleError as exc:
        raise ConfigError(f'ALERT_RULES: {exc}') from None
    url = config['ALERT_WEBHOOK_URL']
    if url and not re.match(r'https?://[^/\s]+', url):
        # Not echoed: a webhook's URL is its secret.
        raise ConfigError('ALERT_WEBHOOK_URL: an http:// or https:// URL')
    for key in ('ALERT_INTERVAL', 'ALERT_WEBHOOK_TIMEOUT'):
        if not config[key] > 0:
            raise ConfigError(f'{key}={config[key]!r}: a number of seconds above 0')
    return config


# What :func:`load` returns: every setting, and the mode it implies.
KEYS = (*DEFAULTS, 'EMBEDDED')


def of(mapping):
    """The loaded configuration held in ``mapping`` (an app's ``config``, say), as a dict.

    For passing configuration down to another process (the ledger's writer
    process) without reading the environment again. Raises ``KeyError`` if
    ``mapping`` lacks a setting.
    """
    return {key: mapping[key] for key in KEYS}


def secret_key(config):
    """The configured SECRET_KEY, or one generated once and kept on disk."""
    if config.get('SECRET_KEY'):
        return config['SECRET_KEY']
    path = Path(config['INSTANCE_PATH']) / 'secret_key'
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then linked into place: when several workers start at
    # once exactly one link succeeds and nobody reads a half-written file.
    tmp = path.with_name(f'.secret_key.{os.getpid()}')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(secrets.token_hex(32))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()

"""gunicorn settings: ``gunicorn -c gunicorn.conf.py wsgi:app``.

gthread workers: each open WebSocket holds one thread for its lifetime, so
``threads`` bounds the live sockets per worker process (see the README).
"""
from app import config as qm_config

_config = qm_config.load()

bind = f"{_config['HOST']}:{_config['PORT']}"
worker_class = 'gthread'
threads = _config['WEB_THREADS']
# The embedded mode keeps its queues, consumers and event bus in one process.
workers = 1 if _config['EMBEDDED'] else _config['WEB_CONCURRENCY']
# Time for running requests (and, embedded, running jobs) to finish on stop.
graceful_timeout = 30
accesslog = '-'
loglevel = _config['LOG_LEVEL'].lower()


def post_worker_init(worker):
    if _config['EMBEDDED']:
        from app import embedded
        embedded.start(worker.wsgi)


_quick = False


def worker_int(worker):
    # SIGINT/SIGQUIT (Ctrl-C) mean "stop now": running jobs are put back in
    # the queue at once instead of being given the grace period.
    global _quick
    _quick = True


def worker_exit(server, worker):
    if _config['EMBEDDED']:
        from app import embedded
        embedded.stop(timeout=1 if _quick else graceful_timeout - 5)

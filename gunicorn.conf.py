"""gunicorn settings: ``gunicorn -c gunicorn.conf.py wsgi:app``.

gthread workers: each open WebSocket holds one thread for its lifetime, so
``threads`` bounds the live sockets per worker process (see the README).
Threads are started on demand; an idle one costs nothing.
"""
import signal

from app import config as qm_config

_config = qm_config.load()

bind = f"{_config['HOST']}:{_config['PORT']}"
worker_class = 'gthread'
threads = _config['WEB_THREADS']
worker_connections = threads + 100
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

    # On SIGTERM gunicorn waits for open requests, and a WebSocket is one
    # that never ends: close them first (code 1012) so pages reconnect to
    # another worker or to this one's successor.
    from app import live
    graceful = worker.handle_exit

    def handle_exit(signum, frame):
        live.hub.shutdown()
        graceful(signum, frame)
    signal.signal(signal.SIGTERM, handle_exit)


_quick = False


def worker_int(worker):
    # SIGINT/SIGQUIT (Ctrl-C) mean "stop now": sockets close at once and
    # running jobs go back to the queue instead of being given the grace period.
    global _quick
    _quick = True
    from app import live
    live.hub.shutdown()


def worker_exit(server, worker):
    if _config['EMBEDDED']:
        from app import embedded
        embedded.stop(timeout=1 if _quick else graceful_timeout - 5)

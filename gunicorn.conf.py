"""gunicorn settings: ``gunicorn -c gunicorn.conf.py wsgi:app``.

gthread workers (``app.serving.ThreadWorker``: new connections taken by the
workers in turn) serve HTTP with ``WEB_THREADS`` threads each. A WebSocket
request holds one of them only for its handshake: the socket is then handed
to the process's event-loop thread (app/sockets.py), so open pages never
take threads from pages, the API or /healthz. The README ("Capacity") says
why this model and not gevent workers.
"""
import resource
import signal

from app import config as qm_config

_config = qm_config.load()

bind = f"{_config['HOST']}:{_config['PORT']}"
worker_class = 'app.serving.ThreadWorker'
threads = _config['WEB_THREADS']
# HTTP connections (in flight and kept alive) per worker; live sockets are
# not among them once handed over. app/live.py keeps file descriptors for
# these out of LIVE_SOCKETS (FD_RESERVE).
worker_connections = 1000
# The embedded mode keeps its queues, consumers and event bus in one process.
workers = 1 if _config['EMBEDDED'] else _config['WEB_CONCURRENCY']
# Time for running requests (and, embedded, running jobs: GRACE_PERIOD) to
# finish on stop, with a few seconds to write the ledger out after them.
graceful_timeout = max(30, _config['GRACE_PERIOD'] + 5)
# The workers share one listening socket and take new connections in turn
# (app/serving.py): with gthread's own epoll accept, a few keep-alive clients
# all landed on one worker and one core while the other idled; a socket per
# worker (SO_REUSEPORT) spreads them by a hash, 2 clients on one worker half
# the time.
accesslog = '-'
# The longest request line gunicorn takes (its maximum; 4094 by default): a
# search or filter of MAX_FILTER (500) characters of any script, 12 bytes
# each percent-encoded, fits with a cursor beside it, where the default
# answered gunicorn's own 414 page before the app could check the value.
limit_request_line = 8190
# gunicorn would take X-Forwarded-Proto from any local peer (a proxy that
# passes the client's header on, another program on the host) as the
# request's scheme. The app trusts proxies only as PROXY_FIX says
# (app/headers.py), so gunicorn trusts none.
secure_scheme_headers = {}
loglevel = _config['LOG_LEVEL'].lower()

# Every live socket is an open file: take the whole allowance the system
# gives (the soft limit is often 1024 while the hard one is far higher).
# Workers inherit it.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard != resource.RLIM_INFINITY and _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def post_worker_init(worker):
    # A closing terminal sends SIGHUP to the whole process group; the master
    # reloads on it (stopping this worker gracefully), so the worker itself
    # must not die of it with pages open and, embedded, jobs running.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if _config['EMBEDDED']:
        from app import embedded
        embedded.start(worker.wsgi)


_quick = False


def worker_int(worker):
    # SIGINT/SIGQUIT (Ctrl-C) mean "stop now": sockets close at once and
    # running jobs go back to the queue instead of being given the grace period.
    global _quick
    _quick = True
    from app import live
    live.shutdown(worker.wsgi)


def worker_exit(server, worker):
    # Live sockets first, with 1012, so pages reconnect to another worker or
    # to this one's successor while running jobs (embedded) finish.
    from app import live
    live.stop(worker.wsgi)
    if _config['EMBEDDED']:
        from app import embedded
        grace = 1 if _quick else min(_config['GRACE_PERIOD'], graceful_timeout - 5)
        embedded.stop(worker.wsgi, timeout=grace)

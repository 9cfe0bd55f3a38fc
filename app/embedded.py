"""The embedded mode: Huey consumers as threads inside the web process.

With no ``REDIS_URL`` one process does everything: the queues live in a
SQLite file and this module runs their workers and scheduler as threads,
the way ``huey_consumer`` would run them in a process of its own.
"""
import logging
import threading

from . import broker, consumer

logger = logging.getLogger(__name__)

_consumers = []
_stop = threading.Event()
_monitor = None


def start(app):
    """Start the recorder and one consumer per queue, in threads (once)."""
    global _monitor
    if _consumers:
        return
    _stop.clear()
    consumer.wire()
    for name in app.config['QUEUES']:
        broker.hueys[name].stopping.clear()
        huey_consumer = broker.hueys[name].create_consumer(
            workers=app.config['EMBEDDED_WORKERS'], worker_type='thread',
            periodic=(name == 'default'),
            # SQLite storage is polled; keep the wait for a new job short.
            initial_delay=0.05, backoff=1.5, max_delay=0.5)
        # Consumer.start() would also take over the process's signal
        # handlers, which belong to the web server here.
        _consumers.append(huey_consumer)
    consumer.start(app)  # before the workers, whose startup hook would start it too
    for huey_consumer in _consumers:
        huey_consumer.scheduler.start()
        for _worker, thread in huey_consumer.worker_threads:
            thread.start()
    _monitor = threading.Thread(target=_watch, name='embedded-health', daemon=True)
    _monitor.start()
    logger.info('embedded consumers started: %s, %d workers each',
                ', '.join(app.config['QUEUES']), app.config['EMBEDDED_WORKERS'])


def _watch():
    # Huey's consumer main loop restarts dead workers; this is that loop.
    while not _stop.wait(10):
        for huey_consumer in _consumers:
            try:
                huey_consumer.check_worker_health()
            except Exception:
                logger.exception('embedded consumer health check failed')


def stop(timeout=10.0):
    """Let running jobs finish for up to ``timeout`` s, re-enqueue the rest, flush."""
    _stop.set()
    for huey_consumer in _consumers:
        huey_consumer.huey.stopping.set()  # no worker starts a job from here
        huey_consumer.stop_flag.set()
    for huey_consumer in _consumers:
        huey_consumer.shutdown_timeout = timeout
        if not huey_consumer._join_workers():
            logger.warning('jobs still running after %.0f s; re-enqueueing them', timeout)
        huey_consumer.huey.notify_interrupted_tasks()
    _consumers.clear()
    consumer.stop()

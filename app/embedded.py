"""The embedded mode: Huey consumers as threads inside the web process.

With no ``REDIS_URL`` one process does everything: the queues live in a
SQLite file and this module runs their workers and scheduler as threads,
the way ``huey_consumer`` would run them in a process of its own. What it
runs is kept on the app (``app.extensions['queue_manager.embedded']``).
"""
import logging
import threading

from . import broker, consumer

logger = logging.getLogger(__name__)

KEY = 'queue_manager.embedded'


class Consumers:
    """One Huey consumer per queue, run as threads, and the thread watching their workers."""

    def __init__(self, app):
        self.app = app
        self.consumers = []
        self.stopping = threading.Event()
        self.monitor = None

    def start(self):
        """Start the recorder and the consumers' scheduler and worker threads."""
        app = self.app
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
            self.consumers.append(huey_consumer)
        consumer.start(app)  # before the workers, whose startup hook would start it too
        for huey_consumer in self.consumers:
            huey_consumer.scheduler.start()
            for _worker, thread in huey_consumer.worker_threads:
                thread.start()
        self.monitor = threading.Thread(target=self._watch, name='embedded-health', daemon=True)
        self.monitor.start()
        logger.info('embedded consumers started: %s, %d workers each',
                    ', '.join(app.config['QUEUES']), app.config['EMBEDDED_WORKERS'])

    def _watch(self):
        # Huey's consumer main loop restarts dead workers; this is that loop.
        while not self.stopping.wait(10):
            for huey_consumer in self.consumers:
                try:
                    huey_consumer.check_worker_health()
                except Exception:
                    logger.exception('embedded consumer health check failed')

    def stop(self, timeout):
        """Let running jobs finish for up to ``timeout`` s, re-enqueue the rest, flush."""
        self.stopping.set()
        for huey_consumer in self.consumers:
            huey_consumer.huey.stopping.set()  # no worker starts a job from here
            huey_consumer.stop_flag.set()
        for huey_consumer in self.consumers:
            huey_consumer.shutdown_timeout = timeout
            if not huey_consumer._join_workers():
                logger.warning('jobs still running after %.0f s; re-enqueueing them', timeout)
            huey_consumer.huey.notify_interrupted_tasks()
        for huey_consumer in self.consumers:
            # Its workers have stopped (their stop flag is set): the Huey is
            # free for the consumers of a later start.
            huey_consumer.huey.stopping.clear()
        self.consumers.clear()
        consumer.stop()
        if self.monitor is not None:
            self.monitor.join(1)


def start(app):
    """Start the recorder and one consumer per queue for ``app``, in threads (once).

    Raises ``RuntimeError`` if this process already runs the consumers of
    another app: the Huey instances, and so their consumers, are the
    process's.
    """
    if KEY in app.extensions:
        return
    running = consumer.process.services
    if running is not None and running.app is not app:
        raise RuntimeError('this process already runs the consumers of another app')
    app.extensions[KEY] = Consumers(app)
    app.extensions[KEY].start()


def stop(app, timeout=10.0):
    """Stop ``app``'s embedded consumers: running jobs get ``timeout`` s, the rest go back."""
    consumers = app.extensions.pop(KEY, None)
    if consumers is not None:
        consumers.stop(timeout)

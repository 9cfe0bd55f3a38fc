"""The consumer process: fills the broker's hook slots, runs the services.

:func:`serve` (what ``huey_tasks.huey`` calls) configures the broker and
:func:`wire` fills the hook slots of every queue's Huey: the ledger records
its signals, each consumer notes its workers, each worker starts the
services below as it starts. The services are started once per process by the first worker's startup hook (or by the
embedded mode), before any worker takes a message:

- the ledger recorder (whose writer acknowledges each message once its
  attempt's outcome is written);
- the lease: this process's liveness in the broker, renewed every
  ``HEARTBEAT_INTERVAL`` seconds, so the leader can tell it died even
  before it wrote anything to the ledger;
- the reaper and reconciler, acting only while this process leads;
- the periodic launcher, likewise (fed by Huey's scheduler every minute);
- the alerts: the rules evaluated and the webhook told every
  ``ALERT_INTERVAL`` seconds, likewise, on a thread of their own so a slow
  webhook never holds up the reaper;
- the watcher that copies each queue's paused switch from the ledger, so a
  paused queue's workers take nothing.

On exit (atexit, after Huey's consumer has stopped its workers) the
recorder writes and acknowledges everything, and only then is the lease
given up: the leader must never see this process gone while a finished
attempt is still unwritten.
"""
import atexit
import logging
import threading

from . import alerts, broker, config as config_module, controls, events, ledger, reaper
from .extensions import db
from .leader import leadership
from .periodic import Launcher
from .reconcile import Reconciler

logger = logging.getLogger(__name__)

PAUSE_CHECK = 1.0  # seconds between looks at the queues' paused switches, at the latest


class Process:
    """The consumer side of this process: its configuration, its ledger recording, its services.

    One per process (:data:`process`); the module functions below act on it.
    """

    def __init__(self):
        self.config = None  # loaded by serve(): a consumer process's configuration
        self.recording = ledger.Recording()
        self.services = None  # this process's Services, once started
        self._lock = threading.Lock()
        self._atexit = False

    def serve(self, config=None):
        """See :func:`serve`."""
        with self._lock:
            if self.config is None:
                self.config = config or config_module.load()
                broker.configure(self.config)
        self.wire()
        return broker.consumer_huey()

    def wire(self):
        """See :func:`wire`."""
        for name, huey in broker.hueys.items():
            self.recording.attach(huey, name)
            huey.on_consumer = self.recording.serving
            huey.on_startup('qm_consumer')(on_worker_startup)

    def start(self, app=None):
        """See :func:`start`."""
        with self._lock:
            if self.services is not None:
                return self.services.app
            # Also the ledger writer process's factory: it builds an app of its own.
            from . import create_app
            if app is None:
                app = create_app(config=self.config)
            self.wire()
            self.services = Services(app, create_app, self.recording)
            self.services.start()
            if not self._atexit:
                atexit.register(self.stop)  # after the recorder's: runs before it
                self._atexit = True
            return app

    def stop(self):
        """See :func:`stop`."""
        with self._lock:
            if self.services is not None:
                self.services.stop()
                self.services = None


process = Process()


def serve(config=None):
    """Configure the broker for a consumer process and wire it; the Huey of ``$QUEUE``.

    What ``huey_tasks.huey`` returns to ``huey_consumer``. The
    configuration is loaded here, once per process (``config``, if given,
    is used instead); the app the services start with later is built from
    it. Raises ``ConfigError`` for a bad configuration or a ``QUEUE`` that
    is not one of ``QUEUES``.
    """
    return process.serve(config)


def wire():
    """Fill the hook slots of every queue's Huey for this process (idempotent)."""
    process.wire()


def start(app=None):
    """Start the consumer-side services for ``app`` (built here if not given), once.

    Returns the app the services run with (the first one's, if they run
    already).
    """
    return process.start(app)


def stop():
    """Stop the services: give up the lead, write and acknowledge everything, end the lease."""
    process.stop()


class Services:
    """This process's services beside Huey's threads, for one app: started and stopped together.

    ``app_factory`` builds the app of the ledger's writer process;
    ``recording`` is this process's :class:`app.ledger.Recording`.
    """

    def __init__(self, app, app_factory, recording):
        self.app = app
        self.app_factory = app_factory
        self.recording = recording
        self.stopping = threading.Event()
        self.threads = []
        self.launcher = Launcher(app, lambda: leadership.leading)

    def start(self):
        """Start the recorder, fill the hooks that need the app, start the threads."""
        app = self.app
        leadership.configure(broker.redis_client())
        self.recording.start(app, acknowledge=broker.ack, app_factory=self.app_factory)
        for huey in broker.hueys.values():
            # Paused until the switches are read: a queue paused while the
            # ledger is away must not be consumed meanwhile.
            huey.paused.set()
            huey.holding = self.recording.backlogged
            huey.task_context = app.app_context  # jobs may use the ledger's models
        self._renew_lease()
        refresh_paused(app)
        for huey in broker.hueys.values():
            huey.on_periodic = self.launcher.tick
        for name, target in (('queue-manager-reaper', self._reap),
                             ('queue-manager-pauses', self._pauses),
                             ('queue-manager-lease', self._lease),
                             ('queue-manager-alerts', self._alerts),
                             ('queue-manager-periodic', lambda: self.launcher.run(self.stopping))):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self):
        """Stop the threads, give up the lead, write everything out, give up the lease."""
        self.stopping.set()
        self.launcher.poke()
        for thread in self.threads:
            thread.join(5)
        for huey in broker.hueys.values():
            huey.on_periodic = huey.holding = huey.task_context = None
            huey.paused.clear()
        leadership.release()
        queues = list(self.recording.queues)
        self.recording.stop()
        try:
            broker.release(queues)
        except broker.BrokerUnavailable as exc:
            logger.warning('lease not released (it runs out by itself): %s', exc)

    def _renew_lease(self):
        try:
            broker.keep_alive(self.recording.queues or self.app.config['QUEUES'][:1])
        except broker.BrokerUnavailable as exc:
            logger.warning('lease not renewed: %s', exc)

    def _lease(self):
        while not self.stopping.wait(self.app.config['HEARTBEAT_INTERVAL']):
            self._renew_lease()
            for huey in broker.hueys.values():
                if huey.deferred and huey.write_deferred():
                    logger.warning('%d retries of %s still not written', len(huey.deferred),
                                   huey.name)

    def _reap(self):
        # A long comparison renews the lead between pages, and stops if it is lost.
        app = self.app
        reconciler = Reconciler(lambda: leadership.claim(ttl=3 * app.config['REAP_INTERVAL']))
        leading = False
        while True:
            now_leading, _handled = reaper.claim_and_reap(app, reconciler)
            if now_leading and not leading:
                self.launcher.poke()  # a new leader starts the ticks the old one missed
            leading = now_leading
            if self.stopping.wait(app.config['REAP_INTERVAL']):
                return

    def _alerts(self):
        # Only the leader evaluates (its lease is claimed by the reaper's
        # thread); incidents are in the ledger, so a new leader carries on.
        app = self.app
        while not self.stopping.wait(app.config['ALERT_INTERVAL']):
            if leadership.leading:
                alerts.check(app)

    def _pauses(self):
        # A pause is announced on the event channel, so workers stop taking
        # jobs at once; the switches are also re-read every PAUSE_CHECK
        # seconds in case an announcement was missed.
        app = self.app
        bus = events.bus
        unsubscribe = bus.subscribe(lambda event: event.get('queues') and refresh_paused(app))
        try:
            bus.listen(self.stopping, PAUSE_CHECK, on_tick=lambda: refresh_paused(app),
                       on_reconnect=lambda: refresh_paused(app))
        finally:
            unsubscribe()


def refresh_paused(app):
    """Copy each queue's paused switch from the ledger into this process's Huey instances."""
    try:
        with app.app_context():
            try:
                paused = controls.paused_queues()
            finally:
                db.session.remove()
    except Exception as exc:
        logger.warning('queue pause switches not read: %s', exc)
        return
    for name, huey in broker.hueys.items():
        if name in paused:
            huey.paused.set()
        else:
            huey.paused.clear()


def on_worker_startup():
    """Huey's worker start-up hook: start this process's services (errors logged, not raised)."""
    # Huey runs this in every worker as it starts; the first one does the work.
    try:
        start()
    except Exception:
        logger.exception('consumer services did not start')

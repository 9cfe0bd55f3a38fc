"""What runs in a consumer process beside Huey's own threads.

Started once per process by the first worker's startup hook (or by the
embedded mode): the ledger recorder, the reaper of lost jobs (which acts
only while this process leads), and the watcher that copies each queue's
paused flag from the broker, so a paused queue's workers take nothing.
"""
import logging
import threading

from . import broker, events, ledger, reaper
from .leader import leadership

logger = logging.getLogger(__name__)

PAUSE_CHECK = 1.0  # seconds between looks at the queues' paused flags, at the latest

_lock = threading.Lock()
_stop = threading.Event()
_threads = []
_app = []


def start(app=None):
    """Start the consumer-side services for ``app`` (built here if not given)."""
    with _lock:
        if _app:
            return _app[0]
        if app is None:
            from . import create_app
            app = create_app()
        _app.append(app)
        _stop.clear()
        leadership.configure(broker.redis_client())
        ledger.start(app)
        broker.refresh_paused()
        for name, target in (('queue-manager-reaper', _reap), ('queue-manager-pauses', _pauses)):
            thread = threading.Thread(target=target, args=(app,), name=name, daemon=True)
            thread.start()
            _threads.append(thread)
        return app


def stop():
    """Stop the services: give up the lead, flush the ledger."""
    with _lock:
        _stop.set()
        for thread in _threads:
            thread.join(5)
        _threads.clear()
        leadership.release()
        ledger.stop()
        _app.clear()


def _reap(app):
    while True:
        reaper.claim_and_reap(app)
        if _stop.wait(app.config['REAP_INTERVAL']):
            return


def _pauses(app):
    # A pause is announced on the event channel, so workers stop taking
    # jobs at once; the flags are also re-read every PAUSE_CHECK seconds in
    # case an announcement was missed.
    bus = events.bus
    if not isinstance(bus, events.RedisBus):
        unsubscribe = bus.subscribe(lambda event: event.get('queues') and broker.refresh_paused())
        _stop.wait()
        unsubscribe()
        return
    while not _stop.is_set():
        pubsub = bus.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(events.CHANNEL)
            while not _stop.is_set():
                message = pubsub.get_message(timeout=PAUSE_CHECK)
                if message is None or b'"queues"' in message['data']:
                    broker.refresh_paused()
        except Exception as exc:
            logger.warning('queue pause watcher: %s; retrying', exc)
            _stop.wait(PAUSE_CHECK)
        finally:
            pubsub.close()


def current_app():
    """The app the consumer services run with, once started."""
    return _app[0] if _app else None


def on_worker_startup():
    # Huey runs this in every worker as it starts; the first one does the work.
    try:
        start()
    except Exception:
        logger.exception('consumer services did not start')

"""The consumer process: configuration read once, hooks filled, services started and stopped."""
import json
import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa
from conftest import make_app
from helpers import ROOT, service_env, wait_for

import huey_tasks
from app import broker, consumer, embedded
from app.extensions import db
from app.models import Job

# Counts the configuration loads of the process it runs in, then does $WHAT.
COUNT_LOADS = textwrap.dedent('''
    import json, os, sys
    from app import config
    loads = []
    real = config.load
    def counted(*args, **kwargs):
        loads.append(1)
        return real(*args, **kwargs)
    config.load = counted
    if os.environ['WHAT'] == 'consumer':
        import huey_tasks
        huey_tasks.huey  # what huey_consumer asks for
        from app import consumer
        app = consumer.start()  # what the first worker's start-up hook does
        embedded = app.config['EMBEDDED']
        consumer.stop()
    else:
        import wsgi
        embedded = wsgi.app.config['EMBEDDED']
    print(json.dumps({'loads': len(loads), 'embedded': embedded}))
''')


@pytest.mark.processes
@pytest.mark.parametrize('what', ['consumer', 'web'])
def test_each_process_loads_its_configuration_once(tmp_path, what):
    env = service_env(tmp_path, WHAT=what)
    done = subprocess.run([sys.executable, '-c', COUNT_LOADS], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {'loads': 1, 'embedded': True}


def test_huey_tasks_offers_only_the_huey_a_consumer_asks_for():
    with pytest.raises(AttributeError, match='no attribute .nothing_here.'):
        huey_tasks.nothing_here  # noqa: B018


def test_wiring_twice_attaches_the_ledger_to_each_huey_once(app):
    class Counting:
        def __init__(self):
            self.signals = []

        def on_signal(self, huey, queue, signal, task, *args):
            self.signals.append((queue, signal))

    consumer.wire()
    consumer.wire()
    huey = broker.hueys['default']
    assert huey.on_consumer == consumer.process.recording.serving
    recording = consumer.process.recording
    recording.recorder = counting = Counting()
    try:
        huey.enqueue(huey_tasks.noop.task_type.wrappers[huey.name].s(params={}))
    finally:
        recording.recorder = None
    assert counting.signals == [('default', 'enqueued')]


def test_the_services_run_once_per_process_and_stop_with_their_hooks_cleared(app, tmp_path):
    other = make_app(tmp_path / 'other')
    started = consumer.start(app)
    try:
        assert started is app and consumer.process.services.app is app
        assert consumer.start(other) is app  # already running: the first app's
        huey = broker.hueys['default']
        assert huey.holding == consumer.process.recording.backlogged
        assert consumer.process.recording.recorder is not None
        names = {t.name for t in consumer.process.services.threads}
        assert names == {'queue-manager-reaper', 'queue-manager-pauses',
                         'queue-manager-lease', 'queue-manager-periodic', 'queue-manager-alerts'}
        assert all(t.is_alive() for t in consumer.process.services.threads)
        threads = consumer.process.services.threads
    finally:
        consumer.stop()
    assert consumer.process.services is None and consumer.process.recording.recorder is None
    assert huey.holding is None and huey.on_periodic is None and huey.task_context is None
    assert not any(t.is_alive() for t in threads)


def test_embedded_consumers_live_on_their_app_and_refuse_a_second_app(app, tmp_path):
    other = make_app(tmp_path / 'other')
    embedded.start(app)
    try:
        running = app.extensions[embedded.KEY]
        assert [c.huey.name for c in running.consumers] == ['qm.default']
        embedded.start(app)  # once per app
        assert app.extensions[embedded.KEY] is running
        with pytest.raises(RuntimeError, match='another app'):
            embedded.start(other)
        assert embedded.KEY not in other.extensions
    finally:
        embedded.stop(app, timeout=5)
    assert embedded.KEY not in app.extensions and not running.monitor.is_alive()
    assert not broker.hueys['default'].stopping.is_set()  # free for a later consumer
    embedded.stop(app)  # stopping what is not running does nothing


def test_a_job_run_by_embedded_consumers_is_recorded_and_they_can_start_again(app):
    for _ in range(2):  # stopped and started again in one process
        embedded.start(app)
        try:
            with app.test_client() as client:
                job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
            with app.app_context():
                def succeeded():
                    db.session.remove()
                    return db.session.scalar(sa.select(Job.state).where(Job.id == job['id'])) \
                        == 'succeeded'
                wait_for(succeeded, 20, message='the job to succeed')
        finally:
            embedded.stop(app, timeout=5)

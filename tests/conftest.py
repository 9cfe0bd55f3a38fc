"""Fixtures: an app on a temporary database, private Redis servers, PostgreSQL."""
import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

# In-process apps must never reach services the developer runs: drop
# connection settings inherited from the shell before anything imports the
# app (huey_tasks builds its Huey instances from the environment at import).
for _key in ('REDIS_URL', 'DATABASE_URL', 'QUEUE', 'QUEUES', 'SECRET_KEY'):
    os.environ.pop(_key, None)
_IMPORT_DIR = tempfile.mkdtemp(prefix='qm-import-')
atexit.register(shutil.rmtree, _IMPORT_DIR, ignore_errors=True)
os.environ['INSTANCE_PATH'] = _IMPORT_DIR

from helpers import CHROMIUM, CHROMIUM_ARGS, IN_CI, RedisServer, need  # noqa: E402

from flask.testing import FlaskClient  # noqa: E402

from app import broker, consumer, create_app, embedded  # noqa: E402
from app.extensions import db  # noqa: E402


# Fixtures that start real processes (a private redis-server, gunicorn,
# huey_consumer, Chromium). Their tests carry the ``processes`` mark and are
# left out of the fast tier, ``make test-fast`` (``-m "not processes"``).
PROCESS_FIXTURES = {'redis_server', 'private_redis', 'stack', 'deployment', 'dep',
                    'browser', 'page'}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, 'fixturenames', ())):
            item.add_marker(pytest.mark.processes)


def pytest_configure(config):
    if config.option.markexpr.replace(' ', '') == 'notprocesses':
        # The fast tier: fuzzing tries fewer examples (the full suite tries
        # them all), and a test that starts a process anyway fails (below).
        os.environ['QM_TEST_TIER'] = 'fast'


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(monkeypatch, request):
    """In the fast tier a test that starts a process fails, naming itself."""
    if os.environ.get('QM_TEST_TIER') == 'fast':
        import subprocess

        def refuse(self, args, *rest, **kwargs):
            raise RuntimeError(f'{request.node.nodeid} started a process ({args!r}) in the '
                               f'fast tier: mark it "processes" or give it one of '
                               f'PROCESS_FIXTURES')
        monkeypatch.setattr(subprocess.Popen, '__init__', refuse)
        # multiprocessing's spawn and forkserver start through Popen too, but
        # fork does not: refuse every start there (the ledger's writer process).
        import multiprocessing.process
        monkeypatch.setattr(multiprocessing.process.BaseProcess, 'start',
                            lambda self: refuse(self, [self.name]))


def pytest_report_header(config):
    pg = os.environ.get('TEST_DATABASE_URL')
    return [f'PostgreSQL ledger tests: {"on " + pg if pg else "off (TEST_DATABASE_URL unset)"}',
            f'CI: {IN_CI}']


@pytest.fixture(scope='session')
def postgres_server():
    """The PostgreSQL server named by TEST_DATABASE_URL (required in CI)."""
    url = os.environ.get('TEST_DATABASE_URL')
    need(url, 'TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)')
    return url


def _admin_url(url):
    return url.replace('postgresql+psycopg://', 'postgresql://', 1)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import psycopg
    name = f'qm_test_{uuid.uuid4().hex[:12]}'
    with psycopg.connect(_admin_url(postgres_server), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE {name}')
    base, _, _ = postgres_server.rpartition('/')
    yield f'{base}/{name}'
    with psycopg.connect(_admin_url(postgres_server), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')


class BrowserClient(FlaskClient):
    """Flask's test client as a current browser on the app's own pages (it sends Sec-Fetch-Site)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.environ_base['HTTP_SEC_FETCH_SITE'] = 'same-origin'


_MIGRATED = {}  # a SQLite ledger the migrations made, once per test session


def _migrated_sqlite_copy(url):
    """Put a copy of a freshly migrated SQLite ledger at ``url`` (a new file); False if it exists.

    The migrations themselves run once per session (and every time in
    tests/test_migrations.py, which goes down and up again); each test then
    starts from a copy, as a fresh ``upgrade()`` would leave it.
    """
    from flask_migrate import upgrade
    path = Path(url[len('sqlite:///'):])
    if path.exists():
        return False
    if 'file' not in _MIGRATED:
        where = Path(tempfile.mkdtemp(prefix='qm-migrated-'))
        app = create_app({'INSTANCE_PATH': str(where), 'SECRET_KEY': 'test', 'REDIS_URL': None,
                          'DATABASE_URL': f'sqlite:///{where}/ledger.db', 'PERIODIC': 0})
        with app.app_context():
            upgrade()
            db.engine.dispose()
        _MIGRATED['file'] = where / 'ledger.db'
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MIGRATED['file'], path)
    return True


def make_app(tmp_path, **overrides):
    from flask_migrate import upgrade
    config = {'INSTANCE_PATH': str(tmp_path), 'SECRET_KEY': 'test',
              'DATABASE_URL': f'sqlite:///{tmp_path}/ledger.db',
              'HUEY_SQLITE_PATH': str(tmp_path / 'huey.db'), 'REDIS_URL': None,
              'PERIODIC': 0, 'TESTING': True}
    config.update(overrides)
    copied = (config['DATABASE_URL'].startswith('sqlite:///')
              and _migrated_sqlite_copy(config['DATABASE_URL']))
    app = create_app(config)
    app.test_client_class = BrowserClient
    if not copied:
        with app.app_context():
            upgrade()
    return app


def start_recording(app):
    """This process's recorder, started for ``app`` on Hueys wired to it (as a consumer's are).

    Stop it with ``consumer.process.recording.stop()``.
    """
    consumer.wire()
    return consumer.process.recording.start(app)


@contextlib.contextmanager
def recording_app(tmp_path, **overrides):
    """``(app, recorder)``: ``make_app(tmp_path, **overrides)`` recording, in its app context."""
    app = make_app(tmp_path, **overrides)
    with app.app_context():
        recorder = start_recording(app)
        yield app, recorder
        consumer.process.recording.stop()
        db.session.remove()
        db.engine.dispose()


def run_next(huey=None):
    """Take the next message and execute it, as a worker thread would; the task."""
    huey = huey or broker.hueys['default']
    task = huey.dequeue()
    assert task is not None, 'nothing queued'
    huey.execute(task)
    return task


def flushed(recorder):
    """Write everything ``recorder`` holds, and read the ledger afresh."""
    # One flush even with nothing pending: it waits for a batch the
    # recorder's own thread has taken and is still writing.
    recorder.flush()
    while recorder.pending:
        recorder.flush()
    db.session.expire_all()


@pytest.fixture(params=['sqlite', 'postgresql'])
def ledger_url(request, tmp_path):
    """The ledger on SQLite, then on PostgreSQL."""
    if request.param == 'sqlite':
        return f'sqlite:///{tmp_path}/ledger.db'
    return request.getfixturevalue('postgres_url')


@pytest.fixture
def app(tmp_path):
    """An embedded-mode app on a temporary SQLite ledger; no consumer runs."""
    app = make_app(tmp_path)
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def ledger_client(tmp_path, ledger_url):
    """``(app, test client)`` on a ledger on SQLite, then on PostgreSQL; no consumer runs."""
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    yield app, app.test_client()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def ctx(app):
    """The ``app`` fixture with its app context pushed for the test."""
    with app.app_context():
        yield app
        db.session.remove()


@pytest.fixture
def worker(app):
    """Consumer threads and the ledger recorder inside this test process."""
    embedded.start(app)
    yield app
    embedded.stop(app, timeout=5)


@pytest.fixture(scope='session')
def browser():
    """The session's Chromium, driven by Playwright; one for every browser test module.

    Defined here, once: a second ``sync_playwright()`` in the same process
    (a copy of this fixture in another module) fails while this one runs.
    """
    from playwright.sync_api import sync_playwright
    need(os.path.exists(CHROMIUM), f'{CHROMIUM} is missing (apt-get install chromium)')
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope='session')
def redis_server(tmp_path_factory):
    """A private redis-server for the session (tests that stop Redis use their own)."""
    server = RedisServer(tmp_path_factory.mktemp('redis'))
    yield server
    server.stop()

"""queue-manager: a job queue on Huey with a ledger in SQL and a live dashboard."""
import importlib
import logging
import os

from flask import Flask
from flask.json.provider import DefaultJSONProvider
from sqlalchemy import event

from . import broker, catalog, config as config_module, events, inputs, rules, text
from .extensions import db, migrate


def create_app(test_config=None, *, config=None):
    """Build the Flask app.

    ``config`` is a configuration this process already loaded
    (:func:`app.config.load`), used as it is; without it the configuration
    is loaded here, from the environment with ``test_config`` over it.
    Raises ``ConfigError`` for a bad configuration.
    """
    config = dict(config) if config is not None else config_module.load(test_config)
    app = Flask(__name__, instance_path=config['INSTANCE_PATH'],
                template_folder='../templates', static_folder='../static')
    os.makedirs(app.instance_path, exist_ok=True)
    app.json = _JSONProvider(app)
    app.config.update(config)
    app.config['SECRET_KEY'] = config_module.secret_key(config)
    app.config['SQLALCHEMY_DATABASE_URI'] = config['DATABASE_URL']
    app.config['SQLALCHEMY_ENGINE_OPTIONS'] = _engine_options(config['DATABASE_URL'])
    logging.basicConfig(level=config['LOG_LEVEL'],
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    if logging.getLogger('huey').handlers:
        # huey_consumer gave Huey's logger a handler of its own; without
        # this every line of it would be written twice.
        logging.getLogger('huey').propagate = False

    # The task modules are the deployment's code, above this package: named
    # in the configuration, not imported by name here.
    for module in config['TASK_MODULES']:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if exc.name != module:
                raise
            raise config_module.ConfigError(
                f'TASK_MODULES: no module named {module!r}') from None
    try:
        # Only now are the task types declared that a rule may name.
        rules.check_tasks(config['ALERT_RULES'], catalog.TASKS)
    except rules.RuleError as exc:
        raise config_module.ConfigError(f'ALERT_RULES: {exc}') from None
    broker.configure(config)
    events.configure(broker.redis_client())

    db.init_app(app)
    migrate.init_app(app, db, directory=os.path.join(config_module.ROOT, 'migrations'))
    with app.app_context():
        if db.engine.dialect.name == 'sqlite':
            event.listen(db.engine, 'connect', _sqlite_pragmas)

    # Imported here, not at the top: gunicorn.conf.py imports this package in
    # the master, and the live hub belongs to each worker.
    from . import admin, api, auth, cli, errors, health, live, pages, templating
    templating.register(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(live.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    errors.register(app)
    # Text that cannot be stored is refused before any view (or socket) sees
    # it, and before anything reads the body (the form's bytes are checked
    # as they came); then who is asking, and whether they may.
    app.before_request(inputs.check_request)
    # A chunked body is given its length, so the size limits apply to it.
    app.wsgi_app = inputs.SizedBody(app.wsgi_app, app.config['MAX_CONTENT_LENGTH'],
                                    inputs.route_limits(app))
    auth.register(app)
    cli.register(app)
    from .reconcile import loss_notice
    app.add_template_global(loss_notice, 'broker_loss')
    # Headers on every response, the session cookie's flags, trusted proxies.
    from . import headers
    headers.register(app)
    return app


class _JSONProvider(DefaultJSONProvider):
    """Flask's JSON, never with NaN or Infinity (not JSON): those are written as strings.

    Keys keep the order the code gives them (a job's ``id`` first), where
    Flask sorts them: sorting a thousand jobs' keys was a quarter of the
    time spent writing a batch's answer.
    """
    sort_keys = False

    def dumps(self, obj, **kwargs):
        try:
            return super().dumps(obj, allow_nan=False, **kwargs)
        except ValueError:  # a non-finite float somewhere: rare, so looked for only now
            return super().dumps(text.finite(obj), allow_nan=False, **kwargs)


def _engine_options(url):
    # JSON is stored as UTF-8 text (searchable as typed) and read back
    # without raising, so one bad stored value cannot fail a whole query.
    options = {'json_serializer': text.dumps, 'json_deserializer': text.loads}
    if url.startswith('sqlite'):
        return {**options, 'connect_args': {'timeout': 30}}
    return {**options, 'pool_pre_ping': True, 'pool_size': 10, 'max_overflow': 20}


def _sqlite_pragmas(dbapi_connection, _record):
    # SQLite keeps whatever bytes it is given as TEXT; a row that is not
    # UTF-8 must read as replacement characters, not fail the query.
    dbapi_connection.text_factory = text.decode_lossy
    # WAL lets the dashboard read while the ledger writer writes; the busy
    # timeout makes writers from several processes queue instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute('PRAGMA journal_mode=WAL')
    cursor.execute('PRAGMA synchronous=NORMAL')
    cursor.execute('PRAGMA busy_timeout=30000')
    cursor.execute('PRAGMA foreign_keys=ON')
    # A REPLACE that deletes a row fires its delete triggers (the counters
    # the ledger keeps, migration 0008) only with this on.
    cursor.execute('PRAGMA recursive_triggers=ON')
    # Up to 64 MiB of pages per connection (the default is 2 MiB): the search
    # index's merges and the ledger's indexes stay in memory instead of
    # being read back from the file on every write (finishing jobs ran 3.5
    # times faster so in a measure). Pages are only taken as they are used.
    cursor.execute('PRAGMA cache_size=-65536')
    cursor.close()


# Jobs submitted from Python (``sleep.submit(...)``) go through app.producer,
# which fills the catalog's hook slot: imported with the package, so that
# any process importing a task module can submit; it builds its app with
# create_app.
from . import producer  # noqa: E402

producer.producer.app_factory = create_app

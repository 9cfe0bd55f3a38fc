"""Configuration: read once from the environment, checked, normalized."""
import sys

import pytest

from app import config, create_app


def test_defaults_name_the_embedded_mode_and_the_default_queue(tmp_path):
    loaded = config.load(environ={'INSTANCE_PATH': str(tmp_path)})
    assert loaded['REDIS_URL'] is None
    assert loaded['QUEUES'] == ['default']
    assert loaded['TASK_MODULES'] == ['huey_tasks']
    assert loaded['DATABASE_URL'] == f'sqlite:///{tmp_path}/queue-manager.db'


def test_lists_are_split_trimmed_and_deduplicated_and_default_is_always_there(tmp_path):
    loaded = config.load(environ={'INSTANCE_PATH': str(tmp_path),
                                  'QUEUES': ' reports, default ,reports,',
                                  'TASK_MODULES': 'huey_tasks, more_tasks'})
    assert loaded['QUEUES'] == ['reports', 'default']
    assert config.load(environ={'INSTANCE_PATH': str(tmp_path),
                                'QUEUES': 'reports'})['QUEUES'] == ['default', 'reports']
    assert loaded['TASK_MODULES'] == ['huey_tasks', 'more_tasks']


@pytest.mark.parametrize('environ, message', [
    ({'QUEUES': 'Reports'}, "queue name 'Reports'"),
    ({'LOST_AFTER': 'soon'}, "LOST_AFTER='soon' is not a number"),
    ({'PROXY_FIX': '-1'}, 'PROXY_FIX=-1: the number of trusted proxies'),
    ({'PREFERRED_URL_SCHEME': 'HTTPS'}, "PREFERRED_URL_SCHEME='HTTPS': http or https"),
    ({'METRICS_RETENTION': '0'}, 'METRICS_RETENTION=0.0: seconds, more than 0'),
    ({'METRICS_RETENTION': '30d'}, "METRICS_RETENTION='30d' is not a number"),
    ({'AUDIT_RETENTION': '-1'}, r'AUDIT_RETENTION=-1.0: seconds, 0 \(kept for ever\) or more'),
    ({'ALERT_RETENTION': '-86400'}, 'ALERT_RETENTION=-86400.0: seconds, 0'),
    ({'AUDIT_RETENTION': 'inf'}, 'AUDIT_RETENTION=inf: seconds, 0 .* at most 3153600000'),
    ({'ALERT_RETENTION': 'nan'}, 'ALERT_RETENTION=nan: seconds'),
    ({'METRICS_RETENTION': '1e20'}, 'METRICS_RETENTION=1e[+]20: seconds, more than 0 and at most'),
])
def test_bad_values_are_refused_by_name(tmp_path, environ, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(environ={'INSTANCE_PATH': str(tmp_path), **environ})


def test_postgres_urls_get_the_driver_we_ship(tmp_path):
    loaded = config.load(environ={'INSTANCE_PATH': str(tmp_path),
                                  'DATABASE_URL': 'postgres://u@db/qm'})
    assert loaded['DATABASE_URL'] == 'postgresql+psycopg://u@db/qm'


def test_a_missing_task_module_is_a_configuration_error(tmp_path):
    with pytest.raises(config.ConfigError, match="TASK_MODULES: no module named 'no_such_tasks'"):
        create_app({'INSTANCE_PATH': str(tmp_path), 'REDIS_URL': None,
                    'TASK_MODULES': 'huey_tasks,no_such_tasks'})


def test_task_types_may_be_declared_in_another_module(tmp_path, monkeypatch):
    from app import broker, catalog
    (tmp_path / 'extra_tasks_for_test.py').write_text(
        'from app.catalog import Param, task\n'
        '@task(params=[Param("n", int, default=1)])\n'
        'def double_for_test(n):\n'
        '    """Twice n."""\n'
        '    return 2 * n\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        create_app({'INSTANCE_PATH': str(tmp_path), 'REDIS_URL': None,
                    'TASK_MODULES': 'huey_tasks,extra_tasks_for_test'})
        declared = catalog.TASKS['double_for_test']
        assert declared.description == 'Twice n.'
        assert set(declared.wrappers) == {h.name for h in broker.hueys.values()}
    finally:
        declared = catalog.TASKS.pop('double_for_test', None)
        for wrapper in (declared.wrappers.values() if declared else ()):
            wrapper.unregister()
        sys.modules.pop('extra_tasks_for_test', None)


def test_an_app_built_from_a_loaded_configuration_uses_it_as_is(tmp_path, monkeypatch):
    loaded = config.load(environ={'INSTANCE_PATH': str(tmp_path), 'LOG_LINES': '7'})
    monkeypatch.setenv('LOG_LINES', '9')  # not read again
    app = create_app(config=loaded)
    assert app.config['LOG_LINES'] == 7
    passed_down = config.of(app.config)
    assert passed_down.pop('SECRET_KEY') == app.config['SECRET_KEY']  # generated, kept on disk
    del loaded['SECRET_KEY']
    assert passed_down == loaded  # what a child process is handed: the same settings
    with pytest.raises(KeyError):
        config.of({'LOG_LINES': 7})

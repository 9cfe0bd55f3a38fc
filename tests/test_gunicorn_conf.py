"""gunicorn.conf.py: its worker class and count, and a port another server holds
refused rather than shared (how the workers share connections: test_serving.py)."""
import runpy

import pytest
from helpers import BIN, ROOT, Process, migrate, service_env, start_web, wait_for


def test_a_second_server_on_a_port_in_use_refuses_to_start(redis_server, tmp_path):
    env = service_env(tmp_path, redis_server.url)
    migrate(env, tmp_path)
    web, api = start_web(env, tmp_path, workers=2)
    port = int(api.base.rsplit(':', 1)[1])
    second = Process('web-second', [str(BIN / 'gunicorn'), '-c', 'gunicorn.conf.py', 'wsgi:app'],
                     dict(env, PORT=str(port), HOST='127.0.0.1', WEB_CONCURRENCY='2'), tmp_path)
    try:
        wait_for(lambda: not second.alive(), 30, 0.1, 'the second server to exit')
        assert second.proc.returncode != 0
        assert 'Connection in use' in second.log()
        assert api.healthy()
    finally:
        second.stop()
        web.stop()
    # Once the first has stopped, its port is free again (TIME_WAIT aside).
    again = Process('web-again', [str(BIN / 'gunicorn'), '-c', 'gunicorn.conf.py', 'wsgi:app'],
                    dict(env, PORT=str(port), HOST='127.0.0.1', WEB_CONCURRENCY='2'), tmp_path)
    try:
        wait_for(lambda: api.healthy() or not again.alive(), 30, 0.1, 'the server to start')
        assert again.alive(), again.log()
    finally:
        again.stop()


@pytest.mark.parametrize('env, workers', [
    ({'REDIS_URL': 'redis://127.0.0.1:1/0', 'WEB_CONCURRENCY': '2'}, 2),
    ({'REDIS_URL': 'redis://127.0.0.1:1/0', 'WEB_CONCURRENCY': '1'}, 1),
    ({'WEB_CONCURRENCY': '4'}, 1),  # embedded: one process runs everything
])
def test_the_workers_share_one_socket_and_take_turns(monkeypatch, env, workers):
    for key in ('REDIS_URL', 'WEB_CONCURRENCY'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    conf = runpy.run_path(str(ROOT / 'gunicorn.conf.py'))
    assert conf['workers'] == workers
    assert conf['worker_class'] == 'app.serving.ThreadWorker'
    assert conf.get('reuse_port', False) is False

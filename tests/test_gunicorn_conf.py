"""gunicorn.conf.py with several workers: connections spread over the workers,
and a port another server holds is refused rather than shared."""
import http.client
import os
import runpy
from pathlib import Path

import pytest
from helpers import BIN, ROOT, Process, migrate, service_env, start_web, wait_for


ESTABLISHED, LISTEN = '01', '0A'  # the state column of /proc/net/tcp


def _inodes(port, wanted):
    """Socket inodes on local ``port`` (IPv4) in state ``wanted``."""
    inodes = set()
    for line in Path('/proc/net/tcp').read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == wanted and int(local.rsplit(':', 1)[1], 16) == port:
            inodes.add(inode)
    return inodes


def _sockets_of(pid):
    """Socket inodes among the open files of process ``pid``."""
    fd_dir = Path(f'/proc/{pid}/fd')
    out = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith('socket:['):
            out.add(target[len('socket:['):-1])
    return out


def _workers(master_pid):
    children = Path(f'/proc/{master_pid}/task/{master_pid}/children').read_text().split()
    return [int(pid) for pid in children]


def _listening_workers(master_pid, port):
    """The master's children that each listen on ``port`` on a socket of their own.

    gunicorn forks its workers a random fraction of a second apart and each
    binds its socket after the fork, so the first may answer before the
    second exists.
    """
    listening = _inodes(port, LISTEN)
    try:
        return [pid for pid in _workers(master_pid) if _sockets_of(pid) & listening]
    except FileNotFoundError:  # a worker exited meanwhile
        return []


def test_keep_alive_clients_are_spread_over_the_workers(redis_server, tmp_path):
    env = service_env(tmp_path, redis_server.url)
    migrate(env, tmp_path)
    web, api = start_web(env, tmp_path, workers=2)
    port = int(api.base.rsplit(':', 1)[1])
    clients = []
    try:
        wait_for(lambda: len(_listening_workers(web.pid, port)) == 2, 30, 0.05,
                 'both workers to listen')
        workers = _workers(web.pid)
        assert len(workers) == 2
        for _ in range(16):
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
            conn.request('GET', '/healthz')
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            clients.append(conn)  # kept open: a keep-alive client
        accepted = _inodes(port, ESTABLISHED)
        held = {pid: len(_sockets_of(pid) & accepted) for pid in workers}
        assert sum(held.values()) == 16, held
        # On one shared socket nearly all of them went to one worker; on a
        # socket per worker each gets some (all 16 on one: 1 in 32,768).
        assert all(n > 0 for n in held.values()), held
    finally:
        for conn in clients:
            conn.close()
        web.stop()


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
        assert f'127.0.0.1:{port} is already in use' in second.log()
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


@pytest.mark.parametrize('env, workers, reuse', [
    ({'REDIS_URL': 'redis://127.0.0.1:1/0', 'WEB_CONCURRENCY': '2'}, 2, True),
    ({'REDIS_URL': 'redis://127.0.0.1:1/0', 'WEB_CONCURRENCY': '1'}, 1, False),
    ({'WEB_CONCURRENCY': '4'}, 1, False),  # embedded: one process runs everything
])
def test_a_socket_per_worker_only_with_several_workers(monkeypatch, env, workers, reuse):
    for key in ('REDIS_URL', 'WEB_CONCURRENCY'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    conf = runpy.run_path(str(ROOT / 'gunicorn.conf.py'))
    assert (conf['workers'], conf['reuse_port']) == (workers, reuse)

"""Submitting from Python: sleep.submit(...) and submit_many, in-process and from another process."""
import enum
import json
import subprocess
import sys

import pytest
import sqlalchemy as sa
from helpers import ROOT, free_port, ledger, migrate, service_env

import huey_tasks
from app import audit, broker, producer
from app.extensions import db
from app.models import Job


def test_a_task_function_makes_the_submission_the_api_takes():
    assert huey_tasks.sleep.job(seconds=1, delay=5) == {
        'task': 'sleep', 'params': {'seconds': 1}, 'delay': 5}
    assert huey_tasks.noop.job(params={}, queue='default', idempotency_key='k') == {
        'task': 'noop', 'params': {}, 'queue': 'default', 'idempotency_key': 'k'}
    with pytest.raises(TypeError):
        huey_tasks.noop.job(task='sleep')


def test_submit_records_and_queues_the_job_as_the_api_does(ctx):
    job = huey_tasks.payment.submit(amount=12.5, card='4111 1111 1111 1111', priority=4)
    assert isinstance(job, producer.Job) and job.created
    assert (job.task, job.state, job.priority, job.queue) == ('payment', 'queued', 4, 'default')
    assert job.params['card'] == '**** 1111' and job.data['id'] == job.id
    row = db.session.get(Job, job.id)
    assert row.params['card'] == '**** 1111' and row.secret_params == {'card': '4111 1111 1111 1111'}
    assert broker.message_ids('default') == {job.id}
    later = huey_tasks.sleep.submit(seconds=1, delay=5)
    assert later.state == 'scheduled' and later.scheduled_for.endswith('Z')
    entry = audit.entries()[1]
    assert (entry.via, entry.action, entry.target, entry.count) == ('python', 'submit',
                                                                    'task payment', 1)
    assert entry.address.split(':')[0]  # the submitting process, host:pid-start


def test_submit_many_is_one_batch_with_its_idempotency_keys(ctx):
    jobs = producer.submit_many([huey_tasks.noop.job(idempotency_key='a'),
                                 {'task': 'sleep', 'params': {'seconds': 2}},
                                 huey_tasks.noop.job(idempotency_key='a')])
    assert [j.created for j in jobs] == [True, True, False]
    assert jobs[2].id == jobs[0].id and jobs[1].params == {'seconds': 2.0, 'steps': 10}
    again = producer.submit_many([huey_tasks.noop.job(idempotency_key='a')])
    assert again[0].id == jobs[0].id and not again[0].created
    assert db.session.query(Job).count() == 2
    assert [(e.target, e.count) for e in audit.entries()] == [('task noop', 1),
                                                             ('tasks noop, sleep', 3)]


def test_bad_parameters_raise_invalid_job_and_write_nothing(ctx):
    with pytest.raises(producer.InvalidJob) as caught:
        huey_tasks.sleep.submit(seconds='soon', colour='red')
    assert caught.value.fields == {'params.colour': 'unknown parameter',
                                   'params.seconds': 'must be a number'}
    assert isinstance(caught.value, ValueError)
    with pytest.raises(producer.InvalidJob) as caught:
        producer.submit_many([huey_tasks.noop.job(), huey_tasks.sleep.job(steps=0)])
    assert caught.value.errors == [{'index': 1, 'field': 'params.steps',
                                    'message': 'must be at least 1'}]
    with pytest.raises(producer.InvalidJob):
        producer.submit_many([huey_tasks.noop.job()] * 1001)
    for not_a_list in (None, 3, 'noop', {'task': 'noop'}, b'x'):
        with pytest.raises(producer.InvalidJob) as caught:
            producer.submit_many(not_a_list)
        assert caught.value.fields == {'jobs': 'must be a non-empty list of jobs'}
    for not_an_object in ([1, 2], 'ab', 0, False):
        with pytest.raises(producer.InvalidJob) as caught:
            huey_tasks.sleep.submit(params=not_an_object, seconds=1)
        assert list(caught.value.fields) == ['params'], caught.value.fields
    assert db.session.query(Job).count() == 0 and audit.entries() == []
    # Any iterable of jobs is a list of them.
    assert [j.task for j in producer.submit_many(huey_tasks.noop.job() for _ in range(2))] == [
        'noop', 'noop']


@pytest.mark.parametrize('bad', ['\ud800', 'a\x00b'], ids=['surrogate', 'nul'])
def test_text_no_ledger_can_store_is_refused_as_the_api_refuses_it(ctx, bad):
    message = ('contains an unpaired surrogate (U+D800)' if '\ud800' in bad
               else 'contains a NUL character')
    with pytest.raises(producer.InvalidJob) as caught:
        huey_tasks.fail.submit(message=bad)
    assert caught.value.fields == {'params.message': message}
    with pytest.raises(producer.InvalidJob) as caught:
        huey_tasks.noop.submit(idempotency_key=bad)
    assert caught.value.fields == {'idempotency_key': message}
    with pytest.raises(producer.InvalidJob) as caught:
        producer.submit_many([huey_tasks.noop.job(), {'task': 'fail', 'params': {'message': bad}}])
    assert caught.value.errors == [{'index': 1, 'field': 'params.message', 'message': message}]
    assert caught.value.fields == {'jobs[1].params.message': message}
    assert db.session.query(Job).count() == 0 and broker.message_ids('default') == set()


class Steps(enum.IntEnum):
    FEW = 3


class Colour(str, enum.Enum):
    RED = 'red'


def test_values_of_subclasses_of_json_types_are_sent_as_their_plain_values(ctx):
    """An enum given as a value used to reach the broker as itself, pickled: a consumer
    that cannot import its module could not read the message, and the job waited in
    the queue for ever (its row, JSON, showed a plain 3)."""
    Odd = type('Odd', (int,), {})  # a class pickle cannot even find
    jobs = [huey_tasks.sleep.submit(seconds=Odd(0), steps=Steps.FEW, priority=Steps.FEW),
            *producer.submit_many([huey_tasks.fail.job(message=Colour.RED),
                                   {'task': 'noop', 'params': {}, 'retries': Odd(2)}])]
    assert [j.created for j in jobs] == [True, True, True]
    assert jobs[0].params == {'seconds': 0.0, 'steps': 3} and jobs[0].priority == 3
    for _job_id, data, _remove in broker.hueys['default'].storage.waiting_messages():
        assert b'test_producer' not in data  # no class of this module in the pickle
        message = broker.read('default', data)
        values = [*message.kwargs['params'].values(), message.retries]
        assert all(type(v) in (int, float, str, bool, type(None)) for v in values), values
    by_task = {j.task: db.session.get(Job, j.id) for j in jobs}
    assert by_task['fail'].params['message'] == 'red' and by_task['noop'].retries == 2


def test_an_eta_may_be_a_datetime(ctx):
    import datetime as dt
    at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(hours=1)
    naive = huey_tasks.noop.submit(eta=at.replace(tzinfo=None))
    aware = huey_tasks.noop.submit(eta=at.astimezone(dt.timezone(dt.timedelta(hours=2))))
    [many] = producer.submit_many([huey_tasks.noop.job(eta=at)])
    expected = at.strftime('%Y-%m-%dT%H:%M:%S.000Z')
    assert [j.scheduled_for for j in (naive, aware, many)] == [expected] * 3
    assert {naive.state, aware.state, many.state} == {'scheduled'}


def test_a_broker_that_refuses_raises_and_leaves_no_row(ctx, monkeypatch):
    def down(*args, **kwargs):
        raise broker.BrokerUnavailable('the broker refused the job: down')
    monkeypatch.setattr(broker, 'enqueue', down)
    monkeypatch.setattr(broker, 'put_prepared', down)
    with pytest.raises(producer.BrokerUnavailable) as caught:
        huey_tasks.noop.submit()
    assert caught.value.unconfirmed == []  # taken back: nothing left
    with pytest.raises(producer.BrokerUnavailable):
        producer.submit_many([huey_tasks.noop.job(), huey_tasks.noop.job()])
    assert db.session.query(Job).count() == 0 and audit.entries() == []
    # Unreachable to take back what it may have taken: those jobs are named.
    monkeypatch.setattr(broker, 'remove_waiting', down)
    with pytest.raises(producer.BrokerUnavailable) as caught:
        producer.submit_many([huey_tasks.noop.job(), huey_tasks.noop.job(delay=60)])
    assert len(set(caught.value.unconfirmed)) == 2 and caught.value.recorded == []
    assert db.session.query(Job).count() == 0 and audit.entries() == []
    # A job with an idempotency key keeps its row (it runs once either way),
    # and submitting it again with the key returns it.
    with pytest.raises(producer.BrokerUnavailable) as caught:
        producer.submit_many([huey_tasks.noop.job(), huey_tasks.noop.job(idempotency_key='k')])
    plain, keyed = caught.value.unconfirmed
    assert caught.value.recorded == [keyed]
    assert [j.id for j in db.session.query(Job)] == [keyed] and audit.entries() == []
    again = huey_tasks.noop.submit(idempotency_key='k')
    assert (again.id, again.created, again.state) == (keyed, False, 'queued')


SCRIPT = '''
import json, sys
import huey_tasks
from app import producer
out = {}
if sys.argv[1] == 'submit':
    job = huey_tasks.sleep.submit(seconds=1, delay=5)
    out['one'] = [job.id, job.state, job.params, job.created]
    many = producer.submit_many([huey_tasks.noop.job(), huey_tasks.payment.job(card='4111 1111 1111 1111'),
                                 {'task': 'noop', 'idempotency_key': 'k'},
                                 huey_tasks.noop.job(idempotency_key='k')])
    out['many'] = [[j.id, j.task, j.params.get('card'), j.created] for j in many]
    try:
        huey_tasks.sleep.submit(seconds='soon')
    except producer.InvalidJob as exc:
        out['invalid'] = exc.fields
else:
    for call in (lambda: huey_tasks.noop.submit(),
                 lambda: producer.submit_many([huey_tasks.noop.job()] * 3)):
        try:
            call()
        except (producer.BrokerUnavailable, producer.LedgerUnavailable) as exc:
            out.setdefault('refused', []).append([type(exc).__name__, str(exc)])
print(json.dumps(out))
'''


def _run(env, what):
    done = subprocess.run([sys.executable, '-c', SCRIPT, what], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_another_process_submits_with_nothing_set_up(redis_server, tmp_path):
    import redis
    env = service_env(tmp_path, redis_server.url)
    migrate(env, tmp_path)
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    out = _run(env, 'submit')
    one_id, state, params, created = out['one']
    assert (state, params, created) == ('scheduled', {'seconds': 1.0, 'steps': 10}, True)
    assert [(task, card, created) for _id, task, card, created in out['many']] == [
        ('noop', None, True), ('payment', '**** 1111', True), ('noop', None, True),
        ('noop', None, False)]
    assert out['many'][3][0] == out['many'][2][0]
    assert out['invalid'] == {'params.seconds': 'must be a number'}
    with ledger(env) as conn:
        rows = dict(conn.execute(sa.text('SELECT id, state FROM job')).all())
        secret = conn.execute(sa.text("SELECT secret_params FROM job WHERE task = 'payment'")).scalar()
        entries = conn.execute(sa.text(
            'SELECT via, target, count FROM audit_entry ORDER BY id')).all()
    assert rows == {one_id: 'scheduled', **{i: 'queued' for i, *_ in out['many']}}
    assert json.loads(secret) == {'card': '4111 1111 1111 1111'}
    assert [tuple(e) for e in entries] == [('python', 'task sleep', 1),
                                           ('python', 'tasks noop, payment', 4)]
    assert client.zcard('huey.redis.qm.default') == 3
    assert client.zcard('huey.schedule.qm.default') == 1


@pytest.mark.processes
def test_another_process_told_the_broker_is_away_writes_nothing(tmp_path):
    env = service_env(tmp_path, f'redis://127.0.0.1:{free_port()}/0')
    migrate(env, tmp_path)
    assert [kind for kind, _message in _run(env, 'refused')['refused']] == [
        'BrokerUnavailable', 'BrokerUnavailable']
    with ledger(env) as conn:
        assert conn.execute(sa.text('SELECT count(*) FROM job')).scalar() == 0
        assert conn.execute(sa.text('SELECT count(*) FROM audit_entry')).scalar() == 0


@pytest.mark.processes
@pytest.mark.parametrize('where', ['away', 'not migrated'])
def test_a_ledger_away_or_not_migrated_is_ledger_unavailable(redis_server, tmp_path, where):
    # Once a raw SQLAlchemy OperationalError, which no caller catching
    # SubmitError (as the README says to) caught.
    import redis
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()  # the suite's own redis-server
    env = service_env(tmp_path, redis_server.url)
    if where == 'away':
        env['DATABASE_URL'] = f'postgresql://postgres@127.0.0.1:{free_port()}/none'
    refused = _run(env, 'refused')['refused']
    assert [kind for kind, _message in refused] == ['LedgerUnavailable'] * 2
    assert all(m.startswith('the ledger database could not be used: ') for _k, m in refused)
    if where == 'not migrated':
        assert 'no such table' in refused[0][1]
    assert [client.zcard(f'huey.{kind}.qm.default') for kind in ('redis', 'schedule')] == [0, 0]


@pytest.mark.processes
def test_a_broker_out_of_memory_part_way_through_a_batch_leaves_no_row_and_no_message(tmp_path):
    # Redis at its maxmemory (noeviction) refuses writes: not a lost
    # connection, but the batch must be all or nothing all the same. Some of
    # its messages went in before the refusal; they are taken out again.
    import redis
    from conftest import make_app
    from helpers import RedisServer
    server = RedisServer(tmp_path / 'redis')
    try:
        app = make_app(tmp_path, REDIS_URL=server.url)
        client = redis.Redis.from_url(server.url)
        waiting = ('huey.redis.qm.default', 'huey.schedule.qm.default')
        with app.app_context():
            jobs = [huey_tasks.fail.job(message=f'{n:04d} ' + 'x' * 480, delay=60 * (n % 2))
                    for n in range(1000)]
            client.config_set('maxmemory', client.info('memory')['used_memory'] + 200_000)
            with pytest.raises(producer.BrokerUnavailable) as caught:
                producer.submit_many(jobs)
            assert "the broker refused the request" in str(caught.value)
            assert "used memory > 'maxmemory'" in str(caught.value)
            calls_run = len(client.keys('qm:once:*'))  # each call that went in leaves one
            assert 0 < calls_run < 500, calls_run  # refused part way
            assert [client.zcard(key) for key in waiting] == [0, 0]
            assert client.hlen('qm:index:qm.default') <= 1  # '*' alone, at 0
            with pytest.raises(producer.BrokerUnavailable):
                huey_tasks.noop.submit()
            assert db.session.query(Job).count() == 0
            client.config_set('maxmemory', 0)
            assert len(producer.submit_many(jobs[:10])) == 10
            assert sum(client.zcard(key) for key in waiting) == 10
    finally:
        server.stop()


FORKED = '''
import json, multiprocessing, sys
import huey_tasks
from app import producer

def child(n):
    try:
        return producer.submit_many([huey_tasks.noop.job(), huey_tasks.noop.job()])[0].id
    except Exception as exc:
        return f'{type(exc).__name__}: {exc}'

first = huey_tasks.noop.submit()  # the parent's pool now holds a connection
with multiprocessing.get_context('fork').Pool(4) as pool:
    got = pool.map(child, range(8))
last = huey_tasks.noop.submit()  # and the parent's connection still works
print(json.dumps({'first': first.id, 'children': got, 'last': last.id}))
'''


@pytest.mark.processes
def test_children_forked_after_a_submission_submit_on_connections_of_their_own(
        tmp_path, postgres_url):
    # Children of a fork-based pool inherit the parent's pooled database
    # connections: used by two processes, a connection breaks for both.
    env = service_env(tmp_path, database_url=postgres_url)
    migrate(env, tmp_path)
    done = subprocess.run([sys.executable, '-c', FORKED], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert all(len(i) == 36 for i in out['children']), out['children']
    with ledger(env) as conn:
        assert conn.execute(sa.text('SELECT count(*) FROM job')).scalar() == 2 + 8 * 2


@pytest.mark.processes
@pytest.mark.parametrize('where', ['not-a-database', 'a-folder', 'under-a-file'])
def test_an_embedded_queue_that_cannot_be_opened_is_broker_unavailable(tmp_path, where):
    path = {'not-a-database': tmp_path / 'bad.db', 'a-folder': tmp_path,
            'under-a-file': tmp_path / 'notes.txt' / 'huey.db'}[where]
    (tmp_path / 'bad.db').write_bytes(b'not a database, ' * 400)
    (tmp_path / 'notes.txt').write_text('a file\n')
    env = service_env(tmp_path)
    migrate(env, tmp_path)
    env['HUEY_SQLITE_PATH'] = str(path)
    refused = _run(env, 'refused')['refused']
    assert [kind for kind, _message in refused] == ['BrokerUnavailable'] * 2
    assert all(message.endswith('(HUEY_SQLITE_PATH)') for _kind, message in refused)
    with ledger(env) as conn:
        assert conn.execute(sa.text('SELECT count(*) FROM job')).scalar() == 0

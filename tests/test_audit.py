"""The audit log: every action taken or refused, with who, what, on what, how many, from where."""
import pytest
from conftest import make_app

from app import accounts, audit, catalog, jobs
from app.extensions import db

PASSWORD = 'long enough'


@pytest.fixture
def audited(tmp_path):
    app = make_app(tmp_path)
    with app.app_context():
        accounts.create_user('ada', PASSWORD, 'admin')
        accounts.create_user('olly', PASSWORD, 'operator')
        app.token = accounts.create_token('olly', 'ci')[1]
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def login(app, name):
    client = app.test_client()
    assert client.post('/login', data={'name': name, 'password': PASSWORD}).status_code == 303
    return client


def entries(app):
    with app.app_context():
        return [e.to_dict() for e in reversed(audit.entries())]


def test_actions_are_recorded_with_who_what_how_many_and_from_where(audited):
    app = audited
    ada = login(app, 'ada')
    ada.environ_base['REMOTE_ADDR'] = '127.0.0.9'
    job_id = ada.post('/api/jobs', json={'task': 'noop', 'delay': 600}).get_json()['id']
    ada.post(f'/jobs/{job_id}/cancel')
    ada.post('/jobs/bulk', data={'action': 'delete', 'scope': 'filter', 'f.state': 'canceled'})
    ada.post('/jobs/bulk', data={'action': 'delete', 'scope': 'filter', 'f.state': 'canceled',
                                 'confirmed': '1'})
    bot = app.test_client()
    bot.post('/api/queues/default/pause', headers={'Authorization': f'Bearer {app.token}'})
    got = [(e['user'], e['role'], e['via'], e['action'], e['target'], e['count'], e['outcome'])
           for e in entries(app)]
    assert got == [
        ('ada', 'admin', 'session', 'login', None, None, 'done'),
        ('ada', 'admin', 'session', 'submit', 'task noop', None, 'done'),
        ('ada', 'admin', 'session', 'cancel', job_id, 1, 'done'),
        ('ada', 'admin', 'session', 'delete', 'filter state=canceled', 1, 'asked to confirm'),
        ('ada', 'admin', 'session', 'delete', 'filter state=canceled', 1, 'done'),
        ('olly', 'operator', 'token', 'pause', 'queue default', None, 'done'),
    ]
    assert [e['address'] for e in entries(app)][1:5] == ['127.0.0.9'] * 4
    assert all(e['at'].endswith('Z') for e in entries(app))


def test_refusals_and_failed_logins_are_recorded_too(audited):
    app = audited
    client = app.test_client()
    client.post('/login', data={'name': 'ada', 'password': 'guess'})
    olly = login(app, 'olly')
    job_id = olly.post('/api/jobs', json={'task': 'noop', 'delay': 600}).get_json()['id']
    assert olly.delete(f'/api/jobs/{job_id}').status_code == 403
    # made by another site in olly's name: refused, and not kept (anyone could flood the log)
    assert olly.post(f'/jobs/{job_id}/retry', headers={'Sec-Fetch-Site': 'cross-site'}).status_code == 403
    for _ in range(20):  # nobody's refused attempts are not kept: no flooding the log
        assert app.test_client().post('/api/jobs', json={'task': 'noop'}).status_code == 401
    got = [(e['user'], e['action'], e['outcome']) for e in entries(app)]
    assert got == [
        ('ada', 'login', 'wrong name or password'),
        ('olly', 'login', 'done'),
        ('olly', 'submit', 'done'),
        ('olly', 'delete', 'refused: 403 forbidden'),
    ]



def test_a_batch_is_one_entry_counting_its_jobs_and_written_with_them(audited, monkeypatch):
    app = audited
    bot = app.test_client()
    token = {'Authorization': f'Bearer {app.token}'}
    items = [{'task': 'noop'}, {'task': 'sleep'}, {'task': 'noop'}]
    assert bot.post('/api/jobs/batch', json={'jobs': items}, headers=token).status_code == 201
    assert bot.post('/api/jobs/batch', json={'jobs': [{'task': 'nope'}]},
                    headers=token).status_code == 400
    from app import broker

    def down(*args):
        raise broker.BrokerUnavailable('the broker refused: down')
    monkeypatch.setattr(broker, 'put_prepared', down)
    assert bot.post('/api/jobs/batch', json={'jobs': items}, headers=token).status_code == 503
    got = [(e['user'], e['via'], e['action'], e['target'], e['count'], e['outcome'])
           for e in entries(app)]
    assert got == [
        ('olly', 'token', 'submit', 'tasks noop, sleep', 3, 'done'),
        ('olly', 'token', 'submit', None, None, 'refused: 400 bad request'),
        ('olly', 'token', 'submit', None, None, 'refused: 503 service unavailable'),
    ]


def test_only_admins_read_the_log_and_it_pages(audited):
    app = audited
    olly = login(app, 'olly')
    assert olly.get('/audit').status_code == 403
    assert olly.get('/api/audit').status_code == 403
    assert olly.get('/ws?view=audit').status_code == 403  # its live view too
    assert 'href="/audit"' not in olly.get('/').get_data(as_text=True)
    ada = login(app, 'ada')
    page = ada.get('/audit').get_data(as_text=True)
    assert 'id="audit-log"' in page and 'olly' in page and 'href="/audit"' in page
    assert 'id="audit-log"' in ada.get('/ws?view=audit').get_data(as_text=True)
    first = ada.get('/api/audit?limit=2').get_json()
    assert [e['action'] for e in first['entries']] == ['login', 'login']
    rest = ada.get(f'/api/audit?limit=2&before={first["next"]}').get_json()
    assert rest['entries'] == [] or rest['entries'][0]['id'] < first['entries'][-1]['id']


def test_a_local_user_without_login_is_recorded_as_local(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    client.post('/api/jobs', json={'task': 'noop'})
    with app.app_context():
        [entry] = audit.entries()
        assert (entry.user, entry.role, entry.via, entry.action) == (None, 'admin', 'local', 'submit')
        jobs.submit(catalog.validate({'task': 'noop', 'params': {}}, app.config)).orm()
        assert len(audit.entries()) == 1  # what the program does itself is not an action of anyone

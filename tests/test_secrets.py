"""Secret parameters, end to end: the task gets the real value, nothing shows it.

The payment task's ``card`` is declared secret. Jobs are submitted through
the API and the form and run through Huey's real execute path (a worker's
dequeue and execute, minus the thread) with the ledger recorder writing,
on SQLite and on PostgreSQL. Then every page, fragment, API route and the
live socket's plain GET that shows the job is read: the card number is in
none of them, nor in the stored log lines, errors or results.
"""
import pytest
import sqlalchemy as sa
from conftest import flushed, make_app, run_next, start_recording

import huey_tasks
from app import broker, catalog, consumer
from app.extensions import db
from app.models import AttemptLog, Job

CARD = '4111 1111 1111 1234'
# The ways it could leak: as typed, as digits, and a prefix a search could match.
LEAKS = (CARD, '4111111111111234', '4111 1111 1111', '411111111111')
PAYMENT = {'amount': 12.5, 'currency': 'EUR', 'card': CARD, 'failure_rate': 0,
           'latency': 0.001}


@pytest.fixture
def secrets_app(tmp_path, ledger_url, monkeypatch):
    """``(app, recorder, cards)``: the ledger recorder on wired Hueys, and the payment task
    spied on: ``cards`` lists the card each run was given. The spy logs the card
    verbatim, reports it as progress and, while ``fail`` holds, raises with it."""
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    cards, fail = [], []
    charge = catalog.TASKS['payment'].func

    def payment(**params):
        card = params['card']
        cards.append(card)
        huey_tasks.log.info('charging card %s', card)
        huey_tasks.progress(0.05, message=f'card {card}')
        if fail:
            raise RuntimeError(f'gateway refused card {card} ({card.replace(" ", "")})')
        return {**charge(**params), 'echo': card}

    monkeypatch.setattr(catalog.TASKS['payment'], 'func', payment)
    with app.app_context():
        recorder = start_recording(app)
        yield app, recorder, cards, fail
        consumer.process.recording.stop()
        db.session.remove()
        db.engine.dispose()


def failed_payment(client, recorder, fail):
    """Submit a payment with no retries and run it, the gateway refusing: its job id."""
    fail.append(True)
    job_id = client.post('/api/jobs', json={'task': 'payment', 'params': PAYMENT,
                                            'retries': 0}).get_json()['id']
    run_next()
    flushed(recorder)
    return job_id


def assert_hidden(body, where):
    text = body if isinstance(body, str) else body.decode('utf-8', 'replace')
    for leak in LEAKS:
        assert leak not in text, f'{leak!r} shown by {where}'


def routes(job_id):
    """Every GET that shows the job (or could find it), pages, fragments, API and live."""
    return ['/', '/jobs', '/jobs?q=1234', '/jobs?task=payment', f'/jobs/{job_id}',
            f'/jobs/{job_id}/row', f'/jobs/{job_id}/summary', f'/jobs/{job_id}/attempts',
            '/failures', '/scheduled', '/periodic', '/jobs/new?task=payment',
            f'/jobs/new?task=payment&params.card={CARD}', '/jobs/new/fields?task=payment',
            '/api/jobs', '/api/jobs?task=payment', f'/api/jobs/{job_id}',
            f'/api/jobs/{job_id}/log', '/api/failures', '/api/scheduled', '/api/tasks',
            '/api/openapi.json', '/api/periodic',
            f'/ws?view=job&id={job_id}', '/ws?view=jobs', '/ws?view=dashboard',
            '/ws?view=failures']


def assert_no_route_shows_it(client, job_id):
    for url in routes(job_id):
        response = client.get(url)
        assert response.status_code == 200, url
        assert_hidden(response.data, url)
    # Searching for it finds nothing, whole or by its start.
    for q in LEAKS:
        assert client.get('/api/jobs', query_string={'q': q}).get_json()['jobs'] == [], q
        page = client.get('/jobs', query_string={'q': q})
        assert job_id[:8] not in page.text, q
    # What is shown of it (its last four) still finds it.
    assert [j['id'] for j in client.get('/api/jobs?q=**** 1234').get_json()['jobs']] == [job_id]


def stored_text(job_id):
    """Everything the ledger keeps about the job but its secret_params, as one text."""
    row = db.session.execute(sa.text(
        'SELECT CAST(params AS TEXT), CAST(result AS TEXT), error, progress_message '
        'FROM job WHERE id = :id'), {'id': job_id}).one()
    attempts = db.session.execute(sa.text(
        'SELECT error_message, traceback FROM attempt WHERE job_id = :id'), {'id': job_id}).all()
    logs = db.session.scalars(sa.select(AttemptLog.message).where(AttemptLog.job_id == job_id))
    return '\n'.join(str(v) for v in (*row, *(v for a in attempts for v in a), *logs))


def test_a_payment_submitted_by_the_api_charges_the_real_card_and_nothing_shows_it(
        secrets_app):
    app, recorder, cards, _fail = secrets_app
    client = app.test_client()
    response = client.post('/api/jobs', json={'task': 'payment', 'params': PAYMENT})
    assert response.status_code == 201
    assert_hidden(response.data, 'POST /api/jobs')
    job_id = response.get_json()['id']
    assert response.get_json()['params']['card'] == '**** 1234'
    row = db.session.get(Job, job_id)
    assert (row.params['card'], row.secret_params) == ('**** 1234', {'card': CARD})

    task = run_next()
    assert task.kwargs['params']['card'] == CARD  # the broker's message carries it
    flushed(recorder)
    # Given the masked value the charge is declined (4 digits): it succeeded.
    assert cards == [CARD]
    row = db.session.get(Job, job_id)
    assert row.state == 'succeeded', row.error
    assert row.result['card'] == '**** 1234' and row.result['echo'] == '**** 1234'
    assert row.secret_params is None  # no longer needed: a succeeded job never runs again
    logged = db.session.scalars(sa.select(AttemptLog.message)
                                .where(AttemptLog.job_id == job_id)).all()
    assert 'huey_tasks: charging card **** 1234' in logged
    assert_hidden(stored_text(job_id), 'the ledger')
    assert_no_route_shows_it(client, job_id)


def test_a_failed_payment_hides_the_card_in_its_errors_and_retries_with_it(secrets_app):
    app, recorder, cards, fail = secrets_app
    client = app.test_client()
    job_id = failed_payment(client, recorder, fail)
    row = db.session.get(Job, job_id)
    assert row.state == 'failed'
    assert row.error == 'RuntimeError: gateway refused card **** 1234 (**** 1234)'
    assert_hidden(stored_text(job_id), 'the ledger')
    assert_no_route_shows_it(client, job_id)
    for q in LEAKS:  # a bulk action cannot find it by the card either
        bulk = client.post('/api/jobs/bulk', json={'action': 'delete', 'filter': {'q': q}})
        assert bulk.get_json()['matched'] == 0, q
    assert db.session.get(Job, job_id).secret_params == {'card': CARD}  # kept for a retry

    # Retried from the API, then from the dashboard: each run gets the real card.
    fail.clear()
    retried = client.post(f'/api/jobs/{job_id}/retry')
    assert retried.status_code == 200
    assert_hidden(retried.data, 'POST /api/jobs/<id>/retry')
    run_next()
    flushed(recorder)
    assert cards == [CARD, CARD]
    assert db.session.get(Job, job_id).state == 'succeeded'


def test_a_retry_from_the_dashboard_and_a_reenqueue_from_the_row_use_the_real_card(
        secrets_app):
    app, recorder, cards, fail = secrets_app
    client = app.test_client()
    job_id = failed_payment(client, recorder, fail)
    fail.clear()
    page = client.post(f'/jobs/{job_id}/retry', headers={'HX-Request': 'true'})
    assert page.status_code < 400
    assert_hidden(page.data, 'POST /jobs/<id>/retry')
    # A message built from the row alone (what the reaper and the reconciler
    # do) carries the real value, read from a fresh session.
    db.session.remove()
    assert broker.build(db.session.get(Job, job_id)).kwargs['params']['card'] == CARD
    run_next()
    flushed(recorder)
    assert cards == [CARD, CARD]
    assert db.session.get(Job, job_id).state == 'succeeded'


def test_a_payment_submitted_by_the_form_is_masked_and_its_errors_do_not_echo_it(secrets_app):
    app, recorder, cards, _fail = secrets_app
    client = app.test_client()
    form = {'task': 'payment', **{f'params.{k}': str(v) for k, v in PAYMENT.items()}}
    refused = client.post('/jobs', data={**form, 'params.amount': 'lots'})
    assert refused.status_code == 400 and 'must be a number' in refused.text
    assert_hidden(refused.data, 'the refused form')
    assert 'type="password"' in refused.text and 'autocomplete="off"' in refused.text
    assert db.session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0

    response = client.post('/jobs', data=form)
    assert response.status_code == 303
    job_id = response.headers['Location'].rsplit('/', 1)[-1]
    run_next()
    flushed(recorder)
    assert cards == [CARD]
    assert db.session.get(Job, job_id).state == 'succeeded'
    assert_no_route_shows_it(client, job_id)


def test_a_payment_enqueued_around_the_api_is_recorded_masked_and_can_be_retried(secrets_app):
    app, recorder, cards, fail = secrets_app
    huey = broker.hueys['default']
    fail.append(True)
    task = catalog.TASKS['payment'].wrappers[huey.name].s(params=PAYMENT)
    huey.enqueue(task)  # no row yet: the recorder writes it from the message
    run_next()
    flushed(recorder)
    row = db.session.get(Job, task.id)
    assert row.state == 'failed'
    assert (row.params['card'], row.secret_params) == ('**** 1234', {'card': CARD})
    assert_hidden(stored_text(task.id), 'the ledger')
    fail.clear()
    assert app.test_client().post(f'/api/jobs/{task.id}/retry').status_code == 200
    run_next()
    flushed(recorder)
    assert cards == [CARD, CARD]
    assert db.session.get(Job, task.id).state == 'succeeded'

"""Alerts: rules evaluated from the ledger's counters and the broker, one row and one webhook
post per incident, a banner on every page, /alerts and /api/alerts.

Jobs run in-process on the embedded broker and are recorded by the real
ledger recorder; the webhook is a real HTTP server on a free port.
"""
import datetime as dt
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from conftest import flushed, make_app, recording_app, run_next
from helpers import Stack, free_port, wait_for
from sqlalchemy.exc import IntegrityError

from app import alerts, broker, catalog, events, fragments, jobs, live
from app.extensions import db
from app.models import Alert, utcnow

FAILING = [{'name': 'failing', 'kind': 'failure_rate', 'queue': 'default', 'percent': 50,
            'minutes': 5, 'min_jobs': 5}]


class Receiver:
    """A webhook receiver on a free port: keeps every JSON body it is sent, answers ``status``.

    ``hold``, when set to an Event, makes each answer wait until the Event is
    set (a receiver that hangs).
    """

    def __init__(self):
        self.received = []  # (status answered, content type, body)
        self.status = 200
        self.hold = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                if outer.hold is not None:
                    outer.hold.wait(30)
                outer.received.append((outer.status, self.headers['Content-Type'], body))
                self.send_response(outer.status)
                self.send_header('Content-Length', '2')
                self.end_headers()
                self.wfile.write(b'ok')

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_port}/services/T000/B000/secret'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self):
        """The bodies answered with a 2xx, in order."""
        return [body for status, _type, body in self.received if 200 <= status < 300]

    def close(self):
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def failing_app(tmp_path, ledger_url, receiver):
    """``(app, recorder)`` recording, with the failure-rate rule and the webhook configured."""
    with recording_app(tmp_path, DATABASE_URL=ledger_url, ALERT_RULES=FAILING,
                       ALERT_WEBHOOK_URL=receiver.url) as pair:
        yield pair


def run(app, recorder, task, n):
    """Submit ``n`` jobs of ``task`` (no retries) and run them all, recorded."""
    for _ in range(n):
        jobs.submit(catalog.validate({'task': task, 'retries': 0}, app.config))
    huey = broker.hueys['default']
    while huey.pending_count():
        run_next(huey)
    flushed(recorder)


def submit(app, task='noop', **options):
    return jobs.submit(catalog.validate({'task': task, **options}, app.config))


def rows():
    db.session.expire_all()
    return db.session.scalars(sa.select(Alert).order_by(Alert.id)).all()


def test_a_failure_rate_fires_once_to_the_webhook_and_resolves_when_the_rate_drops(
        failing_app, receiver):
    app, recorder = failing_app
    heard = []
    unsubscribe = events.bus.subscribe(heard.append)
    try:
        run(app, recorder, 'fail', 3)
        run(app, recorder, 'noop', 1)
        alerts.check(app)  # 3 of 4 failed, but fewer than min_jobs finished
        assert rows() == [] and receiver.received == []

        run(app, recorder, 'fail', 3)
        run(app, recorder, 'noop', 2)  # 6 of 9: 66.7%
        alerts.check(app)
        [alert] = rows()
        assert (alert.rule, alert.kind, alert.scope, alert.subject, alert.state) == \
            ('failing', 'failure_rate', 'queue', 'default', 'firing')
        assert (round(alert.value, 1), alert.threshold) == (66.7, 50.0)
        assert alert.message == ('failure rate of queue default is 66.7% (6 of 9 jobs failed in '
                                 'the last 5 min), over 50%')
        assert (alert.delivery, alert.notified, alert.delivery_attempts) == ('sent', 'firing', 0)
        assert {'alerts': True} in heard  # open pages hear of it

        # Still failing: the same incident, nothing posted again, by this
        # leader or by a new one (which knows only what the ledger holds).
        first = alert.id
        run(app, recorder, 'fail', 2)
        alerts.check(app)
        db.session.remove()
        alerts.check(app)
        assert [(a.id, a.state) for a in rows()] == [(first, 'firing')]
        assert len(receiver.received) == 1

        run(app, recorder, 'noop', 12)  # 8 of 23: 34.8%
        alerts.check(app)
        [alert] = rows()
        assert alert.state == 'resolved' and alert.resolved_at >= alert.fired_at
        assert alert.resolution == ('failure rate of queue default is 34.8% (8 of 23 jobs failed '
                                    'in the last 5 min)')
        assert (alert.delivery, alert.notified) == ('sent', 'resolved')
        alerts.check(app)
        assert len(rows()) == 1
    finally:
        unsubscribe()

    assert [(status, kind) for status, kind, _ in receiver.received] == \
        [(200, 'application/json'), (200, 'application/json')]
    fired, resolved = receiver.delivered()
    assert fired['status'] == 'firing' and resolved['status'] == 'resolved'
    assert fired['text'] == ('[FIRING] failing: failure rate of queue default is 66.7% (6 of 9 '
                             'jobs failed in the last 5 min), over 50%')
    assert resolved['text'].startswith('[RESOLVED] failing: failure rate of queue default is '
                                       '34.8% (8 of 23 jobs failed in the last 5 min) (fired 20')
    assert fired['alert']['id'] == resolved['alert']['id'] == alert.id
    assert fired['alert']['state'] == 'firing' and fired['alert']['resolved_at'] is None
    assert resolved['alert']['state'] == 'resolved' and resolved['alert']['resolved_at']
    assert {k: fired['alert'][k] for k in ('rule', 'kind', 'scope', 'subject', 'threshold')} == \
        {'rule': 'failing', 'kind': 'failure_rate', 'scope': 'queue', 'subject': 'default',
         'threshold': 50.0}
    assert 'delivery' not in fired['alert']


def test_a_failure_rate_per_task_counts_only_that_task(tmp_path, receiver):
    rule = [{'kind': 'failure_rate', 'task': 'fail', 'percent': 10, 'minutes': 1, 'min_jobs': 2}]
    with recording_app(tmp_path, ALERT_RULES=rule) as (app, recorder):
        run(app, recorder, 'noop', 20)
        run(app, recorder, 'fail', 2)
        outcome = alerts.evaluate(app.config)
        [alert] = outcome.fired
        assert (alert.rule, alert.scope, alert.subject, alert.value) == \
            ('failure_rate fail', 'task', 'fail', 100.0)
        assert alert.delivery == 'off'  # no webhook: shown on the pages only
        assert alerts.deliver(app.config) == 0


def test_only_one_firing_row_per_rule_and_subject_even_from_two_leaders(failing_app):
    app, _recorder = failing_app
    now = utcnow()
    fields = dict(rule='failing', kind='failure_rate', scope='queue', subject='default',
                  state='firing', fired_at=now, value=60.0, threshold=50.0, message='m',
                  delivery='off', delivery_attempts=0)
    db.session.add(Alert(**fields))
    db.session.commit()
    db.session.add(Alert(**fields))
    with pytest.raises(IntegrityError):
        db.session.commit()
    db.session.rollback()
    db.session.add(Alert(**dict(fields, state='resolved')))  # history is not limited
    db.session.add(Alert(**dict(fields, subject='reports')))
    db.session.commit()
    assert len(rows()) == 3


def test_a_failed_delivery_is_recorded_and_retried_on_the_next_evaluation(
        failing_app, receiver):
    app, recorder = failing_app
    receiver.status = 500
    run(app, recorder, 'fail', 5)
    alerts.check(app)
    [alert] = rows()
    assert alert.state == 'firing'  # the row is written whatever the webhook does
    assert (alert.delivery, alert.notified, alert.delivery_attempts) == ('pending', None, 1)
    assert alert.delivery_error.startswith('HTTP 500')
    assert 'secret' not in alert.delivery_error

    alerts.check(app)
    assert rows()[0].delivery_attempts == 2
    receiver.status = 200
    alerts.check(app)
    [alert] = rows()
    assert (alert.delivery, alert.notified, alert.delivery_attempts, alert.delivery_error) == \
        ('sent', 'firing', 2, None)
    assert [s for s, _t, _b in receiver.received] == [500, 500, 200]
    assert len(receiver.delivered()) == 1


def test_a_receiver_that_is_down_or_hangs_costs_one_timeout_and_nothing_is_lost(
        tmp_path, receiver):
    down = f'http://127.0.0.1:{free_port()}/hook'
    with recording_app(tmp_path, ALERT_RULES=FAILING, ALERT_WEBHOOK_URL=down,
                       ALERT_WEBHOOK_TIMEOUT=0.5) as (app, recorder):
        run(app, recorder, 'fail', 5)
        alerts.check(app)
        [alert] = rows()
        assert alert.delivery == 'pending' and alert.delivery_error.startswith('unreachable')

        # It resolves before any delivery went out: both messages are due, in order.
        run(app, recorder, 'noop', 20)
        alerts.evaluate(app.config)
        receiver.hold = threading.Event()
        config = dict(app.config, ALERT_WEBHOOK_URL=receiver.url)
        started = time.monotonic()
        assert alerts.deliver(config) == 0
        assert time.monotonic() - started < 5
        [alert] = rows()
        assert (alert.state, alert.delivery, alert.delivery_attempts) == ('resolved', 'pending', 2)
        assert 'timed out' in alert.delivery_error

        receiver.hold.set()
        receiver.hold = None
        wait_for(lambda: len(receiver.received) == 1, 10, message='the held post to end')
        assert alerts.deliver(config) == 2
        assert [b['status'] for b in receiver.delivered()] == ['firing', 'firing', 'resolved']
        assert rows()[0].delivery == 'sent'


def test_depth_oldest_waiting_and_no_consumer_read_the_broker_and_the_ledger(tmp_path):
    rules = [{'kind': 'depth', 'queue': 'default', 'above': 2},
             {'kind': 'oldest_waiting', 'queue': 'default', 'seconds': 60},
             {'kind': 'no_consumer', 'queue': 'default'}]
    app = make_app(tmp_path, ALERT_RULES=rules)
    with app.app_context():
        for _ in range(3):
            submit(app)
        fired = {a.rule: a for a in alerts.evaluate(app.config).fired}
        assert set(fired) == {'depth default', 'no_consumer default'}
        assert fired['depth default'].value == 3.0
        assert fired['depth default'].message == \
            'queue default holds 3 messages ready to run, over 2'
        assert fired['no_consumer default'].message == '0 consumers online for queue default'

        # The oldest job has waited 90 s a minute and a half from now.
        later = utcnow() + dt.timedelta(seconds=90)
        [oldest] = alerts.evaluate(app.config, now=later).fired
        assert oldest.rule == 'oldest_waiting default' and 89 <= oldest.value <= 91

        broker.keep_alive(['default'])  # this process serves the queue now
        while broker.hueys['default'].pending_count():
            broker.hueys['default'].dequeue()
        outcome = alerts.evaluate(app.config, now=later)
        assert sorted(a.rule for a in outcome.resolved) == [
            'depth default', 'no_consumer default']
        assert [a.rule for a in alerts.firing()] == ['oldest_waiting default']  # still queued
        broker.release(['default'])
        db.session.remove()


def test_an_alert_whose_rule_is_gone_resolves_saying_so(failing_app):
    app, recorder = failing_app
    run(app, recorder, 'fail', 5)
    alerts.evaluate(app.config)
    [resolved] = alerts.evaluate(dict(app.config, ALERT_RULES=())).resolved
    assert resolved.resolution == alerts.GONE and alerts.firing() == []


HOSTILE = '<img src=x onerror=alert(1)>'


def test_the_banner_shows_on_every_page_escaped_and_goes_when_resolved(tmp_path):
    rule = [{'name': HOSTILE, 'kind': 'no_consumer', 'queue': 'default'}]
    app = make_app(tmp_path, ALERT_RULES=rule)
    client = app.test_client()
    with app.app_context():
        job_id = submit(app).id
        assert 'id="alert-banner"' in client.get('/').get_data(as_text=True)
        assert 'alert firing' not in client.get('/').get_data(as_text=True)
        alerts.evaluate(app.config)
        db.session.remove()
    pages = ['/', '/jobs', f'/jobs/{job_id}', '/queues', '/workers', '/failures', '/scheduled',
             '/periodic', '/audit', '/alerts', '/jobs/new', '/alerts/banner']
    for path in pages:
        html = client.get(path).get_data(as_text=True)
        assert html.count('id="alert-banner"') == 1, path
        assert '1 alert firing' in html, path
        assert HOSTILE not in html and '&lt;img src=x onerror=alert(1)&gt;' in html, path
        assert '0 consumers online for queue default' in html, path
    for name in fragments.PAGES:  # every live page is refreshed when alerts change
        key, factory = live.view_for({'view': name, 'id': job_id, 'queue': 'default', 'task': 'noop'},
                                     app.config)
        assert factory(key, {}).concerns(fragments.Change.of({'alerts': True})), name
    pushed = client.get('/ws?view=queues').get_data(as_text=True)
    assert '<hx-partial hx-target="#alert-banner" hx-swap="outerHTML">' in pushed
    assert '1 alert firing' in pushed and HOSTILE not in pushed
    with app.app_context():
        broker.keep_alive(['default'])
        alerts.evaluate(app.config)
        broker.release(['default'])
        db.session.remove()
    html = client.get('/queues').get_data(as_text=True)
    assert 'id="alert-banner"' in html and 'alert firing' not in html


def test_the_banner_is_not_shown_to_who_may_not_see_the_pages(tmp_path):
    from app import accounts
    app = make_app(tmp_path, ALERT_RULES=[{'kind': 'no_consumer'}], AUTH='login')
    with app.app_context():
        accounts.create_user('ada', 'long enough', 'viewer')
        alerts.evaluate(app.config)
    client = app.test_client()
    login = client.get('/login').get_data(as_text=True)
    assert 'alert firing' not in login and 'alert-banner' not in login
    client.post('/login', data={'name': 'ada', 'password': 'long enough'})
    assert '1 alert firing' in client.get('/jobs/new').get_data(as_text=True)
    assert client.get('/api/alerts').get_json()['firing'] == 1


def test_alerts_page_and_api_page_through_the_history(tmp_path):
    app = make_app(tmp_path)
    with app.app_context():
        now = utcnow()
        for n in range(5):
            db.session.add(Alert(rule=f'r{n}', kind='depth', scope='queue', subject='default',
                                 state='firing' if n == 4 else 'resolved', fired_at=now,
                                 resolved_at=None if n == 4 else now, value=n, threshold=1,
                                 message=f'message {n}', resolution=None if n == 4 else 'ok',
                                 delivery='off', delivery_attempts=0))
        db.session.commit()
        ids = [a.id for a in rows()]
    client = app.test_client()
    first = client.get('/api/alerts?limit=2').get_json()
    assert [a['id'] for a in first['alerts']] == ids[:-3:-1]
    assert first['firing'] == 1 and first['next'] == ids[3]
    second = client.get(f'/api/alerts?limit=2&before={first["next"]}').get_json()
    assert [a['id'] for a in second['alerts']] == [ids[2], ids[1]]
    last = client.get(f'/api/alerts?limit=2&before={second["next"]}').get_json()
    assert [a['id'] for a in last['alerts']] == [ids[0]] and last['next'] is None
    firing = client.get('/api/alerts?state=firing').get_json()['alerts']
    assert [(a['rule'], a['state'], a['resolved_at']) for a in firing] == [('r4', 'firing', None)]
    assert client.get('/api/alerts?state=open').status_code == 400
    assert client.get('/api/alerts?limit=0').status_code == 400

    html = client.get('/alerts').get_data(as_text=True)
    assert all(f'message {n}' in html for n in range(5))
    assert f'data-alert="{ids[4]}" data-state="firing"' in html
    older = client.get(f'/alerts?before={ids[2]}').get_data(as_text=True)
    assert 'message 1' in older and 'message 3' not in older.split('id="alert-history"')[1]
    assert client.get('/alerts?before=abc').status_code == 400
    # Digits Python calls digits but int() refuses (a superscript), or not ASCII: a 400 too.
    # The page reads its cursor as the API does: the same refused, the same taken.
    for before in ('\u00b2', '\u0663', '1_0', '0', '-3', str(2**63), '1.5', 'x' * 30):
        assert client.get('/alerts', query_string={'before': before}).status_code == 400
        assert client.get('/api/alerts', query_string={'before': before}).status_code == 400
    for before in ('+5', str(2**63 - 1), f' {ids[2]} '):
        assert client.get('/alerts', query_string={'before': before}).status_code == 200
        assert client.get('/api/alerts', query_string={'before': before}).status_code == 200


@pytest.fixture
def stack(tmp_path, receiver):
    """Redis, a web process and one real consumer, alerting to ``receiver`` every 0.5 s."""
    rule = [{'name': 'failing', 'kind': 'failure_rate', 'queue': 'default', 'percent': 50,
             'minutes': 5, 'min_jobs': 4}]
    stack = Stack(tmp_path, ALERT_RULES=json.dumps(rule), ALERT_WEBHOOK_URL=receiver.url,
                  ALERT_INTERVAL=0.5)
    yield stack
    stack.close()


def test_a_real_consumer_running_failing_jobs_fires_the_rule_to_the_webhook_once(
        stack, receiver):
    stack.consumer()
    api = stack.api
    for job in [api.submit('fail', retries=0) for _ in range(4)]:
        api.wait_state(job['id'], 'failed')
    wait_for(lambda: receiver.delivered(), 30, 0.1, 'the webhook to hear the alert')
    [fired] = receiver.delivered()
    assert fired['status'] == 'firing' and fired['text'].startswith(
        '[FIRING] failing: failure rate of queue default is 100.0% (4 of 4 jobs failed')
    status, listed = api.get('/api/alerts?state=firing')
    assert status == 200 and [a['id'] for a in listed['alerts']] == [fired['alert']['id']]
    assert listed['alerts'][0]['delivery'] == 'sent'

    for job in [api.submit('noop') for _ in range(5)]:
        api.wait_state(job['id'], 'succeeded')
    wait_for(lambda: len(receiver.delivered()) == 2, 30, 0.1, 'the webhook to hear it resolve')
    assert [b['status'] for b in receiver.delivered()] == ['firing', 'resolved']
    assert stack.sql("SELECT state FROM alert") == [('resolved',)]

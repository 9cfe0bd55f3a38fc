"""``/metrics`` and the metric history: values agree with the ledger and the broker,
counters never go down, access is a viewer's or the scrape token's."""
import datetime as dt
import time

import pytest
import redis
import sqlalchemy as sa
from conftest import make_app
from helpers import Stack, wait_for
from prometheus_client.parser import text_string_to_metric_families

from app import accounts, broker, jobs, metrics, queries, states
from app.extensions import db
from app.ledger import Finish, Scheduled, Start, Writer, history
from app.models import TIMING_BUCKETS, utcnow


def parse(text):
    """``{(sample name, sorted label items): value}`` of a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def values(samples, name, **labels):
    """``{label values: value}`` of the samples named ``name`` that carry ``labels``."""
    found = {}
    for (sample, items), value in samples.items():
        items = dict(items)
        if sample == name and all(items.get(k) == v for k, v in labels.items()):
            found[tuple(v for k, v in sorted(items.items()) if k not in labels)] = value
    return found


def start(job_id, n, at, task='noop', queue='default'):
    return Start(job_id, n, 'h:1-abc/w', at, task, queue, {}, 0, 2, 0.0)


def finish(job_id, n, outcome, at, duration, final, task='noop', queue='default'):
    error = None if outcome == states.ATTEMPT_SUCCEEDED else 'RuntimeError'
    return Finish(job_id, n, outcome, at, duration, error, error and 'no', None, None, final,
                  task, queue)


@pytest.fixture
def mixed(tmp_path, ledger_url):
    """An app whose ledger the writer gave a run of mixed jobs: ``(app, {name: job id})``.

    ``ok``: succeeded at once (0.2 s); ``flaky``: failed (1.5 s), then
    failed for good (3 s) after its retry time; ``stopped``: canceled
    while it ran (0.04 s); ``waiting``: never started.
    """
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    client = app.test_client()
    ids = {name: client.post('/api/jobs', json={'task': task}).get_json()['id']
           for name, task in (('ok', 'noop'), ('flaky', 'fail'), ('stopped', 'sleep'),
                              ('waiting', 'noop'))}
    with app.app_context():
        created = {i: db.session.get(jobs.Job, i).updated_at for i in ids.values()}
        writer = Writer(db.engine)
        t0 = utcnow()
        later = t0 + dt.timedelta(seconds=7)
        writer.write([start(ids['ok'], 1, t0), finish(ids['ok'], 1, 'succeeded', t0, 0.2, True),
                      start(ids['flaky'], 1, t0, 'fail'), start(ids['stopped'], 1, t0, 'sleep')])
        writer.write([finish(ids['flaky'], 1, 'failed', t0, 1.5, False, 'fail'),
                      Scheduled(ids['flaky'], later, 'fail', 'default')])
        writer.write([start(ids['flaky'], 2, later + dt.timedelta(seconds=2), 'fail'),
                      finish(ids['stopped'], 1, 'canceled', t0, 0.04, True, 'sleep')])
        writer.write([finish(ids['flaky'], 2, 'failed', later, 3.0, True, 'fail')])
        app.created, app.t0, app.later = created, t0, later
    yield app, ids
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def test_rollups_and_totals_agree_with_the_attempts_in_the_ledger(mixed):
    app, ids = mixed
    with app.app_context():
        rows = db.session.execute(sa.text(
            'SELECT j.queue, j.task, a.outcome, count(*), sum(a.duration) FROM attempt a '
            'JOIN job j ON j.id = a.job_id GROUP BY j.queue, j.task, a.outcome')).all()
        attempts = {(q, t, o): n for q, t, o, n, _s in rows}
        assert attempts == {('default', 'noop', 'succeeded'): 1, ('default', 'fail', 'failed'): 2,
                            ('default', 'sleep', 'canceled'): 1}
        rolled = db.session.execute(sa.text(
            'SELECT queue, task, outcome, sum(attempts), sum(finished) FROM metric_minute '
            'GROUP BY queue, task, outcome')).all()
        assert {(q, t, o): int(n) for q, t, o, n, _f in rolled} == attempts
        assert {(q, t, o): int(f) for q, t, o, _n, f in rolled} == {
            ('default', 'noop', 'succeeded'): 1, ('default', 'fail', 'failed'): 1,
            ('default', 'sleep', 'canceled'): 1}
        # Every job that ended is counted once, with its job's outcome.
        stats = queries.stats()['states']
        assert queries.finished_totals() == {
            ('default', 'noop', 'succeeded'): stats['succeeded'],
            ('default', 'fail', 'failed'): stats['failed'],
            ('default', 'sleep', 'canceled'): stats['canceled']}
        run = queries.timing_totals('run')
        for (queue, task, _o), n, seconds in ((k[:3], k_n, s) for *k, k_n, s in rows):
            counts, total = run[(queue, task)]
            assert sum(counts) == n and total == pytest.approx(float(seconds))
        assert run[('default', 'fail')][0][history.bucket(1.5)] == 1
        assert run[('default', 'fail')][0][history.bucket(3.0)] == 1
        # Wait time: from the submission to the first attempt's start, from
        # the retry time to the second's.
        wait = queries.timing_totals('wait')
        assert sum(wait[('default', 'fail')][0]) == 2
        first = (app.t0 - app.created[ids['flaky']]).total_seconds()
        assert wait[('default', 'fail')][1] == pytest.approx(first + 2.0)
        assert sum(wait[('default', 'noop')][0]) == 1  # the waiting job has not started


def test_metrics_agree_with_the_stats_and_the_broker(mixed):
    app, ids = mixed
    client = app.test_client()
    response = client.get('/metrics')
    assert response.status_code == 200
    assert response.content_type == 'text/plain; version=0.0.4; charset=utf-8'
    samples = parse(response.get_data(as_text=True))
    stats = client.get('/api/stats').get_json()
    assert values(samples, 'queue_manager_jobs', queue='default') == {
        (state,): float(n) for state, n in stats['states'].items()}
    finished = values(samples, 'queue_manager_jobs_finished_total', queue='default')
    # (outcome, task): every outcome of every task that ended a job, 0 included.
    assert finished == {('canceled', 'fail'): 0.0, ('failed', 'fail'): 1.0,
                        ('succeeded', 'fail'): 0.0, ('canceled', 'noop'): 0.0,
                        ('failed', 'noop'): 0.0, ('succeeded', 'noop'): 1.0,
                        ('canceled', 'sleep'): 1.0, ('failed', 'sleep'): 0.0,
                        ('succeeded', 'sleep'): 0.0}
    assert values(samples, 'queue_manager_job_run_seconds_count', queue='default') == {
        ('fail',): 2.0, ('noop',): 1.0, ('sleep',): 1.0}
    assert values(samples, 'queue_manager_job_run_seconds_sum', queue='default', task='fail') == {
        (): 4.5}
    run_fail = values(samples, 'queue_manager_job_run_seconds_bucket', task='fail')
    # 1.5 s and 3 s, cumulative by upper bound.
    assert [run_fail[(le, 'default')] for le in ('1.0', '2.5', '5.0', '+Inf')] == [0, 1, 2, 2]
    with app.app_context():
        ready, _scheduled = broker.depth('default')
    assert ready == 4  # the embedded broker still holds every message submitted
    assert values(samples, 'queue_manager_queue_depth') == {('default',): float(ready)}
    assert values(samples, 'queue_manager_consumers') == {('default',): 0.0}
    oldest = values(samples, 'queue_manager_oldest_waiting_seconds')[('default',)]
    with app.app_context():
        submitted = min(app.created.values())
    assert 0 < oldest <= (utcnow() - submitted).total_seconds() + 1
    # No consumer ran here: nothing has been seen at work.
    assert values(samples, 'queue_manager_component_up') == {
        ('ledger_writer',): 0.0, ('reaper',): 0.0, ('scheduler',): 0.0}


def test_counters_never_go_down_after_a_purge_or_a_prune(mixed):
    app, ids = mixed
    client = app.test_client()
    before = parse(client.get('/metrics').get_data(as_text=True))
    with app.app_context():
        assert jobs.purge_finished(days=-1) == 3
        history.prune(db.session.connection(), utcnow() + dt.timedelta(days=1))
        db.session.commit()
        assert db.session.execute(sa.text('SELECT count(*) FROM metric_minute')).scalar() == 0
    after = parse(client.get('/metrics').get_data(as_text=True))
    for name in ('queue_manager_jobs_finished_total', 'queue_manager_job_run_seconds_count',
                 'queue_manager_job_wait_seconds_count', 'queue_manager_job_run_seconds_sum'):
        assert values(after, name) == values(before, name) != {}
    assert values(after, 'queue_manager_jobs', state='succeeded') == {('default',): 0.0}


def test_access_is_a_viewers_or_the_scrape_tokens(tmp_path):
    app = make_app(tmp_path, AUTH='login', METRICS_TOKEN='scrape-secret-1234')
    with app.app_context():
        accounts.create_user('vera', 'long enough', 'viewer')
        viewer = accounts.create_token('vera', 'tests')[1]
    client = app.test_client()
    bearer = lambda token: {'Authorization': f'Bearer {token}'}  # noqa: E731
    refused = client.get('/metrics')
    assert refused.status_code == 401 and refused.headers['WWW-Authenticate'].startswith('Bearer')
    assert 'authentication required' in refused.get_json()['error']
    assert client.get('/metrics', headers=bearer(viewer)).status_code == 200
    scraped = client.get('/metrics', headers=bearer('scrape-secret-1234'))
    assert scraped.status_code == 200 and b'queue_manager_jobs{' in scraped.data
    assert client.get('/metrics', headers=bearer('scrape-secret-1235')).status_code == 401
    assert client.get('/metrics', headers={'Authorization': 'Basic eDp5'}).status_code == 401
    # The scrape token opens /metrics and nothing else.
    assert client.get('/api/stats', headers=bearer('scrape-secret-1234')).status_code == 401
    client.post('/login', data={'name': 'vera', 'password': 'long enough'})
    assert client.get('/metrics').status_code == 200


def test_without_metrics_token_a_bearer_must_be_an_api_token(tmp_path):
    app = make_app(tmp_path, AUTH='login')
    client = app.test_client()
    assert client.get('/metrics', headers={'Authorization': 'Bearer '}).status_code == 401
    assert client.get('/metrics', headers={'Authorization': 'Bearer None'}).status_code == 401


def test_quantiles_interpolate_within_the_bucket():
    counts = [0] * (len(TIMING_BUCKETS) + 1)
    assert queries.quantile(0.5, counts) is None
    counts[history.bucket(0.3)] = 10  # (0.25, 0.5]
    assert queries.quantile(0.5, counts) == pytest.approx(0.375)
    counts[len(TIMING_BUCKETS)] = 90  # beyond the last bound
    assert queries.quantile(0.95, counts) == TIMING_BUCKETS[-1]
    assert history.bucket(1.0) == TIMING_BUCKETS.index(1.0)  # a bound counts in its bucket
    assert history.bucket(1.0001) == TIMING_BUCKETS.index(2.5)


def test_metric_series_reads_throughput_percentiles_and_depth_per_point(tmp_path, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    since = dt.datetime(2026, 3, 1, 12, 0)
    with app.app_context():
        conn = db.session.connection()
        for minute in range(30):
            at = since + dt.timedelta(minutes=minute, seconds=30)
            ended = [history.Ended('default', 'noop', 'succeeded', at, True, 0.3)] * 3
            if minute < 15:
                ended += [history.Ended('default', 'fail', 'failed', at, minute % 2 == 0, 20.0)]
            history.add(conn, ended, [history.Waited('default', 'noop', at, 0.04)] * 3)
            history.sample_depth(conn, at, {'default': (minute, 0), 'reports': (1, 0)})
            history.sample_depth(conn, at, {'default': (999, 0)})  # the first sample stays
        db.session.commit()
        with pytest.raises(queries.BadQuery, match='whole number of minutes'):
            queries.metric_series(since, since + dt.timedelta(hours=1), step=90)
        with pytest.raises(queries.BadQuery, match='at most'):
            queries.metric_series(since, since + dt.timedelta(days=30), step=60)

        series = queries.metric_series(since, since + dt.timedelta(hours=1), step=900)
        assert [p['at'] for p in series] == [since + dt.timedelta(minutes=15 * i) for i in range(4)]
        assert [p['finished'] for p in series] == [
            {'succeeded': 45, 'failed': 8, 'canceled': 0},
            {'succeeded': 45, 'failed': 0, 'canceled': 0},
            {'succeeded': 0, 'failed': 0, 'canceled': 0}, {'succeeded': 0, 'failed': 0, 'canceled': 0}]
        assert series[0]['attempts'] == {'succeeded': 45, 'failed': 15}
        assert (series[0]['run_count'], series[1]['run_count'], series[2]['run_count']) == (60, 45, 0)
        assert series[1]['run_p50'] == pytest.approx(0.375)  # 0.3 s, in (0.25, 0.5]
        assert 10.0 < series[0]['run_p95'] <= 30.0  # the failures' 20 s
        assert series[0]['wait_p50'] == pytest.approx(0.0375)
        assert series[2]['run_p50'] is None and series[2]['depth'] is None
        assert [p['depth'] for p in series[:2]] == [14 + 1, 29 + 1]  # both queues, largest sample

        narrowed = queries.metric_series(since, since + dt.timedelta(minutes=30), step=60,
                                         queue='default', task='fail')
        assert len(narrowed) == 30
        assert [p['attempts'].get('failed', 0) for p in narrowed] == [1] * 15 + [0] * 15
        assert all(p['depth'] is None for p in narrowed)  # depth is per queue, not per task
        assert queries.metric_series(since, since + dt.timedelta(minutes=2), step=60,
                                     queue='reports')[1]['depth'] == 1
        db.session.remove()
        db.engine.dispose()


def test_leader_samples_depth_and_prunes_past_the_retention(tmp_path, ledger_url):
    from app import reaper
    app = make_app(tmp_path, DATABASE_URL=ledger_url, METRICS_RETENTION=3600.0)
    app.test_client().post('/api/jobs', json={'task': 'noop'})
    with app.app_context():
        old = utcnow() - dt.timedelta(hours=2)
        history.add(db.session.connection(), [history.Ended('default', 'noop', 'succeeded', old,
                                                            True, 0.1)])
        db.session.commit()
        now = utcnow().replace(second=1)
        assert reaper.sample_depth(app.config, now) == 1
        app.test_client().post('/api/jobs', json={'task': 'noop'})
        assert reaper.sample_depth(app.config, now.replace(second=59)) == 0  # one a minute
        assert reaper.sample_depth(app.config, now + dt.timedelta(minutes=1)) == 1
        db.session.commit()
        rows = db.session.execute(sa.text(
            'SELECT queue, ready FROM depth_minute ORDER BY minute')).all()
        assert [tuple(r) for r in rows] == [('default', 1), ('default', 2)]
        history.prune(db.session.connection(),
                      utcnow() - dt.timedelta(seconds=app.config['METRICS_RETENTION']))
        db.session.commit()
        assert db.session.execute(sa.text('SELECT count(*) FROM metric_minute')).scalar() == 0
        assert queries.finished_totals() == {('default', 'noop', 'succeeded'): 1}
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def stack(tmp_path):
    stack = Stack(tmp_path, QUEUES='default,idle', METRICS_TOKEN='scrape-me')
    yield stack
    stack.close()


def test_a_real_run_of_mixed_jobs_agrees_with_stats_redis_and_the_ledger(stack):
    stack.consumer()  # serves default only: idle's jobs stay in Redis
    api = stack.api
    ok = [api.submit('noop')['id'] for _ in range(3)]
    bad = [api.submit('fail', retries=1, retry_delay=0)['id'] for _ in range(2)]
    slow = api.submit('sleep', {'seconds': 30, 'steps': 300})['id']
    idle = [api.submit('noop', queue='idle')['id'] for _ in range(2)]
    for job_id in ok:
        api.wait_state(job_id, 'succeeded')
    for job_id in bad:
        api.wait_state(job_id, 'failed')
    api.wait_state(slow, 'running')
    assert api.post(f'/api/jobs/{slow}/cancel')[0] == 202  # asked to stop
    api.wait_state(slow, 'canceled')

    def scrape():
        status, text = api.request('GET', '/metrics', headers={'Authorization': 'Bearer scrape-me'})
        assert status == 200, text
        return parse(text)

    # The scheduler, the reaper and the ledger writer report in within seconds.
    samples = wait_for(lambda: (lambda s: s if set(values(s, 'queue_manager_component_up')
                                                   .values()) == {1.0} else None)(scrape()),
                       30, 0.2, 'every component up')
    stats = api.get('/api/stats')[1]
    for queue, by_state in stats['queues'].items():
        assert values(samples, 'queue_manager_jobs', queue=queue) == {
            (state,): float(n) for state, n in by_state.items()}
    finished = {}
    for (outcome, _task), n in values(samples, 'queue_manager_jobs_finished_total',
                                      queue='default').items():
        finished[outcome] = finished.get(outcome, 0) + n
    assert finished == {'succeeded': 3.0, 'failed': 2.0, 'canceled': 1.0}
    assert {s: stats['queues']['default'][s] for s in finished} == finished

    # Depth: what Redis holds for each queue.
    key = next(k for k in stack.client.keys('huey.redis.*') if k.endswith(b'idle'))
    assert stack.client.zcard(key) == 2
    assert values(samples, 'queue_manager_queue_depth') == {('default',): 0.0, ('idle',): 2.0}
    assert values(samples, 'queue_manager_consumers') == {('default',): 1.0, ('idle',): 0.0}
    assert values(samples, 'queue_manager_oldest_waiting_seconds')[('idle',)] > 0

    # Histogram counts: every attempt the ledger holds, with its duration.
    rows = stack.sql('SELECT j.task, count(*), sum(a.duration) FROM attempt a JOIN job j '
                     'ON j.id = a.job_id GROUP BY j.task')
    runs = values(samples, 'queue_manager_job_run_seconds_count', queue='default')
    assert runs == {(task,): float(n) for task, n, _s in rows}
    sums = values(samples, 'queue_manager_job_run_seconds_sum', queue='default')
    for task, _n, seconds in rows:
        assert sums[(task,)] == pytest.approx(seconds)
    assert values(samples, 'queue_manager_job_wait_seconds_count', queue='default') == runs
    assert len(idle) == 2

    # Purged, the jobs leave the gauges; the counters stay.
    stack.execute("DELETE FROM job WHERE state IN ('succeeded', 'failed', 'canceled')")
    after = scrape()
    assert values(after, 'queue_manager_jobs', state='succeeded') == {
        ('default',): 0.0, ('idle',): 0.0}
    assert (values(after, 'queue_manager_jobs_finished_total')
            == values(samples, 'queue_manager_jobs_finished_total'))
    assert (values(after, 'queue_manager_job_run_seconds_count')
            == values(samples, 'queue_manager_job_run_seconds_count'))
    assert time.time() - values(after, 'queue_manager_component_last_seen_seconds')[
        ('reaper',)] < 10


def test_a_broker_that_hangs_leaves_its_metrics_out_and_the_scrape_on_time(stack):
    api = stack.api
    api.submit('noop', queue='idle')  # no consumer: it stays queued

    def scrape():
        started = time.monotonic()
        status, text = api.request('GET', '/metrics', headers={'Authorization': 'Bearer scrape-me'},
                                   timeout=30)
        assert status == 200, text
        return parse(text), time.monotonic() - started

    before, _ = scrape()
    assert values(before, 'queue_manager_queue_depth') == {('default',): 0.0, ('idle',): 1.0}
    stack.client.execute_command('CLIENT', 'PAUSE', 8000, 'ALL')  # answers no one for 8 s
    try:
        during, took = scrape()
    finally:
        # Paused too, this client's commands wait for the pause's end.
        redis.Redis.from_url(stack.redis.url, socket_timeout=20).execute_command(
            'CLIENT', 'UNPAUSE')
    # Within the broker's deadline (plus the ledger's reads), not the pause's 8 s.
    assert took < metrics.BROKER_DEADLINE + 3, took
    assert not values(during, 'queue_manager_queue_depth')
    assert not values(during, 'queue_manager_component_up')
    assert values(during, 'queue_manager_jobs', queue='idle') == values(
        before, 'queue_manager_jobs', queue='idle')

"""Charts: the metric history drawn as inline SVG on the dashboard, each queue and each task type."""
import datetime as dt
import html as html_lib
import re
import uuid

import pytest
from conftest import make_app

from app import charts, queries
from app.extensions import db
from app.ledger import history
from app.models import Job, utcnow

XSS = '<img src=x onerror="alert(1)">'
CIRCLE = re.compile(r'<circle class="chart-point" cx="([\d.]+)" cy="([\d.]+)" r="[\d.]+" '
                    r'data-value="([^"]+)" data-since="([^"]+)"><title>([^<]*)</title>')


def chart_svg(html, key):
    """The <figure> of chart ``key`` in a page."""
    match = re.search(r'<figure class="chart chart-%s".*?</figure>' % key, html, re.S)
    assert match, f'no {key} chart'
    return match.group(0)


def series_of(figure, line):
    """``[(value, since)]`` of the points drawn for ``line`` in a chart's figure."""
    group = re.search(r'<g class="chart-series series-%s".*?</g>' % line, figure, re.S).group(0)
    return [(float(v), since) for _x, _y, v, since, _t in CIRCLE.findall(group)]


def links_of(figure, line):
    group = re.search(r'<g class="chart-series series-%s".*?</g>' % line, figure, re.S).group(0)
    return [html_lib.unescape(h) for h in re.findall(r'<a href="([^"]+)"', group)]


def iso(at):
    return at.isoformat(timespec='seconds') + 'Z'


@pytest.fixture
def rollups(ledger_client):
    """``(app, client, minutes)``: a known history in the last hour, on SQLite then PostgreSQL.

    Minute ``a`` (10 min ago): 3 noop jobs succeeded (0.3 s each, waited 0.04 s), 1 fail job
    failed (20 s); minute ``b`` (3 min ago): 2 noop succeeded; depth 4 then 7. Each minute
    also has job rows finished in it, so the points' links find them.
    """
    app, client = ledger_client
    now = utcnow()
    a = (now - dt.timedelta(minutes=10)).replace(second=0, microsecond=0)
    b = (now - dt.timedelta(minutes=3)).replace(second=0, microsecond=0)
    with app.app_context():
        conn = db.session.connection()
        at = a + dt.timedelta(seconds=20)
        history.add(conn, [history.Ended('default', 'noop', 'succeeded', at, True, 0.3)] * 3
                    + [history.Ended('default', 'fail', 'failed', at, True, 20.0)],
                    [history.Waited('default', 'noop', at, 0.04)] * 3)
        history.add(conn, [history.Ended('default', 'noop', 'succeeded',
                                         b + dt.timedelta(seconds=5), True, 0.3)] * 2)
        history.sample_depth(conn, a, {'default': (4, 0)})
        history.sample_depth(conn, b, {'default': (7, 0)})
        for minute, task, state in ((a, 'noop', 'succeeded'), (a, 'fail', 'failed'),
                                    (b, 'noop', 'succeeded')):
            db.session.add(Job(id=str(uuid.uuid4()), task=task, queue='default', params={},
                               state=state, retries=0, retry_delay=1.0,
                               created_at=minute - dt.timedelta(minutes=1), updated_at=minute,
                               finished_at=minute + dt.timedelta(seconds=30)))
        db.session.commit()
    yield app, client, {'a': a, 'b': b}


def test_the_svg_plots_the_metric_series_of_known_rollups(rollups):
    app, client, minute = rollups
    page = client.get('/').get_data(as_text=True)
    throughput = chart_svg(page, 'throughput')
    assert series_of(throughput, 'succeeded') == [(3.0, iso(minute['a'])), (2.0, iso(minute['b']))]
    assert series_of(throughput, 'failed') == [(1.0, iso(minute['a']))]
    assert 'jobs per minute' in throughput and '<title id="chart-throughput-title">' in throughput
    # The vertical axis reaches the next round number above the largest count (3 -> 5).
    ticks = re.findall(r'<text class="chart-tick" x="50" y="[\d.]+" text-anchor="end">([^<]+)<',
                       throughput)
    assert ticks == ['0', '1.25', '2.5', '3.75', '5']
    with app.app_context():
        since, until = charts.bounds('1h')
        series = queries.metric_series(since, until, 60)
    assert len(series) == 60
    wait = chart_svg(page, 'wait')
    [(p50, at)] = series_of(wait, 'p50')
    wanted = next(p for p in series if p['at'] == minute['a'])
    assert (p50, at) == (pytest.approx(wanted['wait_p50']), iso(minute['a']))
    run = chart_svg(page, 'run')
    assert [v for v, _ in series_of(run, 'p95')] == [
        pytest.approx(p['run_p95']) for p in series if p['run_p95'] is not None]
    assert series_of(chart_svg(page, 'depth'), 'depth') == [(4.0, iso(minute['a'])),
                                                            (7.0, iso(minute['b']))]
    assert 'highest 3 at' in throughput  # the summary read by screen readers
    assert 'Depth' not in chart_svg(page, 'wait')


def test_a_points_link_lists_the_jobs_behind_it(rollups):
    app, client, minute = rollups
    figure = chart_svg(client.get('/queues/default').get_data(as_text=True), 'throughput')
    [failed] = links_of(figure, 'failed')
    assert failed == ('/jobs?queue=default&state=failed&finished_from=' + iso(minute['a'])
                      + '&finished_to=' + iso(minute['a'] + dt.timedelta(minutes=1)))
    listed = client.get(failed).get_data(as_text=True)
    assert listed.count('data-state="failed"') == 1 and 'data-state="succeeded"' not in listed
    later = client.get(links_of(figure, 'succeeded')[1]).get_data(as_text=True)
    assert later.count('data-state="succeeded"') == 1
    # The task page's points filter by the task, and have no depth chart.
    task_page = client.get('/tasks/noop').get_data(as_text=True)
    assert 'chart-depth' not in task_page
    assert all('task=noop' in href for href in links_of(chart_svg(task_page, 'run'), 'p50'))
    assert series_of(chart_svg(task_page, 'throughput'), 'failed') == []


def test_a_line_breaks_where_there_is_no_data(rollups):
    _app, client, _minute = rollups
    run = chart_svg(client.get('/').get_data(as_text=True), 'run')
    group = re.search(r'<g class="chart-series series-p50".*?</g>', run, re.S).group(0)
    assert len(re.findall(r'<path class="chart-line"', group)) == 2  # minutes a and b, apart


def test_each_window_has_its_points_and_the_switch_is_plain_links(client):
    for window, points in (('1h', 60), ('24h', 96), ('7d', 168)):
        page = client.get(f'/?window={window}').get_data(as_text=True)
        path = re.search(r'series-succeeded" data-line="succeeded">\s*<path class="chart-line" '
                         r'fill="none" d="([^"]+)"', page).group(1)
        assert path.count(' L') == points - 1, window
        assert f'<a href="/?window={window}" hx-boost="true" aria-current="true">' in page
        assert 'no data in this window' in page
    queue_page = client.get('/queues/default?window=7d').get_data(as_text=True)
    assert 'href="/queues/default?window=24h"' in queue_page
    assert 'hx-ws:connect="/ws?view=queue&amp;queue=default&amp;window=7d"' in queue_page


def test_bounds_end_with_the_point_that_holds_now():
    now = dt.datetime(2026, 3, 1, 12, 34, 56)
    assert charts.bounds('1h', now) == (dt.datetime(2026, 3, 1, 11, 35), dt.datetime(2026, 3, 1, 12, 35))
    assert charts.bounds('24h', now) == (dt.datetime(2026, 2, 28, 12, 45), dt.datetime(2026, 3, 1, 12, 45))
    assert charts.bounds('7d', now)[1] == dt.datetime(2026, 3, 1, 13, 0)
    assert [charts.nice_ceiling(v) for v in (0, 3, 7, 0.03, 12)] == [1.0, 5, 10, 0.05, 20]
    assert [charts.seconds_label(s) for s in (0, 0.25, 1.5, 300, 7200)] == [
        '0', '250 ms', '1.5 s', '5 min', '2 h']


def test_unknown_queue_or_task_is_404_and_a_bad_window_400(client):
    for url in ('/queues/nope', '/tasks/nope'):
        resp = client.get(url)
        assert resp.status_code == 404, url
        assert 'no queue named nope' in resp.get_data(as_text=True) or \
            'no task type named nope' in resp.get_data(as_text=True)
    for url in ('/?window=2h', '/queues/default?window=1d', '/tasks/noop?window=<b>'):
        resp = client.get(url)
        assert resp.status_code == 400, url
        assert 'window must be one of 1h, 24h, 7d' in resp.get_data(as_text=True)
    assert client.get('/ws?view=task').status_code == 400
    assert client.get('/charts?queue=nope').status_code == 404
    assert client.get('/charts?window=5m').status_code == 400
    fragment = client.get('/charts?task=noop&window=7d').get_data(as_text=True)
    assert fragment.startswith('<section id="charts"') and 'data-window="7d"' in fragment
    assert 'chart-depth' not in fragment and 'href="/tasks/noop?window=1h"' in fragment
    assert client.get('/ws?view=dashboard&window=1y').status_code == 400
    with pytest.raises(queries.BadQuery):
        charts.window_of('1y')


def test_queue_and_task_names_are_escaped(tmp_path):
    app = make_app(tmp_path, QUEUES=['default'])
    client = app.test_client()
    with app.app_context():
        db.session.add(Job(id=str(uuid.uuid4()), task=XSS, queue=XSS, params={}, state='queued',
                           retries=0, retry_delay=1.0, created_at=utcnow(), updated_at=utcnow()))
        db.session.commit()
    from urllib.parse import quote
    for url in (f'/queues/{quote(XSS, safe="")}', f'/tasks/{quote(XSS, safe="")}', '/jobs'):
        resp = client.get(url)
        assert resp.status_code == 200, url
        body = resp.get_data(as_text=True)
        assert '<img' not in body and '&lt;img src=x onerror=' in body, url
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.mark.parametrize('name', ['billing/charge.v2', 'a//b/'])
def test_a_task_named_with_a_slash_has_its_page_and_its_window_links(tmp_path, name):
    app = make_app(tmp_path, QUEUES=['default'])
    client = app.test_client()
    # name: as another producer, enqueuing around the API, named its task
    with app.app_context():
        job_id = str(uuid.uuid4())
        db.session.add(Job(id=job_id, task=name, queue='default', params={}, state='queued',
                           retries=0, retry_delay=1.0, created_at=utcnow(), updated_at=utcnow()))
        db.session.commit()
    row = client.get(f'/jobs/{job_id}/row').get_data(as_text=True)
    [page] = re.findall(r'href="(/tasks/[^"]+)"', row)
    links = re.findall(r'href="(/tasks/[^"]+)"', client.get(
        f'/charts?task={name}&window=24h').get_data(as_text=True))
    assert links and all(link.startswith(f'/tasks/{name}?window=') for link in links)
    for url in (page, *links):
        resp = client.get(url.replace('&amp;', '&'))
        assert resp.status_code == 200 and f'{name}' in resp.get_data(as_text=True), url
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def without_csrf(html):
    """``html`` with its forms' CSRF tokens blanked: each request's token is signed with
    the second it was made in, so two requests a second boundary apart differ there."""
    return re.sub(r'name="csrf_token" value="[^"]*"', 'name="csrf_token" value=""', html)


def test_charts_are_drawn_again_only_when_their_points_change(rollups):
    from flask import template_rendered
    app, client, minute = rollups
    drawn = []

    def note(sender, template, context, **extra):
        if template.name == '_charts.html':
            drawn.append(context.get('task'))  # None: every task
    template_rendered.connect(note, app)
    try:
        first = client.get('/').get_data(as_text=True)
        assert without_csrf(client.get('/').get_data(as_text=True)) == without_csrf(first)
        assert client.get('/charts').status_code == 200
        assert drawn == [None]
        # Another scope with the same points (none) has its own links.
        empty_a, empty_b = (client.get(f'/charts?task={t}').get_data(as_text=True)
                            for t in ('sleep', 'report'))
        assert '/tasks/sleep?window=' in empty_a and '/tasks/report?window=' in empty_b
        assert drawn == [None, 'sleep', 'report']
        # A job ends in the window: the dashboard's points change, and so does its HTML.
        with app.app_context():
            history.add(db.session.connection(), [history.Ended(
                'default', 'noop', 'succeeded', minute['b'] + dt.timedelta(seconds=9), True, 0.1)])
            db.session.commit()
        again = client.get('/').get_data(as_text=True)
        assert drawn == [None, 'sleep', 'report', None]
        assert series_of(chart_svg(again, 'throughput'), 'succeeded')[-1] == (
            3.0, iso(minute['b']))
    finally:
        template_rendered.disconnect(note, app)


def test_drawn_html_forgets_the_least_recently_used():
    from app.fragments import Drawn
    drawn = Drawn(size=2)
    drawn.put('a', 'A')
    drawn.put('b', 'B')
    assert drawn.get('a') == 'A'  # now the most recent
    drawn.put('c', 'C')
    assert (drawn.get('a'), drawn.get('b'), drawn.get('c')) == ('A', None, 'C')

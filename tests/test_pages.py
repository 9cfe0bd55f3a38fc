"""Pages and fragments: rendering, escaping, forms that work without JavaScript."""
import re

from app.extensions import db
from app.models import Attempt, Job

XSS = '<script>alert(1)</script>'


def submit(client, **form):
    return client.post('/jobs', data=form)


def test_dashboard_lists_counts_form_and_recent_jobs(client):
    job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    html = client.get('/').get_data(as_text=True)
    assert 'id="queue-stats"' in html and 'id="submit-form"' in html
    assert f'id="job-{job["id"]}"' in html
    assert re.search(r'data-state="queued">1<', html)
    assert 'htmx-4.0.1.min.js' in html


def test_parameters_and_errors_are_escaped_everywhere(client, app):
    job = client.post('/api/jobs', json={'task': 'fail', 'params': {'message': XSS}}).get_json()
    with app.app_context():
        row = db.session.get(Job, job['id'])
        row.state, row.attempts, row.error = 'failed', 1, f'RuntimeError: {XSS}'
        db.session.add(Attempt(job_id=row.id, number=1, outcome='failed', error_type='RuntimeError',
                               error_message=XSS, traceback=f'Traceback...\nRuntimeError: {XSS}'))
        db.session.commit()
    for path in ('/', '/jobs', f'/jobs/{job["id"]}', f'/jobs/{job["id"]}/row',
                 f'/jobs/{job["id"]}/attempts', f'/jobs?q={XSS}'):
        html = client.get(path).get_data(as_text=True)
        assert XSS not in html, path
        assert '&lt;script&gt;alert(1)&lt;/script&gt;' in html, path


def test_form_submission_redirects_to_the_job(client, app):
    resp = submit(client, task='sleep', **{'params.seconds': '2', 'params.steps': '4'})
    assert resp.status_code == 303
    job_id = resp.headers['Location'].rsplit('/', 1)[1]
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert (job.task, job.params) == ('sleep', {'seconds': 2.0, 'steps': 4})
    page = client.get(resp.headers['Location']).get_data(as_text=True)
    assert f'Submitted sleep job {job_id[:8]}' in page


def test_bad_form_rerenders_with_messages_by_the_fields(client, app):
    resp = submit(client, task='sleep', priority='900', **{'params.seconds': '-3', 'params.steps': 'x'})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert '<p class="error" id="e-seconds">seconds must be at least 0</p>' in html
    assert '<p class="error" id="e-steps">steps must be a whole number</p>' in html
    assert 'priority must be at most 100' in html
    assert 'value="-3"' in html  # what was typed stays in the field
    with app.app_context():
        assert db.session.query(Job).count() == 0


def test_htmx_form_errors_return_just_the_form(client):
    resp = client.post('/jobs', data={'task': 'sleep', 'params.steps': '0'},
                       headers={'HX-Request': 'true'})
    assert resp.status_code == 400
    html = resp.get_data(as_text=True)
    assert html.lstrip().startswith('<form id="submit-form"') and '<html' not in html


def test_htmx_dashboard_submit_returns_a_fresh_form(client):
    resp = client.post('/jobs', data={'task': 'noop', 'stay': '1'}, headers={'HX-Request': 'true'})
    assert resp.status_code == 201
    assert 'Submitted noop job' in resp.get_data(as_text=True)


def test_task_fields_follow_the_declaration(client):
    html = client.get('/jobs/new/fields?task=payment').get_data(as_text=True)
    assert 'name="params.amount"' in html and 'min="0.01"' in html
    assert '<option value="GBP"' in html
    page = client.get('/jobs/new?task=flaky').get_data(as_text=True)
    assert 'name="params.failures"' in page and 'name="params.seconds"' not in page


def test_actions_appear_only_where_the_state_allows(client, app):
    job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    html = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    assert f'/jobs/{job["id"]}/cancel' in html
    assert f'/jobs/{job["id"]}/retry' not in html and f'/jobs/{job["id"]}/delete' not in html
    resp = client.post(f'/jobs/{job["id"]}/cancel')
    assert resp.status_code == 303
    html = client.get(f'/jobs/{job["id"]}').get_data(as_text=True)
    assert f'/jobs/{job["id"]}/retry' in html and f'/jobs/{job["id"]}/delete' in html
    assert client.post(f'/jobs/{job["id"]}/delete').status_code == 303
    assert client.get(f'/jobs/{job["id"]}').status_code == 404


def test_conflicting_action_is_a_409_page(client):
    job = client.post('/api/jobs', json={'task': 'noop'}).get_json()
    resp = client.post(f'/jobs/{job["id"]}/retry')
    assert resp.status_code == 409
    assert 'cannot retry a queued job' in resp.get_data(as_text=True)


def test_not_found_is_a_page_or_a_fragment_for_htmx(client):
    page = client.get('/jobs/nope')
    assert page.status_code == 404 and '<html' in page.get_data(as_text=True)
    fragment = client.get('/jobs/nope/summary', headers={'HX-Request': 'true'})
    assert fragment.status_code == 404 and '<html' not in fragment.get_data(as_text=True)


def test_job_list_filters_and_pages_without_javascript(client):
    for _ in range(3):
        client.post('/api/jobs', json={'task': 'noop'})
    client.post('/api/jobs', json={'task': 'sleep'})
    html = client.get('/jobs?task=sleep').get_data(as_text=True)
    assert html.count('<tr id="job-') == 1
    client.application.config['PAGE_SIZE'] = 2
    first = client.get('/jobs').get_data(as_text=True)
    assert first.count('<tr id="job-') == 2
    older = re.search(r'href="(/jobs\?cursor=[^"]+)"', first).group(1)
    second = client.get(older.replace('&amp;', '&')).get_data(as_text=True)
    assert second.count('<tr id="job-') == 2
    assert set(re.findall(r'<tr id="job-([^"]+)"', first)).isdisjoint(
        re.findall(r'<tr id="job-([^"]+)"', second))

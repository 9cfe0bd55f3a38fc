"""The dashboard in a real Chromium (Debian's), driven by Playwright.

Everything here happens without reloading the page: the WebSocket pushes
fragments and htmx swaps them in.
"""
import http.server
import json
import re
import signal
import threading
import time

import pytest
from helpers import ADMIN, Deployment, Socket, add_user, start_consumer, wait_for
from test_auth import ROUTES, app_routes, url_of

from app import create_app
from playwright.sync_api import expect

# Every test here starts real processes: the full suite only (make test).
pytestmark = pytest.mark.processes

@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={'width': 1300, 'height': 900})
    page = context.new_page()
    errors = []
    page.on('pageerror', lambda exc: errors.append(str(exc)))
    trace(page)
    yield page
    context.close()
    assert errors == [], errors


@pytest.fixture(scope='module', params=['distributed', 'embedded'])
def deployment(request, tmp_path_factory):
    dep = Deployment(request.param, tmp_path_factory.mktemp(f'browser-{request.param}'))
    yield dep
    dep.close()


def trace(page):
    """Print the page's socket and console events: shown when a test fails."""
    def on_socket(ws):
        print(f'{time.monotonic():.3f} ws open {ws.url}')
        ws.on('close', lambda _: print(f'{time.monotonic():.3f} ws closed {ws.url}'))
        ws.on('socketerror', lambda err: print(f'{time.monotonic():.3f} ws error {err}'))
        ws.on('framereceived', lambda frame: print(f'{time.monotonic():.3f} ws frame {len(frame)} chars'))
    page.on('websocket', on_socket)
    page.on('console', lambda msg: print(f'{time.monotonic():.3f} console {msg.text}'))


def live(page):
    expect(page.locator('#live-status')).to_have_text('live', timeout=20_000)


def submit_from_dashboard(page, task, **fields):
    page.select_option('#f-task', task)
    page.wait_for_selector(f'#task-fields legend:has-text("{task} parameters")')
    for name, value in fields.items():
        if name in ('retries', 'retry_delay', 'delay', 'priority'):
            page.locator('details.options').evaluate('d => d.open = true')
        page.fill(f'#f-{name}', str(value))
    page.click('#submit-form button[type=submit]')
    note = page.locator('#submit-form .flash-ok a')
    expect(note).to_be_visible(timeout=10_000)
    return note.get_attribute('href').rsplit('/', 1)[1]


def test_submitted_job_appears_and_succeeds_without_reload(deployment, page):
    deployment.open(page, '/')
    live(page)
    marker = page.evaluate('() => (window.__marker = Math.random())')
    job_id = submit_from_dashboard(page, 'sleep', seconds=1, steps=2)
    row = page.locator(f'#job-{job_id}')
    expect(row).to_be_visible(timeout=5_000)
    expect(row).to_have_attribute('data-state', 'succeeded', timeout=20_000)
    expect(page.locator('#queue-stats [data-state="succeeded"]')).not_to_have_text('0')
    assert page.evaluate('() => window.__marker') == marker  # same page, never reloaded


def test_flaky_job_page_shows_three_attempts_appear_live(deployment, page):
    job = deployment.api.submit('flaky', {'failures': 2}, retry_delay=3)
    deployment.open(page, f'/jobs/{job["id"]}')
    live(page)
    attempts = page.locator('.timeline .attempt')
    # On a busy machine the first attempt may have ended before the page
    # opened: each attempt from the one it shows first must appear live.
    shown = attempts.count()
    assert shown < 3, 'every attempt ended before the page opened: nothing to see live'
    for count in range(max(shown, 1), 4):
        expect(attempts).to_have_count(count, timeout=20_000)
    expect(page.locator(f'#job-{job["id"]}-summary')).to_have_attribute('data-state', 'succeeded',
                                                                         timeout=20_000)
    assert [a.get_attribute('data-outcome') for a in attempts.all()] == ['failed', 'failed', 'succeeded']
    expect(page.locator('.attempt-error').first).to_contain_text('RuntimeError: attempt 1')


def test_sleep_progress_bar_advances(deployment, page):
    job = deployment.api.submit('sleep', {'seconds': 5, 'steps': 10})
    deployment.open(page, f'/jobs/{job["id"]}')
    live(page)
    bar = page.locator(f'#job-{job["id"]}-summary .progress')
    values = []
    for _ in range(3):
        page.wait_for_function(
            '([sel, last]) => { const b = document.querySelector(sel);'
            ' return b && Number(b.getAttribute("aria-valuenow")) > last; }',
            arg=[f'#job-{job["id"]}-summary .progress', values[-1] if values else 0],
            timeout=10_000)
        values.append(int(bar.get_attribute('aria-valuenow')))
    assert values == sorted(values) and len(set(values)) == 3 and values[-1] <= 100


def test_two_windows_both_update(deployment, browser):
    contexts = [browser.new_context() for _ in range(2)]
    try:
        pages = [c.new_page() for c in contexts]
        for p in pages:
            trace(p)
            deployment.open(p, '/')
            live(p)
        job_id = submit_from_dashboard(pages[0], 'noop')
        for p in pages:
            expect(p.locator(f'#job-{job_id}')).to_have_attribute('data-state', 'succeeded',
                                                                   timeout=15_000)
    finally:
        for c in contexts:
            c.close()


def test_restarted_web_process_leaves_the_page_reconnected_and_current(tmp_path, page):
    dep = Deployment('distributed', tmp_path, web_workers=1)
    try:
        job = dep.api.submit('sleep', {'seconds': 3, 'steps': 3})
        dep.open(page, f'/jobs/{job["id"]}')
        live(page)
        node = page.locator('#live-status').get_attribute('data-node')
        dep.restart_web()
        # The job finished while the page's server was away; the snapshot
        # sent on reconnect brings the page up to date.
        dep.api.wait_state(job['id'], 'succeeded', 30)
        expect(page.locator(f'#job-{job["id"]}-summary')).to_have_attribute(
            'data-state', 'succeeded', timeout=20_000)
        live(page)
        assert page.locator('#live-status').get_attribute('data-node') != node
        assert re.search(r'100%', page.locator(f'#job-{job["id"]}-summary .progress').inner_text())
    finally:
        dep.close()


def test_jobs_list_follows_its_filter(deployment, page):
    deployment.open(page, '/jobs?state=scheduled')
    live(page)
    job = deployment.api.submit('noop', delay=600)
    row = page.locator(f'#job-{job["id"]}')
    expect(row).to_have_attribute('data-state', 'scheduled', timeout=15_000)
    other = deployment.api.submit('noop')
    deployment.api.wait_state(other['id'], 'succeeded')
    deployment.api.post(f'/api/jobs/{job["id"]}/cancel')
    expect(row).to_have_count(0, timeout=15_000)  # canceled: no longer in this list
    expect(page.locator(f'#job-{other["id"]}')).to_have_count(0)


def test_the_socket_opens_even_when_the_extension_arrives_late(deployment, page):
    def slow(route):
        time.sleep(0.5)  # the extension's script arrives after htmx's
        route.continue_()
    page.route('**/hx-ws-*.js', slow)
    deployment.open(page, '/')
    live(page)


def test_bulk_retry_from_the_jobs_list(deployment, page):
    failed = [deployment.api.submit('flaky', {'failures': 1}, retries=0)['id'] for _ in range(3)]
    for job_id in failed:
        deployment.api.wait_state(job_id, 'failed')
    deployment.open(page, '/jobs?state=failed&task=flaky')
    live(page)
    for job_id in failed[:2]:
        page.check(f'#select-{job_id}')
    page.click('.bulk-bar button[value=retry]')
    expect(page.locator('.flash-ok')).to_contain_text('2 of 2 jobs retried')
    for job_id in failed[:2]:
        assert deployment.api.wait_state(job_id, 'succeeded')['attempt_count'] == 2
    assert deployment.api.job(failed[2])['state'] == 'failed'
    # the page follows its filter: the retried jobs leave it, live
    deployment.open(page, '/jobs?state=failed&task=flaky')
    live(page)
    expect(page.locator(f'#job-{failed[2]}')).to_be_visible()
    expect(page.locator(f'#job-{failed[0]}')).to_have_count(0)


def test_pausing_a_queue_lets_jobs_pile_up_then_drain_live(deployment, page):
    deployment.open(page, '/queues')
    live(page)
    row = page.locator('#queue-default')
    page.click('#queue-default button[value=pause]')
    expect(row).to_have_attribute('data-paused', 'true')
    live(page)
    ids = [deployment.api.submit('noop')['id'] for _ in range(5)]
    expect(row.locator('td.count-queued')).to_have_text('5', timeout=15_000)  # queued, live
    page.click('#queue-default button[value=resume]')
    expect(row).to_have_attribute('data-paused', 'false')
    live(page)
    for job_id in ids:
        deployment.api.wait_state(job_id, 'succeeded')
    expect(row.locator('td.count-queued')).to_have_text('0', timeout=15_000)


def test_a_job_on_a_killed_worker_is_seen_to_recover(tmp_path, page):
    # Heartbeats every 0.5 s, lost after 3 s: the reaper acts within seconds.
    dep = Deployment('distributed', tmp_path, web_workers=1,
                     HEARTBEAT_INTERVAL=0.5, LOST_AFTER=3, REAP_INTERVAL=1)
    try:
        victim = dep.processes[-1]
        # Long enough to be seen running however slow the machine.
        job = dep.api.submit('sleep', {'seconds': 10, 'steps': 20})
        dep.open(page, f'/jobs/{job["id"]}')
        live(page)
        summary = page.locator(f'#job-{job["id"]}-summary')
        expect(summary).to_have_attribute('data-state', 'running', timeout=20_000)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        dep.processes.append(start_consumer(dep.env, tmp_path, name='consumer-after-kill'))
        first = page.locator(f'#attempt-{job["id"]}-1')
        expect(first).to_have_attribute('data-outcome', 'lost', timeout=30_000)
        expect(first).to_contain_text('died (its lease ran out)')
        expect(summary).to_have_attribute('data-state', 'succeeded', timeout=60_000)
        expect(page.locator(f'#attempt-{job["id"]}-2')).to_have_attribute('data-outcome', 'succeeded')
    finally:
        dep.close()


def test_a_page_refused_by_a_full_server_polls_until_a_socket_is_free(tmp_path, page):
    dep = Deployment('embedded', tmp_path, LIVE_SOCKETS=1)
    holder = None
    try:
        holder = Socket(f'{dep.ws_base}/ws?view=dashboard')  # takes the only place
        wait_for(lambda: holder.messages, 10, message='the holder\'s snapshot')
        dep.open(page, '/')
        status = page.locator('#live-status')
        expect(status).to_have_text('not live (polling)', timeout=10_000)
        marker = page.evaluate('() => (window.__marker = Math.random())')
        job = dep.api.submit('noop')
        dep.api.wait_state(job['id'], 'succeeded')
        # fetched by polling, every 5 s: the page has no socket
        expect(page.locator(f'#job-{job["id"]}')).to_have_attribute('data-state', 'succeeded',
                                                                     timeout=15_000)
        expect(status).to_have_text('not live (polling)')
        holder.close()
        holder = None
        # the page asks again (after 3.5 to 6.5 s) and is live once more
        live(page)
        other = dep.api.submit('noop')
        expect(page.locator(f'#job-{other["id"]}')).to_have_attribute('data-state', 'succeeded',
                                                                       timeout=5_000)
        assert page.evaluate('() => window.__marker') == marker  # never reloaded
    finally:
        if holder:
            holder.close()
        dep.close()


# -- the Content-Security-Policy: nothing the pages do is refused --

WATCH_POLICY = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', function (e) {
  window.__violations.push(e.violatedDirective + ' blocked ' + (e.blockedURI || '(inline)')
                           + ' at ' + (e.sourceFile || '?') + ':' + e.lineNumber);
});
"""


def watch_policy(page):
    """Record every policy violation (per document) and every console error of ``page``."""
    page.add_init_script(WATCH_POLICY)  # runs before the page's own scripts
    errors = []
    page.on('console', lambda msg: errors.append(msg.text) if msg.type == 'error' else None)
    return errors


def violations(page):
    return page.evaluate('() => window.__violations')


def test_pages_run_live_under_the_policy_without_a_violation(deployment, page):
    errors = watch_policy(page)
    base = deployment.api.base
    deployment.open(page, '/')  # logged in where login is asked for (its page is policed too)
    response = page.goto(base + '/')
    assert "script-src 'self'" in response.headers['content-security-policy']
    live(page)
    job_id = submit_from_dashboard(page, 'sleep', seconds=1, steps=2)
    expect(page.locator(f'#job-{job_id}')).to_have_attribute('data-state', 'succeeded', timeout=20_000)
    assert violations(page) == []

    page.goto(f'{base}/jobs')
    live(page)
    other = deployment.api.submit('sleep', {'seconds': 1, 'steps': 4})
    expect(page.locator(f'#job-{other["id"]}')).to_have_attribute('data-state', 'succeeded',
                                                                   timeout=20_000)
    assert violations(page) == []

    page.goto(f'{base}/jobs/{other["id"]}')
    live(page)
    # the bar is a <progress>, drawn without a style attribute
    expect(page.locator(f'#job-{other["id"]}-summary progress.progress-fill')).to_have_attribute(
        'value', '100')
    assert page.locator('[style]').count() == 0
    assert violations(page) == []
    assert errors == []

    # The watch sees a violation when there is one: inline script is refused.
    page.evaluate("""() => { const s = document.createElement('script');
                             s.textContent = 'window.__ran = true'; document.body.append(s); }""")
    page.wait_for_function('() => window.__violations.length > 0')
    assert violations(page)[0].startswith('script-src-elem blocked inline')
    assert page.evaluate('() => window.__ran') is None
    assert any('Content Security Policy' in e for e in errors)


def test_deleting_a_job_asks_first_under_the_policy(deployment, page):
    watch_policy(page)
    job = deployment.api.submit('noop')
    deployment.api.wait_state(job['id'], 'succeeded')
    deployment.open(page, f'/jobs/{job["id"]}')
    live(page)
    questions = []

    def answer(accept):
        def on_dialog(dialog):
            questions.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()
        return on_dialog

    page.once('dialog', answer(False))
    page.click('form[data-confirm] button[value=delete]')
    assert questions == [f'Delete job {job["id"][:8]} and its history?']
    assert deployment.api.job(job['id'])['state'] == 'succeeded'  # kept
    page.once('dialog', answer(True))
    page.click('form[data-confirm] button[value=delete]')
    expect(page.locator('.flash-ok')).to_contain_text(f'Job {job["id"][:8]} deleted.')
    assert deployment.api.get(f'/api/jobs/{job["id"]}')[0] == 404
    assert len(questions) == 2
    assert violations(page) == []


# -- access control --

def test_each_role_sees_and_does_only_what_it_may(tmp_path, browser):
    dep = Deployment('distributed', tmp_path, web_workers=1)
    try:
        for role in ('viewer', 'operator'):
            add_user(dep.env, role, role, f'{role}-password')
        failed = dep.api.wait_state(dep.api.submit('fail', retries=0)['id'], 'failed')['id']
        seen = {}
        for role in ('viewer', 'operator', 'admin'):
            context = browser.new_context()
            try:
                page = context.new_page()
                user = ADMIN if role == 'admin' else (role, f'{role}-password')
                dep.open(page, f'/jobs/{failed}', user=user)
                live(page)
                expect(page.locator('.who')).to_contain_text(f'{user[0]} ({role})')
                summary = page.locator(f'#job-{failed}-summary')
                seen[role] = sorted(summary.locator('button[name=action]').evaluate_all(
                    'buttons => buttons.map(b => b.value)'))
                if role == 'operator':
                    summary.locator('button[value=retry]').click()
                    wait_for(lambda: len(dep.api.job(failed)['attempts']) == 2, 20,
                             message='the retry to run')
                if role == 'admin':
                    page.once('dialog', lambda dialog: dialog.accept())
                    summary.locator('button[value=delete]').click()
                    wait_for(lambda: dep.api.get(f'/api/jobs/{failed}')[0] == 404, 15,
                             message='the job to be deleted')
                    # The page goes on to the jobs list: close the context once it
                    # is there and live. Closing it mid-navigation once held
                    # Chromium's context disposal for the test's whole timeout.
                    expect(page.locator('.flash-ok')).to_contain_text(f'Job {failed[:8]} deleted.')
                    live(page)
            finally:
                context.close()
        assert seen == {'viewer': [], 'operator': ['retry'], 'admin': ['delete', 'retry']}
    finally:
        dep.close()


EVIL_PAGE = """<!doctype html><html><body>
{forms}
<script>
  window.answered = 0;
  for (const frame of document.querySelectorAll('iframe')) frame.onload = () => window.answered++;
  for (const form of document.forms) form.submit();
  const ws = new WebSocket('{ws}');
  ws.onclose = e => {{ document.title = 'closed ' + e.code + ' ' + e.reason; }};
  ws.onmessage = e => {{ document.title = 'received'; }};
</script></body></html>"""


@pytest.mark.parametrize('mode', ['embedded', 'distributed'])
def test_a_page_on_another_site_can_neither_act_nor_listen(tmp_path, browser, mode):
    # Embedded, no user: make run's login-free mode, where the browser needs no
    # cookie to act; distributed: an admin's session (its cookie is SameSite).
    dep = Deployment(mode, tmp_path, web_workers=1)
    server = None
    try:
        job = dep.api.submit('sleep', {'seconds': 1}, delay=3600)
        # A form for every state-changing route a form can reach (POST), with
        # the fields its action needs; DELETE is out of a form's reach.
        app = create_app({'INSTANCE_PATH': str(tmp_path / 'routes'), 'REDIS_URL': None})
        fields = {'pages.create_job': {'task': 'noop'}, 'api.submit_job': {'task': 'noop'},
                  'pages.bulk_jobs': {'action': 'delete', 'scope': 'filter', 'confirmed': '1'},
                  'api.bulk_action': {'action': 'delete'},
                  'admin.create_user': {'name': 'mallory', 'role': 'admin',
                                        'password': 'long enough'},
                  'admin.create_token': {'user': 'admin'}}
        targets = [('post', url_of(rule, job['id']), fields.get(endpoint, {}))
                   for endpoint, method, rule in app_routes(app)
                   if method == 'POST' and ROUTES[(endpoint, method)] is not None]
        assert len(targets) >= 20
        forms = '\n'.join(
            f'<iframe name="sink{n}"></iframe>'
            f'<form method="{method}" action="{dep.api.base}{path}" target="sink{n}">'
            + ''.join(f'<input name="{k}" value="{v}">' for k, v in fields.items()) + '</form>'
            for n, (method, path, fields) in enumerate(targets))
        html = EVIL_PAGE.format(forms=forms, ws=f'{dep.ws_base}/ws?view=dashboard')

        class Evil(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = html.encode()
                self.send_response(200)
                self.send_header('Content-Type', 'text/html')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Evil)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        context = browser.new_context()
        try:
            page = context.new_page()
            dep.open(page, '/')  # logged in: its session cookie is what the other site would use
            live(page)
            evil = context.new_page()
            # localhost, not 127.0.0.1: another site, not only another origin
            evil.goto(f'http://localhost:{server.server_address[1]}/')
            evil.wait_for_function("document.title.startsWith('closed')", timeout=15_000)
            assert evil.title() == 'closed 1008 a socket opened from another site ' \
                                   f'(http://localhost:{server.server_address[1]}) is refused'

            # Every form was sent and answered (the answers are refusals, and
            # framed by no one: each frame shows the browser's error page).
            evil.wait_for_function(f'window.answered >= {len(targets)}', timeout=20_000)
        finally:
            context.close()
        # Nothing changed: the job waits as it did, the queue runs, nothing new,
        # no user or token made, and the audit log names the refusals.
        after = dep.api.job(job['id'])
        assert (after['state'], after['attempts']) == ('scheduled', [])
        status, listed = dep.api.get('/api/jobs')
        assert [j['id'] for j in listed['jobs']] == [job['id']]
        assert not any(q['paused'] for q in dep.api.get('/api/queues')[1]['queues'])
        assert not any(p['paused'] for p in dep.api.get('/api/periodic')[1]['periodic'])
        users = dep.sql('SELECT name FROM app_user')
        assert users == ([('admin',)] if mode == 'distributed' else [])
        entries = dep.api.get('/api/audit?limit=1000')[1]['entries']
        # Another site's requests are not kept (anyone could flood the log).
        assert sorted(e['action'] for e in entries) == (
            ['login', 'submit'] if mode == 'distributed' else ['submit'])
    finally:
        if server is not None:
            server.shutdown()
        dep.close()


# -- times and the job page --

def test_times_tick_copy_buttons_copy_and_framework_frames_unfold(deployment, browser):
    failed = deployment.api.wait_state(deployment.api.submit('fail', {'message': 'no luck'},
                                                             retries=0)['id'], 'failed')
    # one step: no progress report, so nothing but the page's own clock moves its time
    slow = deployment.api.submit('sleep', {'seconds': 20, 'steps': 1})
    context = browser.new_context(viewport={'width': 1300, 'height': 900},
                                  permissions=['clipboard-read', 'clipboard-write'])
    try:
        page = context.new_page()
        errors = []
        page.on('pageerror', lambda exc: errors.append(str(exc)))
        trace(page)
        deployment.open(page, f'/jobs/{failed["id"]}')
        live(page)
        marker = page.evaluate('() => (window.__marker = Math.random())')

        # relative times move on in the page, without a reload or a push
        finished = page.locator(f'#job-{failed["id"]}-summary dt:has-text("Finished") + dd time')
        expect(finished).to_have_attribute('datetime', failed['finished_at'][:19] + 'Z')
        assert finished.get_attribute('title').endswith(' UTC')
        first = finished.locator('.ago').inner_text()
        expect(finished.locator('.ago')).not_to_have_text(first, timeout=15_000)
        expect(finished.locator('.ago')).to_have_text(re.compile(r'^\d+ s ago$'))

        # the traceback: the task's frame shown, the framework's folded until asked for
        attempt = page.locator(f'#attempt-{failed["id"]}-1')
        own = attempt.locator('.tb-section > .tb-frames .tb-frame')
        expect(own).to_have_count(1)
        expect(own).to_contain_text('huey_tasks.py')
        expect(own).to_contain_text('in fail')
        folded = attempt.locator('details.tb-folded')
        framework = folded.locator('.tb-frame').first
        expect(framework).to_be_hidden()
        folded.locator('summary').click()
        expect(framework).to_be_visible()
        assert any('/huey/' in f for f in folded.locator('.tb-frame .tb-where').all_inner_texts())

        # copy buttons: shown with JavaScript, they copy and say so
        copy_id = page.get_by_role('button', name='Copy the job id')
        copy_id.click()
        expect(copy_id).to_have_text('Copied')
        expect(page.locator('#copy-status')).to_have_text('Copied')
        assert page.evaluate('() => navigator.clipboard.readText()') == failed['id']
        attempt.get_by_role('button', name='Copy the traceback').click()
        copied = page.evaluate('() => navigator.clipboard.readText()')
        assert copied.startswith('Traceback (most recent call last):')
        assert copied.rstrip().endswith('RuntimeError: no luck')
        page.get_by_role('button', name='Copy the parameters as JSON').click()
        page.wait_for_function('async () => (await navigator.clipboard.readText()).includes("no luck")')
        assert json.loads(page.evaluate('() => navigator.clipboard.readText()')) == {'message': 'no luck'}
        assert page.evaluate('() => window.__marker') == marker  # all in one page, never reloaded

        # a running job's clock runs in the page
        page.goto(f'{deployment.api.base}/jobs/{slow["id"]}')
        live(page)
        clock = page.locator(f'#job-{slow["id"]}-summary .elapsed')
        expect(clock).to_be_visible(timeout=20_000)
        seconds = int(clock.inner_text().split()[0])
        page.wait_for_function(
            '([sel, s]) => parseInt(document.querySelector(sel).textContent) >= s + 2',
            arg=[f'#job-{slow["id"]}-summary .elapsed', seconds], timeout=10_000)
        assert errors == []
    finally:
        context.close()


def test_times_read_and_copy_buttons_hide_without_javascript(deployment, browser):
    job = deployment.api.wait_state(deployment.api.submit('noop')['id'], 'succeeded')
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        deployment.open(page, f'/jobs/{job["id"]}')
        finished = page.locator(f'#job-{job["id"]}-summary dt:has-text("Finished") + dd time')
        expect(finished.locator('.ago')).to_have_text(re.compile(r'^(just now|\d+ s ago)$'))
        expect(page.locator('.btn-copy').first).to_be_hidden()
        assert page.locator('.btn-copy').count() >= 2
        page.goto(deployment.api.base + '/jobs?state=succeeded')
        expect(page.locator(f'#job-{job["id"]} td.run-time')).to_have_text(re.compile(r'\d+ (ms|s)$'))
    finally:
        context.close()


SUCCEEDED_POINTS = '#charts [data-chart="throughput"] .series-succeeded circle'
SUCCEEDED_TOTAL = """() => [...document.querySelectorAll('%s')]
    .reduce((sum, c) => sum + Number(c.dataset.value), 0)""" % SUCCEEDED_POINTS


def test_the_throughput_chart_follows_finished_jobs_and_a_point_opens_them(deployment, page):
    policy = watch_policy(page)
    deployment.open(page, '/')
    live(page)
    marker = page.evaluate('() => (window.__marker = Math.random())')
    before = page.evaluate(SUCCEEDED_TOTAL)
    made = [deployment.api.submit('noop')['id'] for _ in range(3)]
    for job_id in made:
        wait_for(lambda: deployment.api.job(job_id)['state'] == 'succeeded', 20,
                 message=f'job {job_id} succeeded')
    # Pushed over the socket (at most every few seconds), not reloaded.
    page.wait_for_function(f'() => ({SUCCEEDED_TOTAL})() >= {before + 3}', timeout=30_000)
    assert page.evaluate('() => window.__marker') == marker
    # Drawn in the theme's colours: succeeded and failed lines, each its own.
    strokes = page.evaluate("""() => ['succeeded', 'failed'].map(k => getComputedStyle(
        document.querySelector(`#charts [data-chart="throughput"] .series-${k} .chart-line`)).stroke)""")
    assert 'none' not in strokes and strokes[0] != strokes[1], strokes
    # The newest point holds them (or they straddle a minute: the one before it).
    links = page.locator('#charts [data-chart="throughput"] .series-succeeded a')
    hrefs = [links.nth(i).get_attribute('href') for i in range(links.count())][-2:]
    listed = set()
    for href in reversed(hrefs):
        page.goto(deployment.api.base + href)
        live(page)
        listed |= {i for i in made if page.locator(f'#job-{i}').count()}
        assert page.locator('#jobs-page-rows tr[data-state]:not([data-state="succeeded"])').count() == 0
    assert listed == set(made)
    expect(page.locator('.finished-range')).to_be_visible()
    # The window switch is a plain link, followed by htmx without a reload; the page stays live.
    deployment.open(page, '/')
    live(page)
    marker = page.evaluate('() => (window.__marker = Math.random())')
    page.click('#charts .chart-windows a[href="/?window=24h"]')
    expect(page.locator('#charts')).to_have_attribute('data-window', '24h', timeout=10_000)
    assert page.url.endswith('/?window=24h')
    live(page)
    assert page.evaluate('() => window.__marker') == marker
    assert page.locator('[style]').count() == 0
    assert violations(page) == [] and policy == []

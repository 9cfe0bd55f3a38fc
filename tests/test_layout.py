"""The layout in a real Chromium: every page at phone and desktop size, light and dark.

One deployment for the module, its ledger seeded with the values that used
to break the layout (10 KB parameters, a 200-character error, a long
traceback, a long progress message, a long consumer id). On every page, at
390x844 and 1400x900, in both themes: nothing scrolls sideways (neither the
page nor a panel), progress labels stay inside their bar, and axe-core
(vendored in static/) finds no serious or critical violation. Then the
header: the menu at phone size, the theme picker, and the one status shown
without JavaScript.
"""
import datetime as dt
import json
import urllib.parse
import uuid

import pytest
from helpers import ROOT, Deployment, grant_admin, ledger
from test_browser import live

import sqlalchemy as sa
from playwright.sync_api import expect

pytestmark = pytest.mark.processes

AXE = ROOT / 'static' / 'axe-core-4.14.1.min.js'
SIZES = {'phone': {'width': 390, 'height': 844}, 'desktop': {'width': 1400, 'height': 900}}
LONG_ERROR = 'RuntimeError: ' + 'the payment provider answered with an unexpected status ' \
    + 'E' * 143  # 200 characters after the type, the last 143 without a space


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """``(deployment, {name: job id})``: an embedded deployment with a seeded ledger and an admin."""
    # The seeded consumer stays online (LOST_AFTER: a day), so the reaper
    # leaves its running job as it is.
    dep = Deployment('embedded', tmp_path_factory.mktemp('layout'), LOST_AFTER=86400)
    grant_admin(dep.env)  # a user exists: pages ask for a login, the header shows who
    ids = seed(dep)
    yield dep, ids
    dep.close()


def _insert(conn, table, row):
    conn.execute(sa.text(f'INSERT INTO {table} ({", ".join(row)}) '
                         f'VALUES ({", ".join(":" + k for k in row)})'), row)


def seed(dep):
    """Write jobs, attempts, a consumer, alerts and an audit entry with long values; their ids."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    worker = 'build-host-' + 'w' * 120 + ':4242-1a2b3c'
    ids = {name: str(uuid.uuid4()) for name in ('failed', 'running', 'scheduled', 'big')}

    def job(name, **values):
        row = {'id': ids[name], 'task': 'noop', 'queue': 'default', 'params': '{}',
               'state': 'succeeded', 'priority': 0, 'attempts': 1, 'attempt_base': 0,
               'retries': 2, 'retry_delay': 5.0, 'created_at': now, 'updated_at': now,
               'version': 3}
        row.update(values)
        for key in ('params', 'result'):
            if key in row and not isinstance(row[key], str):
                row[key] = json.dumps(row[key])
        return row

    traceback = 'Traceback (most recent call last):\n' + ''.join(
        f'  File "/srv/queue-manager/.venv/lib/python3.11/site-packages/huey/{"deep/" * 12}'
        f'module_{n}.py", line {n}, in call_{n}\n    return self.inner_{n}({"arg, " * 30})\n'
        for n in range(60)) + LONG_ERROR
    with ledger(dep.env) as conn:
        _insert(conn, 'job', job('big', params={'blob': 'x' * 10240},
                                 result={'echo': 'y' * 10240}, finished_at=now))
        _insert(conn, 'job', job('failed', task='fail', state='failed', attempts=3,
                                 params={'message': 'E' * 200, 'payload': 'p ' * 5120},
                                 error=LONG_ERROR, error_type='RuntimeError', finished_at=now,
                                 worker=worker))
        for number in (1, 2, 3):
            _insert(conn, 'attempt', {'job_id': ids['failed'], 'number': number,
                                      'outcome': 'failed', 'worker': worker, 'started_at': now,
                                      'finished_at': now, 'duration': 1.5,
                                      'error_type': 'RuntimeError',
                                      'error_message': LONG_ERROR.split(': ', 1)[1],
                                      'traceback': traceback})
        _insert(conn, 'job', job('running', task='sleep', state='running', progress=0.2,
                                 progress_message='step 12 of 60 · ' + 'reticulating ' * 14,
                                 started_at=now, worker=worker,
                                 params={'seconds': 3600, 'steps': 60}))
        _insert(conn, 'job', job('scheduled', state='scheduled', attempts=0,
                                 scheduled_for=now + dt.timedelta(days=1),
                                 params={'note': 'z' * 10240}))
        _insert(conn, 'worker', {'id': worker, 'host': 'build-host-' + 'w' * 120, 'pid': 4242,
                                 'queues': '["default"]', 'concurrency': 4, 'started_at': now,
                                 'last_seen': now, 'processed': 3, 'failed': 3,
                                 'current': json.dumps([ids['running']]), 'leader': False})
        for state in ('firing', 'resolved'):
            _insert(conn, 'alert', {'rule': 'payment-failures-' + 'r' * 60, 'kind': 'failure_rate',
                                    'scope': 'task', 'subject': 'payment', 'state': state,
                                    'fired_at': now, 'value': 0.5, 'threshold': 0.1,
                                    'message': LONG_ERROR, 'delivery': 'off',
                                    'delivery_attempts': 0, 'resolved_at':
                                        now if state == 'resolved' else None,
                                    'resolution': 'fell to ' + 'q' * 150 if state == 'resolved'
                                    else None})
        _insert(conn, 'audit_entry', {'at': now, 'user': 'admin', 'role': 'admin', 'via': 'session',
                                      'action': 'bulk_delete', 'count': 7, 'address': '127.0.0.1',
                                      'target': 'state=failed&q=' + 'f' * 400, 'outcome': 'done'})
    return ids


def pages(ids):
    """(name, path) of every page of the app."""
    return [('dashboard', '/'), ('jobs', '/jobs'), ('failed job', f'/jobs/{ids["failed"]}'),
            ('succeeded job', f'/jobs/{ids["big"]}'), ('running job', f'/jobs/{ids["running"]}'),
            ('failures', '/failures'), ('queues', '/queues'), ('scheduled', '/scheduled'),
            ('periodic', '/periodic'), ('workers', '/workers'), ('submit', '/jobs/new'),
            ('alerts', '/alerts'), ('audit', '/audit'), ('users', '/users'), ('login', '/login')]


# What overflows sideways: the page, any panel, any progress label.
OVERFLOW = """() => {
  const out = [];
  const root = document.documentElement;
  if (root.scrollWidth > root.clientWidth) out.push(`page ${root.scrollWidth} > ${root.clientWidth}`);
  for (const el of document.querySelectorAll('.panel, .progress, .progress-label, .top')) {
    if (el.scrollWidth > el.clientWidth + 1)
      out.push(`${el.className} ${el.id || ''} ${el.scrollWidth} > ${el.clientWidth}`);
  }
  for (const el of document.querySelectorAll('.progress')) {
    if (el.scrollHeight > el.clientHeight + 1) out.push(`progress label cut: ${el.scrollHeight} > ${el.clientHeight}`);
  }
  return out;
}"""

# The relative luminance of the page's background (0 black, 1 white).
BACKGROUND = """() => {
  const [r, g, b] = getComputedStyle(document.body).backgroundColor.match(/[\\d.]+/g).map(Number);
  const lin = c => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
}"""

AXE_RUN = """async () => {
  const result = await axe.run(document, {runOnly: {type: 'tag',
      values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}});
  return result.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
    .map(v => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(' | ')}`);
}"""


def new_context(browser, size='desktop', **options):  # noqa: F811 (the fixture's name)
    return browser.new_context(viewport=SIZES[size], **options)


def open_page(dep, page, path):
    """Open ``path`` logged in as the admin; wait for the live status where the page has one."""
    dep.open(page, path)
    if urllib.parse.urlsplit(page.url).path != urllib.parse.urlsplit(path).path:
        page.goto(dep.api.base + path)  # the login form led elsewhere
    if page.locator('#live-status').count():
        live(page)


@pytest.mark.parametrize('scheme', ['light', 'dark'])
@pytest.mark.parametrize('size', ['phone', 'desktop'])
def test_every_page_fits_the_screen_and_passes_axe(site, browser, size, scheme):  # noqa: F811
    dep, ids = site
    # axe is put into each page as an inline script, which the pages' policy
    # refuses: this context alone bypasses it (test_browser.py checks the policy).
    context = new_context(browser, size, color_scheme=scheme, bypass_csp=True)
    problems = {}
    try:
        page = context.new_page()
        errors = []
        page.on('pageerror', lambda exc: errors.append(str(exc)))
        for name, path in pages(ids):
            if name == 'login':
                context.clear_cookies()  # the login form as someone logged out sees it
            open_page(dep, page, path)
            # what details fold is checked too (a traceback)
            page.evaluate("() => document.querySelectorAll('main details').forEach(d => { d.open = true; })")
            found = page.evaluate(OVERFLOW)
            luminance = page.evaluate(BACKGROUND)
            if (luminance < 0.2) != (scheme == 'dark'):
                found.append(f'the {scheme} theme is not applied (background luminance {luminance:.2f})')
            if size == 'phone':
                page.click('label[for=menu-toggle]')  # axe checks the open menu too
                expect(page.locator('#menu nav')).to_be_visible()
            page.add_script_tag(path=str(AXE))
            found += page.evaluate(AXE_RUN)
            if found:
                problems[name] = found
        assert errors == []
    finally:
        context.close()
    assert problems == {}


def test_no_page_scrolls_sideways_at_1280_px(site, browser):  # noqa: F811
    # The narrowest desktop the layout promises to fit: tables, not cards, here.
    dep, ids = site
    context = browser.new_context(viewport={'width': 1280, 'height': 800})
    problems = {}
    try:
        page = context.new_page()
        for name, path in pages(ids)[:-1]:  # the login page is the phone's and desktop's
            open_page(dep, page, path)
            page.evaluate("() => document.querySelectorAll('main details').forEach(d => { d.open = true; })")
            found = page.evaluate(OVERFLOW)
            if found:
                problems[name] = found
    finally:
        context.close()
    assert problems == {}


def test_long_values_are_on_the_pages_wrapped_not_lost(site, browser):  # noqa: F811
    # What the overflow checks above looked at is really there.
    dep, ids = site
    context = new_context(browser, 'phone')
    try:
        page = context.new_page()
        open_page(dep, page, '/')
        row = page.locator(f'#job-{ids["failed"]}')
        expect(row.locator('td.error-cell bdi')).to_have_attribute('title', LONG_ERROR)
        expect(row.locator('td.error-cell')).to_be_visible()
        expect(page.locator(f'#job-{ids["running"]} .progress-label')).to_contain_text(
            'step 12 of 60 · reticulating')
        # a card: each cell led by its column's name
        assert row.locator('td.state').evaluate(
            "td => getComputedStyle(td, '::before').content") == '"State"'
        open_page(dep, page, f'/jobs/{ids["failed"]}')
        expect(page.locator('.params-table')).to_contain_text('p p p')
        expect(page.locator('.attempt-error').first).to_contain_text('E' * 143)
        open_page(dep, page, '/workers')
        expect(page.locator('td[data-label=Consumer]').first).to_contain_text('w' * 120)
    finally:
        context.close()


@pytest.mark.parametrize('javascript', [True, False])
def test_the_menu_opens_and_reaches_every_page_at_phone_size(site, browser, javascript):  # noqa: F811
    dep, ids = site
    context = new_context(browser, 'phone', java_script_enabled=javascript)
    try:
        page = context.new_page()
        open_page(dep, page, '/') if javascript else dep.open(page, '/')
        links = page.locator('#menu nav a')
        expect(links.first).to_be_hidden()
        expect(page.locator('header .live:visible')).to_have_count(1)  # the status stays in view
        page.click('label[for=menu-toggle]')
        names = links.all_inner_texts()
        assert names == ['Dashboard', 'Jobs', 'Queues', 'Scheduled', 'Periodic', 'Failures',
                         'Workers', 'Alerts', 'Submit', 'Audit', 'Users']
        for link in links.all():
            expect(link).to_be_visible()
            box = link.bounding_box()
            assert box['x'] >= 0 and box['x'] + box['width'] <= SIZES['phone']['width'], box
        expect(page.locator('.who button')).to_be_visible()  # log out is in the menu too
        links.filter(has_text='Workers').click()
        page.wait_for_url('**/workers')
        expect(page.locator('h1')).to_have_text('Workers')
        page.click('label[for=menu-toggle]')
        page.locator('#menu nav a', has_text='Failures').click()
        page.wait_for_url('**/failures')
    finally:
        context.close()


def test_the_theme_picker_switches_and_survives_a_reload(site, browser):  # noqa: F811
    dep, _ = site
    context = new_context(browser, 'desktop', color_scheme='light')
    try:
        page = context.new_page()
        open_page(dep, page, '/queues')
        picker = page.locator('#theme-choice')
        expect(picker).to_be_visible()
        expect(picker).to_have_value('system')
        assert page.evaluate(BACKGROUND) > 0.8  # the system's light
        picker.select_option('dark')
        expect(page.locator('html')).to_have_attribute('data-theme', 'dark')
        assert page.evaluate(BACKGROUND) < 0.05
        page.reload()
        # applied before the page's own scripts ran: the first paint is dark
        assert page.evaluate('() => localStorage.getItem("qm-theme")') == 'dark'
        expect(page.locator('html')).to_have_attribute('data-theme', 'dark')
        expect(page.locator('#theme-choice')).to_have_value('dark')
        assert page.evaluate(BACKGROUND) < 0.05
        open_page(dep, page, '/jobs')  # every page
        assert page.evaluate(BACKGROUND) < 0.05
        page.locator('#theme-choice').select_option('system')
        expect(page.locator('html')).not_to_have_attribute('data-theme', 'dark')
        assert page.evaluate(BACKGROUND) > 0.8
        page.reload()
        assert page.evaluate(BACKGROUND) > 0.8
        page.locator('#theme-choice').select_option('light')
        page.emulate_media(color_scheme='dark')  # the system turns dark: the choice holds
        assert page.evaluate(BACKGROUND) > 0.8
        page.locator('#theme-choice').select_option('system')
        assert page.evaluate(BACKGROUND) < 0.05  # and "system" follows it
    finally:
        context.close()


def test_without_javascript_the_header_shows_one_status(site, browser):  # noqa: F811
    dep, _ = site
    context = new_context(browser, 'desktop', java_script_enabled=False, color_scheme='dark')
    try:
        page = context.new_page()
        dep.open(page, '/')
        statuses = page.locator('header .live:visible')
        expect(statuses).to_have_count(1)
        expect(statuses).to_have_text('live updates need JavaScript: reload to refresh')
        expect(page.locator('#theme-choice')).to_be_hidden()  # it could not work
        assert page.evaluate(BACKGROUND) < 0.05  # the system's dark, with no script
    finally:
        context.close()
    context = new_context(browser, 'desktop')
    try:
        page = context.new_page()
        open_page(dep, page, '/')
        statuses = page.locator('header .live:visible')
        expect(statuses).to_have_count(1)
        expect(statuses).to_have_text('live')
    finally:
        context.close()

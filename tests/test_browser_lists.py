"""The jobs list's selection, confirmations, the submit form's options and the keyboard
shortcuts (static/lists.js, static/confirm.js, static/keys.js) in a real Chromium, with
JavaScript and without."""
import re

import pytest
from helpers import Deployment
from playwright.sync_api import expect
from test_browser import live, page, trace  # noqa: F401 (fixtures)

pytestmark = pytest.mark.processes


@pytest.fixture(scope='module')
def deployment(tmp_path_factory):
    # Embedded (no login while no user exists); three jobs a page, so a
    # handful of jobs spans pages.
    dep = Deployment('embedded', tmp_path_factory.mktemp('browser-lists'), PAGE_SIZE=3)
    yield dep
    dep.close()


@pytest.fixture
def no_js_page(browser):  # noqa: F811
    context = browser.new_context(java_script_enabled=False, viewport={'width': 1300, 'height': 900})
    yield context.new_page()
    context.close()


def scheduled_jobs(deployment, n, task='noop'):
    return [deployment.api.submit(task, delay=3600)['id'] for _ in range(n)]


def test_select_the_page_then_every_matching_job_and_cancel_them_after_confirming(deployment, page):  # noqa: F811
    ids = scheduled_jobs(deployment, 5, task='sleep')
    deployment.open(page, '/jobs?state=scheduled&task=sleep')
    live(page)
    expect(page.locator('#job-count')).to_have_attribute('data-count', '5')
    rows = page.locator('table.jobs input[name=ids]')
    expect(rows).to_have_count(3)
    page.check('#select-page')
    assert all(box.is_checked() for box in rows.all())
    button = page.locator('#select-matching-button')
    expect(page.locator('#select-matching')).to_contain_text('All 3 jobs on this page are selected.')
    expect(button).to_have_text('Select all 5 jobs matching this filter')
    button.click()
    assert page.locator('#bulk-scope').input_value() == 'filter'
    expect(page.locator('#select-matching')).to_contain_text(
        'All 5 jobs matching this filter are selected.')
    # Unticking one row goes back to the ticked jobs.
    rows.first.uncheck()
    assert page.locator('#bulk-scope').input_value() == 'selected'
    expect(page.locator('#select-page')).to_have_js_property('indeterminate', True)
    rows.first.check()
    button.click()
    page.click('.bulk-bar button[value=cancel]')
    expect(page.locator('#confirm-title')).to_have_text('Cancel 5 jobs?')
    expect(page.locator('.confirm-filter')).to_contain_text('scheduled')
    expect(page.locator('.confirm-filter')).to_contain_text('sleep')
    # The destructive button is filled red; the way out is not.
    colors = page.evaluate("""() => {
        const probe = document.createElement('span');
        probe.style.color = 'var(--bad)';  // the theme's colour for danger
        document.body.append(probe);
        return [getComputedStyle(document.querySelector('.btn-destructive')).backgroundColor,
                getComputedStyle(document.querySelector('.btn-safe')).backgroundColor,
                getComputedStyle(probe).color]; }""")
    assert colors[0] == colors[2] and colors[1] != colors[0]
    page.click('.btn-destructive')
    expect(page.locator('.flash-ok')).to_contain_text('5 of 5 jobs canceled')
    for job_id in ids:
        assert deployment.api.job(job_id)['state'] == 'canceled'


def test_without_javascript_deletes_and_bulk_actions_confirm_on_a_page(deployment, no_js_page):
    page = no_js_page  # noqa: F811
    job = deployment.api.submit('noop', delay=3600)
    deployment.api.post(f'/api/jobs/{job["id"]}/cancel')
    deployment.open(page, f'/jobs/{job["id"]}')
    page.click('form[data-confirm] button[value=delete]')
    expect(page.locator('#confirm-title')).to_have_text('Delete 1 job?')
    expect(page.locator('.confirm-jobs')).to_contain_text(job['id'][:8])
    assert deployment.api.job(job['id'])['state'] == 'canceled'  # asked, not done
    page.click('.btn-safe')  # Keep it
    assert page.url.endswith(f'/jobs/{job["id"]}')
    page.click('form[data-confirm] button[value=delete]')
    page.click('.btn-destructive')
    expect(page.locator('.flash-ok')).to_contain_text(f'Job {job["id"][:8]} deleted.')
    assert deployment.api.get(f'/api/jobs/{job["id"]}')[0] == 404

    ids = scheduled_jobs(deployment, 2, task='flaky')
    deployment.open(page, '/jobs?state=scheduled&task=flaky')
    expect(page.locator('#select-page')).to_be_hidden()  # nothing to tick it without JavaScript
    page.check(f'#select-{ids[0]}')
    page.click('.bulk-bar button[value=cancel]')
    expect(page.locator('#confirm-title')).to_have_text('Cancel 1 job?')
    page.click('.btn-destructive')
    expect(page.locator('.flash-ok')).to_contain_text('1 of 1 jobs canceled')
    page.select_option('#bulk-scope', 'filter')
    page.click('.bulk-bar button[value=cancel]')
    expect(page.locator('#confirm-title')).to_have_text('Cancel 1 job?')
    expect(page.locator('.confirm-filter')).to_contain_text('flaky')
    page.click('.btn-destructive')
    assert [deployment.api.job(i)['state'] for i in ids] == ['canceled', 'canceled']


@pytest.mark.parametrize('javascript', [True, False])
def test_the_options_open_on_their_errors(deployment, browser, javascript):  # noqa: F811
    context = browser.new_context(java_script_enabled=javascript)
    try:
        page = context.new_page()
        deployment.open(page, '/jobs/new')
        options = page.locator('details.options')
        expect(options).not_to_have_attribute('open', '')
        options.locator('summary').click()
        page.fill('#f-delay', '99999999')
        page.click('#submit-form button[type=submit]')
        expect(page.locator('#submit-form .error').first).to_contain_text('fix the fields marked below')
        expect(page.locator('details.options')).to_have_attribute('open', '')
        expect(page.locator('#f-delay')).to_be_visible()
        expect(page.locator('#submit-form p.error', has_text='delay')).to_be_visible()
    finally:
        context.close()


def test_keyboard_shortcuts_and_their_help(deployment, page):  # noqa: F811
    ids = scheduled_jobs(deployment, 2, task='fail')
    deployment.open(page, '/jobs?state=scheduled&task=fail')
    live(page)
    page.keyboard.press('?')
    dialog = page.get_by_role('dialog', name='Keyboard shortcuts')
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text('Go to Queues')
    page.keyboard.press('j')  # the dialog is modal: no row moves behind it
    expect(page.locator('tr.row-current')).to_have_count(0)
    page.keyboard.press('Escape')
    expect(dialog).to_be_hidden()

    page.keyboard.press('/')
    search = page.locator('main input[type=search]')
    expect(search).to_be_focused()
    page.keyboard.type('jk?')  # typed into the field, not taken as shortcuts
    expect(search).to_have_value('jk?')
    expect(page.locator('tr.row-current')).to_have_count(0)
    expect(dialog).to_be_hidden()
    search.fill('')
    page.locator('h1').click()  # out of the field

    newest_first = ids[::-1]
    page.keyboard.press('j')
    expect(page.locator('tr.row-current')).to_have_id(f'job-{newest_first[0]}')
    page.keyboard.press('j')
    expect(page.locator('tr.row-current')).to_have_id(f'job-{newest_first[1]}')
    page.keyboard.press('k')
    expect(page.locator('tr.row-current')).to_have_id(f'job-{newest_first[0]}')
    # A live update re-renders the rows: the chosen row and its focus stay.
    newer = scheduled_jobs(deployment, 1, task='fail')[0]
    expect(page.locator(f'#job-{newer}')).to_have_count(1, timeout=15_000)
    expect(page.locator('tr.row-current')).to_have_id(f'job-{newest_first[0]}')
    expect(page.locator(f'#job-{newest_first[0]} a').first).to_be_focused()
    page.keyboard.press('j')  # on from the chosen row, not from the top
    expect(page.locator('tr.row-current')).to_have_id(f'job-{newest_first[1]}')
    page.keyboard.press('k')
    # A tick box is not a text field: the keys still work from it.
    page.locator(f'#select-{newest_first[1]}').check()
    page.keyboard.press('k')
    expect(page.locator('tr.row-current')).to_have_id(f'job-{newer}')
    page.keyboard.press('j')
    expect(page.locator('tr.row-current')).to_have_id(f'job-{newest_first[0]}')
    page.locator('h1').click()  # focus off the row's link: Enter is the shortcut's
    page.keyboard.press('Enter')
    page.wait_for_url(re.compile(rf'/jobs/{newest_first[0]}$'))
    page.keyboard.press('g')
    page.keyboard.press('q')
    page.wait_for_url(re.compile(r'/queues$'))
    expect(page.locator('h1')).to_have_text('Queues')

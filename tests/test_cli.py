"""The users, tokens and jobs commands, as `flask --app wsgi ...` runs them."""
import datetime as dt
import json
import re

import pytest
from conftest import flushed, recording_app, run_next
from helpers import broker_locked

from app import accounts, audit, broker, templating
from app.extensions import db
from app.models import Job, utcnow


def run(app, *args, input=None):
    return app.test_cli_runner().invoke(args=list(args), input=input)


def test_users_are_created_listed_changed_and_deleted(app):
    out = run(app, 'users', 'create', 'ada', '--role', 'admin', '--password-stdin',
              input='correct horse\n')
    assert out.exit_code == 0 and out.output == 'created ada (admin)\n'
    # From a prompt, asked twice
    out = run(app, 'users', 'create', 'bob', '--role', 'viewer', input='long enough\nlong enough\n')
    assert out.exit_code == 0, out.output
    listed = run(app, 'users', 'list').output.splitlines()
    assert [line.split('\t')[:2] for line in listed] == [['ada', 'admin'], ['bob', 'viewer']]
    assert run(app, 'users', 'set-role', 'bob', 'operator').output == 'bob is now operator\n'
    assert run(app, 'users', 'set-password', 'bob', '--password-stdin',
               input='new password\n').exit_code == 0
    with app.app_context():
        assert accounts.authenticate('bob', 'new password').role == 'operator'
    assert run(app, 'users', 'delete', 'bob').output == 'deleted bob\n'
    assert len(run(app, 'users', 'list').output.splitlines()) == 1


def test_users_commands_fail_clearly(app):
    out = run(app, 'users', 'create', 'ada', '--role', 'root', '--password-stdin', input='x' * 9)
    assert out.exit_code == 2 and "'root' is not one of" in out.output
    out = run(app, 'users', 'create', 'ada', '--role', 'admin', '--password-stdin', input='short\n')
    assert out.exit_code == 1 and 'Error: a password has at least 8 characters' in out.output
    out = run(app, 'users', 'delete', 'nobody')
    assert out.exit_code == 1 and "no user named 'nobody'" in out.output
    run(app, 'users', 'create', 'ada', '--role', 'admin', '--password-stdin', input='long enough\n')
    out = run(app, 'users', 'set-role', 'ada', 'viewer')
    assert out.exit_code == 1 and 'last admin' in out.output


def test_ensure_admin_creates_the_first_admin_once(app, monkeypatch):
    monkeypatch.delenv('ADMIN_PASSWORD', raising=False)
    out = run(app, 'users', 'ensure-admin')
    password = re.search(r'one-time password (\S+)', out.output).group(1)
    with app.app_context():
        assert accounts.authenticate('admin', password).role == 'admin'
    assert run(app, 'users', 'ensure-admin').output == 'users exist already; nothing to do\n'


def test_ensure_admin_takes_the_password_from_the_environment(app, monkeypatch):
    monkeypatch.setenv('ADMIN_PASSWORD', 'from the environment')
    out = run(app, 'users', 'ensure-admin', '--name', 'boss')
    assert out.exit_code == 0 and 'from the environment' not in out.output
    with app.app_context():
        assert accounts.authenticate('boss', 'from the environment').role == 'admin'


def test_a_token_is_printed_once_works_and_is_revoked(app):
    run(app, 'users', 'create', 'bot', '--role', 'operator', '--password-stdin',
        input='long enough\n')
    token = run(app, 'tokens', 'create', '--user', 'bot', '--name', 'ci').output.strip()
    client = app.test_client()
    auth = {'Authorization': f'Bearer {token}'}
    assert client.post('/api/jobs', json={'task': 'noop'}, headers=auth).status_code == 201
    listed = run(app, 'tokens', 'list').output
    assert token not in listed and '\tci\tbot\toperator\t' in listed and 'last used 20' in listed
    token_id = listed.split('\t', 1)[0]
    assert run(app, 'tokens', 'revoke', '\u0661').exit_code == 2  # ASCII digits only
    assert run(app, 'tokens', 'revoke', token_id).output == f'revoked token {token_id} (ci)\n'
    resp = client.get('/api/stats', headers=auth)
    assert resp.status_code == 401 and 'unknown or revoked token' in resp.get_json()['error']
    out = run(app, 'tokens', 'create', '--user', 'nobody')
    assert out.exit_code == 1 and "no user named 'nobody'" in out.output


# -- jobs ---------------------------------------------------------------------------

@pytest.fixture
def ledger_jobs(tmp_path):
    """``(app, recorder)`` on two queues, recording what Huey runs in this process."""
    with recording_app(tmp_path, QUEUES='default,reports') as pair:
        yield pair


def submit(client, task='noop', **fields):
    resp = client.post('/api/jobs', json={'task': task, **fields})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()['id']


def failed_job(app, recorder, queue='default'):
    """A job that ran and failed, for real: submitted, executed by Huey, recorded."""
    job_id = submit(app.test_client(), 'fail', queue=queue, retries=0)
    run_next(broker.hueys[queue])
    flushed(recorder)
    assert db.session.get(Job, job_id).state == 'failed'
    return job_id


def state_of(job_id):
    db.session.expire_all()
    job = db.session.get(Job, job_id)
    return job.state if job else None


def last_audit():
    db.session.expire_all()
    return audit.entries(limit=1)[0]


def test_jobs_stats_counts_per_queue_and_state_as_the_api_does(ledger_jobs):
    app, recorder = ledger_jobs
    client = app.test_client()
    failed_job(app, recorder)
    submit(client), submit(client)
    submit(client, queue='reports', delay=3600)
    out = run(app, 'jobs', 'stats', '--json')
    assert out.exit_code == 0 and json.loads(out.output) == client.get('/api/stats').get_json()
    lines = run(app, 'jobs', 'stats').output.splitlines()
    assert lines[0].split() == ['QUEUE', 'QUEUED', 'SCHEDULED', 'RUNNING', 'RETRYING',
                                'SUCCEEDED', 'FAILED', 'CANCELED', 'TOTAL']
    assert [line.split() for line in lines[1:]] == [
        ['default', '2', '0', '0', '0', '0', '1', '0', '3'],
        ['reports', '0', '1', '0', '0', '0', '0', '0', '1'],
        ['all', '2', '1', '0', '0', '0', '1', '0', '4']]


def test_jobs_list_filters_and_pages_as_the_api_does(ledger_jobs):
    app, recorder = ledger_jobs
    client = app.test_client()
    failed = failed_job(app, recorder)
    waiting = [submit(client, params={}) for _ in range(4)]
    # The table: newest first, the next page's cursor on standard error.
    out = run(app, 'jobs', 'list', '--limit', '2')
    header, *rows = out.stdout.splitlines()
    assert header.split() == ['ID', 'STATE', 'QUEUE', 'TASK', 'ATTEMPTS', 'CREATED', 'FINISHED', 'RUN']
    assert [r.split()[:5] for r in rows] == [[waiting[3], 'queued', 'default', 'noop', '0'],
                                             [waiting[2], 'queued', 'default', 'noop', '0']]
    cursor = re.fullmatch(r'more: add --cursor (\S+)\n', out.stderr).group(1)
    # --json: the API's body, page after page.
    seen, cursor = [], None
    while True:
        args = ['--limit', '2'] + (['--cursor', cursor] if cursor else [])
        body = json.loads(run(app, 'jobs', 'list', '--json', *args).output)
        api = client.get('/api/jobs?limit=2' + (f'&cursor={cursor}' if cursor else '')).get_json()
        assert body == api
        seen += [j['id'] for j in body['jobs']]
        cursor = body['next']
        if not cursor:
            break
    assert seen == [*reversed(waiting), failed]
    # The API's filters.
    listed = lambda *args: [line.split()[0] for line in  # noqa: E731
                            run(app, 'jobs', 'list', *args).stdout.splitlines()[1:]]
    assert listed('--state', 'failed') == [failed]
    assert listed('--task', 'noop', '--queue', 'default') == list(reversed(waiting))
    assert listed('-q', waiting[1][:8]) == [waiting[1]]
    assert listed('--queue', 'reports') == []
    assert run(app, 'jobs', 'list', '--queue', 'reports').stderr == 'no jobs match\n'
    # The API's orders, cursor and all.
    for sort in ('oldest', 'runtime'):
        body = json.loads(run(app, 'jobs', 'list', '--json', '--sort', sort, '--limit', '2').output)
        assert body == client.get(f'/api/jobs?sort={sort}&limit=2').get_json()
    assert listed('--sort', 'oldest') == [failed, *waiting]
    assert listed('--sort', 'runtime') == [failed]  # the one job that ran
    # Its run time in the last column (the run-time order's key); '-' for a job not finished.
    table = run(app, 'jobs', 'list', '--sort', 'oldest').stdout.splitlines()
    assert table[0].split()[-1] == 'RUN'
    ran = db.session.get(Job, failed).run_seconds
    assert table[1].split()[0] == failed and table[1].endswith(templating.format_duration(ran))
    assert [line.split()[-1] for line in table[2:]] == ['-'] * len(waiting)


def test_jobs_list_refuses_bad_filters_cursors_and_limits(app):
    out = run(app, 'jobs', 'list', '--state', 'done')
    assert out.exit_code == 2 and "'done' is not one of" in out.output
    out = run(app, 'jobs', 'list', '--cursor', 'not-a-cursor')
    assert out.exit_code == 1 and 'Error: cursor is not one this server handed out' in out.output
    out = run(app, 'jobs', 'list', '--sort', 'slowest')
    assert out.exit_code == 2 and "'slowest' is not one of" in out.output
    out = run(app, 'jobs', 'list', '--limit', '501')
    assert out.exit_code == 2 and 'at most 500 (MAX_PAGE_SIZE)' in out.output
    out = run(app, 'jobs', 'list', '--limit', '0')
    assert out.exit_code == 2
    # Numbers as forms and query strings take them: ASCII digits (int() takes these).
    for limit in ('\u0663', '1_0', '\uff15', '\u00a05'):
        out = run(app, 'jobs', 'list', '--limit', limit)
        assert out.exit_code == 2 and 'is not a whole number (ASCII digits)' in out.output, limit
    assert run(app, 'jobs', 'list', '--limit', ' +2 ').exit_code == 0
    out = run(app, 'jobs', 'list', '--task', 'x' * 1001)
    assert out.exit_code == 1 and 'Error: task must be at most 500 characters' in out.output


def test_retry_by_filter_names_the_count_and_filter_and_acts_only_when_confirmed(ledger_jobs):
    app, recorder = ledger_jobs
    mine = [failed_job(app, recorder) for _ in range(2)]
    other = failed_job(app, recorder, queue='reports')
    question = 'Retry 2 jobs matching state=failed queue=default? [y/N]: '
    out = run(app, 'jobs', 'retry', '--state', 'failed', '--queue', 'default', input='n\n')
    assert out.exit_code == 1 and out.output.startswith(question)
    assert 'Error: not confirmed; nothing was changed' in out.output
    assert [state_of(i) for i in (*mine, other)] == ['failed'] * 3
    entry = last_audit()
    assert (entry.action, entry.target, entry.count, entry.outcome, entry.via) == (
        'retry', 'filter state=failed queue=default', 2, 'not confirmed', 'cli')
    # No answer at all (a script without --yes) is no either.
    out = run(app, 'jobs', 'retry', '--state', 'failed', '--queue', 'default', input='')
    assert out.exit_code == 1 and [state_of(i) for i in mine] == ['failed'] * 2

    out = run(app, 'jobs', 'retry', '--state', 'failed', '--queue', 'default', input='y\n')
    assert out.exit_code == 0 and out.output == question + 'y\n2 of 2 jobs retried\n'
    assert [state_of(i) for i in (*mine, other)] == ['queued', 'queued', 'failed']
    assert broker.message_ids('default') == set(mine)
    entry = last_audit()
    assert (entry.action, entry.target, entry.count, entry.outcome) == (
        'retry', 'filter state=failed queue=default', 2, 'done')


def test_yes_skips_the_question(ledger_jobs):
    app, recorder = ledger_jobs
    client = app.test_client()
    waiting = [submit(client) for _ in range(3)]
    later = submit(client, queue='reports', delay=3600)
    out = run(app, 'jobs', 'cancel', '--queue', 'default', '--yes')
    assert out.exit_code == 0 and out.output == '3 of 3 jobs canceled (or asked to stop)\n'
    assert [state_of(i) for i in waiting] == ['canceled'] * 3
    assert broker.message_ids('default') == set() and state_of(later) == 'scheduled'
    out = run(app, 'jobs', 'delete', *waiting[:2], '-y')
    assert out.exit_code == 0 and out.output == '2 of 2 jobs deleted\n'
    assert [state_of(i) for i in waiting] == [None, None, 'canceled']
    entry = last_audit()
    assert (entry.action, entry.target, entry.count) == (
        'delete', f'ids {waiting[0]}, {waiting[1]}', 2)
    out = run(app, 'jobs', 'retry', '--all', '--yes')
    assert out.exit_code == 0 and out.output == '1 of 2 jobs retried; skipped: 1 scheduled\n'
    assert state_of(waiting[2]) == 'queued'


def test_one_job_by_id_and_the_refusal_its_state_gives(ledger_jobs):
    app, recorder = ledger_jobs
    client = app.test_client()
    failed = failed_job(app, recorder)
    job_id = submit(client)
    out = run(app, 'jobs', 'delete', job_id, '--yes')
    assert out.exit_code == 1
    assert 'Error: cannot delete a queued job' in out.output and state_of(job_id) == 'queued'
    entry = last_audit()
    assert (entry.action, entry.target, entry.outcome) == ('delete', job_id, 'refused: 409 conflict')
    out = run(app, 'jobs', 'cancel', job_id, input='y\n')
    assert out.exit_code == 0
    assert out.output == f'Cancel job {job_id}? [y/N]: y\njob {job_id} canceled\n'
    assert state_of(job_id) == 'canceled' and broker.message_ids('default') == set()
    assert run(app, 'jobs', 'retry', job_id, '--yes').output == f'job {job_id} queued again\n'
    assert state_of(job_id) == 'queued' and broker.message_ids('default') == {job_id}
    # Several ids: those whose state does not allow it are skipped and counted.
    out = run(app, 'jobs', 'delete', failed, job_id, '--yes')
    assert out.output == '1 of 2 jobs deleted; skipped: 1 queued\n' and state_of(failed) is None


def test_unknown_ids_and_unclear_requests_fail_and_change_nothing(ledger_jobs):
    app, recorder = ledger_jobs
    job_id = failed_job(app, recorder)
    out = run(app, 'jobs', 'retry', job_id, 'no-such-job', '--yes')
    assert out.exit_code == 1
    assert 'Error: no job with id no-such-job; nothing was changed' in out.output
    assert state_of(job_id) == 'failed'
    assert last_audit().outcome == 'refused: 404 not found'
    for args, said in (
            ((job_id, '--state', 'failed'), 'give job ids or a filter'),
            ((), 'name the jobs: one or more ids, or a filter'),
            (('--all', '--queue', 'default'), '--all means every job: give it no filter'),
            (('--state', 'lost'), "'lost' is not one of")):
        out = run(app, 'jobs', 'retry', *args, '--yes')
        assert out.exit_code == 2 and said in out.output, out.output
    out = run(app, 'jobs', 'cancel', '--task', 'no_such_task')
    assert out.exit_code == 0 and out.output == 'no jobs match task=no_such_task; nothing to do\n'
    assert state_of(job_id) == 'failed'


def test_a_broker_that_does_not_answer_fails_the_command_and_leaves_the_job(ledger_jobs):
    app, _recorder = ledger_jobs
    job_id = submit(app.test_client())
    with broker_locked():
        out = run(app, 'jobs', 'cancel', job_id, '--yes')
    assert out.exit_code == 1 and 'Error: the job broker is unreachable' in out.output
    assert state_of(job_id) == 'queued' and broker.message_ids('default') == {job_id}
    assert last_audit().outcome == 'refused: broker unreachable'


def test_purge_deletes_jobs_finished_long_ago_after_asking(tmp_path, ledger_url):
    with recording_app(tmp_path, DATABASE_URL=ledger_url) as (app, recorder):
        client = app.test_client()
        old, recent = submit(client), submit(client)
        waiting = submit(client, delay=3600)
        run_next(), run_next()
        flushed(recorder)
        db.session.get(Job, old).finished_at = utcnow() - dt.timedelta(days=40)
        db.session.commit()
        out = run(app, 'jobs', 'purge', '--days', '30', input='n\n')
        assert out.exit_code == 1 and out.output.startswith(
            'Delete 1 job finished more than 30 days ago, with their attempts and logs? [y/N]')
        assert state_of(old) == 'succeeded'
        out = run(app, 'jobs', 'purge', '--days', '30', '--yes')
        assert out.exit_code == 0 and out.output == 'deleted 1 jobs finished more than 30 days ago\n'
        assert [state_of(i) for i in (old, recent, waiting)] == [None, 'succeeded', 'scheduled']
        entry = last_audit()
        assert (entry.action, entry.target, entry.count) == ('purge', 'finished more than 30 days ago', 1)
        out = run(app, 'jobs', 'purge', '--days', '30')
        assert out.output == 'no job finished more than 30 days ago; nothing to do\n'
        assert run(app, 'jobs', 'purge', '--days', '0', '--yes').exit_code == 2
        for days in ('\u0663\u0660', '3_0'):
            out = run(app, 'jobs', 'purge', '--days', days, '--yes')
            assert out.exit_code == 2 and 'is not a whole number' in out.output
        assert run(app, 'jobs', 'purge').exit_code == 2  # --days is required

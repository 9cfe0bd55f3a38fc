"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""
import json

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import make_app
from flask_migrate import downgrade, upgrade

from app import queries
from app.extensions import db
from app.ledger import tallies


def test_migrations_match_the_models_and_downgrade_cleanly(tmp_path, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url)  # upgraded to head
    with app.app_context():
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(
                conn, opts={'include_name': tallies.modelled}), db.metadata)
        assert diff == []
        downgrade(revision='base')
        with db.engine.connect() as conn:
            assert set(db.inspect(conn).get_table_names()) == {'alembic_version'}
        upgrade()
        with db.engine.connect() as conn:
            assert {'job', 'attempt', 'attempt_log', 'worker'} <= set(db.inspect(conn).get_table_names())
        db.engine.dispose()


def test_json_stored_with_ascii_escapes_is_rewritten_as_utf8_text(tmp_path, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    with app.app_context():
        downgrade(revision='0003')
        postgres = db.engine.dialect.name == 'postgresql'
        cast = 'CAST({} AS json)' if postgres else '{}'
        rows = [{'id': f'job-{n:05d}', 'params': json.dumps({'message': f'caf\u00e9 \u2615 {n}'}),
                 'result': json.dumps({'r': '\ud800'}) if n % 2 else None} for n in range(1200)]
        if not postgres:
            rows.append({'id': 'job-bad', 'params': '{not json', 'result': 'NaN'})
        with db.engine.begin() as conn:
            conn.execute(sa.text(
                'INSERT INTO job (id, task, queue, params, result, state, priority, attempts, '
                'attempt_base, retries, retry_delay, created_at, updated_at, version) VALUES '
                f"(:id, 'fail', 'default', {cast.format(':params')}, {cast.format(':result')}, "
                "'failed', 0, 1, 0, 0, 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00', 1)"), rows)
            conn.execute(sa.text(
                'INSERT INTO worker (id, host, pid, queues, concurrency, started_at, last_seen, '
                f"processed, failed, current, leader) VALUES ('h:1', 'h', 1, "
                f"{cast.format(':queues')}, 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00', "
                f"0, 0, {cast.format(':current')}, false)"),
                {'queues': json.dumps(['d\u00e9faut']), 'current': '[]'})
        upgrade()
        with db.engine.connect() as conn:
            stored = dict(conn.execute(sa.text(
                'SELECT id, CAST(params AS TEXT) FROM job')).all())
            results = dict(conn.execute(sa.text(
                'SELECT id, CAST(result AS TEXT) FROM job WHERE result IS NOT NULL')).all())
            queues = conn.execute(sa.text('SELECT CAST(queues AS TEXT) FROM worker')).scalar()
        assert stored['job-00000'] == '{"message": "café ☕ 0"}'
        assert stored['job-01199'] == '{"message": "café ☕ 1199"}'  # past the first batch
        assert results['job-00001'] == '{"r": "\\\\ud800"}'  # storable, shown escaped
        assert 'job-00000' not in results
        assert queues == '["défaut"]'
        if not postgres:
            assert (stored['job-bad'], results['job-bad']) == ('{not json', 'NaN')  # left as they were
        assert len(app.test_client().get('/api/jobs?q=café&limit=500').get_json()['jobs']) == 500
        db.engine.dispose()


def test_secret_values_recorded_before_move_out_of_the_shown_params(tmp_path, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    with app.app_context():
        downgrade(revision='0005')
        postgres = db.engine.dialect.name == 'postgresql'
        cast = 'CAST({} AS json)' if postgres else '{}'
        rows = [{'id': f'job-{n:04d}', 'task': task, 'params': json.dumps(params)}
                for n, (task, params) in enumerate(
                    [('payment', {'card': '4111 1111 1111 1234', 'amount': 5.0})] * 600
                    + [('payment', {'card': '123', 'amount': 1.0}),
                       ('fail', {'message': '4111 1111 1111 1234'})])]
        with db.engine.begin() as conn:
            conn.execute(sa.text(
                'INSERT INTO job (id, task, queue, params, state, priority, attempts, '
                'attempt_base, retries, retry_delay, created_at, updated_at, version) VALUES '
                f"(:id, :task, 'default', {cast.format(':params')}, 'failed', 0, 1, 0, 0, 0, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00', 1)"), rows)
        upgrade()
        read = 'SELECT id, CAST(params AS TEXT), CAST(secret_params AS TEXT) FROM job'
        with db.engine.connect() as conn:
            stored = {i: (json.loads(p), s and json.loads(s))
                      for i, p, s in conn.execute(sa.text(read))}
        assert stored['job-0000'] == ({'card': '**** 1234', 'amount': 5.0},
                                      {'card': '4111 1111 1111 1234'})
        assert stored['job-0599'][0]['card'] == '**** 1234'  # past the first batch
        assert stored['job-0600'] == ({'card': '****', 'amount': 1.0}, {'card': '123'})
        assert stored['job-0601'] == ({'message': '4111 1111 1111 1234'}, None)  # not secret
        downgrade(revision='0005')
        with db.engine.connect() as conn:
            params = dict(conn.execute(sa.text('SELECT id, CAST(params AS TEXT) FROM job')).all())
        assert json.loads(params['job-0000'])['card'] == '4111 1111 1111 1234'
        assert json.loads(params['job-0600'])['card'] == '123'
        db.engine.dispose()


def test_run_times_are_filled_from_the_attempts_already_recorded(tmp_path, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    with app.app_context():
        downgrade(revision='0010')
        params = 'CAST(:params AS json)' if db.engine.dialect.name == 'postgresql' else ':params'
        # (job, state, attempts as (outcome, ended, duration)): a job that
        # ran twice, one canceled while it waited for a retry, one whose
        # second attempt still runs, one that never ran.
        jobs_ = [('ran-twice', 'succeeded', [('failed', True, 4.0), ('succeeded', True, 0.5)]),
                 ('canceled', 'canceled', [('failed', True, 1.25)]),
                 ('running', 'running', [('failed', True, 2.0), ('running', False, None)]),
                 ('never-ran', 'canceled', [])]
        with db.engine.begin() as conn:
            for job_id, state, attempts in jobs_:
                conn.execute(sa.text(
                    'INSERT INTO job (id, task, queue, params, state, priority, attempts, '
                    'attempt_base, retries, retry_delay, created_at, started_at, finished_at, '
                    f"updated_at, version) VALUES (:id, 'noop', 'default', {params}, :state, 0, "
                    ":n, 0, 3, 0, '2026-01-01 00:00:00', :started, :finished, "
                    "'2026-01-01 00:00:00', 1)"),
                    {'id': job_id, 'params': '{}', 'state': state, 'n': len(attempts),
                     'started': '2026-01-01 00:00:01' if attempts else None,
                     'finished': None if state == 'running' else '2026-01-01 00:05:00'})
                for number, (outcome, ended, duration) in enumerate(attempts, 1):
                    conn.execute(sa.text(
                        'INSERT INTO attempt (job_id, number, outcome, started_at, finished_at, '
                        "duration) VALUES (:id, :n, :outcome, '2026-01-01 00:00:01', :end, :d)"),
                        {'id': job_id, 'n': number, 'outcome': outcome, 'd': duration,
                         'end': '2026-01-01 00:00:05' if ended else None})
        upgrade()
        with db.engine.connect() as conn:
            run = dict(conn.execute(sa.text('SELECT id, run_seconds FROM job')).all())
        assert run == {'ran-twice': 0.5, 'canceled': 1.25, 'running': 2.0, 'never-ran': None}
        # The run-time order lists the finished ones by it, through its index.
        with app.test_request_context():
            listed = [j.id for j in queries.list_jobs(sort='runtime')[0]]
            db.session.remove()  # its read ends before the schema changes
        assert listed == ['canceled', 'ran-twice']
        downgrade(revision='0010')
        with db.engine.connect() as conn:
            assert 'run_seconds' not in {c['name'] for c in db.inspect(conn).get_columns('job')}
            assert conn.execute(sa.text('SELECT count(*) FROM job')).scalar() == 4
        db.engine.dispose()

"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import make_app
from flask_migrate import downgrade, upgrade

from app.extensions import db


def test_migrations_match_the_models_and_downgrade_cleanly(tmp_path, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url)  # upgraded to head
    with app.app_context():
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
        assert diff == []
        downgrade(revision='base')
        with db.engine.connect() as conn:
            assert set(db.inspect(conn).get_table_names()) == {'alembic_version'}
        upgrade()
        with db.engine.connect() as conn:
            assert {'job', 'attempt', 'attempt_log', 'worker'} <= set(db.inspect(conn).get_table_names())
        db.engine.dispose()

"""The extensions: one naming convention for every constraint, and ``db`` and
``migrate`` created unbound, then bound to each app ``create_app`` builds."""
import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import make_app
from helpers import ROOT

from app import models
from app.extensions import db, migrate


@pytest.fixture
def ledger_app(tmp_path, ledger_url):
    app = make_app(tmp_path, DATABASE_URL=ledger_url)
    with app.app_context():
        yield app
        db.session.remove()
        db.engine.dispose()


def scratch_tables(metadata):
    """Two tables with one constraint or index of each kind the convention names."""
    parent = sa.Table('scratch_parent', metadata, sa.Column('id', sa.Integer, primary_key=True))
    child = sa.Table(
        'scratch', metadata,
        sa.Column('id', sa.Integer, primary_key=True),
        sa.Column('slug', sa.String(20), unique=True),
        sa.Column('kind', sa.String(20), index=True),
        sa.Column('n', sa.Integer),
        sa.Column('parent_id', sa.ForeignKey('scratch_parent.id')),
        sa.CheckConstraint('n > 0', name='positive'))
    return parent, child


def test_the_convention_names_each_kind_of_constraint_and_index():
    _, child = scratch_tables(sa.MetaData(naming_convention=db.metadata.naming_convention))
    names = {type(c).__name__: c.name for c in child.constraints}
    assert names == {'PrimaryKeyConstraint': 'pk_scratch', 'UniqueConstraint': 'uq_scratch_slug',
                     'CheckConstraint': 'ck_scratch_positive',
                     'ForeignKeyConstraint': 'fk_scratch_parent_id_scratch_parent'}
    assert [i.name for i in child.indexes] == ['ix_scratch_kind']


def test_the_named_constraints_come_back_by_name_from_the_database(ledger_app):
    metadata = sa.MetaData(naming_convention=db.metadata.naming_convention)
    scratch_tables(metadata)
    metadata.create_all(db.engine)
    try:
        inspector = sa.inspect(db.engine)
        assert inspector.get_pk_constraint('scratch')['name'] == 'pk_scratch'
        assert [u['name'] for u in inspector.get_unique_constraints('scratch')] == ['uq_scratch_slug']
        assert [c['name'] for c in inspector.get_check_constraints('scratch')] == ['ck_scratch_positive']
        assert [f['name'] for f in inspector.get_foreign_keys('scratch')] == [
            'fk_scratch_parent_id_scratch_parent']
        # PostgreSQL also lists the index behind the unique constraint
        assert [i['name'] for i in inspector.get_indexes('scratch')
                if not i.get('duplicates_constraint')] == ['ix_scratch_kind']
    finally:
        metadata.drop_all(db.engine)


def test_the_models_use_the_conventions_metadata():
    assert models.Job.metadata is db.metadata
    assert models.Job.__table__.primary_key.name == 'pk_job'
    fk, = models.Attempt.__table__.foreign_key_constraints
    assert fk.name == 'fk_attempt_job_id_job'


def test_the_migrated_ledger_has_every_key_named_by_the_convention(ledger_app):
    inspector = sa.inspect(db.engine)
    found = set()
    for table in db.metadata.sorted_tables:
        pk = inspector.get_pk_constraint(table.name)['name']
        fks = {f['name'] for f in inspector.get_foreign_keys(table.name)}
        if db.engine.dialect.name == 'sqlite' and table.kwargs.get('sqlite_autoincrement'):
            # SQLite's AUTOINCREMENT takes an inline, unnamed primary key
            assert pk is None, table.name
            pk = f'pk_{table.name}'
        assert pk == f'pk_{table.name}'
        assert fks == {f'fk_{table.name}_{fk.column_keys[0]}_{fk.referred_table.name}'
                       for fk in table.foreign_key_constraints}
        found |= {pk, *fks}
    assert {'pk_job', 'pk_attempt', 'pk_control', 'fk_attempt_job_id_job',
            'fk_attempt_log_job_id_job', 'fk_job_event_job_id_job'} <= found


def test_db_is_unbound_outside_an_app_and_each_app_has_its_own_database(tmp_path):
    with pytest.raises(RuntimeError, match='application context'):
        db.session.execute(sa.text('SELECT 1'))
    first = make_app(tmp_path / 'first')
    second = make_app(tmp_path / 'second')
    try:
        assert first.extensions['sqlalchemy'] is second.extensions['sqlalchemy'] is db
        with first.app_context():
            assert db.engine.url.database == str(tmp_path / 'first' / 'ledger.db')
            db.session.add(models.Control(key='only-here', value={'n': 1}))
            db.session.commit()
        with second.app_context():
            assert db.engine.url.database == str(tmp_path / 'second' / 'ledger.db')
            assert db.session.get(models.Control, 'only-here') is None
        with first.app_context():
            assert db.session.get(models.Control, 'only-here').value == {'n': 1}
    finally:
        for app in (first, second):
            with app.app_context():
                db.session.remove()
                db.engine.dispose()


def test_migrate_is_bound_to_the_project_migrations_and_make_app_reaches_their_head(ledger_app):
    state = ledger_app.extensions['migrate']
    assert state.migrate is migrate and state.db is db
    assert state.directory == str(ROOT / 'migrations')
    head = ScriptDirectory.from_config(migrate.get_config()).get_current_head()
    with db.engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    assert head is not None and current == head

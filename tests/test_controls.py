"""Switches kept in the ledger: paused queues and periodic tasks, the broker's marks."""
from app import controls
from app.extensions import db


def test_values_are_stored_updated_and_found_by_prefix(ctx):
    assert controls.get('k', 'default') == 'default'
    controls.put('k', {'a': 1})
    controls.put('k', {'a': 2})
    controls.add('n', 2)
    controls.add('n', 3)
    db.session.commit()
    assert controls.get('k') == {'a': 2} and controls.get('n') == 5
    assert controls.matching('k') == {'k': {'a': 2}}


def test_a_prefix_with_like_wildcards_matches_only_itself(ctx):
    controls.put('queue.paused:a_b', True)
    controls.put('queue.paused:axb', True)
    db.session.commit()
    assert set(controls.matching('queue.paused:a_')) == {'queue.paused:a_b'}


def test_paused_names_are_those_switched_on(ctx):
    controls.put(controls.QUEUE_PAUSED.format('reports'), True)
    controls.put(controls.QUEUE_PAUSED.format('default'), False)
    controls.put(controls.PERIODIC_PAUSED.format('purge'), True)
    db.session.commit()
    assert controls.paused_queues() == {'reports'}
    assert controls.paused_periodic() == {'purge'}

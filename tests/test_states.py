"""Which operator actions each job state allows."""
import pytest

from app import states


@pytest.mark.parametrize('state, allowed', [
    ('queued', {'cancel'}),
    ('scheduled', {'cancel', 'run_now'}),
    ('running', {'cancel'}),
    ('retrying', {'cancel', 'run_now'}),
    ('succeeded', {'delete'}),
    ('failed', {'retry', 'delete'}),
    ('canceled', {'retry', 'delete'}),
])
def test_actions_by_state(state, allowed):
    actions = ('retry', 'cancel', 'delete', 'run_now')
    assert {a for a in actions if states.allows(state, a)} == allowed


def test_conflict_explains_what_is_allowed():
    with pytest.raises(states.StateConflict) as info:
        states.check('succeeded', 'cancel')
    assert str(info.value) == ('cannot cancel a succeeded job; only queued, scheduled, running, '
                               'retrying jobs can be canceled')
    assert info.value.state == 'succeeded'


def test_a_finished_job_is_never_waiting():
    assert not states.FINISHED & states.WAITING
    assert set(states.JOB_STATES) == states.FINISHED | states.WAITING | {states.RUNNING}

"""Which operator actions each job state allows."""
import pytest

from app import states


@pytest.mark.parametrize('state, allowed', [
    ('queued', {'cancel'}),
    ('scheduled', {'cancel'}),
    ('running', set()),
    ('retrying', {'cancel'}),
    ('succeeded', {'delete'}),
    ('failed', {'retry', 'delete'}),
    ('canceled', {'retry', 'delete'}),
])
def test_actions_by_state(state, allowed):
    assert {a for a in ('retry', 'cancel', 'delete') if states.allows(state, a)} == allowed


def test_conflict_explains_what_is_allowed():
    with pytest.raises(states.StateConflict) as info:
        states.check('running', 'cancel')
    assert str(info.value) == ('cannot cancel a running job; only queued, scheduled, retrying '
                               'jobs can be canceled')
    assert info.value.state == 'running'


def test_a_finished_job_is_never_waiting():
    assert not states.FINISHED & states.WAITING
    assert set(states.JOB_STATES) == states.FINISHED | states.WAITING | {states.RUNNING}

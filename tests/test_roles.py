"""Roles: ordered, each allowed what the one below may do, refusals that say who may."""
import pytest

from app import roles


def test_each_role_may_what_the_one_below_may_and_more():
    for action, (lowest, _phrase) in roles.ACTIONS.items():
        allowed = [r for r in roles.ROLES if roles.may(r, action)]
        assert allowed == list(roles.ROLES[roles.ROLES.index(lowest):]), action
    assert roles.may('viewer', 'view') and not roles.may('viewer', 'retry')
    assert roles.may('operator', 'retry') and not roles.may('operator', 'delete')
    assert roles.may('admin', 'delete') and roles.may('admin', 'users')
    assert not roles.may(None, 'view') and not roles.may('root', 'view')


def test_a_refusal_names_who_may_and_who_asked():
    assert roles.refusal('viewer', 'retry') == \
        'only operators and admins may retry jobs; you are a viewer'
    assert roles.refusal('operator', 'delete') == 'only admins may delete jobs; you are an operator'
    assert roles.refusal(None, 'submit').endswith('; log in first')


def test_an_unknown_role_or_action_is_an_error():
    assert roles.check('admin') == 'admin'
    with pytest.raises(roles.UnknownRole, match='viewer, operator, admin'):
        roles.check('root')
    with pytest.raises(KeyError):
        roles.may('admin', 'launch-missiles')

"""Alert rules: parsed once at start, every bad rule refused by its position and name."""
import json

import pytest

from app import config, create_app, rules
from app.rules import Rule, RuleError

QUEUES = ['default', 'reports']


def test_each_kind_parses_with_its_defaults_and_a_name_of_its_own():
    parsed = rules.parse(json.dumps([
        {'name': 'payments failing', 'kind': 'failure_rate', 'task': 'payment', 'percent': 20,
         'minutes': 5},
        {'kind': 'failure_rate', 'queue': 'reports', 'percent': 50.5, 'minutes': 15,
         'min_jobs': 3},
        {'kind': 'depth', 'queue': 'default', 'above': 1000},
        {'kind': 'oldest_waiting', 'seconds': 300},
        {'kind': 'no_consumer', 'queue': 'reports'},
    ]), QUEUES)
    assert parsed == (
        Rule('payments failing', 'failure_rate', 20.0, None, 'payment', 5, 10),
        Rule('failure_rate reports', 'failure_rate', 50.5, 'reports', None, 15, 3),
        Rule('depth default', 'depth', 1000.0, 'default'),
        Rule('oldest_waiting', 'oldest_waiting', 300.0),
        Rule('no_consumer reports', 'no_consumer', 0.0, 'reports'),
    )
    assert [r.scope for r in parsed] == ['task', 'queue', 'queue', 'queue', 'queue']
    assert parsed[0].subjects(QUEUES) == ['payment']
    assert parsed[2].subjects(QUEUES) == ['default']
    assert parsed[3].subjects(QUEUES) == QUEUES  # no queue: every queue, each on its own


@pytest.mark.parametrize('raw', [None, '', '  ', '[]', []])
def test_no_rules_is_an_empty_tuple(raw):
    assert rules.parse(raw, QUEUES) == ()


def test_parsed_rules_pass_through_unchanged():
    parsed = rules.parse('[{"kind": "depth", "above": 1}]', QUEUES)
    assert rules.parse(parsed, QUEUES) == parsed


@pytest.mark.parametrize('raw, message', [
    ('{not json', 'not JSON'),
    ('{"kind": "depth"}', 'must be a JSON array of rules'),
    ('["depth"]', 'rule 1: must be a JSON object'),
    ('[{"kind": "depth", "above": 1}, {"kind": "load", "above": 1}]',
     'rule 2: kind must be one of failure_rate, depth, oldest_waiting, no_consumer'),
    ('[{"name": "x", "kind": "depth", "above": 1, "percent": 3}]',
     "rule 1 \\('x'\\): unknown key 'percent' for kind depth"),
    ('[{"kind": "failure_rate", "percent": 10}]', 'rule 1: minutes is required for kind failure_rate'),
    ('[{"kind": "depth"}]', 'rule 1: above is required for kind depth'),
    ('[{"kind": "depth", "above": "100"}]', 'rule 1: above must be a number'),
    ('[{"kind": "depth", "above": true}]', 'rule 1: above must be a number'),
    ('[{"kind": "depth", "above": -1}]', 'rule 1: above must be between 0 and'),
    ('[{"kind": "failure_rate", "percent": 101, "minutes": 5}]',
     'rule 1: percent must be between 0 and 100'),
    ('[{"kind": "failure_rate", "percent": 10, "minutes": 0}]',
     'rule 1: minutes must be between 1 and 1440'),
    ('[{"kind": "failure_rate", "percent": 10, "minutes": 2.5}]',
     'rule 1: minutes must be a whole number'),
    ('[{"kind": "failure_rate", "percent": 10, "minutes": 5, "min_jobs": 0}]',
     'rule 1: min_jobs must be between 1 and'),
    ('[{"kind": "depth", "above": 1, "queue": "nightly"}]',
     "rule 1: queue 'nightly' is not one of QUEUES \\(default, reports\\)"),
    ('[{"kind": "failure_rate", "percent": 1, "minutes": 1, "queue": "default", "task": "x"}]',
     'rule 1: give queue or task, not both'),
    ('[{"kind": "depth", "above": 1, "name": ""}]', "rule 1 \\(''\\): name must be a non-empty string"),
    ('[{"kind": "depth", "above": 1, "name": "a\\nb"}]', 'name must be at most 100 printable'),
    ('[{"kind": "depth", "above": 1}, {"kind": "depth", "above": 5}]',
     "rule 2: another rule is named 'depth'; give each its own name"),
])
def test_a_bad_rule_is_refused_naming_it(raw, message):
    with pytest.raises(RuleError, match=message):
        rules.parse(raw, QUEUES)


def test_a_rule_on_an_undeclared_task_is_refused_by_name():
    parsed = rules.parse('[{"name": "typo", "kind": "failure_rate", "task": "paymnet", '
                         '"percent": 5, "minutes": 5}]', QUEUES)
    with pytest.raises(RuleError, match="rule 1 \\('typo'\\): task 'paymnet' is not a declared"):
        rules.check_tasks(parsed, {'payment', 'noop'})
    assert rules.check_tasks(parsed, {'paymnet'}) is None


def test_the_configuration_stops_on_a_bad_rule_and_on_an_unknown_task(tmp_path):
    with pytest.raises(config.ConfigError, match='ALERT_RULES: rule 1: above is required'):
        config.load(environ={'INSTANCE_PATH': str(tmp_path),
                             'ALERT_RULES': '[{"kind": "depth"}]'})
    loaded = config.load(environ={'INSTANCE_PATH': str(tmp_path), 'QUEUES': 'reports',
                                  'ALERT_RULES': '[{"kind": "no_consumer", "queue": "reports"}]'})
    assert loaded['ALERT_RULES'] == (Rule('no_consumer reports', 'no_consumer', 0.0, 'reports'),)
    with pytest.raises(config.ConfigError, match="ALERT_RULES: rule 1 .*task 'nope'"):
        create_app({'INSTANCE_PATH': str(tmp_path), 'REDIS_URL': None, 'ALERT_RULES': [
            {'kind': 'failure_rate', 'task': 'nope', 'percent': 5, 'minutes': 5}]})


@pytest.mark.parametrize('environ, message', [
    ({'ALERT_WEBHOOK_URL': 'hooks.example.com/T000'}, 'ALERT_WEBHOOK_URL: an http:// or https:// URL'),
    ({'ALERT_INTERVAL': '0'}, 'ALERT_INTERVAL=0.0: a number of seconds above 0'),
    ({'ALERT_WEBHOOK_TIMEOUT': 'soon'}, "ALERT_WEBHOOK_TIMEOUT='soon' is not a number"),
])
def test_bad_alert_settings_are_refused_by_name(tmp_path, environ, message):
    with pytest.raises(config.ConfigError, match=message) as caught:
        config.load(environ={'INSTANCE_PATH': str(tmp_path), **environ})
    assert 'T000' not in str(caught.value)  # a webhook's URL is its secret: never echoed

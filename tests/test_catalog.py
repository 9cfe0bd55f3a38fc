"""Validation of submissions against the task declarations."""
import datetime as dt

import pytest

import huey_tasks  # noqa: F401  (declares the task types)
from app import catalog, config as config_module
from app.catalog import Param, ValidationError, validate

CONFIG = config_module.load({'QUEUES': 'default,reports', 'INSTANCE_PATH': '/nonexistent'},
                            environ={})
NOW = dt.datetime(2026, 1, 1, 12, 0, 0)


def check(data, **kw):
    return validate(data, CONFIG, now=NOW, **kw)


def fields_of(data, **kw):
    with pytest.raises(ValidationError) as info:
        check(data, **kw)
    return info.value.fields


def test_defaults_come_from_the_declaration_and_config():
    sub = check({'task': 'sleep'})
    assert sub.params == {'seconds': 5.0, 'steps': 10}
    assert (sub.queue, sub.priority, sub.eta) == ('default', 0, None)
    assert (sub.retries, sub.retry_delay) == (2, 5.0)


def test_per_job_overrides_of_retries_and_delay():
    sub = check({'task': 'fail', 'retries': 0, 'retry_delay': 0.5, 'priority': 7,
                 'queue': 'reports'})
    assert (sub.retries, sub.retry_delay, sub.priority, sub.queue) == (0, 0.5, 7, 'reports')


def test_unknown_task_lists_the_known_ones():
    fields = fields_of({'task': 'nope'})
    assert set(fields) == {'task'}
    assert 'noop' in fields['task'] and 'sleep' in fields['task']


def test_missing_task_is_required():
    assert fields_of({'params': {}}) == {'task': 'is required'}


@pytest.mark.parametrize('params, field, message', [
    ({'seconds': 'abc'}, 'params.seconds', 'must be a number'),
    ({'seconds': -1}, 'params.seconds', 'must be at least 0'),
    ({'seconds': 4000}, 'params.seconds', 'must be at most 3600'),
    ({'steps': 2.5}, 'params.steps', 'must be a whole number'),
    ({'steps': '3'}, 'params.steps', 'must be a whole number'),
    ({'steps': True}, 'params.steps', 'must be a whole number'),
    ({'steps': 0}, 'params.steps', 'must be at least 1'),
    ({'seconds': float('nan')}, 'params.seconds', 'must be a finite number'),
    ({'bogus': 1}, 'params.bogus', 'unknown parameter'),
])
def test_bad_parameter_values_are_named(params, field, message):
    assert fields_of({'task': 'sleep', 'params': params})[field] == message


def test_choices_and_string_limits():
    fields = fields_of({'task': 'payment', 'params': {'currency': 'XYZ', 'card': 'x' * 40}})
    assert fields['params.currency'].startswith('must be one of EUR')
    assert fields['params.card'] == 'must be at most 32 characters'


def test_every_bad_field_is_reported_at_once():
    fields = fields_of({'task': 'sleep', 'params': {'seconds': -5, 'steps': 0},
                        'priority': 1000, 'retries': -1, 'queue': 'nope', 'colour': 'red'})
    assert set(fields) == {'params.seconds', 'params.steps', 'priority', 'retries', 'queue',
                           'colour'}
    assert fields['colour'] == 'unknown field'
    assert fields['queue'].startswith('unknown queue; one of default, reports')


def test_params_must_be_an_object_and_body_a_dict():
    assert fields_of({'task': 'noop', 'params': [1]})['params'] == 'must be an object'
    with pytest.raises(ValidationError) as info:
        check(['noop'])
    assert info.value.fields == {'body': 'must be a JSON object'}


def test_delay_becomes_an_eta_and_excludes_eta():
    sub = check({'task': 'noop', 'delay': 90})
    assert sub.eta == NOW + dt.timedelta(seconds=90)
    assert fields_of({'task': 'noop', 'delay': 5, 'eta': '2026-01-01T13:00:00Z'}) == {
        'delay': 'give delay or eta, not both'}


def test_eta_with_offset_is_converted_to_utc_and_past_eta_runs_now():
    sub = check({'task': 'noop', 'eta': '2026-01-01T14:30:00+02:00'})
    assert sub.eta == dt.datetime(2026, 1, 1, 12, 30)
    assert check({'task': 'noop', 'eta': '2025-12-31T00:00:00Z'}).eta is None
    assert fields_of({'task': 'noop', 'eta': 'tomorrow'})['eta'].startswith('must be an ISO 8601')
    assert fields_of({'task': 'noop', 'eta': '2030-01-01T00:00:00Z'}) == {'eta': 'must be within a year'}


def test_form_values_are_strings_and_converted():
    sub = check({'task': 'sleep', 'params.seconds': '1.5', 'params.steps': '3', 'priority': '',
                 'delay': '', 'retries': '1'}, from_form=True)
    assert sub.params == {'seconds': 1.5, 'steps': 3}
    assert (sub.priority, sub.retries, sub.eta) == (0, 1, None)
    fields = fields_of({'task': 'sleep', 'params.seconds': 'soon', 'retries': 'x'}, from_form=True)
    assert fields == {'params.seconds': 'must be a number', 'retries': 'must be a whole number'}
    # ASCII digits only, as a number field writes them; signs and exponents are fine.
    sub = check({'task': 'sleep', 'params.seconds': ' +2.5e-1 ', 'params.steps': '+02',
                 'retries': '+3'}, from_form=True)
    assert (sub.params, sub.retries) == ({'seconds': 0.25, 'steps': 2}, 3)
    for odd in ('\u0663', '\uff15', '1_000', '\u00b2', '1 0', '0x10', '\u00a05', ''):
        fields = fields_of({'task': 'sleep', 'params.steps': odd or '.', 'retries': odd or '.',
                            'params.seconds': odd or 'e1'}, from_form=True)
        assert fields == {'params.seconds': 'must be a number', 'params.steps':
                          'must be a whole number', 'retries': 'must be a whole number'}, odd
    for odd in ('nan', 'infinity', '1e999'):
        assert 'params.seconds' in fields_of({'task': 'sleep', 'params.seconds': odd},
                                             from_form=True), odd


def test_an_empty_idempotency_key_is_refused_from_a_program_and_none_from_a_form():
    assert fields_of({'task': 'noop', 'idempotency_key': ''}) == {
        'idempotency_key': 'must not be empty: leave it out for no key'}
    assert check({'task': 'noop'}).idempotency_key is None
    assert check({'task': 'noop', 'idempotency_key': ' '}).idempotency_key == ' '
    assert check({'task': 'noop', 'idempotency_key': ''}, from_form=True).idempotency_key is None
    schema = catalog.submission_schema({'QUEUES': ['default']})
    assert schema['properties']['idempotency_key']['minLength'] == 1


def test_an_empty_form_field_falls_back_to_the_default():
    assert check({'task': 'sleep', 'params.seconds': ''}, from_form=True).params['seconds'] == 5.0


def test_boolean_parameters_are_strict_in_json_and_checkboxes_in_forms():
    flag = Param('flag', bool, default=False)
    assert flag.parse(True) is True
    with pytest.raises(ValueError, match='true or false'):
        flag.parse('yes')
    assert flag.parse(None, from_form=True) is False
    assert flag.parse('true', from_form=True) is True


def test_declarations_reject_reserved_names_and_bad_defaults():
    with pytest.raises(ValueError, match='reserved'):
        Param('priority', int, default=0)
    with pytest.raises(ValueError, match='at most'):
        Param('n', int, default=50, max=10)
    with pytest.raises(TypeError):
        Param('x', list)


def test_task_declarations_describe_themselves():
    described = {t['name']: t for t in (tt.to_dict(CONFIG) for tt in catalog.TASKS.values())}
    assert {'noop', 'sleep', 'flaky', 'fail', 'payment'} <= set(described)
    seconds = described['sleep']['params'][0]
    assert seconds == {'name': 'seconds', 'type': 'number', 'required': False, 'default': 5.0,
                       'min': 0, 'max': 3600, 'choices': None, 'max_length': None,
                       'help': 'Total time to sleep', 'secret': False}
    assert described['flaky']['retries'] == 2 and described['flaky']['retry_delay'] == 5.0


def test_a_secret_parameter_is_validated_then_split_into_shown_and_secret():
    sub = check({'task': 'payment', 'params': {'card': '4111 1111 1111 1111', 'amount': 5}})
    assert sub.params['card'] == '4111 1111 1111 1111'  # the task is given the real value
    shown, secret = sub.task.split(sub.params)
    assert shown['card'] == '**** 1111' and shown['amount'] == 5.0
    assert secret == {'card': '4111 1111 1111 1111'}
    assert catalog.split('sleep', {'seconds': 1}) == ({'seconds': 1}, {})
    assert catalog.split('no_such_task', {'x': 'y'}) == ({'x': 'y'}, {})


def test_a_secret_is_described_masked_and_write_only():
    card = catalog.TASKS['payment'].param('card')
    assert card.to_dict()['secret'] is True
    assert card.to_dict()['default'] == '**** 4242'
    schema = card.json_schema()
    assert (schema['writeOnly'], schema['format']) == (True, 'password')
    assert 'default' not in schema  # not even the declared default is written out


def test_an_empty_secret_form_field_takes_the_default_and_errors_do_not_echo_it():
    # The field is never filled in again, so left empty it means "the default".
    assert check({'task': 'payment', 'params.card': ''}, from_form=True).params['card'] == \
        '4242 4242 4242 4242'
    long_card = '5' * 40
    fields = fields_of({'task': 'payment', 'params': {'card': long_card}})
    assert fields == {'params.card': 'must be at most 32 characters'}


def test_only_string_parameters_can_be_secret():
    with pytest.raises(TypeError, match='only a str parameter can be secret'):
        Param('pin', int, secret=True)

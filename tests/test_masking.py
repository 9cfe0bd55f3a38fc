"""Masking secret values, and finding them in free text."""
from app.masking import Redactor, mask, redact

CARD = '4111 1111 1111 1234'


def test_a_long_value_keeps_its_last_four_characters_and_a_short_one_none():
    assert mask(CARD) == '**** 1234'
    assert mask('411111111111') == '**** 1111'  # 12 characters: a third shown
    assert mask('12345678901') == '****'
    assert mask('123') == '****'
    assert (mask(''), mask(None)) == ('', None)


def test_every_occurrence_is_masked_as_typed_as_digits_and_escaped():
    line = (f'charging {CARD}; digits 4111111111111234; '
            f"repr {CARD!r}; again {CARD}")
    masked = redact(line, [CARD])
    assert '4111' not in masked
    assert masked.count('**** 1234') == 4


def test_a_secret_containing_another_is_masked_whole():
    masked = redact('token abcdefghijkl-XYZ', ['abcdefghijkl-XYZ', 'abcdefghijkl'])
    assert masked == 'token **** -XYZ'


def test_json_like_values_are_masked_in_every_string_keys_included():
    result = {'card': CARD, CARD: [1, {'deep': f'x{CARD}x'}], 'n': 3.5, 'ok': True}
    assert Redactor([CARD]).value(result) == {
        'card': '**** 1234', '**** 1234': [1, {'deep': 'x**** 1234x'}], 'n': 3.5, 'ok': True}


def test_nothing_to_hide_changes_nothing():
    empty = Redactor([None, '', 42])
    assert not empty
    assert empty.text('4111') == '4111'
    result = {'a': 1}
    assert empty.value(result) is result
    # Too short to look for in text: a two-letter secret would mask every such pair.
    assert redact('ab ab', ['ab']) == 'ab ab'
    assert redact('cvv 123 ok', ['123']) == 'cvv **** ok'

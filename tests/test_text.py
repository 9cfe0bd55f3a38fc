"""Text every ledger can store: naming what cannot be, cleaning it, reading JSON back."""
import json
import math

from hypothesis import given, settings, strategies as st
from werkzeug.datastructures import MultiDict

from app import text


def test_problem_names_nul_and_unpaired_surrogates_only():
    assert text.problem('plain, é, 日本語, ☕, \u202eRTL\u202c, \x01') is None
    assert text.problem('a\x00b') == 'contains a NUL character'
    assert text.problem('x\ud800') == 'contains an unpaired surrogate (U+D800)'
    assert text.problem('\udfff') == 'contains an unpaired surrogate (U+DFFF)'


def test_problems_names_each_field_path_in_json():
    value = {'task': 'fail', 'params': {'message': '\ud800', 'ok': 'fine'},
             'ids': ['a', 'b\x00'], 'nested': [{'deep': '\udc00'}]}
    assert text.problems(value) == {
        'params.message': 'contains an unpaired surrogate (U+D800)',
        'ids[1]': 'contains a NUL character',
        'nested[0].deep': 'contains an unpaired surrogate (U+DC00)'}
    assert text.problems({'fine': ['é', 1, None, True, {'x': 'y'}]}) == {}


def test_problems_names_a_bad_key_by_its_escaped_text():
    assert text.problems({'params': {'\ud800': 1}}) == {
        'params.\\ud800': 'its name contains an unpaired surrogate (U+D800)'}


def test_problems_checks_every_value_of_a_repeated_form_field():
    form = MultiDict([('ids', 'a'), ('ids', 'b\x00'), ('q', 'fine')])
    assert text.problems(form) == {'ids': 'contains a NUL character'}


def test_problems_reports_nesting_past_the_limit_where_it_goes_too_deep():
    deep = value = {}
    for _ in range(40):
        value['a'] = {}
        value = value['a']
    [(path, message)] = text.problems(deep).items()
    assert path == '.'.join(['a'] * text.MAX_DEPTH)
    assert message == f'is nested more than {text.MAX_DEPTH} levels deep'


def _nested(levels, leaf):
    """``leaf`` inside ``levels`` containers, lists and objects in turn."""
    value = leaf
    for n in range(levels):
        value = {'a': value} if n % 2 else [value]
    return value


# Decoded JSON, with the characters no ledger stores among its strings and keys.
_ODD_TEXT = st.text(st.sampled_from(['a', 'é', '\x00', '\ud800', '\udc00', '\\', 'u']),
                    max_size=6)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | _ODD_TEXT,
                     lambda children: st.lists(children, max_size=3)
                     | st.dictionaries(_ODD_TEXT, children, max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(value=_JSON, ascii_only=st.booleans(), depth=st.integers(0, 40))
def test_json_problems_agree_with_problems_of_what_was_decoded(value, ascii_only, depth):
    # As a request's body holds it: escaped or raw, except what UTF-8 cannot
    # carry (a surrogate, which only its escape can), nested to any depth.
    value = _nested(depth, value)
    body = json.dumps(value, ensure_ascii=ascii_only)
    try:
        body.encode('utf-8')
    except UnicodeEncodeError:
        body = json.dumps(value)
    decoded = json.loads(body)
    assert text.json_problems(body, decoded) == text.problems(decoded)


def test_json_problems_look_only_at_nesting_when_the_body_escapes_nothing_unstorable():
    assert text.json_problems('{"a": "\\\\u0000"}', {'a': '\\u0000'}) == {}
    deep = _nested(40, 1)
    body = json.dumps(deep)
    assert text.json_problems(body, deep) == text.problems(deep) != {}
    assert text.json_problems(json.dumps(_nested(32, 1)), _nested(32, 1)) == {}
    assert text.json_problems(json.dumps(_nested(33, 1)), _nested(33, 1)) != {}


def test_problems_names_at_most_the_limit():
    assert len(text.problems({f'k{i}': '\x00' for i in range(100)})) == text.MAX_FIELDS


def test_clean_escapes_what_cannot_be_stored_and_joins_surrogate_pairs():
    assert text.clean('é ☕') == 'é ☕'
    assert text.clean('a\x00b') == 'a\\x00b'
    assert text.clean('x\ud800y') == 'x\\ud800y'
    assert text.clean('\ud83d\ude00 \ud83d') == '😀 \\ud83d'
    text.clean('\ud800\x00').encode('utf-8')  # storable


def test_safe_str_survives_str_and_repr_that_raise():
    class Hostile(Exception):
        def __str__(self):
            raise RuntimeError('no str')

        def __repr__(self):
            raise RuntimeError('no repr')

    class OnlyRepr:
        def __str__(self):
            raise ValueError

        def __repr__(self):
            return 'OnlyRepr()'

    assert text.safe_str(Hostile()) == '<unprintable Hostile object>'
    assert text.safe_str(OnlyRepr()) == 'OnlyRepr()'
    assert text.safe_str(b'\xff') == "b'\\xff'"


def test_storable_bounds_text_and_says_it_was_cut():
    big = 'x' * 10_000_000
    short = text.storable(big, 1000)
    assert len(short) <= 1000 and short.startswith('xxx')
    assert short.endswith('… [10,000,000 characters, cut]')
    assert text.storable('fits', 1000) == 'fits'
    assert text.storable('LEVELNAMELONG', 10) == 'LEVELNAMEL'


def test_storable_can_keep_both_ends_of_a_traceback():
    tb = 'Traceback (most recent call last):\n' + 'y' * 200_000 + '\nRuntimeError: end'
    kept = text.storable(tb, 1000, keep_end=True)
    assert len(kept) <= 1000
    assert kept.startswith('Traceback (most recent call last):')
    assert kept.endswith('RuntimeError: end') and 'characters, cut' in kept


def test_storable_cleans_what_it_keeps():
    assert text.storable('\ud800' * 10, 1000) == '\\ud800' * 10
    assert len(text.storable('\ud800' * 1000, 100)) <= 100


def test_dumps_writes_utf8_text_and_storable_json():
    assert text.dumps({'message': 'é 日本語 ☕'}) == '{"message": "é 日本語 ☕"}'
    stored = text.dumps({'m': 'a\ud800b', '\udc00': 1})
    stored.encode('utf-8')
    assert json.loads(stored) == {'m': 'a\\ud800b', '\\udc00': 1}
    assert json.loads(text.dumps({'nul': '\x00'})) == {'nul': '\x00'}  # escaped by JSON


def test_dumps_stores_what_is_not_json_as_its_repr():
    assert json.loads(text.dumps({1, 2})) == {'repr': '{1, 2}'}
    assert json.loads(text.dumps(math.nan)) == {'repr': 'nan'}
    assert json.loads(text.dumps(10 ** 5000))['repr'].startswith('<unprintable int')


def test_loads_never_raises_on_what_a_ledger_holds():
    assert text.loads('{"a": "é"}') == {'a': 'é'}
    assert text.loads(b'{"a": "\xc3\xa9"}') == {'a': 'é'}
    assert text.loads('{not json') == {'unreadable': '{not json'}
    assert text.loads(b'\xff\xfe') == {'unreadable': '\ufffd\ufffd'}
    assert text.loads('{"a": "\\ud800", "b": "\\ud83d\\ude00"}') == {'a': '\\ud800', 'b': '😀'}
    assert text.loads('{"nul": "a\\u0000"}') == {'nul': 'a\\x00'}
    assert text.loads('[NaN, Infinity]') == ['NaN', 'Infinity']
    assert text.loads(42) == 42 and text.loads(None) is None
    assert text.loads('[' * 100_000) == {'unreadable': text.storable('[' * 100_000, 1000)}
    assert len(text.loads('x' * 10_000_000)['unreadable']) <= 1000


def test_decode_lossy_replaces_bytes_that_are_not_utf8():
    assert text.decode_lossy(b'ok \xc3\xa9 \xff') == 'ok é \ufffd'


def test_numbers_json_cannot_carry_come_back_as_strings():
    assert text.loads('{"n": 1e999, "m": -1e999, "x": 1.5, "c": NaN}') == {
        'n': '1e999', 'm': '-1e999', 'x': 1.5, 'c': 'NaN'}
    assert text.loads(float('inf')) == 'Infinity'
    assert text.finite({'a': [float('nan'), -float('inf'), (2.0,)], 'b': 'x'}) == {
        'a': ['NaN', '-Infinity', [2.0]], 'b': 'x'}

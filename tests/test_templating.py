"""The filters every template uses."""
import datetime as dt

from app import templating


def test_times_and_durations_read_as_people_write_them():
    at = dt.datetime(2026, 1, 31, 12, 5, 9, 123456)
    assert templating.format_ts(at) == '2026-01-31 12:05:09'
    assert templating.format_iso(at) == '2026-01-31T12:05:09Z'
    assert templating.format_iso_ms(at) == '2026-01-31T12:05:09.123Z'
    assert [templating.format_duration(s) for s in (None, 0.25, 12.5, 184, 3723)] == [
        '', '250 ms', '12.50 s', '3m 04s', '1h 02m 03s']
    assert templating.format_duration(float('inf')) == 'inf'


def test_percent_is_bounded_and_never_fails():
    assert [templating.percent(f) for f in (None, 0.333, 1.7, -1, float('nan'))] == [
        0, 33, 100, 0, 0]


def test_long_values_are_cut_saying_so():
    assert templating.brief('x' * 100, 10) == 'x' * 9 + '…'
    assert templating.brief({'é': 1}) == '{"é": 1}'
    clipped = templating.clip('y' * 50, 10)
    assert clipped.startswith('y' * 10) and '40 more characters' in clipped
    assert templating.pretty_json({'b': 1, 'a': '☕'}) == '{\n  "a": "☕",\n  "b": 1\n}'

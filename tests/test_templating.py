"""The filters every template uses."""
import datetime as dt
from types import SimpleNamespace

from app import templating


def test_times_and_durations_read_as_people_write_them():
    at = dt.datetime(2026, 1, 31, 12, 5, 9, 123456)
    assert templating.format_ts(at) == '2026-01-31 12:05:09'
    assert templating.format_iso(at) == '2026-01-31T12:05:09Z'
    assert templating.format_iso_ms(at) == '2026-01-31T12:05:09.123Z'
    assert [templating.format_duration(s) for s in (None, 0.25, 12.5, 184, 3723)] == [
        '', '250 ms', '12.50 s', '3m 04s', '1h 02m 03s']
    assert templating.format_duration(float('inf')) == 'inf'
    assert [templating.format_duration(s, precise=True) for s in (0.00235, 0.0024, 1.25e-5, 0.5, 12.5)] \
        == ['2.35 ms', '2.4 ms', '0.0125 ms', '500 ms', '12.50 s']


def test_percent_is_bounded_and_never_fails():
    assert [templating.percent(f) for f in (None, 0.333, 1.7, -1, float('nan'))] == [
        0, 33, 100, 0, 0]


def test_long_values_are_cut_saying_so():
    assert templating.brief('x' * 100, 10) == 'x' * 9 + '…'
    assert templating.brief({'é': 1}) == '{"é": 1}'
    clipped = templating.clip('y' * 50, 10)
    assert clipped.startswith('y' * 10) and '40 more characters' in clipped
    assert templating.pretty_json({'b': 1, 'a': '☕'}) == '{\n  "a": "☕",\n  "b": 1\n}'


def test_relative_times_read_as_people_say_them():
    now = dt.datetime(2026, 1, 31, 12, 0, 0)
    ago = {0: 'just now', 4.9: 'just now', -4: 'just now', 5: '5 s ago', 59.9: '59 s ago',
           60: '1 min ago', 3599: '59 min ago', 3600: '1 h ago', 47.9 * 3600: '47 h ago',
           48 * 3600: '2 d ago', 29.9 * 86400: '29 d ago', -5: 'in 5 s', -310: 'in 5 min',
           -7200: 'in 2 h'}
    for seconds, expected in ago.items():
        assert templating.relative(now - dt.timedelta(seconds=seconds), now) == expected, seconds
    assert templating.relative(dt.datetime(2025, 12, 1, 23, 59), now) == '2025-12-01'
    assert templating.relative(None, now) == ''


def test_a_running_clock_and_a_finished_run_time():
    assert [templating.format_elapsed(s) for s in (None, -2, 0, 59.9, 184, 3723)] == [
        '', '0 s', '0 s', '59 s', '3m 04s', '1h 02m 03s']
    start = dt.datetime(2026, 1, 31, 12, 0, 0)
    assert templating.running_for(start, start + dt.timedelta(seconds=75)) == '1m 15s'
    assert templating.running_for(None) == ''

    def job(state, finished, ran):
        return SimpleNamespace(state=state, finished_at=finished, run_seconds=ran)
    end = start + dt.timedelta(seconds=2.5)
    # The latest attempt's run time, as the writer keeps it, once the job has ended.
    assert templating.run_time(job('succeeded', end, 2.5)) == 2.5
    assert templating.run_time(job('failed', end, 0.125)) == 0.125
    # canceled while it waited for a retry: the attempt that ran before
    assert templating.run_time(job('canceled', end, 1.5)) == 1.5
    assert templating.run_time(job('canceled', end, None)) is None  # withdrawn before it ran
    assert templating.run_time(job('retrying', None, 2.5)) is None  # not ended yet

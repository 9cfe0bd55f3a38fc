"""Charts: the metric history (:func:`app.queries.metric_series`) as figures a page can draw.

Each :class:`Chart` holds what an SVG needs, already placed in its
:data:`WIDTH` x :data:`HEIGHT` view box: lines as path segments (a point
without data breaks the line, so gaps show), the points themselves with
the time range behind each, the axes' ticks and labels, and a sentence
that sums it up for screen readers. Templates draw it (``_charts.html``);
nothing here knows HTML or URLs.
"""
import datetime as dt
import math
from typing import NamedTuple

from . import queries
from .models import utcnow

WINDOWS = queries.SERIES_WINDOWS  # name -> (seconds shown, seconds per point)
DEFAULT_WINDOW = '1h'
WINDOW_LABELS = {'1h': 'last hour', '24h': 'last 24 hours', '7d': 'last 7 days'}
STEP_LABELS = {60: 'minute', 900: '15 minutes', 3600: 'hour'}
# Seconds between two labelled times on the time axis, per window.
TIME_TICKS = {'1h': 600, '24h': 4 * 3600, '7d': 86400}

# The view box, and the plot area inside it (room for the axes' labels).
WIDTH, HEIGHT = 600, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 592, 12, 172


class Point(NamedTuple):
    """One plotted point: ``x``, ``y`` in the view box, ``value`` (a count or
    seconds) and ``text`` (it as shown), the UTC range ``[since, until)`` it
    covers (naive), that range's ends as ISO 8601 (``...Z``, as the jobs list's
    filters take them) and ``when``, the range as its label shows it
    (``2026-01-31 12:00 to 12:05 UTC``). Made here, not in the template: a
    dashboard draws hundreds of points, each with a link and a label."""
    x: float
    y: float
    value: float
    text: str
    since: dt.datetime
    until: dt.datetime
    since_iso: str = ''
    until_iso: str = ''
    when: str = ''


class Line(NamedTuple):
    """One line: ``key`` (``succeeded``, ``failed``, ``p50``, ``p95``, ``depth``), its legend
    ``label``, ``segments`` (lists of points with no gap inside, each a path) and ``state``,
    the job state its points' links filter by (None: any)."""
    key: str
    label: str
    segments: list
    state: str | None

    @property
    def points(self):
        """Every point of every segment, oldest first."""
        return [p for segment in self.segments for p in segment]


class Chart(NamedTuple):
    """One chart: ``key`` (``throughput``, ``wait``, ``run``, ``depth``), ``title``, ``unit``
    (what the vertical axis counts), ``lines``, ``y_ticks`` and ``x_ticks`` (``[(position,
    label)]``) and ``summary`` (one sentence: what it shows and its highest values)."""
    key: str
    title: str
    unit: str
    lines: list
    y_ticks: list
    x_ticks: list
    summary: str

    @property
    def empty(self):
        """True when no line has a point."""
        return not any(line.segments for line in self.lines)


def window_of(value):
    """The chart window named ``value`` (None or empty: :data:`DEFAULT_WINDOW`).

    Raises :class:`~app.queries.BadQuery` (a 400) for any other value.
    """
    if not value:
        return DEFAULT_WINDOW
    if value not in WINDOWS:
        raise queries.BadQuery(f'window must be one of {", ".join(WINDOWS)}', 'window')
    return value


def bounds(window, now=None):
    """``(since, until)`` of ``window`` ending with the point that holds ``now`` (naive UTC).

    Points start on whole multiples of the window's step, so a point covers
    the same minutes on every render.
    """
    length, step = WINDOWS[window]
    now = now or utcnow()
    epoch = int(now.replace(tzinfo=dt.timezone.utc).timestamp())
    until = dt.datetime.fromtimestamp(epoch - epoch % step + step, dt.timezone.utc).replace(
        tzinfo=None)
    return until - dt.timedelta(seconds=length), until


def nice_ceiling(value):
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is ``value`` or more (1 for 0)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= value * (1 - 1e-9):
            return factor * power
    return 10 * power


def seconds_label(seconds):
    """A short label for a time: ``0``, ``250 ms``, ``1.5 s``, ``2 min``, ``1.5 h``."""
    if seconds == 0:
        return '0'
    if seconds < 1:
        return f'{seconds * 1000:.3g} ms'
    if seconds < 120:
        return f'{seconds:.3g} s'
    if seconds < 7200:
        return f'{seconds / 60:.3g} min'
    return f'{seconds / 3600:.3g} h'


def count_label(n):
    """A count as text: whole numbers without a decimal point."""
    return f'{n:.0f}' if float(n).is_integer() else f'{n:.3g}'


def _x(i, points):
    return LEFT + (i + 0.5) * (RIGHT - LEFT) / points


def _time_ticks(window, since, until):
    every = TIME_TICKS[window]
    length = (until - since).total_seconds()
    start = int(since.replace(tzinfo=dt.timezone.utc).timestamp())
    ticks = []
    t = start - start % every + (every if start % every else 0)
    while t <= start + length:
        at = dt.datetime.fromtimestamp(t, dt.timezone.utc)
        label = at.strftime('%b %d') if every >= 86400 else at.strftime('%H:%M')
        ticks.append((round(LEFT + (t - start) / length * (RIGHT - LEFT), 1), label))
        t += every
    return ticks


def _chart(key, title, unit, window, series, lines, fmt):
    """A :class:`Chart` of ``lines`` (``[(key, label, value of a point or None, state)]``)."""
    length, step = WINDOWS[window]
    values = [v for _k, _l, get, _s in lines for p in series if (v := get(p)) is not None]
    top = nice_ceiling(max(values, default=0))
    span = dt.timedelta(seconds=step)
    drawn = []
    for line_key, label, get, state in lines:
        segments, current = [], []
        for i, p in enumerate(series):
            value = get(p)
            if value is None:
                if current:
                    segments.append(current)
                current = []
                continue
            y = BOTTOM - value / top * (BOTTOM - TOP)
            since, until = p['at'], p['at'] + span
            current.append(Point(
                round(_x(i, len(series)), 1), round(y, 1), value, fmt(value), since, until,
                since.isoformat(timespec='seconds') + 'Z', until.isoformat(timespec='seconds') + 'Z',
                f'{since:%Y-%m-%d %H:%M} to {until:%H:%M} UTC'))
        if current:
            segments.append(current)
        drawn.append(Line(line_key, label, segments, state))
    y_ticks = [(round(BOTTOM - k / 4 * (BOTTOM - TOP), 1), fmt(top * k / 4)) for k in range(5)]
    since, until = series[0]['at'], series[-1]['at'] + span
    summary = [f'{title}, {unit}, over the {WINDOW_LABELS[window]}:']
    for line in drawn:
        points = line.points
        if not points:
            summary.append(f'{line.label}: no data.')
            continue
        peak = max(points, key=lambda p: p.value)
        summary.append(f'{line.label}: highest {fmt(peak.value)} at '
                       f'{peak.since:%Y-%m-%d %H:%M} UTC, latest {fmt(points[-1].value)}.')
    return Chart(key, title, unit, drawn, y_ticks, _time_ticks(window, since, until),
                 ' '.join(summary))


def series(window, queue=None, task=None, now=None):
    """The metric history :func:`charts` draws for ``window``, ``queue`` and ``task`` (None:
    all), ending with the point that holds ``now``: :func:`app.queries.metric_series`'s
    list. Raises :class:`~app.queries.BadQuery` for a bad window."""
    window = window_of(window)
    since, until = bounds(window, now)
    return queries.metric_series(since, until, WINDOWS[window][1], queue=queue, task=task)


def charts(window, queue=None, task=None, now=None, points=None):
    """The charts of ``window`` (a key of :data:`WINDOWS`) for ``queue`` and ``task`` (None: all).

    ``[Chart]``: throughput (jobs succeeded and failed per point), wait time
    and run time (p50 and p95 of the attempts that ended in each point,
    seconds) and, without ``task`` (depth is kept per queue), queue depth
    (the most jobs waiting in the broker sampled in each point). Draws
    ``points`` (what :func:`series` returned for the same window, queue and
    task) or else reads the metric history once. Raises
    :class:`~app.queries.BadQuery` for a bad window.
    """
    window = window_of(window)
    length, step = WINDOWS[window]
    history = points if points is not None else series(window, queue, task, now)
    per = f'jobs per {STEP_LABELS[step]}'
    found = [
        _chart('throughput', 'Throughput', per, window, history, [
            ('succeeded', 'succeeded', lambda p: p['finished']['succeeded'], 'succeeded'),
            ('failed', 'failed', lambda p: p['finished']['failed'], 'failed')], count_label),
        _chart('wait', 'Wait time', 'seconds from enqueue to start', window, history, [
            ('p50', 'p50', lambda p: p['wait_p50'], None),
            ('p95', 'p95', lambda p: p['wait_p95'], None)], seconds_label),
        _chart('run', 'Run time', 'seconds per attempt', window, history, [
            ('p50', 'p50', lambda p: p['run_p50'], None),
            ('p95', 'p95', lambda p: p['run_p95'], None)], seconds_label),
    ]
    if not task:
        found.append(_chart('depth', 'Queue depth', 'jobs waiting in the broker', window, history, [
            ('depth', 'depth', lambda p: p['depth'], None)], count_label))
    return found

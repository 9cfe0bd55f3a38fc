"""What every template can use: the filters and globals the pages, fragments and sockets share.

Registered on the app by :func:`register` (``create_app``), so a fragment
renders the same wherever it is rendered.
"""
import json
import logging
import math

from flask import render_template, url_for

from . import endings, text, tracebacks
from .models import isoformat, utcnow

logger = logging.getLogger(__name__)


def format_ts(value):
    """A naive UTC datetime as ``YYYY-MM-DD HH:MM:SS`` ('' for None)."""
    return '' if value is None else value.strftime('%Y-%m-%d %H:%M:%S')


def format_iso(value):
    """A naive UTC datetime as ISO 8601 to the second, with ``Z`` ('' for None)."""
    return '' if value is None else value.isoformat(timespec='seconds') + 'Z'


def format_iso_ms(value):
    """As :func:`format_iso`, to the millisecond."""
    # Millisecond precision, as in the JSON API (the benchmark reads it).
    return isoformat(value) or ''


def format_duration(seconds, precise=False):
    """Seconds as ``850 ms``, ``12.50 s``, ``3m 04s`` or ``1h 02m 03s`` ('' for None).

    ``precise``: under a second, three significant digits (``2.35 ms``,
    ``0.0123 ms``), where whole milliseconds would read the same for
    different times (how far a run-time search has looked).
    """
    if seconds is None:
        return ''
    if not math.isfinite(seconds):
        return str(seconds)  # a row no application path writes: shown as it is
    if seconds < 1:
        return f'{seconds * 1000:.3g} ms' if precise else f'{seconds * 1000:.0f} ms'
    if seconds < 120:
        return f'{seconds:.2f} s'
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h {minutes:02d}m {secs:02d}s' if hours else f'{minutes}m {secs:02d}s'


# -- relative times (static/times.js computes the same on the page) --------

# (below this many seconds, unit in seconds, label): the first that fits.
_UNITS = ((60, 1, 's'), (3600, 60, 'min'), (48 * 3600, 3600, 'h'), (30 * 86400, 86400, 'd'))
JUST_NOW = 5  # seconds either way that read as "just now"


def relative(value, now=None):
    """A naive UTC datetime relative to ``now`` (default: this moment): ``3 min ago``.

    ``just now`` within :data:`JUST_NOW` seconds either way; then whole
    seconds (``12 s ago``), minutes (``in 5 min``), hours (up to 47) and days
    (up to 29), always rounded down; further away, the date (``2026-01-31``).
    '' for None. static/times.js writes the same text in the browser.
    """
    if value is None:
        return ''
    seconds = ((now or utcnow()) - value).total_seconds()
    distance = abs(seconds)
    if distance < JUST_NOW:
        return 'just now'
    for below, unit, label in _UNITS:
        if distance < below:
            amount = f'{int(distance // unit)} {label}'
            return f'{amount} ago' if seconds > 0 else f'in {amount}'
    return value.strftime('%Y-%m-%d')


def format_elapsed(seconds):
    """Whole seconds as a running clock: ``42 s``, ``3m 04s``, ``1h 02m 03s`` ('' for None).

    A negative value (a clock a little behind another host's) reads ``0 s``.
    """
    if seconds is None or not math.isfinite(seconds):
        return ''
    total = max(int(seconds), 0)
    if total < 60:
        return f'{total} s'
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h {minutes:02d}m {secs:02d}s' if hours else f'{minutes}m {secs:02d}s'


def running_for(since, now=None):
    """How long since the naive UTC datetime ``since``, as :func:`format_elapsed` writes it."""
    if since is None:
        return ''
    return format_elapsed(((now or utcnow()) - since).total_seconds())


def run_time(job):
    """Seconds the latest attempt of a finished ``job`` ran (``job.run_seconds``), or None.

    None for a job not finished, or whose attempts never ran (canceled
    while queued). A running job's time is :func:`running_for` its
    ``started_at``. The jobs list's run-time order sorts by the same value.
    """
    if job.finished_at is None:
        return None
    return job.run_seconds


def percent(fraction):
    """A progress fraction as a whole percentage from 0 to 100 (0 for none or not a number)."""
    if fraction is None or not math.isfinite(fraction):
        return 0
    return round(min(max(fraction, 0.0), 1.0) * 100)


def pretty_json(value):
    """A JSON value indented for a ``<pre>``, keys sorted, text as typed."""
    # A plain str, so Jinja's autoescaping shows markup in values as text.
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def brief(value, width=60):
    """A value as one line of at most ``width`` characters, cut with an ellipsis."""
    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= width else shown[:width - 1] + '…'


def clip(value, limit=64 * 1024):
    """Long text cut for a page, saying how much is left out (the API has all of it)."""
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + f'\n… [{len(value) - limit:,} more characters: see the API]'


def isolated(dom_id=None, job_id=None, what='This row', tag='tr', colspan=1, caller=None):
    """The ``{% call %}`` body, or a placeholder if it cannot be rendered: a bad row costs only itself.

    Every fragment row that shows a ledger row renders through this, so pages,
    fragment GETs and the live socket all survive a row that raises or whose
    text cannot be sent (a lone surrogate fails only when the page is encoded,
    so the body is tried as UTF-8 here). The placeholder is a ``tag`` with
    the same ``dom_id`` (live swaps still find it) and a link to ``job_id``;
    the error goes to the log.
    """
    try:
        html = caller()
        html.encode('utf-8')
        return html
    except Exception:
        logger.exception('%s (%s) could not be rendered; showing a placeholder', what, dom_id)
        job_id = _shown(job_id)
        try:
            href = job_id and url_for('pages.job_page', job_id=job_id)
        except Exception:
            href = None
        return render_template('_unreadable.html', dom_id=_shown(dom_id), job_id=job_id,
                               href=href, what=what, tag=tag, colspan=colspan)


def _shown(value):
    return None if value is None else text.clean(text.safe_str(value))[:200]


FILTERS = {'ts': format_ts, 'iso': format_iso, 'iso_ms': format_iso_ms,
           'duration': format_duration, 'percent': percent, 'pretty_json': pretty_json,
           'brief': brief, 'clip': clip,
           'relative': relative, 'running_for': running_for, 'run_time': run_time,
           'job_ending': endings.of_job, 'attempt_ending': endings.of_attempt,
           'parse_traceback': tracebacks.parse}
GLOBALS = {'isolated': isolated}


def register(app):
    """Give ``app``'s templates :data:`FILTERS` and :data:`GLOBALS`."""
    for name, function in FILTERS.items():
        app.add_template_filter(function, name)
    for name, function in GLOBALS.items():
        app.add_template_global(function, name)

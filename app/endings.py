"""How the end of an attempt or a job reads to an operator.

The ledger stores what ended an attempt as the exception's type and message
(``app.task_api.Canceled`` / ``canceled by an operator at 40%``,
``huey.exceptions.TaskTimeout`` / ``timeout 2.0s``, the reaper's
``WorkerLost`` / why). Those are names of our code and Huey's, not words for
an operator: :func:`of_attempt` and :func:`of_job` say the same in words
(``Canceled by an operator at 40%``, ``Timed out after 2 s``, ``Its consumer
stopped while running it (lost): …``) and keep the stored text beside them
for a tooltip. An error the task itself raised reads as it was stored: its
type is the task author's own word. The JSON API is not changed by this.
"""
import re
from typing import NamedTuple

CANCELED = 'canceled'
TIMEOUT = 'timeout'
LOST = 'lost'
INTERRUPTED = 'interrupted'
ERROR = 'error'

# Error types as the ledger stores them (module.Name; app.ledger.recorder).
CANCEL_TYPES = frozenset({'app.task_api.Canceled', 'huey.exceptions.CancelExecution'})
TIMEOUT_TYPES = frozenset({'huey.exceptions.TaskTimeout'})
LOST_TYPES = frozenset({'WorkerLost'})

# Huey's TaskTimeout says "timeout 2.0s" or "timeout (2.0s)".
_SECONDS = re.compile(r'(\d+(?:\.\d+)?)\s*s\b')


class Ending(NamedTuple):
    """What ended it, for a page: ``text`` to show, ``raw`` (the stored
    ``Type: message``, for a tooltip or the folded details) and ``kind``: one
    of ``canceled``, ``timeout``, ``lost``, ``interrupted`` or ``error``."""
    text: str
    raw: str
    kind: str

    @property
    def reworded(self):
        """True when :attr:`text` is not the stored text (so the page offers ``raw``)."""
        return self.text != self.raw


def _seconds(value):
    return f'{value:g} s'


def _sentence(message):
    return message[:1].upper() + message[1:]


def explain(error_type, message, outcome=None, timeout=None):
    """The :class:`Ending` of an error stored as ``error_type`` and ``message``.

    ``outcome`` is the attempt's outcome when known (``interrupted`` is told
    by it: its error is a plain ``RuntimeError``); ``timeout`` the job's
    timeout in seconds, used when a timeout's message names none. Returns
    None when there is no error (``error_type`` empty). Never raises.
    """
    if not error_type:
        return None
    message = message or ''
    raw = f'{error_type}: {message}' if message else error_type
    if error_type in CANCEL_TYPES or outcome == CANCELED:
        return Ending(_sentence(message) if message.startswith('canceled')
                      else 'Canceled' + (f': {message}' if message else ''),
                      raw, CANCELED)
    if error_type in TIMEOUT_TYPES or outcome == TIMEOUT:
        found = _SECONDS.search(message)
        limit = float(found.group(1)) if found else timeout
        return Ending(f'Timed out after {_seconds(limit)}' if limit else 'Timed out', raw, TIMEOUT)
    if error_type in LOST_TYPES or outcome == LOST:
        # The recorded message already says whose consumer and why.
        return Ending(f'Lost: {message}' if message
                      else 'Lost: its consumer stopped while running it', raw, LOST)
    if outcome == INTERRUPTED:
        return Ending('Interrupted by its consumer shutting down'
                      + (f': {message}' if message else ''), raw, INTERRUPTED)
    return Ending(raw, raw, ERROR)


def of_attempt(attempt, timeout=None):
    """The :class:`Ending` of ``attempt`` (an ``Attempt`` row: ``error_type``,
    ``error_message``, ``outcome``), or None when it ended without an error."""
    return explain(attempt.error_type, attempt.error_message, attempt.outcome, timeout)


def of_job(job):
    """The :class:`Ending` of ``job``'s latest error (a ``Job`` row: ``error``, the
    stored ``Type: message``, and ``error_type``), or None when it has none."""
    error, error_type = job.error, job.error_type
    if not error:
        return None
    if not error_type:
        return Ending(error, error, ERROR)
    prefix = f'{error_type}: '
    message = error[len(prefix):] if error.startswith(prefix) else (
        '' if error == error_type else error)
    ending = explain(error_type, message, timeout=job.timeout)
    return ending._replace(raw=error)

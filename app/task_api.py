"""What a task can know about the job it is running, and how it talks back.

``progress()`` reports how far the job is; it is also the task's checkpoint:
it raises when an operator canceled the job or the attempt ran out of time.
What the task logs through :mod:`logging` while it runs is kept with its
attempt.
"""
import logging
import threading
import time
from dataclasses import dataclass, field

from huey.exceptions import CancelExecution

from . import text

_local = threading.local()

CANCEL_CHECK = 0.5  # seconds between looks for a cancel request
CANCEL_KEY = 'qm:cancel:{}'


class Canceled(CancelExecution):
    """An operator canceled the running job; it ends ``canceled``, not retried."""

    def __init__(self, message):
        super().__init__(retry=False)
        self.message = message

    def __str__(self):
        return self.message


@dataclass
class Running:
    job_id: str
    attempt: int
    task: object  # the Huey Task instance
    huey: object = None
    fraction: float = 0.0
    message: str | None = None
    checked: float = field(default_factory=time.monotonic)


def current():
    """The :class:`Running` job of this thread, or None outside a job."""
    return getattr(_local, 'running', None)


class running:
    """Context manager marking ``task`` as this thread's running job.

    ``attempt`` is the attempt's number, counted from 1 (the broker reads it
    from the task's message).
    """

    def __init__(self, task, huey=None, attempt=1):
        self.running = Running(task.id, attempt, task, huey)

    def __enter__(self):
        _local.running = self.running
        return self.running

    def __exit__(self, *exc):
        _local.running = None


def progress(done, total=None, message=None):
    """Report progress of the running job: ``done`` of ``total``, or a fraction.

    Cheap enough to call in a tight loop: reports are buffered and only the
    latest per job reaches the ledger. Raises :class:`Canceled` when an
    operator canceled the job, and Huey's ``TaskTimeout`` when the attempt
    is past its timeout, so a long task stops at its next report.
    """
    job = current()
    if job is None:
        return
    fraction = done / total if total else done
    job.fraction = min(1.0, max(0.0, float(fraction)))
    # Stored as the job's progress_message (200 characters): whatever the
    # task passes must be text the ledger accepts.
    job.message = None if message is None else text.storable(message, 200)
    # The ledger's recorder fills the Huey's slot in a consumer; reports go
    # nowhere when none runs (a task called directly, or Huey's immediate mode).
    sink = getattr(job.huey, 'on_progress', None)
    if sink is not None:
        sink(job, job.fraction, job.message)
    checkpoint()


def checkpoint():
    """Raise if the running job was canceled or ran out of time (no report)."""
    job = current()
    if job is None:
        return
    job.task.check_timeout()
    now = time.monotonic()
    if job.huey is not None and now - job.checked >= CANCEL_CHECK:
        job.checked = now
        key = CANCEL_KEY.format(job.job_id)
        if job.huey.storage.has_data_for_key(key):
            job.huey.storage.delete_data(key)
            where = f' at {job.fraction:.0%}' + (f' ({job.message})' if job.message else '')
            raise Canceled(f'canceled by an operator{where}')


class LogCapture(logging.Handler):
    """Keeps what running tasks log, with their attempt (through their Huey's ``on_log`` slot)."""

    def emit(self, record):
        job = current()
        log_sink = getattr(job and job.huey, 'on_log', None)
        if log_sink is None:
            return
        try:
            log_sink(job, record.levelname, self.format(record))
        except Exception:
            self.handleError(record)

"""What a task can know about the job it is running, and how it reports progress."""
import threading
from dataclasses import dataclass

_local = threading.local()

# Set by the ledger recorder of a consumer; progress reports go nowhere when
# no recorder runs (a task called directly, or Huey's immediate mode).
sink = None


@dataclass
class Running:
    job_id: str
    attempt: int
    task: object  # the Huey Task instance


def attempt_number(task):
    """The number of the attempt ``task`` is about to run, counted from 1.

    Every message carries ``meta``: the attempts made before it was enqueued
    (``base``) and the retries it was enqueued with. Huey decrements
    ``task.retries`` on each retry, so the difference counts the retries.
    """
    meta = task.kwargs.get('meta') or {}
    return meta.get('base', 0) + meta.get('retries', task.retries) - task.retries + 1


def current():
    """The :class:`Running` job of this thread, or None outside a job."""
    return getattr(_local, 'running', None)


class running:
    """Context manager marking ``task`` as this thread's running job."""

    def __init__(self, task):
        self.running = Running(task.id, attempt_number(task), task)

    def __enter__(self):
        _local.running = self.running
        return self.running

    def __exit__(self, *exc):
        _local.running = None


def progress(done, total=None, message=None):
    """Report progress of the running job: ``done`` of ``total``, or a fraction.

    Cheap enough to call in a tight loop: reports are buffered and only the
    latest per job reaches the ledger.
    """
    job = current()
    if job is None or sink is None:
        return
    fraction = done / total if total else done
    fraction = min(1.0, max(0.0, float(fraction)))
    sink(job, fraction, None if message is None else str(message)[:200])

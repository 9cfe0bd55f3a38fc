"""Attempts cut off by a shutdown: run again as the next attempt, or failed visibly."""
import logging
from typing import NamedTuple

from .. import catalog, message

logger = logging.getLogger(__name__)


class Interruption(NamedTuple):
    """How an interrupted attempt is recorded: the error it ended with, and whether the job ends."""
    error: Exception
    final: bool


def requeue(huey, task, number=None):
    """Put ``task``, interrupted, back in ``huey``'s queue to run as its job's next attempt.

    ``number`` is the attempt it was running (read from its message when
    None). Returns the :class:`Interruption` to record, final when the job
    cannot run again (its task type is not safe to run twice, or the broker
    refused the message, which is logged); or None when the leader already
    took the run back and nothing is to be recorded here.
    """
    # Huey drops a task cut off by a shutdown; we put it back as the next
    # attempt (at-least-once), or fail it visibly if it is not safe to
    # run twice or the broker is gone. A run whose claim the leader
    # already took back (this consumer was thought dead) is left to it.
    task_type = catalog.TASKS.get(message.task_name(task.name))
    if task_type is not None and not task_type.rerun:
        return Interruption(RuntimeError('the consumer stopped during this attempt; not safe to '
                                         'run twice'), final=True)
    claim_held = getattr(huey, 'claim_held', None)
    if claim_held is not None and not claim_held(task):
        logger.warning('ledger: interrupted job %s was already taken back by the leader',
                       task.id)
        return None
    base = number if number is not None else message.attempt_number(task)
    try:
        huey.enqueue(message.again(task, base))
    except Exception as exc:
        logger.error('ledger: interrupted job %s not re-enqueued: %s', task.id, exc)
        return Interruption(RuntimeError(f'the consumer stopped during this attempt and the job '
                                         f'could not be re-enqueued: {exc}'), final=True)
    return Interruption(RuntimeError('the consumer stopped during this attempt; re-enqueued'),
                        final=False)

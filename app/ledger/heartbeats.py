"""A consumer's heartbeat rows in the ledger: alive, what it serves and runs, what it ended.

The reaper reads them (with the broker's lease) to tell a live consumer
from a dead one; the dashboard's workers page shows them.
"""
import time

from .. import states
from ..leader import parse_name
from ..models import utcnow
from .ops import Finish, Heartbeat, Stopped


class Heartbeats:
    """The heartbeat records of consumer ``consumer``, one due every ``interval`` seconds.

    ``consumer`` is a process name as :func:`app.leader.process_name`
    gives it (``host:pid-start``). Whoever runs the consumer sets
    ``queues`` (the names it serves), ``concurrency`` (its worker threads)
    and ``is_leader`` (a callable); a consumer that serves no queue sends
    no heartbeat.
    """

    def __init__(self, consumer, interval=5.0):
        self.consumer = consumer
        self.interval = interval
        self.queues, self.concurrency = [], 0
        self.is_leader = lambda: False
        self.started_at = utcnow()
        self._next = 0.0  # monotonic time the next heartbeat is due
        self._counts = [0, 0]  # attempts ended, and of those not succeeded, since the last beat

    def due(self):
        """Whether a heartbeat is due now; if so the next one is due ``interval`` s later."""
        if not self.queues or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.interval
        return True

    def written(self, ops):
        """Count the attempts that ``ops``, a batch the ledger has just written, ended."""
        for op in ops:
            if isinstance(op, Finish):
                self._counts[0] += 1
                self._counts[1] += op.outcome != states.ATTEMPT_SUCCEEDED

    def beat(self, running):
        """A :class:`~.ops.Heartbeat` as of now; ``running`` is the ids of the jobs running.

        It carries the counts since the previous one, which start again from 0.
        """
        done, bad = self._counts
        self._counts = [0, 0]
        host, pid = parse_name(self.consumer)
        return Heartbeat(self.consumer, host, int(pid), self.queues, self.concurrency,
                         self.started_at, utcnow(), done, bad, running, bool(self.is_leader()))

    def stopped(self):
        """A :class:`~.ops.Stopped` record: the consumer stops now."""
        return Stopped(self.consumer, utcnow())

"""The Huey message format, as queue-manager writes and reads it.

A message is what Huey keeps in the broker for one run of a job: its
serialized task (Huey's own pickle) behind a short text header we add,

    b'qm1 <job id> <priority>\\n' + <Huey's serialized message>

so the broker can tell which job a message belongs to and how urgent it is
without unpickling it (a Lua script moves due messages into the queue by
priority, and the broker keeps a count of messages per job for the
reconciler). Messages without the header (written by an older version, or
by Huey's own tests) are still read.

The task's keyword arguments carry ``params`` (the job's parameters) and
``meta``: ``base``, the attempts made before this message was written, and
``retries``, the retries it was written with. Huey decrements
``task.retries`` on each retry, so the attempt a message runs is
``base + (meta retries - task retries) + 1``.
"""
import re
from typing import NamedTuple

MAGIC = b'qm1 '
# Ids that can go in the header as they are (uuids, and Huey's own ids).
_PLAIN_ID = re.compile(r'[A-Za-z0-9_.:-]{1,64}')


class Header(NamedTuple):
    """What the header says: the job id (None without a header) and the priority."""
    job_id: str | None
    priority: int


def header(job_id, priority):
    """The header bytes for a message of ``job_id`` (b'' if the id cannot be written)."""
    if not isinstance(job_id, str) or not _PLAIN_ID.fullmatch(job_id):
        return b''
    return b'%s%s %d\n' % (MAGIC, job_id.encode(), int(priority or 0))


def split(data):
    """``(Header, body)`` of raw message bytes; a message without a header is all body."""
    data = bytes(data)
    if data.startswith(MAGIC):
        end = data.find(b'\n', len(MAGIC))
        if end > 0:
            fields = data[len(MAGIC):end].split(b' ')
            if len(fields) == 2:
                try:
                    return Header(fields[0].decode(), int(fields[1])), data[end + 1:]
                except ValueError:
                    pass
    return Header(None, 0), data


def job_id(data):
    """The job id in a message's header, or None."""
    return split(data)[0].job_id


def kwargs(params, base, retries):
    """A task's keyword arguments: the job's parameters and the attempt bookkeeping."""
    return {'params': params, 'meta': {'base': base, 'retries': retries}}


def _kwargs(task):
    return task.kwargs if isinstance(task.kwargs, dict) else {}


def _meta(task):
    meta = _kwargs(task).get('meta')
    return meta if isinstance(meta, dict) else {}


def params(task):
    """The job's parameters carried by ``task`` (a Huey Task), ``{}`` if it has none."""
    return _kwargs(task).get('params') or {}


def retries(task):
    """The retries ``task``'s message was written with; Huey's count if it has no ``meta``."""
    return _meta(task).get('retries', task.retries)


def again(task, base):
    """A new Huey task running ``task``'s job again, ``base`` attempts having been made.

    Same id, options and retries left as ``task``, its ``meta`` rewritten
    so that the new message runs attempt ``base + 1``. Not sent anywhere.
    """
    return type(task)((), kwargs(params(task), base, task.retries),
                      id=task.id, retries=task.retries, retry_delay=task.retry_delay,
                      retry_backoff=task.retry_backoff, priority=task.priority,
                      timeout=task.timeout)


def base(task):
    """Attempts of ``task``'s job made before its message was written (0 if it has no ``meta``)."""
    return _meta(task).get('base', 0)


def attempt_number(task):
    """The number of the attempt ``task`` (a Huey Task) runs, counted from 1."""
    return base(task) + retries(task) - task.retries + 1


def task_name(huey_name):
    """A task type's name from Huey's ``module.name`` string."""
    return huey_name.rsplit('.', 1)[-1]

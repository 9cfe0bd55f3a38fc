"""The changes the recorder buffers and :func:`~app.ledger.apply.apply` writes.

One record per kind of change, made on Huey's worker threads (so cheap to
build: NamedTuples) and sent in batches to the writer, across a pipe when it
is a child process (so picklable: plain values only). Times are naive UTC
datetimes; ``number`` is an attempt number, counted from 1.
"""
from typing import NamedTuple


class Start(NamedTuple):
    """Attempt ``number`` of ``job_id`` started on ``worker`` at ``at``.

    The rest is what the job's row is made of if the ledger has not seen
    the job (enqueued around the API): its task type's name, queue,
    parameters (secret ones masked), priority, retries (as the job was
    submitted with), retry delay (seconds) and the real values of its
    secret parameters (``{}`` if none).
    """
    job_id: str
    number: int
    worker: str
    at: object
    task: str
    queue: str
    params: dict
    priority: int
    retries: int
    retry_delay: float
    secret_params: dict = {}


class Finish(NamedTuple):
    """Attempt ``number`` of ``job_id`` ended with ``outcome``.

    ``at`` is naive UTC; ``duration`` seconds (None if the start was not
    seen); ``final`` says no attempt follows (the job ends); ``receipt``
    acknowledges the attempt's message once this is written (None when
    there is nothing to acknowledge).
    """
    job_id: str
    number: int
    outcome: str
    at: object
    duration: float | None
    error_type: str | None
    error_message: str | None
    traceback: str | None
    result: object
    final: bool
    task: str
    queue: str | None
    receipt: object = None


class Progress(NamedTuple):
    """The running attempt ``number`` of ``job_id`` reported ``fraction`` (0..1) done."""
    job_id: str
    number: int
    fraction: float
    message: str | None


class Log(NamedTuple):
    """A line attempt ``number`` of ``job_id`` logged at ``at``, with its level's name."""
    job_id: str
    number: int
    at: object
    level: str
    message: str


class Queued(NamedTuple):
    """The scheduler moved the due job ``job_id`` into its queue."""
    job_id: str
    task: str
    queue: str


class Scheduled(NamedTuple):
    """Job ``job_id`` (a retry, or a job submitted for later) is due at ``eta``."""
    job_id: str
    eta: object
    task: str
    queue: str


class Heartbeat(NamedTuple):
    """Consumer ``consumer`` is alive at ``seen``.

    It runs on ``host`` as ``pid`` since ``started_at``, serving ``queues``
    (names) with ``concurrency`` worker threads, and runs the jobs
    ``running`` (ids) now. ``processed`` and ``failed`` count the attempts
    it ended, and of those the ones that did not succeed, since its
    previous heartbeat; ``leader`` says whether it leads.
    """
    consumer: str
    host: str
    pid: int
    queues: list
    concurrency: int
    started_at: object
    seen: object
    processed: int
    failed: int
    running: list
    leader: bool


class Stopped(NamedTuple):
    """Consumer ``consumer`` stopped at ``at``."""
    consumer: str
    at: object

"""Turns at writing a SQLite ledger, handed from process to process by a file lock."""
import contextlib
import fcntl
import logging
import os

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def write_turn(engine):
    """Wait for this process's turn to write ``engine``'s SQLite ledger; hold it in the block.

    SQLite lets one writer in at a time and makes the others poll: its busy
    handler sleeps 1, 2, 5, 10... ms between tries, so two web processes
    writing submissions at once spend much of their time asleep while the
    database is free. An exclusive ``flock`` on a file beside the database
    (``<file>.lock``) hands the turn straight to the next process waiting:
    measured with bench/submit.py's single POST (2 web processes, 8 clients),
    about a fifth more jobs a second. Only processes of one host can share
    a SQLite file, so a host-local lock covers every writer that takes it;
    one that does not (the consumer, the CLI) is still kept out by SQLite's
    own lock, taken after this one, so the two cannot deadlock.

    Does nothing for another database, an in-memory SQLite, or a lock file
    that cannot be opened (a read-only folder: logged once per process).
    """
    url = engine.url
    path = url.database if url.get_backend_name() == 'sqlite' else None
    if not path or path == ':memory:' or path.startswith('file:'):
        yield
        return
    try:
        fd = os.open(path + '.lock', os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        if not getattr(write_turn, 'warned', False):
            write_turn.warned = True
            logger.warning('no write turns for %s: %s', path, exc)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock

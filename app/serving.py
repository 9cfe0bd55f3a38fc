"""The web processes' gunicorn worker: gthread, with new connections taken in turn.

``gunicorn.conf.py`` names :class:`ThreadWorker` as its ``worker_class``.
Every worker of a server shares the master's one listening socket. Which
worker a new connection lands on decides which core serves it for as long
as the client keeps it open, and producers keep theirs open (a batch
client, an HTTP pool): a handful of connections on one worker leave the
other worker's core idle.

How the kernel hands connections out decides it (measured for nginx in
Cloudflare's "Why does one NGINX worker take all the load?", 2017):

- gthread waits with epoll, so every waiting worker wakes for a new
  connection and the first to call ``accept()`` takes it: of 16 keep-alive
  connections opened one after another, one worker took 16 in one run
  (``tests/test_serving.py``) and 11 in another.
- ``SO_REUSEPORT`` (a socket per worker) spreads them by a hash of the
  client's address and port: two connections share one worker half the
  time.
- A thread blocked in ``accept()`` is woken one at a time, the one that
  has waited longest first: workers that each keep one such thread take
  new connections in turn.

So here each worker takes its connections with a thread blocked in
``accept()`` and hands them to gthread's loop, which serves them exactly as
it serves its own; having taken one, it lets :data:`TURN` pass before it
takes another, so a burst is shared too. The listening socket times its
``accept()`` out every :data:`ACCEPT_TIMEOUT` seconds (``SO_RCVTIMEO``), so a
stopping worker leaves the queue of waiting acceptors, and serves what it
took, before it drains.

Limits: a worker stopped at once (SIGQUIT, or SIGABRT when gunicorn's
timeout kills it) may have taken one connection in its last
:data:`ACCEPT_TIMEOUT` that nobody answers (the client sees a reset); a
worker at ``worker_connections`` may take one or two more, taken before it
paused. Whether a socket blocks is shared by every process that holds it:
the master of a ``USR2`` re-exec makes it non-blocking again until its
workers start, and meanwhile ``accept()`` here waits in ``select()``.
"""
import errno
import select
import socket
import struct
import threading
import time

from gunicorn.workers import gthread

ACCEPT_TIMEOUT = 0.5  # seconds an accept() waits before it looks whether to stop
# Seconds an acceptor lets pass after taking a connection: one that arrives
# meanwhile goes to another worker's acceptor, not to this one, back at
# accept() before the other has woken. Shorter than any request. Its effect
# is small and timing-bound: of twenty rounds of two clients connecting at
# once, 20, 20 and 20 split one and one with it, 20, 18 and 19 without it
# (and gthread's own accept split 11 in one run), so no test pins it down;
# tests/test_serving.py checks the spread of keep-alive clients instead.
TURN = 0.0005
# An accepted socket inherits the listener's SO_RCVTIMEO; gthread reads
# requests with blocking recv(), which must wait for a slow client.
_NO_TIMEOUT = struct.pack('ll', 0, 0)
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNABORTED)


class ThreadWorker(gthread.ThreadWorker):
    """gunicorn's ``gthread`` worker whose new connections are taken in turn with the
    other workers (see the module's docstring); each is then served by gthread.

    One acceptor thread per listening socket. A worker at its
    ``worker_connections`` stops taking more (give or take the one or two
    its acceptors were taking); a stopping one stops, then serves the
    connections its acceptors took before it drains.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._open = threading.Event()     # set: the acceptors take connections
        self._acceptors = []

    def set_accept_enabled(self, enabled):
        """Start or pause taking connections (gthread's loop calls it; never polls the
        listening sockets). Pausing a stopping worker waits for its acceptors to end,
        at most :data:`ACCEPT_TIMEOUT` seconds, and serves what they took."""
        if enabled == self._accepting:
            return
        self._accepting = enabled
        if enabled:
            if not self._acceptors:
                self._start_acceptors()
            self._open.set()
            return
        self._open.clear()
        if not self.alive:
            for thread in self._acceptors:
                thread.join(ACCEPT_TIMEOUT * 2)
            # What they took is queued for this loop: count it in before
            # the drain looks at how many connections are left.
            self.method_queue.run_callbacks(None)

    def _start_acceptors(self):
        timeout = struct.pack('ll', int(ACCEPT_TIMEOUT), int(ACCEPT_TIMEOUT % 1 * 1e6))
        for listener in self.sockets:
            # Blocking, so that accept() waits in the kernel's queue of
            # acceptors (a flag of the socket all workers share: they all
            # take connections this way), with a timeout to look up.
            listener.setblocking(True)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            thread = threading.Thread(target=self._accept_loop, args=(listener,),
                                      name='accept', daemon=True)
            thread.start()
            self._acceptors.append(thread)

    def _accept_loop(self, listener):
        while self.alive:
            if not self._open.wait(ACCEPT_TIMEOUT):
                continue
            began = time.monotonic()
            try:
                client, address = listener.accept()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TIMEOUT)
            except OSError as exc:
                if exc.errno not in _RETRY:
                    # Out of file descriptors, say: the loop logs it, and
                    # this thread waits a moment instead of spinning.
                    self.method_queue.defer(self.log.warning, 'accept failed: %s', exc)
                    time.sleep(ACCEPT_TIMEOUT)
                elif time.monotonic() - began < ACCEPT_TIMEOUT / 2:
                    # Answered at once: another process made the socket
                    # non-blocking (a USR2 re-exec's master). Wait for a
                    # connection rather than spin.
                    select.select([listener], [], [], ACCEPT_TIMEOUT)
                continue
            self.method_queue.defer(self._accepted, client, address, listener)
            # Always: a worker started alone (or by TTIN) may have siblings.
            time.sleep(TURN)

    def _accepted(self, client, address, listener):
        """Serve a connection an acceptor took (on the loop, as gthread's ``accept``)."""
        self.nr_conns += 1
        client.setblocking(True)
        self.enqueue_req(gthread.TConn(self.cfg, client, address, listener.getsockname()))

    def accept(self, listener):  # pragma: no cover - the listening sockets are never polled
        raise AssertionError('connections are taken by the acceptor threads')

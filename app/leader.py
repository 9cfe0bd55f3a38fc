"""Which consumer leads the deployment: it runs the reaper and enqueues periodic tasks.

With Redis, consumers compete for a key with a time to live; the holder
renews it and loses it by going silent, when another consumer takes over.
The embedded mode has one process, which always leads.
"""
import os
import secrets
import socket
import time

KEY = 'queue-manager:leader'


_name = [None, None]  # (pid, name): made anew in a forked child


def process_name():
    """This process as ``host:pid-start``: how consumers, leases and pages name it.

    ``start`` is six random hex digits drawn when the process starts, so a
    process that comes back with the same host name and pid (a container's
    PID 1 after a restart, say) is not taken for the one that died. Made
    when first asked in each process, never at import: gunicorn's master
    and Huey's process workers import the package before they fork.
    """
    pid = os.getpid()
    if _name[0] != pid:
        _name[:] = [pid, f'{socket.gethostname()}:{pid}-{secrets.token_hex(3)}']
    return _name[1]


def parse_name(name):
    """``(host, pid)`` of a :func:`process_name`; pid None if it has none."""
    host, _, rest = name.rpartition(':')
    pid = rest.split('-', 1)[0]
    return host, int(pid) if pid.isascii() and pid.isdigit() else None

# Renew only while still the holder (a lease that lapsed may be someone else's).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class Leadership:
    def __init__(self):
        self.client = None  # None: the embedded mode
        self._until = 0.0

    def configure(self, client):
        self.client = client

    def claim(self, ttl):
        """Take or keep the lead for ``ttl`` seconds; return whether we lead."""
        if self.client is None:
            self._until = float('inf')
            return True
        ms, me = int(ttl * 1000), process_name()
        try:
            held = (self.client.set(KEY, me, nx=True, px=ms)
                    or self.client.eval(_RENEW, 1, KEY, me, ms))
        except Exception:
            held = False
        # Stop acting a little before the lease ends, so two never overlap.
        self._until = time.monotonic() + ttl * 0.8 if held else 0.0
        return bool(held)

    def release(self):
        if self.client is not None and self.leading:
            try:
                self.client.eval("if redis.call('get', KEYS[1]) == ARGV[1] then "
                                 "return redis.call('del', KEYS[1]) end return 0", 1, KEY, process_name())
            except Exception:
                pass
        self._until = 0.0

    @property
    def leading(self):
        return time.monotonic() < self._until


leadership = Leadership()

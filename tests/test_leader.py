"""Process identity: how consumers, leases and pages name a process."""
import os
import socket

from app import leader


def test_a_process_name_is_host_pid_and_a_start_mark_kept_for_the_process():
    name = leader.process_name()
    host, pid = leader.parse_name(name)
    assert (host, pid) == (socket.gethostname(), os.getpid())
    assert len(name.rsplit('-', 1)[1]) == 6
    assert leader.process_name() == name  # the same all through the process


def test_names_parse_even_with_colons_in_the_host_or_no_pid():
    assert leader.parse_name('a:b:c:41-abcdef') == ('a:b:c', 41)
    assert leader.parse_name('host:worker') == ('host', None)

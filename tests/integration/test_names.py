"""Names: happy eyeballs over IPv6 and IPv4, and the DNS cache, with a hosts file of
the test's own (the daemon runs in a mount namespace that resolves from it only)."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import listening_socket, silent_listener
from integration import socks5client
from integration.socks5client import recv_exact


def hosts_file(tmp_path, text: str):
    path = tmp_path / "hosts"
    path.write_text(text)
    return path


def serve_once(listener: socket.socket, word: bytes) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(word)


def fetch_word(daemon, name: str, port: int, server: socket.socket) -> tuple[int, bytes]:
    """SOCKS5 CONNECT to name:port, `server` expected to take it; the reply code and
    what the server said."""
    sock, rep, _, _ = socks5client.connect(daemon.address, name, port)
    with sock:
        if rep != 0:
            return rep, b""
        serve_once(server, b"hi")
        return rep, recv_exact(sock, 2)


@pytest.mark.parametrize("silent_family", ["ipv6", "ipv4"])
def test_happy_eyeballs_gets_past_a_silent_address(start_daemon, tmp_path, silent_family):
    """One family black-holes the connect: the other is tried 250 ms later and wins,
    well inside timeouts.connect (one address at a time would wait it out and fail)."""
    hosts = hosts_file(tmp_path, "::1 dual.test\n127.0.0.1 dual.test\n")
    good_host, silent_host = (
        ("127.0.0.1", "::1") if silent_family == "ipv6" else ("::1", "127.0.0.1")
    )
    with listening_socket(good_host, also_free_on=silent_host) as good:
        port = good.getsockname()[1]
        with silent_listener(silent_host, port):
            daemon = start_daemon("[timeouts]\nconnect = 5\n", hosts=hosts)
            assert fetch_word(daemon, "dual.test", port, good) == (0, b"hi")
            assert daemon.access()["status"] == "ok"


def test_a_refused_family_moves_on_at_once(start_daemon, tmp_path):
    hosts = hosts_file(tmp_path, "::1 dual.test\n127.0.0.1 dual.test\n")
    good = listening_socket()  # nothing listens on [::1]:port
    with good:
        daemon = start_daemon("[timeouts]\nconnect = 5\n", hosts=hosts)
        assert fetch_word(daemon, "dual.test", good.getsockname()[1], good) == (0, b"hi")


def test_every_address_refused_is_0x05(start_daemon, tmp_path):
    hosts = hosts_file(tmp_path, "::1 dual.test\n127.0.0.1 dual.test\n")
    probe = listening_socket()
    port = probe.getsockname()[1]
    probe.close()
    daemon = start_daemon(hosts=hosts)
    sock, rep, _, _ = socks5client.connect(daemon.address, "dual.test", port)
    sock.close()
    assert rep == 0x05
    assert daemon.access()["status"] == "refused"


def test_answers_are_cached_for_their_lifetime(start_daemon, tmp_path):
    hosts = hosts_file(tmp_path, "127.0.0.1 moving.test\n")
    first = listening_socket(also_free_on="127.0.0.2")
    port = first.getsockname()[1]
    second = listening_socket("127.0.0.2", port)
    try:
        cached = start_daemon("[dns]\ncache_ttl = 1\n", hosts=hosts)
        uncached = start_daemon("[dns]\ncache_size = 0\n", hosts=hosts)
        for daemon in (cached, uncached):
            assert fetch_word(daemon, "moving.test", port, first) == (0, b"hi")
        hosts.write_text("127.0.0.2 moving.test\n")  # the name moves
        assert fetch_word(uncached, "moving.test", port, second) == (0, b"hi")
        assert fetch_word(cached, "moving.test", port, first) == (0, b"hi")  # still cached
        time.sleep(1.2)
        assert fetch_word(cached, "moving.test", port, second) == (0, b"hi")  # expired
    finally:
        first.close()
        second.close()


def test_unknown_names_are_cached_briefly(start_daemon, tmp_path):
    hosts = hosts_file(tmp_path, "127.0.0.1 other.test\n")
    target = listening_socket()
    port = target.getsockname()[1]
    try:
        remembers = start_daemon("[dns]\nnegative_ttl = 60\n", hosts=hosts)
        forgets = start_daemon("[dns]\nnegative_ttl = 0\n", hosts=hosts)
        for daemon in (remembers, forgets):
            assert fetch_word(daemon, "late.test", port, target) == (0x04, b"")
            assert daemon.access()["status"] == "unreachable"
        hosts.write_text("127.0.0.1 late.test\n")  # the name appears
        assert fetch_word(forgets, "late.test", port, target) == (0, b"hi")
        assert fetch_word(remembers, "late.test", port, target) == (0x04, b"")
    finally:
        target.close()


def test_the_cache_keeps_the_most_recently_used_names(start_daemon, tmp_path):
    """dns.cache_size = 2: a third name pushes out the one used least recently (not
    the one looked up first, when that has been used since)."""
    names = ("one.test", "two.test", "three.test")
    hosts = hosts_file(tmp_path, "".join(f"127.0.0.1 {name}\n" for name in names))
    old = listening_socket(also_free_on="127.0.0.2")
    port = old.getsockname()[1]
    new = listening_socket("127.0.0.2", port)
    try:
        for server in (old, new):
            server.settimeout(5)  # a connection to the other address fails the test
        daemon = start_daemon("[dns]\ncache_size = 2\ncache_ttl = 300\n", hosts=hosts)
        for name in ("one.test", "two.test", "one.test", "three.test"):  # two.test is LRU
            assert fetch_word(daemon, name, port, old) == (0, b"hi")
        hosts.write_text("".join(f"127.0.0.2 {name}\n" for name in names))  # all move
        assert fetch_word(daemon, "three.test", port, old) == (0, b"hi")  # cached
        assert fetch_word(daemon, "one.test", port, old) == (0, b"hi")  # cached
        assert fetch_word(daemon, "two.test", port, new) == (0, b"hi")  # was evicted
    finally:
        old.close()
        new.close()

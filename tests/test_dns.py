"""proxyd.dns without sockets: literals need no lookup, names IDNA refuses fail like any
lookup, the hosts file is read as getaddrinfo reads it, and dns.per_client."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from proxyd import dns
from proxyd.dns import AddrInfo, HostsFile, Resolver, _getaddrinfo, literal_addresses, parse_hosts

V6, V4 = socket.AF_INET6, socket.AF_INET


def test_literals_need_no_lookup() -> None:
    assert literal_addresses("127.0.0.1", 8080) == [(V4, ("127.0.0.1", 8080))]
    assert literal_addresses("::1", 8080) == [(V6, ("::1", 8080, 0, 0))]
    assert literal_addresses("localhost", 8080) is None
    assert literal_addresses("1.2.3", 8080) is None  # not shorthand for 1.2.0.3


def test_a_name_idna_cannot_encode_is_no_such_name() -> None:
    """Every caller of the resolver handles it as any failed lookup (IDNA fails before
    any query is sent)."""
    with pytest.raises(socket.gaierror) as info:
        _getaddrinfo("a" * 70 + ".invalid")
    assert info.value.errno == socket.EAI_NONAME


def test_the_hosts_file_as_getaddrinfo_reads_it() -> None:
    names = parse_hosts(
        "# comment\n"
        "127.0.0.1 localhost Known.Test  # trailing comment\n"
        "::1 localhost ip6-localhost\n"
        "10.0.0.1 known.test\n"
        "127.0.0.1 known.test\n"  # (already there)
        "not-an-address some.name\n"
        "10.0.0.2\n"
        "fe80::1%lo link.test\n"
    )
    assert names["localhost"] == [(V4, ("127.0.0.1", 0)), (V6, ("::1", 0, 0, 0))]
    assert names["known.test"] == [(V4, ("127.0.0.1", 0)), (V4, ("10.0.0.1", 0))]
    assert "some.name" not in names and "10.0.0.2" not in names
    assert names["link.test"][0][1][3] != 0  # the scope of the link-local address


def test_the_hosts_file_is_read_again_when_it_changes(tmp_path, monkeypatch) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.7 here.test\n")
    monkeypatch.setattr(dns, "HOSTS_CHECK", 0.0)  # look at the file at every lookup
    table = HostsFile(str(hosts))
    assert table.get("HERE.test", 443) == [(V4, ("192.0.2.7", 443))]
    assert table.get("elsewhere.test", 443) is None
    hosts.write_text("192.0.2.8 elsewhere.test\n")
    assert table.get("elsewhere.test", 80) == [(V4, ("192.0.2.8", 80))]
    assert table.get("here.test", 80) is None
    hosts.unlink()
    assert table.get("elsewhere.test", 80) is None


def test_a_name_of_the_hosts_file_resolves_while_every_thread_is_busy(
    tmp_path, monkeypatch
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.7 here.test\n")
    release = threading.Event()
    asked: list[str] = []

    def blocking(host: str) -> list[AddrInfo]:
        asked.append(host)
        assert release.wait(10)
        return [(V4, ("192.0.2.1", 0))]

    monkeypatch.setattr(dns, "_getaddrinfo", blocking)

    async def run() -> None:
        resolver = Resolver(threads=1, hosts=str(hosts))
        try:
            stuck = resolver.lookup("slow.test", 80, "10.0.0.1")  # the one thread
            found = await resolver.resolve("here.test", 80, 5.0, "10.0.0.2")
            assert found == [(V4, ("192.0.2.7", 80))]
            release.set()
            await stuck
            # a free thread: getaddrinfo reads the file itself, as nsswitch.conf says
            assert (await resolver.resolve("here.test", 80, 5.0, "10.0.0.2"))[0][1][0]
            assert asked == ["slow.test", "here.test"]
        finally:
            release.set()
            resolver.close()

    asyncio.run(run())


def test_lookups_count_against_their_client_until_the_thread_returns(monkeypatch) -> None:
    """dns.per_client: a client's lookups beyond it fail at once; one given up still
    counts while its thread runs, one dropped unstarted counts no more; other clients
    are not held up by it."""
    release = threading.Event()

    def blocking(host: str) -> list[AddrInfo]:
        assert release.wait(10)
        return [(V4, ("192.0.2.1", 0))]

    monkeypatch.setattr(dns, "_getaddrinfo", blocking)

    async def run() -> None:
        resolver = Resolver(threads=3, per_client=2, hosts=None)
        try:
            a1 = resolver.lookup("a1.test", 80, "10.0.0.1")
            a2 = resolver.lookup("a2.test", 80, "10.0.0.1")
            a3 = resolver.lookup("a3.test", 80, "10.0.0.1")
            with pytest.raises(socket.gaierror, match=r"dns\.per_client"):
                await a3
            shared = resolver.lookup("a1.test", 80, "10.0.0.1")  # joins a1: no new lookup
            b1 = resolver.lookup("b1.test", 80, "10.0.0.2")
            b2 = resolver.lookup("b2.test", 80, "10.0.0.2")  # queued: all 3 threads busy
            assert resolver.in_flight("10.0.0.1") == 2 and resolver.in_flight("10.0.0.2") == 2
            for future in (a1, shared, b2):
                future.cancel()
            for _ in range(10):
                await asyncio.sleep(0)
            # a1 and a2 still hold their threads; b2 left the queue unstarted
            assert resolver.in_flight("10.0.0.1") == 2 and resolver.in_flight("10.0.0.2") == 1
            release.set()
            assert (await b1)[0][1] == ("192.0.2.1", 80)
            assert (await a2)[0][1] == ("192.0.2.1", 80)
            for _ in range(100):
                if not resolver.in_flight("10.0.0.1"):
                    break
                await asyncio.sleep(0.01)
            assert resolver.in_flight("10.0.0.1") == 0 and resolver.in_flight("10.0.0.2") == 0
            assert (await resolver.lookup("a4.test", 80, "10.0.0.1"))[0][1][0] == "192.0.2.1"
        finally:
            release.set()
            resolver.close()

    asyncio.run(run())

"""Slowloris: a thousand clients that stall or trickle during the handshake are cut at
`timeouts.handshake`, each with its access line, while a normal client is served
throughout; afterwards the daemon holds no more descriptors than before."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from integration import socks5client

SLOW = 1000
HANDSHAKE = 1.5
STARTS = [
    b"\x05\xff\x00",  # a SOCKS5 greeting that promised 255 methods
    b"\x04\x01\x00\x50\x7f\x00\x00\x01user",  # a SOCKS4 request whose user id never ends
    b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",  # a head never ended
    b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n",
]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_stalling_and_trickling_clients_are_cut_and_harm_no_one(start_daemon, tcp_server):
    echo = tcp_server()
    daemon = start_daemon(f"[timeouts]\nhandshake = {HANDSHAKE}\n")
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", echo.port):
        pass
    daemon.wait_for(lambda _e: len(daemon.access_events()) == 1)
    baseline = open_fds(daemon.proc.pid)

    slow: list[socket.socket] = []
    try:
        for i in range(SLOW):
            sock = socket.create_connection(daemon.address, timeout=5)
            sock.sendall(STARTS[i % len(STARTS)])
            sock.setblocking(False)
            slow.append(sock)
        opened = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            """Every other client sends one more byte of its unending request (a method,
            a user id, a header value: never its end), round and round, for as long as
            the daemon lets it."""
            while not stop.is_set():
                for sock in slow[::2]:
                    try:
                        sock.send(b"a")
                    except OSError:
                        pass  # cut already, or its buffer is full
                time.sleep(0.1)

        trickler = threading.Thread(target=trickle)
        trickler.start()
        try:
            # a normal client, again and again, is served at once meanwhile
            waits = []
            while time.monotonic() - opened < HANDSHAKE + 0.5:
                started = time.monotonic()
                with socks5client.open_tunnel(daemon.address, "127.0.0.1", echo.port) as sock:
                    sock.sendall(b"ping")
                    assert socks5client.recv_exact(sock, 4) == b"ping"
                waits.append(time.monotonic() - started)
                time.sleep(0.1)
            assert max(waits) < 1.0, max(waits)

            # every slow client is cut once its handshake time is up
            deadline = time.monotonic() + 10
            open_ones = {sock.fileno(): sock for sock in slow}
            poller = select.poll()  # not select(): the suite's descriptors pass 1024
            for fd in open_ones:
                poller.register(fd, select.POLLIN)
            while open_ones and time.monotonic() < deadline:
                for fd, _events in poller.poll(200):
                    try:
                        if open_ones[fd].recv(65536) != b"":
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:  # reset: cut as well
                        pass
                    poller.unregister(fd)
                    del open_ones[fd]
            assert not open_ones, f"{len(open_ones)} slow clients still connected"
        finally:
            stop.set()
            trickler.join(5)
    finally:
        for sock in slow:
            sock.close()

    timeouts = lambda: [e for e in daemon.access_events() if e["status"] == "handshake_timeout"]  # noqa: E731
    daemon.wait_for(lambda _e: len(timeouts()) >= SLOW)
    assert len(timeouts()) == SLOW
    assert {e["error"] for e in timeouts()} == {f"no complete request within {HANDSHAKE:g} s"}
    deadline = time.monotonic() + 5
    while open_fds(daemon.proc.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(daemon.proc.pid) <= baseline

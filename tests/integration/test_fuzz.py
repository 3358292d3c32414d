"""A live-port fuzz: thousands of random and mutated handshakes against the running
daemon. Afterwards it must still serve a normal client at once, hold no more file
descriptors than before, and have written an access line for every connection.

The inputs come from a seeded generator (the seed is in the assertion messages), so
a failure can be replayed. The daemon may only reach loopback: its rules deny
every other destination, and names resolve from a test hosts file only, without a
query to any DNS server.
"""

from __future__ import annotations

import base64
import collections
import os
import random
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import PASSWORD, USER
from integration import socks5client

CONNECTIONS = 2000
SEED = int(os.environ.get("PROXYD_FUZZ_SEED", "20261121"))

LOOPBACK_ONLY = (
    "[server]\n"
    'default_action = "deny"\n'
    'proxy_protocol_from = ["127.0.0.2/32"]\n'
    "[timeouts]\nhandshake = 2\nconnect = 2\nidle = 5\nudp_idle = 2\n"
    '[[rules]]\naction = "allow"\ndestinations = ["127.0.0.0/8", "::1/128", "localhost"]\n'
)


def seeds(port: int) -> list[bytes]:
    """Valid handshakes of every kind the listener detects, to be mutated."""
    p = struct.pack("!H", port)
    user, password = USER.encode(), PASSWORD.encode()
    login = b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
    token = base64.b64encode(user + b":" + password)
    return [
        # a destination beyond loopback: the rules must deny it, never connect
        b"\x05\x01\x02" + login + b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x50",
        b"CONNECT 198.51.100.1:443 HTTP/1.1\r\nProxy-Authorization: Basic " + token + b"\r\n\r\n",
        b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + p,
        b"\x05\x02\x00\x02" + login + b"\x05\x01\x00\x03\x09localhost" + p + b"hello",
        b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",  # UDP ASSOCIATE
        b"\x05\x01\x00" + b"\x05\x02\x00\x01\x7f\x00\x00\x01" + p,  # BIND
        b"\x05\x01\x00" + b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + p,
        b"\x04\x01" + p + b"\x7f\x00\x00\x01" + b"fuzz\x00",
        b"\x04\x01" + p + b"\x00\x00\x00\x01" + b"\x00localhost\x00",
        f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
        f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        b"POST http://localhost:1/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n\x05\x01\x00",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12) + b"\x05\x01\x00",
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip a byte
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif op == 1:  # cut short
            del out[at:]
        elif op == 2:  # insert junk
            out[at:at] = rng.randbytes(rng.randint(1, 40))
        elif op == 3 and out:  # a length or count byte at an extreme
            out[min(at, len(out) - 1)] = rng.choice((0, 1, 127, 128, 255))
        elif op == 4:  # repeat a piece
            out[at:at] = out[at : at + rng.randint(1, 64)]
        else:  # drop a piece
            del out[at : at + rng.randint(1, 8)]
    return bytes(out)


def inputs(rng: random.Random, port: int) -> list[bytes]:
    valid = seeds(port)
    made = []
    for i in range(CONNECTIONS):
        if i % 4 == 0:
            made.append(rng.randbytes(rng.choice((0, 1, 2, 7, 64, 600, 5000))))
        else:
            made.append(mutate(rng, rng.choice(valid)))
    return made


def throw(address: tuple[str, int], data: bytes, rng: random.Random) -> None:
    """Send `data` in a few pieces, maybe half-close, read what comes for a moment."""
    with socket.create_connection(address, timeout=5) as sock:
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3)))
        start = 0
        try:
            for cut in [*cuts, len(data)]:
                if data[start:cut]:
                    sock.sendall(data[start:cut])
                start = cut
            if rng.random() < 0.5:
                sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.2)
            while sock.recv(65536):
                pass
        except OSError:  # reset, or nothing within the moment: we are done with it
            pass


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_random_and_mutated_handshakes_harm_no_one(start_daemon, tcp_server, users_file, tmp_path):
    echo = tcp_server()
    hosts = tmp_path / "hosts"
    Path(hosts).write_text("127.0.0.1 localhost\n")
    daemon = start_daemon(
        LOOPBACK_ONLY + f'[auth]\nusers_file = "{users_file}"\nmax_failures = 0\n', hosts=hosts
    )
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", echo.port, auth=(USER, PASSWORD)):
        pass  # warm up: what the first connection makes (threads, caches) is not a leak
    daemon.wait_for(lambda _e: len(daemon.access_events()) == 1)
    baseline = open_fds(daemon.proc.pid)

    rng = random.Random(SEED)
    made = inputs(rng, echo.port)
    rngs = [random.Random(rng.random()) for _ in made]
    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda args: throw(daemon.address, *args), zip(made, rngs, strict=True)))
    assert time.monotonic() - started < 60, f"seed {SEED}"

    # every connection ends (handshake, connect and idle timeouts are short) with a line
    total = 1 + len(made)
    daemon.wait_for(lambda _e: _ids(daemon) >= set(range(1, total + 1)), timeout=30)
    assert _ids(daemon) == set(range(1, total + 1)), f"seed {SEED}"
    statuses = collections.Counter(e["status"] for e in daemon.access_events())
    assert statuses["bad_request"] > 100 and statuses["denied"] > 10, statuses

    # still serving, at once, and holding nothing it held not before
    started = time.monotonic()
    with socks5client.open_tunnel(
        daemon.address, "127.0.0.1", echo.port, auth=(USER, PASSWORD)
    ) as sock:
        sock.sendall(b"still here")
        assert socks5client.recv_exact(sock, 10) == b"still here"
    assert time.monotonic() - started < 2.0, "the normal client waited"
    deadline = time.monotonic() + 10
    while open_fds(daemon.proc.pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(daemon.proc.pid) <= baseline, f"seed {SEED}"
    assert daemon.proc.poll() is None
    output = daemon.output()
    assert "Traceback" not in output and "session_error" not in output, f"seed {SEED}"


def _ids(daemon) -> set[int]:
    return {e["conn_id"] for e in daemon.access_events()}

"""sd_notify and socket activation by their environment protocol (no daemon needed)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from proxyd.systemd import Notifier, listen_sockets


def test_notifier_sends_to_a_path_and_to_the_abstract_namespace(tmp_path: Path) -> None:
    for address, bind_to in (
        (str(tmp_path / "n"), str(tmp_path / "n")),
        (f"@proxyd-test-{os.getpid()}", f"\0proxyd-test-{os.getpid()}"),
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(bind_to)
            notifier = Notifier({"NOTIFY_SOCKET": address})
            assert notifier.enabled
            notifier.send("READY=1", "STATUS=0 active connections")
            assert receiver.recv(100) == b"READY=1\nSTATUS=0 active connections"
            notifier.close()


def test_notifier_without_a_socket_does_nothing() -> None:
    for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}):
        notifier = Notifier(environ)
        assert not notifier.enabled
        notifier.send("READY=1")  # no error
        assert notifier.watchdog_interval is None


def test_watchdog_interval_is_half_and_for_our_pid_only(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "3000000"}
    assert Notifier(env).watchdog_interval == 1.5
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 1.5
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({**env, "WATCHDOG_USEC": "x"}).watchdog_interval is None


def test_listen_sockets_only_for_our_pid() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert listen_sockets(environ) == []
    assert environ == {}  # never passed on to children
    assert listen_sockets({}) == []

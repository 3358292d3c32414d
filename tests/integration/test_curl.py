"""Real clients: curl through SOCKS5 and HTTP CONNECT against a local HTTP server."""

from __future__ import annotations

import subprocess

import pytest

from conftest import PASSWORD, USER


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("flag", "protocol"),
    [("--socks5", "socks5"), ("--socks5-hostname", "socks5"), ("--proxytunnel", "http")],
)
def test_fetch_through_proxy(start_daemon, origin, flag, protocol):
    daemon = start_daemon()
    proxy = f"127.0.0.1:{daemon.port}"
    proxy_args = (
        ["--proxytunnel", "--proxy", f"http://{proxy}"] if protocol == "http" else [flag, proxy]
    )
    # a name, so --socks5-hostname makes the proxy resolve it
    url = (
        origin.url.replace("127.0.0.1", "localhost") if flag == "--socks5-hostname" else origin.url
    )
    result = curl(*proxy_args, url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == origin.body

    line = daemon.access()
    assert line["protocol"] == protocol
    assert line["command"] == "connect"
    assert line["status"] == "ok"
    assert line["user"] is None
    host = "localhost" if flag == "--socks5-hostname" else "127.0.0.1"
    assert line["target"] == f"{host}:{origin.port}"
    assert line["bytes_down"] > len(origin.body)  # body plus response head
    assert 0 < line["bytes_up"] < 1024  # one GET request


@pytest.mark.parametrize("protocol", ["socks5", "http"])
def test_fetch_with_user(start_daemon, origin, users_file, protocol):
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    if protocol == "socks5":
        args = ["--socks5-hostname", f"{USER}:{PASSWORD}@127.0.0.1:{daemon.port}"]
    else:
        args = ["--proxytunnel", "--proxy", f"http://{USER}:{PASSWORD}@127.0.0.1:{daemon.port}"]
    result = curl(*args, origin.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == origin.body
    line = daemon.access()
    assert (line["user"], line["status"], line["protocol"]) == (USER, "ok", protocol)


@pytest.mark.parametrize("protocol", ["socks5", "http"])
def test_wrong_password_refused(start_daemon, origin, users_file, protocol):
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    if protocol == "socks5":
        args = ["--socks5", f"{USER}:not-the-password@127.0.0.1:{daemon.port}"]
    else:
        args = [
            "--proxytunnel",
            "--proxy",
            f"http://{USER}:not-the-password@127.0.0.1:{daemon.port}",
            "--write-out",
            "%{http_connect}",
        ]
    result = curl(*args, origin.url)
    assert result.returncode != 0
    assert result.stdout != origin.body
    if protocol == "http":
        assert result.stdout.endswith(b"407")
    line = daemon.access()
    assert (line["user"], line["status"]) == (USER, "auth_failed")
    assert "not-the-password" not in daemon.output()


def test_refused_target_gives_502(start_daemon):
    from conftest import closed_port

    daemon = start_daemon()
    port = closed_port()
    result = curl(
        "--proxytunnel",
        "--proxy",
        f"http://127.0.0.1:{daemon.port}",
        "--write-out",
        "%{http_connect}",
        f"http://127.0.0.1:{port}/",
    )
    assert result.returncode != 0
    assert result.stdout.endswith(b"502")
    line = daemon.access()
    assert (line["status"], line["target"]) == ("refused", f"127.0.0.1:{port}")


@pytest.mark.parametrize(("flag", "host"), [("--socks4", "127.0.0.1"), ("--socks4a", "localhost")])
def test_fetch_through_socks4(start_daemon, origin, flag, host):
    daemon = start_daemon()
    result = curl(flag, f"127.0.0.1:{daemon.port}", origin.url.replace("127.0.0.1", host))
    assert result.returncode == 0, result.stderr
    assert result.stdout == origin.body
    line = daemon.access()
    assert (line["protocol"], line["command"], line["status"]) == ("socks4", "connect", "ok")
    assert line["target"] == f"{host}:{origin.port}"
    assert line["bytes_down"] > len(origin.body)


def test_socks4_refused_when_users_are_configured(start_daemon, origin, users_file):
    """SOCKS4 cannot carry a password: refused (0x5B) unless auth.allow_socks4."""
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    result = curl("--socks4a", f"{USER}@127.0.0.1:{daemon.port}", origin.url)
    assert result.returncode != 0
    assert result.stdout == b""
    line = daemon.access()
    assert (line["protocol"], line["status"]) == ("socks4", "auth_failed")
    allowed = start_daemon(f'[auth]\nusers_file = "{users_file}"\nallow_socks4 = true\n')
    result = curl("--socks4a", f"127.0.0.1:{allowed.port}", origin.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == origin.body


def test_an_ipv6_listener(start_daemon, origin):
    daemon = start_daemon(listen="[::1]:0")
    assert daemon.host == "::1"
    for args in (
        ["--socks5-hostname", f"[::1]:{daemon.port}"],
        ["-x", f"http://[::1]:{daemon.port}"],
    ):
        result = curl(*args, origin.url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == origin.body
    assert daemon.access()["client"].startswith("[::1]:")

"""The command line: check-config, the open-proxy guard, passwd, signals, secrets in output."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PASSWORD, ROOT, USER, basic_token, proxyd, request_head
from integration import socks5client
from integration.test_proxy_protocol import socks5_tunnel, v1


def test_version():
    result = proxyd("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("proxyd ")


def test_check_config_good_file(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text((ROOT / "config" / "proxyd.toml").read_text())
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr


def test_check_config_reports_every_problem_with_key_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:99999"]\nmax_connections = "many"\n'
        "[timeouts]\nconnect = -1\n"
        '[buffers]\nread_size = 12\ncolour = "red"\n'
    )
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    for key in (
        "server.listen[0]",
        "server.max_connections",
        "timeouts.connect",
        "buffers.read_size",
        "buffers.colour",
    ):
        assert any(line.startswith(f"{path}: {key}: ") for line in lines), (key, lines)


def test_daemon_refuses_bad_config(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[timeouts]\nidle = 'forever'\n")
    result = proxyd("--config", str(path))
    assert result.returncode == 1
    assert f"{path}: timeouts.idle:" in result.stderr


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_open_proxy_guard_refuses_to_start(listen):
    result = proxyd("--listen", listen)
    assert result.returncode == 1
    assert "server.allow_open_proxy" in result.stderr
    assert "listening" not in result.stdout


def test_open_proxy_guard_check_config(tmp_path):
    path = tmp_path / "open.toml"
    path.write_text('[server]\nlisten = ["0.0.0.0:1080"]\n')
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "server.listen" in result.stderr


def test_a_users_file_without_users_is_refused(tmp_path):
    """No user in auth.users_file would silently mean no authentication."""
    users = tmp_path / "users"
    users.write_text("# nobody yet\n\n")
    users.chmod(0o600)
    path = tmp_path / "empty-users.toml"
    path.write_text(f'[auth]\nusers_file = "{users}"\n')
    result = proxyd("--config", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert f"{path}: auth.users_file: {users} holds no user" in result.stderr
    assert "listening" not in result.stdout
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "auth.users_file" in result.stderr
    assert "OK" not in result.stdout


# exposed on loopback: a balancer relays clients from anywhere
BALANCED = '[server]\nproxy_protocol_from = ["127.0.0.1/32"]\n'


def test_open_proxy_guard_takes_client_rules(start_daemon, tmp_path, tcp_server):
    """Exposed without users: it starts when nothing is allowed by default and every
    allow rule names its clients; then only those clients get through."""
    only_named = (
        BALANCED + 'default_action = "deny"\n'
        '[[rules]]\naction = "allow"\nclients = ["192.0.2.0/24"]\n'
        'destinations = ["127.0.0.0/8"]\n'
    )
    open_too = only_named + '[[rules]]\naction = "allow"\ndestinations = ["127.0.0.0/8"]\n'
    path = tmp_path / "open.toml"
    path.write_text(open_too)
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "server.proxy_protocol_from" in result.stderr
    assert "clients in every allow rule" in result.stderr
    result = proxyd("--config", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1 and "listening" not in result.stdout

    path.write_text(only_named)
    assert proxyd("check-config", "--config", str(path)).returncode == 0
    daemon = start_daemon(only_named)
    server = tcp_server()
    sock, rep = socks5_tunnel(daemon, v1("192.0.2.7", 5000), "127.0.0.1", server.port)
    sock.close()
    assert rep == 0
    sock, rep = socks5_tunnel(daemon, v1("198.51.100.7", 5001), "127.0.0.1", server.port)
    sock.close()
    assert rep == 2  # not a named client: denied by default_action


def test_socks4_with_users_on_an_exposed_daemon_needs_an_opt_in(start_daemon, tmp_path, users_file):
    """SOCKS4 carries no password: allowed on an exposed daemon, it opens the proxy."""
    socks4 = f'[auth]\nusers_file = "{users_file}"\nallow_socks4 = true\n'
    path = tmp_path / "socks4.toml"
    path.write_text(BALANCED + socks4)
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "auth.allow_socks4" in result.stderr
    result = proxyd("--config", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1 and "auth.allow_socks4" in result.stderr
    # opted in: it starts (and on loopback only it always did)
    path.write_text(BALANCED + "allow_open_proxy = true\n" + socks4)
    assert proxyd("check-config", "--config", str(path)).returncode == 0
    start_daemon(BALANCED + "allow_open_proxy = true\n" + socks4)
    start_daemon(socks4)


def test_passwd_writes_private_hashed_file(tmp_path):
    path = tmp_path / "users"
    assert proxyd("passwd", "--file", str(path), "bob", stdin=b"first-secret\n").returncode == 0
    assert proxyd("passwd", "--file", str(path), "carol", stdin=b"carol-secret\n").returncode == 0
    assert proxyd("passwd", "--file", str(path), "bob", stdin=b"second-secret\n").returncode == 0
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [line.split(":")[0] for line in text.splitlines()] == ["carol", "bob"]
    assert "secret" not in text
    assert all(line.split(":", 1)[1].startswith("$scrypt$") for line in text.splitlines())
    assert not [p for p in os.listdir(tmp_path) if p != "users"]  # no temp file left


def test_check_config_warns_of_users_hashed_at_different_costs(tmp_path):
    """A login's time shows whether its user exists when the users' scrypt costs
    differ (the decoy for unknown names has one of them): warned, still OK."""
    from proxyd.auth import hash_password

    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('a', log_n=12)}\nbob:{hash_password('b', log_n=10)}\n")
    users.chmod(0o600)
    path = tmp_path / "proxyd.toml"
    path.write_text(f'[auth]\nusers_file = "{users}"\n')
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "warning: users_file_mixed_costs" in result.stderr
    users.write_text(f"alice:{hash_password('a', log_n=10)}\nbob:{hash_password('b', log_n=10)}\n")
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 0 and "mixed_costs" not in result.stderr


def test_passwd_rejects_bad_input(tmp_path):
    path = tmp_path / "users"
    assert proxyd("passwd", "--file", str(path), "bad:name", stdin=b"pw\n").returncode == 1
    assert proxyd("passwd", "--file", str(path), "dave", stdin=b"\n").returncode == 1
    assert not path.exists()


def test_sigterm_and_sigint_stop_with_open_tunnel(start_daemon, tcp_server):
    """With no grace, a stop signal closes every tunnel at once."""
    server = tcp_server()
    for sig in (signal.SIGTERM, signal.SIGINT):
        daemon = start_daemon("[server]\nshutdown_grace = 0\n")
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
        with sock:
            assert rep == 0
            started = time.monotonic()
            assert daemon.stop(sig) == 0
            assert time.monotonic() - started < 5
            assert sock.recv(1) == b""
        assert daemon.access()["status"] == "shutdown"
        daemon.wait_for(lambda e: e.get("event") == "stopped")


def test_no_secret_in_any_output(start_daemon, users_file, tcp_server):
    """Passwords, Authorization values and hashes never reach stdout or stderr."""

    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\nmax_failures = 3\n', "--log-level", "debug"
    )
    server = tcp_server()
    for password in (PASSWORD, "wrong-password-xyz"):
        sock, _, _, _ = socks5client.connect(
            daemon.address, "127.0.0.1", server.port, auth=(USER, password)
        )
        sock.close()
    import socket as socketlib

    for password in (PASSWORD, "wrong-password-xyz"):
        with socketlib.create_connection(daemon.address, timeout=5) as sock:
            sock.sendall(request_head("CONNECT", f"127.0.0.1:{server.port}", password=password))
            sock.recv(4096)
    # a malformed head that quotes a credential must not be echoed into the log either
    with socketlib.create_connection(daemon.address, timeout=5) as sock:
        sock.sendall(b"CONNECT x:1 HTTP/1.1\r\nProxy-Authorization Basic c2VjcmV0LXRva2Vu\r\n\r\n")
        sock.recv(4096)
    # user information inside a target is a password too
    for raw in (
        b"GET http://alice:userinfo-secret@127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n",
        b"CONNECT alice:userinfo-secret@127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        with socketlib.create_connection(daemon.address, timeout=5) as sock:
            sock.sendall(raw)
            sock.recv(4096)
    for i in range(1, 8):
        daemon.access(lambda e, i=i: e["conn_id"] == i)
    # forwarded requests carry credentials in every request; the third failure
    # (with the two above) locks the client out, and the lockout is logged
    for password in ("wrong-password-xyz", PASSWORD):
        with socketlib.create_connection(daemon.address, timeout=5) as sock:
            url = f"http://127.0.0.1:{server.port}/"
            sock.sendall(request_head("GET", url, host="127.0.0.1", password=password))
            sock.recv(4096)
    daemon.wait_for(lambda e: e.get("event") == "auth_lockout")
    assert daemon.access(lambda e: e["conn_id"] == 9)["status"] == "locked_out"
    daemon.stop()
    output = daemon.output()
    hashes = [line.split(":", 1)[1] for line in users_file.read_text().splitlines()]
    for secret in (PASSWORD, "wrong-password-xyz", "c2VjcmV0LXRva2Vu", "userinfo-secret", *hashes):
        assert secret not in output
    for password in (PASSWORD, "wrong-password-xyz"):
        assert basic_token(USER, password) not in output


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "proxyd"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout == proxyd("--version").stdout


def test_passwd_on_a_terminal_does_not_echo(tmp_path):
    """On a terminal the password is asked twice and never echoed back."""
    import pty
    import select

    path = tmp_path / "users"
    pid, fd = pty.fork()
    if pid == 0:  # child: its controlling terminal is the pty
        try:
            os.execv(
                sys.executable,
                [sys.executable, "-m", "proxyd", "passwd", "--file", str(path), "erin"],
            )
        finally:
            os._exit(127)
    output = b""
    deadline = time.monotonic() + 20
    answered = 0
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
            prompts = output.count(b"Password for erin: ") + output.count(b"Again: ")
            if prompts > answered:
                os.write(fd, b"tty-secret-77\n")
                answered += 1
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert answered == 2, output
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"tty-secret-77" not in output
    assert path.read_text().startswith("erin:$scrypt$")

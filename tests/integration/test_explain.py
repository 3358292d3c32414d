"""`proxyd explain` against the real daemon: for each (client, user, target) of one
config, explain's answer (allowed or not, the deciding rule or default) is the
daemon's own, and an allowed target is one the daemon connected to."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import PASSWORD, ROOT, USER, local_names
from integration import socks5client

OTHER, OTHER_PASSWORD = "bob", "looking-glass-7"  # a user the rules refuse good.test


@dataclass(frozen=True)
class Case:
    client: str
    user: str
    target: str  # HOST:PORT, ports named by the servers: {one}, {two}, {own}
    allowed: bool
    rule: int | None
    reason: str


CASES = [
    Case("127.0.0.1", USER, "good.test:{one}", True, 1, "rule"),  # by name
    Case("127.0.0.1", OTHER, "good.test:{one}", False, 0, "rule"),  # by user
    Case("127.0.0.2", USER, "127.0.0.2:{two}", True, 2, "rule"),  # by CIDR, for its clients
    Case("127.0.0.1", USER, "127.0.0.2:{two}", False, None, "private_destination"),
    Case("127.0.0.1", USER, "other.test:{one}", False, None, "private_destination"),
    Case("127.0.0.1", USER, "via.test:{one}", True, 3, "rule"),  # through the parent
    Case("127.0.0.1", USER, "127.0.0.1:{own}", False, None, "own_listener"),
]

JSON_KEYS = {
    "config",
    "request",
    "allowed",
    "status",
    "rule",
    "reason",
    "error",
    "rule_source",
    "default_action",
    "private_destinations",
    "own_ports",
    "addresses",
    "lookup_error",
    "dialable",
    "route",
    "credentials",
    "limits",
    "quota",
}


def config(users: Path, parent_port: int) -> str:
    return f"""\
[server]
private_destinations = "deny"

[auth]
users_file = "{users}"

[[upstreams]]
name = "p"
servers = ["socks5h://127.0.0.1:{parent_port}"]

# bob may not reach good.test
[[rules]]
action = "deny"
users = ["{OTHER}"]
destinations = ["good.test"]

[[rules]]
action = "allow"
destinations = ["good.test"]

[[rules]]
action = "allow"
clients = ["127.0.0.2/32"]
destinations = ["127.0.0.2/32"]

[[rules]]
action = "allow"
destinations = ["via.test"]
via = "p"
"""


@pytest.fixture
def setup(start_daemon, tcp_server, users_file, tmp_path):
    """A parent daemon, a child daemon routing via.test through it, echo servers on
    127.0.0.1 and 127.0.0.2, and the command prefix that gives explain their names."""
    users = tmp_path / "users"
    users.write_bytes(users_file.read_bytes())
    users.chmod(0o600)
    subprocess.run(
        [sys.executable, "-m", "proxyd", "passwd", "--file", str(users), OTHER],
        input=f"{OTHER_PASSWORD}\n".encode(),
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 good.test other.test via.test\n")
    one, two = tcp_server(), tcp_server(host="127.0.0.2")
    parent = start_daemon(hosts=hosts)
    child = start_daemon(config(users, parent.port), hosts=hosts)
    path = child.config_path
    assert path is not None
    ports = {"one": one.port, "two": two.port, "own": child.port}
    prefix = local_names(tmp_path / "explain-names", hosts)
    return child, path, ports, prefix


def run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Each command run to its end, all at once (each is a Python start-up)."""
    procs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        for command in commands
    ]
    done = []
    for proc, command in zip(procs, commands, strict=True):
        out, err = proc.communicate(timeout=30)
        done.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return done


def explain_all(
    prefix: list[str], path: Path, own_port: int, argvs: list[list[str]]
) -> list[subprocess.CompletedProcess[str]]:
    """`proxyd explain` for each argv, all at once, with the test's names and the
    daemon's listener as its own (explain takes --listen as the daemon does)."""
    base = [sys.executable, "-m", "proxyd", "--listen", f"127.0.0.1:{own_port}", "explain"]
    return run_all([[*prefix, *base, "--config", str(path), *argv] for argv in argvs])


def ask_daemon(daemon: Any, case: Case, target: str) -> dict[str, Any]:
    """The request through the daemon: its access line (once the tunnel has ended),
    after proving an allowed tunnel reaches the target."""
    host, _, port = target.rpartition(":")
    password = PASSWORD if case.user == USER else OTHER_PASSWORD
    sock, rep, _, _ = socks5client.connect(
        daemon.address, host, int(port), auth=(case.user, password), source=case.client
    )
    with sock:
        if rep == 0:
            sock.sendall(b"explained")
            assert socks5client.recv_exact(sock, 9) == b"explained"
    return daemon.access(
        lambda e: (
            (e["target"], e["user"]) == (target, case.user)
            and e["client"].startswith(case.client + ":")
        )
    )


def test_explain_answers_as_the_daemon_does(setup):
    daemon, path, ports, prefix = setup
    targets = [case.target.format(**ports) for case in CASES]
    argvs = [
        ["--client", case.client, "--user", case.user, "--json", target]
        for case, target in zip(CASES, targets, strict=True)
    ]
    results = explain_all(prefix, path, ports["own"], argvs)
    for case, target, done in zip(CASES, targets, results, strict=True):
        assert done.returncode == (0 if case.allowed else 3), (case, done.stderr)
        answer = json.loads(done.stdout)
        assert set(answer) == JSON_KEYS
        assert (answer["allowed"], answer["rule"], answer["reason"]) == (
            case.allowed,
            case.rule,
            case.reason,
        ), (case, answer)
        line = ask_daemon(daemon, case, target)
        # the daemon's own answer, and its reason, as its access line gives them
        assert (line["status"] == "ok") is case.allowed, (case, line)
        assert line.get("rule") == answer["rule"], (case, line, answer)
        assert line.get("reason", "rule" if line.get("rule") is not None else None) == (
            None if case.reason == "default_action" else case.reason
        ), (case, line)
        if case.allowed:
            assert line.get("via") == answer["route"]["via"]
            if answer["route"]["via"] is None:
                host = target.rpartition(":")[0]
                assert answer["dialable"] == [host if host[0].isdigit() else "127.0.0.1"]
        else:
            assert answer["dialable"] == []
    via = json.loads(results[5].stdout)
    assert (via["route"]["via"], via["route"]["strategy"]) == ("p", "round_robin")
    assert via["route"]["servers"] == [f"socks5h://127.0.0.1:{daemon_parent_port(path)}"]
    assert via["addresses"] == ["127.0.0.1"] and via["dialable"] is None  # the parent resolves


def daemon_parent_port(path: Path) -> int:
    text = path.read_text()
    return int(text.split("socks5h://127.0.0.1:")[1].split('"')[0])


def test_explain_human_output_exit_codes_and_credentials(setup, tmp_path):
    _daemon, path, ports, prefix = setup
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nbogus = 1\n")
    open_proxy = tmp_path / "open.toml"
    open_proxy.write_text('[server]\nlisten = ["0.0.0.0:1080"]\n')
    human, unknown, no_user, denied_json = explain_all(
        prefix,
        path,
        ports["own"],
        [
            ["--user", OTHER, f"good.test:{ports['one']}"],
            ["--user", "carol", "--json", f"good.test:{ports['one']}"],
            ["--json", f"good.test:{ports['one']}"],
            ["--user", USER, "--protocol", "http", "--command", "GET", "--json", "nowhere.test:80"],
        ],
    )
    assert human.returncode == 3
    text = human.stdout
    assert f"rule:        {path}, lines 12-15" in text, text
    assert f'             users = ["{OTHER}"]' in text
    assert "decided by:  rules[0]" in text and "decision:    refused (denied)" in text
    assert "credentials: required" in text and "the user exists" in text
    assert "$scrypt$" not in text and "looking-glass" not in text
    for done, why in ((unknown, "no user 'carol'"), (no_user, "credentials required")):
        answer = json.loads(done.stdout)
        assert done.returncode == 3 and answer["status"] == "auth_failed", answer
        assert answer["reason"] == "credentials" and why in answer["error"]
    assert json.loads(unknown.stdout)["credentials"]["user_exists"] is False
    # a name the daemon cannot resolve: unreachable, as the daemon would answer
    answer = json.loads(denied_json.stdout)
    assert denied_json.returncode == 3 and answer["status"] == "unreachable", answer
    assert answer["request"]["command"] == "GET" and answer["addresses"] == []
    cli = [sys.executable, "-m", "proxyd", "explain", "--config"]
    bad = [["no-port"], ["a:99999"], ["--client", "nobody", "a:1"], ["--protocol", "x", "a:1"]]
    broken_done, open_done, *usage = run_all(
        [
            [*cli, str(broken), "1.2.3.4:80"],
            [*cli, str(open_proxy), "1.2.3.4:80"],
            *([*cli, str(path), *argv] for argv in bad),
        ]
    )
    for done, problem in (
        (broken_done, "server.bogus: unknown key"),
        (open_done, "anyone could use this proxy"),
    ):
        assert done.returncode == 1 and done.stdout == "" and problem in done.stderr, done
    for done in usage:
        assert done.returncode == 2 and "usage: proxyd explain" in done.stderr, done

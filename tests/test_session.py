"""proxyd.session's phases: every transition the driver may make is in one table, and
any other raises (as h11's _state.py does), so a step taken out of turn is a bug
that shows, not a session that limps on."""

from __future__ import annotations

import asyncio
import socket

import pytest
from test_gate import context

from proxyd import session
from proxyd.errors import LocalProtocolError
from proxyd.session import _NEXT, Phase, Session


def test_every_phase_but_the_end_is_in_the_table_and_the_end_leads_nowhere() -> None:
    assert set(_NEXT) == set(Phase) - {Phase.DONE}
    reachable = {Phase.HANDSHAKE}
    for targets in _NEXT.values():
        reachable |= targets
    assert reachable == set(Phase) - {Phase.DONE}  # DONE: by _end, from anywhere


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], Phase.RELAY),  # a tunnel before its request was checked and connected
        ([Phase.CONNECT], Phase.FORWARD),
        ([Phase.CONNECT, Phase.RELAY], Phase.HANDSHAKE),  # back to reading a handshake
        ([Phase.UDP], Phase.CONNECT),
        ([Phase.TLS], Phase.CONNECT),
    ],
)
def test_a_transition_out_of_turn_raises(path: list[Phase], bad: Phase) -> None:
    async def run() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        with theirs:
            s = Session(context(), ours, ("127.0.0.1", 1), 1, on_close=lambda _s: None)
            for phase in path:
                s._enter(phase)
            with pytest.raises(LocalProtocolError):
                s._enter(bad)
            s._end(session.Status.SHUTDOWN, None)

    asyncio.run(run())

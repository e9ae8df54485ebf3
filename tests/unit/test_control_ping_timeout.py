"""The control ``ping`` method leaves the timeout to the ping itself (in virtual time)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

from lattica.control.errors import ControlError
from lattica.control.node_methods import PingParams, register_node_methods
from lattica.control.registry import MethodRegistry
from lattica.errors import RpcError
from lattica.node import Node


class _SilentPeerNode:
    """A node whose ping to a silent connection times out on its own clock, which starts a
    little after the control method's (as the real one: the RPC layer closes the silent
    connection when that timeout fires, so the next ping dials afresh)."""

    def __init__(self) -> None:
        self.own_timeout_fired = False

    async def ping(self, target: object, *, timeout_s: float) -> Any:
        await trio.sleep(timeout_s + 0.01)
        self.own_timeout_fired = True
        raise RpcError("timeout", f"no answer within {timeout_s:g} s")


async def test_a_ping_that_times_out_runs_its_own_timeout_and_reports_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Review finding: the method's own limit equalled the ping's and fired first, as a
    # cancellation, so the RPC layer never closed the silent connection and every ping for
    # ~60 s reused it.
    node = _SilentPeerNode()
    registry = MethodRegistry()
    register_node_methods(registry, cast(Node, node))
    method = registry.get("ping")
    assert method is not None
    with pytest.raises(ControlError) as info:
        await method.handler(PingParams(addr="127.0.0.1:4001", timeout_s=10.0))
    assert node.own_timeout_fired
    assert info.value.code == "timeout"
    assert "within 10 s" in str(info.value)

"""Which connection carries bulk data (BulkPath): how often TCP is tried where it fails, with
fake transports in virtual time (the real ones: tests/socket/test_tcp_transport.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from lattica.errors import ConnectError, ConnectRefusedError, ConnectTimeoutError
from lattica.identity import Identity, PeerId
from lattica.net.bulk_path import BulkPath

X = Identity.from_seed(b"x" * 32).peer_id
Y = Identity.from_seed(b"y" * 32).peer_id
RELAY = Identity.from_seed(b"r" * 32).peer_id


class FakeQuic:
    def __init__(self, peer_id: PeerId, address: tuple[str, int], relayed_via: PeerId | None = None) -> None:
        self.peer_id = peer_id
        self.remote_address = address
        self.relayed_via = relayed_via


class FakeManager:
    def __init__(self) -> None:
        self.current: dict[PeerId, FakeQuic] = {}

    async def connect(self, peer: PeerId, *, timeout_s: float = 10.0) -> FakeQuic:
        await trio.lowlevel.checkpoint()
        return self.current[peer]


class FailingTcp:
    """Every dial fails: refused at once, or after its timeout (a NAT that drops SYNs)."""

    def __init__(self, error: type[ConnectError]) -> None:
        self.error = error
        self.attempts = 0

    def connection(self, peer_id: PeerId) -> None:
        return None

    async def connect(self, peer: Any, *, timeout_s: float) -> None:
        self.attempts += 1
        if self.error is ConnectTimeoutError:
            await trio.sleep(timeout_s)
        else:
            await trio.lowlevel.checkpoint()
        raise self.error("no")


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def path(tcp: FailingTcp) -> tuple[BulkPath, FakeManager]:
    manager = FakeManager()
    return BulkPath(manager, tcp, tcp_attempt_timeout_s=3.0), manager  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [ConnectRefusedError, ConnectTimeoutError])
async def test_one_attempt_per_retry_period_beside_one_quic_connection(
    mock_clock: trio.testing.MockClock, error: type[ConnectError]
) -> None:
    tcp = FailingTcp(error)
    bulk, manager = path(tcp)
    manager.current[X] = FakeQuic(X, ("10.0.0.1", 4001))
    for _ in range(20):
        assert await bulk.connection(X) is manager.current[X]
    assert tcp.attempts == 1


async def test_a_timed_out_attempt_is_not_repeated_beside_each_new_quic_connection(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A peer whose QUIC connection is new for every transfer (review finding: 3 s per transfer).
    tcp = FailingTcp(ConnectTimeoutError)
    bulk, manager = path(tcp)
    for _ in range(20):
        manager.current[X] = FakeQuic(X, ("10.0.0.1", 4001))
        await bulk.connection(X)
    assert tcp.attempts == 1


async def test_a_refused_attempt_is_repeated_beside_a_new_quic_connection(mock_clock: trio.testing.MockClock) -> None:
    # Refused: nothing listened (a peer restarting); a new connection may be the restarted peer.
    tcp = FailingTcp(ConnectRefusedError)
    bulk, manager = path(tcp)
    for _ in range(3):
        manager.current[X] = FakeQuic(X, ("10.0.0.1", 4001))
        await bulk.connection(X)
        await bulk.connection(X)
    assert tcp.attempts == 3


async def test_relayed_connections_never_try_tcp(mock_clock: trio.testing.MockClock) -> None:
    # Their address is the relay's, shared by every peer behind it (review finding: each
    # transfer alternating between two relayed peers tried TCP at the relay).
    tcp = FailingTcp(ConnectTimeoutError)
    bulk, manager = path(tcp)
    manager.current[X] = FakeQuic(X, ("198.51.100.7", 4001), relayed_via=RELAY)
    manager.current[Y] = FakeQuic(Y, ("198.51.100.7", 4001), relayed_via=RELAY)
    for _ in range(10):
        assert await bulk.connection(X) is manager.current[X]
        assert await bulk.connection(Y) is manager.current[Y]
    assert tcp.attempts == 0

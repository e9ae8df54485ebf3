"""ConnectionManager: one connection per peer, shared dials, address book, idle close."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lattica.errors import ConnectError, PeerIdMismatchError
from lattica.identity import Identity
from lattica.net import Connection, ConnectionManager, Endpoint, EndpointConfig, PeerAddr

from .conftest import MakeEndpoint


async def _manager(
    nursery: trio.Nursery, endpoint: Endpoint, *, idle_close_s: float | None = None
) -> ConnectionManager:
    manager = ConnectionManager(endpoint, idle_close_s=idle_close_s)
    await nursery.start(manager.run)
    return manager


async def test_connect_reuses_the_live_connection(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    await _manager(nursery, bob)
    first = await manager.connect(PeerAddr(bob.local_address, bob.peer_id))
    again = await manager.connect(bob.peer_id)
    by_addr = await manager.connect(PeerAddr(bob.local_address, bob.peer_id))
    assert first is again is by_addr
    assert manager.connection(bob.peer_id) is first
    assert alice.stats.outbound_connections == 1


async def test_concurrent_connect_calls_share_one_dial(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    manager.add_addresses(bob.peer_id, [bob.local_address])
    results: list[Connection] = []

    async def dial() -> None:
        results.append(await manager.connect(bob.peer_id))

    async with trio.open_nursery() as dials:
        for _ in range(5):
            dials.start_soon(dial)
    assert len(results) == 5 and all(c is results[0] for c in results)
    assert alice.stats.outbound_connections == 1
    assert bob.stats.inbound_connections == 1


async def test_dialling_an_address_without_id_learns_the_peer_id_and_address(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    conn = await manager.connect(PeerAddr.parse(f"127.0.0.1:{bob.local_address[1]}"))
    assert conn.peer_id == bob.peer_id
    assert manager.addresses(bob.peer_id) == [bob.local_address]
    assert await manager.connect(bob.peer_id) is conn


async def test_unknown_peer_id_without_addresses_fails_to_connect(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    manager = await _manager(nursery, await make_endpoint())
    with pytest.raises(ConnectError, match="no known address"):
        await manager.connect(Identity.generate().peer_id)


async def test_wrong_peer_at_address_raises_mismatch(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    with pytest.raises(PeerIdMismatchError):
        await manager.connect(PeerAddr(bob.local_address, Identity.generate().peer_id))
    assert manager.connections() == []


async def test_callbacks_see_connect_and_disconnect_and_reconnect_works(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    connected: list[Connection] = []
    disconnected = trio.Event()
    manager.on_connected(connected.append)
    manager.on_disconnected(lambda c: disconnected.set())
    conn = await manager.connect(PeerAddr(bob.local_address, bob.peer_id))
    assert connected == [conn]
    await conn.aclose("test")
    await disconnected.wait()
    assert manager.connection(bob.peer_id) is None
    again = await manager.connect(bob.peer_id)  # from the address book
    assert again is not conn and not again.is_closed


async def test_idle_connections_are_closed(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    config = EndpointConfig(idle_timeout_s=1000, keepalive_interval_s=10)
    alice, bob = await make_endpoint(config=config), await make_endpoint(config=config)
    manager = await _manager(nursery, alice, idle_close_s=60.0)
    conn = await manager.connect(PeerAddr(bob.local_address, bob.peer_id))
    start = trio.current_time()
    await conn.wait_closed()
    assert conn.close_reason == "idle"
    assert 59.9 <= trio.current_time() - start <= 60.0 * 1.25 + 1

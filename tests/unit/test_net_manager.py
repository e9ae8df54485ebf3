"""ConnectionManager: one connection per peer, shared dials, address book, idle close."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lattica.errors import ConnectError, DialSelfError, PeerIdMismatchError
from lattica.identity import Identity
from lattica.net import Connection, ConnectionManager, Endpoint, EndpointConfig, PeerAddr, UdpSocket

from .conftest import MakeEndpoint


async def _manager(
    nursery: trio.Nursery, endpoint: Endpoint, *, idle_close_s: float | None = None
) -> ConnectionManager:
    manager = ConnectionManager(endpoint, idle_close_s=idle_close_s)
    await nursery.start(manager.run)
    return manager


async def test_connect_reuses_the_live_connection(make_endpoint: MakeEndpoint, nursery: trio.Nursery) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    await _manager(nursery, bob)
    first = await manager.connect(PeerAddr(bob.local_address, bob.peer_id))
    again = await manager.connect(bob.peer_id)
    by_addr = await manager.connect(PeerAddr(bob.local_address, bob.peer_id))
    assert first is again is by_addr
    assert manager.connection(bob.peer_id) is first
    assert alice.stats.outbound_connections == 1


async def test_concurrent_connect_calls_share_one_dial(make_endpoint: MakeEndpoint, nursery: trio.Nursery) -> None:
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


async def test_wrong_peer_at_address_raises_mismatch(make_endpoint: MakeEndpoint, nursery: trio.Nursery) -> None:
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
    connected_event = trio.Event()
    disconnected = trio.Event()

    async def record_connected(connection: Connection) -> None:
        connected.append(connection)
        connected_event.set()

    async def record_disconnected(connection: Connection) -> None:
        disconnected.set()

    manager.on_connected(record_connected)
    manager.on_disconnected(record_disconnected)
    conn = await manager.connect(PeerAddr(bob.local_address, bob.peer_id))
    await connected_event.wait()
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


# --- A failure involving one peer never ends the node (issue 8, A1) --------------------------


async def test_an_unsendable_address_from_the_network_is_not_stored_and_the_manager_survives(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    liar = Identity.generate().peer_id
    # What a hostile Ping or FIND_NODE answer carried: sendto raised TypeError on it, which
    # escaped the dial task and cancelled the manager's nursery (the daemon exited with 1).
    manager.add_addresses(liar, [("a\x00b", 4001), ("example.org", 4001), ("127.0.0.1", 0)])
    manager.add_addresses(liar, [("::ffff:127.0.0.1", 4999)])
    assert manager.addresses(liar) == [("127.0.0.1", 4999)]
    assert manager.invalid_addresses_ignored == 3
    with pytest.raises(ConnectError):
        await manager.connect(PeerAddr(("a\x00b", 4001), liar))
    assert (await manager.connect(PeerAddr(bob.local_address, bob.peer_id))).peer_id == bob.peer_id


async def test_any_exception_from_one_dial_ends_that_dial_only(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    real_connect = alice.connect
    broken = Identity.generate().peer_id

    async def connect(address: tuple[str, int], **kwargs: object) -> Connection:
        if kwargs.get("expected_peer") == broken:
            raise TypeError("a bug below the manager, reached by one peer")
        return await real_connect(address, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(alice, "connect", connect)
    with pytest.raises(ConnectError, match="TypeError"):
        await manager.connect(PeerAddr(("127.0.0.1", 4999), broken))
    assert (await manager.connect(PeerAddr(bob.local_address, bob.peer_id))).peer_id == bob.peer_id


async def test_a_stream_handler_bug_closes_that_connection_not_the_node(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    await _manager(nursery, alice)
    server = await _manager(nursery, bob)

    async def buggy(stream: object) -> None:
        raise KeyError("bug")

    server.set_stream_handler(buggy)  # type: ignore[arg-type]
    client = await _manager(nursery, await make_endpoint())
    conn = await client.connect(PeerAddr(bob.local_address, bob.peer_id))
    stream = await conn.open_stream()
    await stream.send_all(b"x")
    with trio.fail_after(5):
        await conn.wait_closed()
    assert conn.close_reason is not None and "internal error" in conn.close_reason
    # bob still serves others.
    other = await _manager(nursery, await make_endpoint())
    assert (await other.connect(PeerAddr(bob.local_address, bob.peer_id))).peer_id == bob.peer_id


async def test_a_failing_connected_handler_surfaces(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            alice = Endpoint(Identity.generate(), UdpSocket.bind("127.0.0.1", 0))
            bob = Endpoint(Identity.generate(), UdpSocket.bind("127.0.0.1", 0))
            await nursery.start(alice.run)
            await nursery.start(bob.run)
            manager = await _manager(nursery, alice)
            await _manager(nursery, bob)

            async def failing(connection: Connection) -> None:
                raise RuntimeError("bug in a connected handler")

            manager.on_connected(failing)
            await manager.connect(PeerAddr(bob.local_address, bob.peer_id))
            await trio.sleep(5)  # virtual: the failure ends the nursery long before
            nursery.cancel_scope.cancel()
    assert info.group_contains(RuntimeError, match="bug in a connected handler")


# --- Address families and names (issue 8, A5) ------------------------------------------------


async def test_a_dual_stack_node_dials_ipv4_and_ipv6_peers(nursery: trio.Nursery) -> None:
    async def start(host: str) -> tuple[Endpoint, ConnectionManager]:
        endpoint = Endpoint(Identity.generate(), UdpSocket.bind(host, 0))
        await nursery.start(endpoint.run)
        return endpoint, await _manager(nursery, endpoint)

    _, dual = await start("::")
    v4, _ = await start("127.0.0.1")
    v6, _ = await start("::1")
    conn4 = await dual.connect(PeerAddr(v4.local_address, v4.peer_id), timeout_s=5)
    conn6 = await dual.connect(PeerAddr(v6.local_address, v6.peer_id), timeout_s=5)
    assert conn4.remote_address == v4.local_address == ("127.0.0.1", v4.local_address[1])
    assert conn6.remote_address == v6.local_address
    # The IPv4 peer sees the dual-stack node at a plain IPv4 address.
    [inbound] = [c for c in v4.connections() if c.direction == "inbound"]
    assert inbound.remote_address == ("127.0.0.1", dual.endpoint.local_address[1])


async def test_an_ipv4_node_dialling_ipv6_fails_at_once_with_the_reason(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    manager = await _manager(nursery, await make_endpoint())
    peer = Identity.generate().peer_id
    began = trio.current_time()
    with pytest.raises(ConnectError, match=r"IPv4-only.*cannot reach IPv6 address ::1"):
        await manager.connect(PeerAddr(("::1", 4001), peer), timeout_s=10)
    manager.add_addresses(peer, [("::1", 4001)])
    with pytest.raises(ConnectError, match="IPv4-only"):
        await manager.connect(peer, timeout_s=10)
    assert trio.current_time() == began  # no timeout was waited for


async def test_names_are_resolved_by_the_async_resolver_and_checked(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    asked: list[tuple[str, int]] = []

    async def resolve(name: str, port: int) -> list[tuple[str, int]]:
        asked.append((name, port))
        await trio.lowlevel.checkpoint()
        if name == "missing.test":
            raise OSError("Name or service not known")
        if name == "hostile.test":
            return [("a\x00b", port), ("0.0.0.0", port)]
        return [("::1", port), ("::ffff:127.0.0.1", port)]  # the IPv6 answer is unusable here

    manager = ConnectionManager(alice, idle_close_s=None, resolve=resolve)
    await nursery.start(manager.run)
    conn = await manager.connect(PeerAddr.parse(f"{bob.peer_id}@bob.test:{bob.local_address[1]}"))
    assert conn.remote_address == bob.local_address
    with pytest.raises(ConnectError, match=r"cannot resolve 'missing\.test'"):
        await manager.connect(PeerAddr.parse("missing.test:4001"))
    with pytest.raises(ConnectError, match="no usable address"):
        await manager.connect(PeerAddr.parse("hostile.test:4001"))
    assert asked == [("bob.test", bob.local_address[1]), ("missing.test", 4001), ("hostile.test", 4001)]


async def test_a_slow_resolver_is_bounded(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def never(name: str, port: int) -> list[tuple[str, int]]:
        await trio.sleep_forever()
        raise AssertionError

    manager = ConnectionManager(await make_endpoint(), resolve=never, resolve_timeout_s=3)
    await nursery.start(manager.run)
    with pytest.raises(ConnectError, match=r"resolving 'slow\.test' timed out"):
        await manager.connect(PeerAddr.parse("slow.test:4001"))


# --- A node never dials itself (issue 8, B9) -------------------------------------------------


async def test_dialling_our_own_peer_id_is_refused(make_endpoint: MakeEndpoint, nursery: trio.Nursery) -> None:
    alice = await make_endpoint()
    manager = await _manager(nursery, alice)
    with pytest.raises(DialSelfError):
        await manager.connect(PeerAddr(alice.local_address, alice.peer_id))
    with pytest.raises(DialSelfError):
        await manager.connect(alice.peer_id)
    assert alice.stats.outbound_connections == 0


async def test_an_address_only_dial_that_reaches_ourselves_is_closed(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery
) -> None:
    alice = await make_endpoint()
    manager = await _manager(nursery, alice)
    with pytest.raises(DialSelfError):
        await manager.connect(PeerAddr(alice.local_address))
    assert manager.connections() == []
    assert manager.addresses(alice.peer_id) == []
    with trio.fail_after(5):  # both ends of the connection to ourselves are being closed
        for connection in alice.connections():
            await connection.wait_closed()


# --- An explicit address is dialled (issue 8, B8) --------------------------------------------


async def test_an_explicit_address_is_dialled_even_with_a_connection_to_that_peer(
    make_endpoint: MakeEndpoint, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    alice, bob = await make_endpoint(), await make_endpoint()
    manager = await _manager(nursery, alice)
    first = await manager.connect_and_report(PeerAddr(bob.local_address, bob.peer_id))
    assert not first.reused
    again = await manager.connect_and_report(PeerAddr(bob.local_address, bob.peer_id))
    assert again.reused and again.connection is first.connection
    assert (await manager.connect_and_report(bob.peer_id)).reused
    closed_port = UdpSocket.bind("127.0.0.1", 0)
    elsewhere = closed_port.local_address
    closed_port.close()
    with pytest.raises(ConnectError):
        await manager.connect(PeerAddr(elsewhere, bob.peer_id), timeout_s=2)

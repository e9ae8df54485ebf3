"""The endpoint on kernel UDP sockets: what only a real socket can show."""

from __future__ import annotations

import pytest
import trio

from lattica.errors import ConnectError

from .conftest import MakeUdpEndpoint


async def test_two_endpoints_talk_over_loopback_udp(make_udp_endpoint: MakeUdpEndpoint) -> None:
    alice, bob = await make_udp_endpoint(), await make_udp_endpoint()
    conn = await alice.connect(bob.local_address, expected_peer=bob.peer_id)
    stream = await conn.open_stream()
    await stream.send_all(b"x" * 100_000)
    await stream.send_eof()
    (inbound,) = bob.connections()
    served = await inbound.accept_stream()
    received = b""
    while chunk := await served.receive_some():
        received += chunk
    assert received == b"x" * 100_000


@pytest.mark.parametrize("host", ["a\x00b", "\udcff.example"])
async def test_a_host_the_kernel_refuses_ends_that_dial_not_the_endpoint(
    make_udp_endpoint: MakeUdpEndpoint, host: str
) -> None:
    # Issue 8, A1: sendto raises TypeError for a NUL byte or an unencodable host, not OSError.
    # Neither reaches the system resolver: sendto rejects both before any lookup.
    node, honest = await make_udp_endpoint(), await make_udp_endpoint()
    healthy = await node.connect(honest.local_address, expected_peer=honest.peer_id)

    with trio.move_on_after(1.0) as guard:  # a hang guard: the refusal comes before any packet
        with pytest.raises(ConnectError, match="address is refused"):
            await node.connect((host, 4001))
    assert not guard.cancelled_caught
    stream = await healthy.open_stream()
    await stream.send_all(b"still here")
    await stream.send_eof()
    (served,) = honest.connections()
    assert await (await served.accept_stream()).receive_some() == b"still here"

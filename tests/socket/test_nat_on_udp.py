"""STUN observed addresses between two ``NatService``s, and an AutoNAT dial-back between two
nodes, on kernel UDP sockets (loopback only)."""

from __future__ import annotations

import socket

import pytest
import trio

from lattica.config import NodeConfig
from lattica.identity import Identity
from lattica.nat import NatService
from lattica.nat.autonat_messages import AUTONAT_PROTOCOL, DialBackRequest, decode_dial_back_response, encode_autonat
from lattica.nat.stun import decode_message, encode_binding_request, xor_mapped_address
from lattica.net import Endpoint, EndpointConfig, UdpSocket
from lattica.net.address import PeerAddr
from lattica.node import Node

from .conftest import MakeUdpEndpoint


async def test_each_side_learns_the_address_the_other_sees(
    make_udp_endpoint: MakeUdpEndpoint, nursery: trio.Nursery
) -> None:
    a, b = await make_udp_endpoint(), await make_udp_endpoint()
    nat_a, nat_b = NatService(a), NatService(b)
    await nursery.start(nat_a.run)
    await nursery.start(nat_b.run)
    assert await nat_a.observed_address(b.local_address, timeout_s=5) == a.local_address
    assert await nat_b.observed_address(a.local_address, timeout_s=5) == b.local_address


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_an_ipv6_client_gets_an_ipv6_mapped_address(nursery: trio.Nursery) -> None:
    server = Endpoint(Identity.generate(), UdpSocket.bind("::1", 0), EndpointConfig())
    await nursery.start(server.run)
    await nursery.start(NatService(server).run)
    client = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM)
    with client:
        await client.bind(("::1", 0))
        tid = bytes(range(12))
        await client.sendto(encode_binding_request(tid), server.local_address[:2])
        with trio.fail_after(5):
            answer, _ = await client.recvfrom(2048)
        message = decode_message(answer)
        assert message.transaction_id == tid
        assert xor_mapped_address(message) == client.getsockname()[:2]


async def test_an_autonat_dial_back_leaves_from_a_fresh_kernel_socket() -> None:
    async with (
        Node(
            Identity.generate(),
            UdpSocket.bind("127.0.0.1", 0),
            NodeConfig(),
            dial_back_socket_factory=lambda: UdpSocket.bind("127.0.0.1", 0),
        ) as server,
        Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0), NodeConfig()) as client,
    ):
        client.reachability.inbox.expect(until=trio.current_time() + 60)
        payload = encode_autonat(DialBackRequest(addresses=[client.socket.local_address]))
        with trio.fail_after(10):
            reply = await client.rpc.request(
                PeerAddr(server.socket.local_address, server.peer_id), AUTONAT_PROTOCOL, payload
            )
        response = decode_dial_back_response(reply)
        assert response.status == "ok" and response.nonce is not None
        source = client.reachability.inbox.received_from(response.nonce)
        assert source is not None and source[0] == "127.0.0.1"
        assert source != server.socket.local_address  # not the server's own port

"""Observed addresses over STUN between real ``Node``s on sim_net, in virtual time."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.identity import Identity
from lattica.nat import ObservedAddressError
from lattica.nat.stun import (
    BINDING_METHOD,
    StunClass,
    StunMessage,
    decode_message,
    encode_binding_request,
    encode_binding_success,
    encode_message,
    xor_mapped_address,
)
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import Filtering, LinkConfig, Mapping, NatConfig, Network, SimSocket

PORT = 4001
LINK = LinkConfig(latency_s=0.025)
NAT_LINK = LinkConfig(latency_s=0.005)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"nat-node-%d" % i).digest())


async def test_node_behind_endpoint_independent_nat_learns_its_public_address(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=11) as net:
        public_host = net.add_host("198.51.100.1", LINK)
        nat = net.add_nat(
            "203.0.113.1",
            NatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT),
        )
        private_host = nat.add_host("192.168.1.10", NAT_LINK)
        async with (
            Node(identity(0), public_host.bind(PORT), NodeConfig(), rng=random.Random(1)) as public,
            Node(identity(1), private_host.bind(PORT), NodeConfig(), rng=random.Random(2)) as private,
        ):
            began = trio.current_time()
            observed = await private.nat.observed_address(public.socket.local_address, timeout_s=5)
            # One round trip, no retransmission: 5 + 25 ms each way.
            assert trio.current_time() - began == pytest.approx(0.060)
            [mapping] = nat.mappings()
            assert mapping.internal == private.socket.local_address
            assert observed == mapping.external and observed[0] == "203.0.113.1"
            assert observed != private.socket.local_address
            assert public.nat.stats.requests_answered == 1
            # Endpoint-independent mapping: the QUIC connection to the same peer uses that
            # mapping too, so the public node sees the private one at the observed address.
            connection = await private.connect(PeerAddr(public.socket.local_address, public.peer_id))
            assert connection.peer_id == public.peer_id
            await private.ping(public.peer_id)  # the public side has authenticated us by now
            [inbound] = public.connections.connections()
            assert inbound.remote_address == observed
            # The public node asks back through the same mapping (the filter lets it in).
            assert await public.nat.observed_address(observed, timeout_s=5) == public.socket.local_address


async def test_lost_requests_are_retransmitted_and_silence_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=12) as net:
        a_host = net.add_host("198.51.100.1", LINK)
        b_host = net.add_host("198.51.100.2", LINK)
        async with Node(identity(0), a_host.bind(PORT), NodeConfig(), rng=random.Random(3)) as a:
            silent = b_host.bind(PORT)  # a socket nobody reads: no STUN answer ever
            began = trio.current_time()
            with pytest.raises(ObservedAddressError, match="no STUN answer"):
                await a.nat.observed_address(silent.local_address, timeout_s=30)
            # Sent at 0, 0.5, 1.5, 3.5 s; gave up after one more doubled wait (8 s).
            assert trio.current_time() - began == pytest.approx(7.5)
            assert len(await silent.receive_batch()) == 4
            with pytest.raises(ObservedAddressError):
                await a.nat.observed_address(("not-an-ip", 1), timeout_s=1)


async def test_forged_and_malformed_stun_gets_no_answer_and_does_not_disturb_the_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with Network(seed=13) as net:
        node_host = net.add_host("198.51.100.1", LINK)
        peer_host = net.add_host("198.51.100.2", LINK)
        attacker_host = net.add_host("198.51.100.66", LINK)
        async with Node(identity(0), node_host.bind(PORT), NodeConfig(), rng=random.Random(4)) as node:
            server = peer_host.bind(3478)  # an honest STUN server, driven by hand
            attacker = attacker_host.bind(5000)
            target = node.socket.local_address
            tid = bytes(range(12))
            hostile = [
                b"\x00",
                b"\x00\x01\x00\x00" + bytes(16),  # no magic cookie
                encode_binding_request(tid) + b"\x00\x00",  # bad length
                encode_binding_request(tid)[:-1],
                # A request with an unknown comprehension-required attribute: dropped, not 420.
                encode_message(StunMessage(BINDING_METHOD, StunClass.REQUEST, tid, ((0x0024, b"\x00" * 4),))),
                # Indications and other methods are not answered.
                encode_message(StunMessage(BINDING_METHOD, StunClass.INDICATION, tid)),
                encode_message(StunMessage(0x003, StunClass.REQUEST, tid)),
                # Unsolicited responses (forged answers to nothing) are dropped.
                encode_binding_success(tid, ("192.0.2.1", 9)),
                b"\x01" + bytes(600),
            ]
            for data in hostile:
                await attacker.send_to(data, target)
            await trio.sleep(1)
            assert node.nat.stats.malformed_dropped == 5
            assert node.nat.stats.unexpected_dropped == 4
            assert node.nat.stats.requests_answered == 0
            # A forged answer (right transaction id, wrong source) while a real request is pending
            # does not become our address; the honest server's answer does.
            async with trio.open_nursery() as nursery:
                result: list[tuple[str, int]] = []

                async def ask() -> None:
                    result.append(await node.nat.observed_address(server.local_address, timeout_s=5))

                nursery.start_soon(ask)
                [(request, source)] = await server.receive_batch()
                pending_id = decode_message(request).transaction_id
                await attacker.send_to(encode_binding_success(pending_id, ("192.0.2.66", 6666)), target)
                await trio.sleep(0.1)
                assert result == []
                await server.send_to(encode_binding_success(pending_id, source), source)
            assert result == [target]
            assert node.nat.stats.unexpected_dropped == 5
            # Nothing was sent to the attacker, and the node still answers an honest request.
            with trio.move_on_after(1) as waited:
                await attacker.receive_batch()
            assert waited.cancelled_caught
            await attacker.send_to(encode_binding_request(tid), target)
            [(answer, source)] = await attacker.receive_batch()
            assert source == target
            assert xor_mapped_address(decode_message(answer)) == attacker.local_address
            assert len(answer) <= len(encode_binding_request(tid)) + 24


async def test_a_flood_of_requests_is_answered_at_the_rate_limit_only(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=14) as net:
        node_host = net.add_host("198.51.100.1", LINK)
        flooder_host = net.add_host("198.51.100.66", LINK)
        other_host = net.add_host("198.51.100.67", LINK)
        async with Node(identity(0), node_host.bind(PORT), NodeConfig(), rng=random.Random(6)) as node:
            flooder, other = flooder_host.bind(5000), other_host.bind(5000)
            target = node.socket.local_address

            async def answers_within(sock: SimSocket, seconds: float) -> int:
                count = 0
                with trio.move_on_after(seconds):
                    while True:
                        count += len(await sock.receive_batch())
                return count

            for i in range(100):
                await flooder.send_to(encode_binding_request(i.to_bytes(12)), target)
            # Burst of 20 per source (default), the rest dropped; answers are 12 bytes larger.
            assert await answers_within(flooder, 0.5) == 20
            assert node.nat.stats.rate_limited_dropped == 80
            # Another source is not starved by the flooder.
            await other.send_to(encode_binding_request(bytes(12)), target)
            assert await answers_within(other, 0.5) == 1
            # Tokens refill at 10/s: the second flood arrives 1.55 s after the first (15.5 tokens).
            await trio.sleep(0.55)
            for i in range(100):
                await flooder.send_to(encode_binding_request(i.to_bytes(12)), target)
            assert await answers_within(flooder, 0.5) == 15

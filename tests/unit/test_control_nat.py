"""The ``nat.observed`` control method on two sim_net nodes, one behind a NAT."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.control.errors import INVALID_PARAMS, TIMEOUT, ControlError
from lattica.control.messages import NoParams
from lattica.control.nat_methods import NatStatusResult, ObservedParams, ObservedResult, register_nat_methods
from lattica.control.registry import MethodRegistry
from lattica.identity import Identity
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import Filtering, LinkConfig, Mapping, NatConfig, Network


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_nat_observed_reports_the_public_address(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=21) as net:
        public_host = net.add_host("198.51.100.1", LinkConfig(latency_s=0.01))
        private_host = net.add_nat("203.0.113.1", NatConfig()).add_host("192.168.1.10")
        silent = net.add_host("198.51.100.9").bind(4001)
        ident = [Identity.from_seed(hashlib.sha256(b"ctl-nat-%d" % i).digest()) for i in range(2)]
        async with (
            Node(ident[0], public_host.bind(4001), NodeConfig(), rng=random.Random(1)),
            Node(ident[1], private_host.bind(4001), NodeConfig(), rng=random.Random(2)) as private,
        ):
            registry = MethodRegistry()
            register_nat_methods(registry, private)
            method = registry.get("nat.observed")
            assert method is not None
            result = await method.handler(ObservedParams(addr="198.51.100.1:4001"))
            assert isinstance(result, ObservedResult)
            assert result.observed_addr.startswith("203.0.113.1:")
            assert result.asked == "198.51.100.1:4001" and result.local_addr == "192.168.1.10:4001"
            with pytest.raises(ControlError) as info:
                await method.handler(ObservedParams(addr="peer.example:4001"))
            assert info.value.code == INVALID_PARAMS
            with pytest.raises(ControlError) as info:
                await method.handler(ObservedParams(addr=f"198.51.100.9:{silent.local_address[1]}", timeout_s=2))
            assert info.value.code == TIMEOUT


async def test_nat_status_reports_reachability_agreement_and_mapping(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=22) as net:
        hosts = [net.add_host(f"198.51.{100 + i}.1", LinkConfig(latency_s=0.01)) for i in range(3)]
        nat = net.add_nat(
            "203.0.113.1",
            NatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT),
        )
        private_host = nat.add_host("192.168.1.10")
        ident = [Identity.from_seed(hashlib.sha256(b"ctl-nat-status-%d" % i).digest()) for i in range(4)]
        async with (
            Node(ident[0], hosts[0].bind(4001), NodeConfig(), dial_back_socket_factory=lambda: hosts[0].bind(0)) as a,
            Node(ident[1], hosts[1].bind(4001), NodeConfig(), dial_back_socket_factory=lambda: hosts[1].bind(0)) as b,
            Node(ident[2], hosts[2].bind(4001), NodeConfig(), dial_back_socket_factory=lambda: hosts[2].bind(0)) as c,
            Node(ident[3], private_host.bind(4001), NodeConfig(), rng=random.Random(3)) as private,
        ):
            registry = MethodRegistry()
            register_nat_methods(registry, private)
            method = registry.get("nat.status")
            assert method is not None
            before = await method.handler(NoParams())
            assert isinstance(before, NatStatusResult)
            assert (before.reachability, before.observers, before.dht_mode) == ("unknown", 0, "server")
            changed = trio.Event()
            private.reachability.add_listener(lambda status: changed.set())
            for peer in (a, b, c):
                await private.connect(PeerAddr(peer.listen_addresses()[0], peer.peer_id))
            with trio.fail_after(60):
                await changed.wait()
            after = await method.handler(NoParams())
            assert isinstance(after, NatStatusResult)
            [row] = after.observed_addrs
            assert row.addr.startswith("203.0.113.1:") and row.observers == 3
            assert (after.reachability, after.confidence, after.unreachable_results) == ("private", 3, 3)
            assert after.mapping == "endpoint-independent" and after.dht_mode == "client"
            assert after.relay_reservation_wanted and after.relay_reservations == [] and after.checks_done == 1

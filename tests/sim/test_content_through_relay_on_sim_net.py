"""A seeder behind a NAT, reached only through its relay: its upload slots on sim_net."""

from __future__ import annotations

import hashlib
import random
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.content import Cid, ContentConfig
from lattica.identity import Identity
from lattica.nat.config import NatConfig
from lattica.nat.hole_punch_config import HolePunchConfig
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_config import RelayConfig
from lattica.net.config import NetConfig
from lattica.node import Node
from sim_net import Filtering, LinkConfig, Mapping, Network
from sim_net import NatConfig as SimNatConfig
from tests.sim.content_hogs import trickle
from tests.unit.content_samples import KIB, random_bytes

PORT = 4001
LINK = LinkConfig(latency_s=0.025)
NAT_LINK = LinkConfig(latency_s=0.005)
PORT_RESTRICTED = SimNatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT)
SYMMETRIC = SimNatConfig(mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT)
CONTENT = ContentConfig(chunk_bytes=32 * KIB, fetch_request_timeout_s=5.0, fetch_stall_timeout_s=60.0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"content-relay-sim-%d" % i).digest())


async def test_a_relayed_peer_holding_every_slot_of_a_natted_seeder_gives_one_to_another_relayed_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: every fetcher of a seeder behind a NAT that is not hole-punched arrives
    # through its relay. Counted as the relay, an attacker coming the same way held every slot
    # and an honest relayed fetch failed "busy": it could never take a slot from "its own host".
    source = tmp_path / "data.bin"
    source.write_bytes(random_bytes(512 * KIB, seed=7))
    async with Network(seed=5) as net, AsyncExitStack() as stack:
        relay_host = net.add_host("198.51.100.1", LINK)
        relay = await stack.enter_async_context(
            Node(
                identity(100),
                relay_host.bind(PORT),
                NodeConfig(nat=NatConfig(relay=RelayConfig(service=True))),
                rng=random.Random(1),
            )
        )
        relays = (f"{relay.peer_id}@198.51.100.1:{PORT}",)

        def natted(i: int, public_ip: str, kind: SimNatConfig, content: ContentConfig, *, punch: bool) -> Node:
            host = net.add_nat(public_ip, kind).add_host("192.168.1.10", NAT_LINK)
            # The hog reads slowly: a small receive window keeps its streams from taking all at once.
            window = {"stream_receive_window_bytes": 64 * KIB} if i == 1 else {}
            config = NodeConfig(
                net=NetConfig(keepalive_interval_s=5.0, **window),  # type: ignore[arg-type]
                content=content,
                nat=NatConfig(
                    relay=RelayConfig(relays=relays, reservations=1), hole_punch=HolePunchConfig(enabled=punch)
                ),
            )
            return Node(identity(i), host.bind(PORT), config, blocks_dir=tmp_path / f"n{i}", rng=random.Random(10 + i))

        seeder = await stack.enter_async_context(
            natted(0, "203.0.113.2", PORT_RESTRICTED, replace(CONTENT, max_uploads=4), punch=True)
        )
        hog = await stack.enter_async_context(natted(1, "203.0.113.1", PORT_RESTRICTED, CONTENT, punch=False))
        honest = await stack.enter_async_context(natted(2, "203.0.113.3", SYMMETRIC, CONTENT, punch=True))
        assert seeder.content is not None and honest.content is not None
        cid = Cid.parse(str((await seeder.content.publish(source)).cid))
        chunks = seeder.content.store.manifest(cid).files[0].chunks
        await seeder.relay_client.wait_reservations()
        [seeder_relayed] = seeder.relay_client.relayed_addresses()
        await hog.ping(RelayedAddr.parse(seeder_relayed), timeout_s=10)
        stop = trio.Event()

        async with trio.open_nursery() as nursery:
            for _ in range(4):  # ask for every chunk, read 1 KiB a second
                nursery.start_soon(trickle, hog, seeder.peer_id, chunks, stop)
            await trio.sleep(100)  # past upload_timeout_s: the trickle keeps its slots
            assert seeder.content.uploads == 4
            await honest.ping(RelayedAddr.parse(seeder_relayed), timeout_s=10)
            [connection] = [c for c in seeder.connections.connections() if c.peer_id == honest.peer_id]
            assert connection.relayed_via == relay.peer_id  # the honest fetcher comes through the relay too
            await honest.content.fetch(cid, out_dir=tmp_path / "out")  # failed "busy" before
            stop.set()
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert seeder.content.upload_slots.preemptions >= 1

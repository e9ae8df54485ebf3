"""The NAT traversal matrix on sim_net: every ordered pair of NAT types, real ``Node``s, one
public relay, virtual time. Shared by tests/sim/test_nat_matrix_on_sim_net.py and bench/nat.py.

For each pair (dialler behind NAT type X, target behind NAT type Y) the dialler reaches the
target: directly when the target is public, else through the target's relay reservation; the
target then runs hole punching (it accepted the relayed connection). The pair's outcome is the
path a ping by peer id takes once hole punching finished: ``direct``, ``relayed``, or
``failed`` (no ping got through).

Topology: every public host (the relay, public nodes, each NAT's outside) sits behind one
access link of ``latency_s / 2`` and ``loss / 2`` per direction, so a path between two of them
has ``latency_s`` one way and about ``loss`` loss per direction; the LAN behind each NAT is a
perfect link. Each NATed node is alone behind its own NAT and holds a reservation on the relay.
"""

from __future__ import annotations

import hashlib
import math
import random
from contextlib import AsyncExitStack
from dataclasses import dataclass

import trio

from lattica.config import NodeConfig
from lattica.errors import LatticaError
from lattica.identity import Identity
from lattica.nat.config import NatConfig
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_config import RelayConfig
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import Filtering, LinkConfig, Mapping, Network, PortAllocation
from sim_net import NatConfig as SimNatConfig

PORT = 4001

NAT_TYPES: dict[str, SimNatConfig | None] = {
    "public": None,
    "full-cone": SimNatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ENDPOINT_INDEPENDENT),
    "address-restricted": SimNatConfig(mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_DEPENDENT),
    "port-restricted": SimNatConfig(
        mapping=Mapping.ENDPOINT_INDEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT
    ),
    "symmetric": SimNatConfig(
        mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT, filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT
    ),
    "symmetric-random": SimNatConfig(
        mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
        filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
        port_allocation=PortAllocation.RANDOM,
    ),
}
"""The NAT types of the matrix, by name (None: no NAT)."""

ENDPOINT_DEPENDENT = frozenset({"symmetric", "symmetric-random"})
"""Types whose mapping depends on the destination: a pair with one of them need not go direct."""


@dataclass
class PairResult:
    """One cell of the matrix."""

    dialler: str
    target: str
    outcome: str
    """``direct``, ``relayed`` or ``failed``."""
    time_to_direct_s: float | None
    """From the relayed connection to the direct path (0 for a public target, dialled directly);
    None when the pair did not end direct."""
    error: str | None = None

    @property
    def direct_expected(self) -> bool:
        """Neither side has an endpoint-dependent mapping."""
        return self.dialler not in ENDPOINT_DEPENDENT and self.target not in ENDPOINT_DEPENDENT


@dataclass
class MatrixRun:
    """The whole matrix and what the relay carried."""

    pairs: list[PairResult]
    relay_bytes_forwarded: int
    relay_circuits_opened: int
    virtual_s: float


def _identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"nat-matrix-%d" % i).digest())


async def run_matrix(
    *,
    seed: int,
    types: list[str] | None = None,
    latency_s: float = 0.05,
    loss: float = 0.02,
    pair_timeout_s: float = 120.0,
) -> MatrixRun:
    """Build and run every ordered pair of ``types`` (default: all of :data:`NAT_TYPES`) at
    once; must run under a ``MockClock`` (it takes minutes of virtual time)."""
    names = list(NAT_TYPES) if types is None else types
    link = LinkConfig(latency_s=latency_s / 2, loss=loss / 2)
    began = trio.current_time()
    async with Network(seed=seed) as net, AsyncExitStack() as stack:
        relay = await stack.enter_async_context(
            Node(
                _identity(0),
                net.add_host("198.18.0.1", link).bind(PORT),
                NodeConfig(nat=NatConfig(relay=RelayConfig(service=True))),
                rng=random.Random(seed),
            )
        )
        relay_string = f"{relay.peer_id}@198.18.0.1:{PORT}"
        counter = 0

        async def add_node(kind: str) -> Node:
            nonlocal counter
            counter += 1
            public_ip = f"198.18.{1 + counter // 250}.{counter % 250 + 1}"
            nat_config = NAT_TYPES[kind]
            if nat_config is None:
                host = net.add_host(public_ip, link)
                config = NodeConfig()
            else:
                host = net.add_nat(public_ip, nat_config, link).add_host("10.0.0.2")
                config = NodeConfig(nat=NatConfig(relay=RelayConfig(relays=(relay_string,), reservations=1)))
            node = Node(_identity(counter), host.bind(PORT), config, rng=random.Random(seed * 1000 + counter))
            return await stack.enter_async_context(node)

        pairs = [(x, y) for x in names for y in names]
        nodes = [(await add_node(x), await add_node(y)) for x, y in pairs]
        results: list[PairResult] = []
        async with trio.open_nursery() as nursery:
            for (x, y), (a, b) in zip(pairs, nodes, strict=True):
                nursery.start_soon(_run_pair, x, y, a, b, relay, pair_timeout_s, results)
        stats = relay.relay_service.stats
        return MatrixRun(results, stats.bytes_forwarded, stats.circuits_opened, trio.current_time() - began)


async def _run_pair(x: str, y: str, a: Node, b: Node, relay: Node, timeout_s: float, results: list[PairResult]) -> None:
    result = PairResult(x, y, "failed", None)
    results.append(result)
    with trio.move_on_after(timeout_s):
        try:
            if NAT_TYPES[y] is None:
                await a.ping(PeerAddr(b.socket.local_address, b.peer_id), timeout_s=30)
                result.outcome, result.time_to_direct_s = "direct", 0.0
                return
            await b.relay_client.wait_reservations()
            if NAT_TYPES[x] is not None:
                await a.relay_client.wait_reservations()  # its observed address is known by then
            [relayed] = b.relay_client.relayed_addresses()
            await a.ping(RelayedAddr.parse(relayed), timeout_s=30)
            # b accepted the relayed connection, so b runs the hole punch: wait for its end.
            while b.hole_punch.direct_after_s(a.peer_id) is None and (
                a.peer_id in b.hole_punch.active() or b.hole_punch.stats.attempts == 0
            ):
                await b.hole_punch.wait_changed()
            ping = await a.ping(b.peer_id, timeout_s=30)
        except LatticaError as exc:
            result.error = str(exc)
            return
        if ping.relayed_via is None:
            result.outcome = "direct"
            result.time_to_direct_s = b.hole_punch.direct_after_s(a.peer_id)
        else:
            result.outcome = "relayed"
    if result.outcome == "failed" and result.error is None:
        result.error = f"no outcome within {timeout_s:g} s"


def median(values: list[float]) -> float:
    """The median of ``values`` (NaN for none)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

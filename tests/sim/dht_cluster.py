"""A cluster of real ``Node``s on sim_net for DHT tests: start, crash and restart by index.

Every node runs in its own task and cancel scope inside the cluster's nursery, so a test can
crash one (its access link goes dark first, so not even a courtesy CONNECTION_CLOSE escapes)
while the others go on. Identities, addresses and node RNGs are derived from the node's index,
and record expiry follows virtual time through :func:`wall_clock`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import replace

import trio

from lattica.config import NodeConfig
from lattica.dht import DhtConfig
from lattica.identity import Identity, PeerId
from lattica.net.address import PeerAddr
from lattica.net.config import NetConfig
from lattica.node import Node
from sim_net import Host, LinkConfig, Network

PORT = 4001
WALL_EPOCH = 1_800_000_000.0
# Two access links per path: 25 ms each gives 50 ms one-way latency; 1.01% loss on each gives
# 1 - 0.9899**2 = 2% loss per path and direction.
ACCESS_LINK = LinkConfig(latency_s=0.025, loss=0.0101)
DARK_LINK = LinkConfig(latency_s=0.025, loss=1.0)
# Short per-query and per-lookup deadlines keep failed queries cheap in virtual time; k and
# alpha stay at the Kademlia defaults.
FAST_DHT = DhtConfig(k=20, alpha=3, query_timeout_s=2.0, lookup_timeout_s=20.0)
# No QUIC keepalives (no NATs here, so idle connections may simply time out and be redialled).
# Also a workaround: with keepalives on, a connection whose last datagram arrived at an unlucky
# float instant re-arms its keepalive timer to the current instant forever (`now - last <
# interval` although `last + interval == now`), spinning at one virtual instant
# (lattica/net/connection.py, Connection._on_timer).
NODE_CONFIG = NodeConfig(net=NetConfig(keepalive_interval_s=math.inf))


def wall_clock() -> float:
    """Unix seconds that advance with trio's (virtual) clock."""
    return WALL_EPOCH + trio.current_time()


def identity(index: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"dht-sim-node-%d" % index).digest())


def host_ip(index: int) -> str:
    # Private addresses: the routing table's per-/24 diversity limit exempts them by default.
    return f"10.0.{index // 250}.{index % 250 + 1}"


def peer_addr(index: int) -> PeerAddr:
    return PeerAddr((host_ip(index), PORT), identity(index).peer_id)


class DhtCluster:
    """Nodes ``0..size-1`` on ``net`` (hosts created up front; nodes started on demand)."""

    def __init__(
        self,
        net: Network,
        nursery: trio.Nursery,
        size: int,
        *,
        dht_config: DhtConfig = FAST_DHT,
        node_config: NodeConfig | None = None,
        link: LinkConfig = ACCESS_LINK,
    ) -> None:
        self.net = net
        self.dht_config = dht_config
        self.node_config = node_config or NODE_CONFIG
        self.link = link
        self.hosts: list[Host] = [net.add_host(host_ip(i), link) for i in range(size)]
        self.nodes: dict[int, Node] = {}
        self._nursery = nursery
        self._scopes: dict[int, trio.CancelScope] = {}

    @property
    def size(self) -> int:
        return len(self.hosts)

    def index_of(self, peer: PeerId | bytes) -> int:
        key = peer.key if isinstance(peer, PeerId) else peer
        return next(i for i in range(self.size) if identity(i).peer_id.key == key)

    async def start(self, index: int, *, bootstrap: Sequence[int] = (), config: DhtConfig | None = None) -> Node:
        """Start node ``index``; with ``bootstrap`` it joins through those nodes in the background
        (``node.joined_dht`` is set when it has)."""
        base = config or self.dht_config
        peers = tuple(peer_addr(b) for b in bootstrap if b != index)
        dht_config = replace(base, bootstrap_peers=peers)
        node: Node = await self._nursery.start(self._run, index, dht_config)
        return node

    async def _run(self, index: int, dht_config: DhtConfig, *, task_status: trio.TaskStatus[Node]) -> None:
        with trio.CancelScope() as scope:
            self._scopes[index] = scope
            node = Node(
                identity(index),
                self.hosts[index].bind(PORT),
                replace(self.node_config, dht=dht_config),
                wall_clock=wall_clock,
                rng=random.Random(index),
            )
            async with node:
                self.nodes[index] = node
                task_status.started(node)
                try:
                    await trio.sleep_forever()
                finally:
                    del self.nodes[index]

    async def start_all(self, indices: Sequence[int], *, seeds: Sequence[int]) -> None:
        """Start ``indices`` joining through ``seeds`` and wait until every one has joined."""
        for index in indices:
            await self.start(index, bootstrap=seeds)
        for index in indices:
            node = self.nodes[index]
            if node.dht.config.bootstrap_peers:
                await node.joined_dht.wait()

    def crash(self, index: int) -> None:
        """Stop node ``index`` abruptly: its link drops everything, then its tasks are cancelled."""
        self.hosts[index].set_link(DARK_LINK)
        self._scopes.pop(index).cancel()

    def live(self) -> list[int]:
        return sorted(self.nodes)

"""A cluster of real ``Node``s on sim_net for the replicated-space tests.

Built on :mod:`tests.sim.dht_cluster` (seeded identities, addresses, virtual wall clock); the
nodes here skip the DHT join (replicas are named to ``join_space``), which keeps 50-node
simulations cheap: QUIC handshakes (~3.4 ms CPU each) dominate, and only sync partners meet.
"""

from __future__ import annotations

import math
from dataclasses import replace

from lattica.config import NodeConfig
from lattica.crdt import CrdtConfig
from lattica.net.config import NetConfig

from .dht_cluster import FAST_DHT

# Anti-entropy every 5 s (virtual) with one random replica; each replica pushes what is new to
# 2 others, in batches gathered over 0.5 s (every push is a QUIC stream: CPU is per packet).
SIM_CRDT = CrdtConfig(
    anti_entropy_interval_s=5.0,
    fanout=2,
    push_delay_s=0.5,
    batch_bytes=64 * 1024,  # a batch crosses a 10%-loss path well within the request timeout
    request_timeout_s=10.0,
    discovery_interval_s=3600.0,
)
NODE_CONFIG = NodeConfig(net=NetConfig(keepalive_interval_s=math.inf), dht=FAST_DHT, crdt=SIM_CRDT)


def node_config(**crdt: object) -> NodeConfig:
    """:data:`NODE_CONFIG` with some crdt settings replaced."""
    return replace(NODE_CONFIG, crdt=replace(SIM_CRDT, **crdt))  # type: ignore[arg-type]

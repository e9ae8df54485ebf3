"""sim_net: an in-process emulated network for trio, with the socket interface lattica uses.

Hosts, links (latency, jitter, loss, bursts, duplication, reordering, bandwidth, queues, MTU),
partitions and RFC 4787 NAT boxes, all on trio's clock and deterministic per seed. Imports
nothing from lattica. See ``sim_net/README.md``.
"""

from sim_net.counters import (
    Address,
    DropCause,
    HostCounters,
    LinkCounters,
    NatCounters,
    NetworkCounters,
    TraceEvent,
    TraceKind,
)
from sim_net.link import (
    UDP_IPV4_OVERHEAD_BYTES,
    AccessLink,
    GilbertElliott,
    LinkConfig,
    LinkDirection,
)
from sim_net.nat import Filtering, Mapping, NatConfig, NatMapping, PortAllocation
from sim_net.network import Host, Nat, Network, Partition
from sim_net.sockets import DEFAULT_RECEIVE_BUFFER_BYTES, SimSocket

__all__ = [
    "DEFAULT_RECEIVE_BUFFER_BYTES",
    "UDP_IPV4_OVERHEAD_BYTES",
    "AccessLink",
    "Address",
    "DropCause",
    "Filtering",
    "GilbertElliott",
    "Host",
    "HostCounters",
    "LinkConfig",
    "LinkCounters",
    "LinkDirection",
    "Mapping",
    "Nat",
    "NatConfig",
    "NatCounters",
    "NatMapping",
    "Network",
    "NetworkCounters",
    "Partition",
    "PortAllocation",
    "SimSocket",
    "TraceEvent",
    "TraceKind",
]

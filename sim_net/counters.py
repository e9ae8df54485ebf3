"""Counters and trace records: what the emulated network did with each datagram.

Every counter type is a plain mutable dataclass. Objects that own counters hand out copies
(``.counters``), so a test can keep a snapshot and compare it with a later one.

Every ``dropped`` dict holds a key for each :class:`DropCause` value (a plain ``str``), so
``counters.dropped["loss"]`` reads 0 rather than raising before the first drop.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

Address = tuple[str, int]
"""An IPv4 ``(host, port)`` pair, as the lattica ``DatagramSocket`` interface uses."""


class DropCause(enum.StrEnum):
    """Why a datagram did not reach a socket. The values are the keys of ``dropped`` dicts."""

    LOSS = "loss"
    """Random loss on a link (Bernoulli or Gilbert-Elliott)."""
    QUEUE = "queue"
    """The link's transmit queue was full (tail drop)."""
    MTU = "mtu"
    """Datagram plus IPv4/UDP headers exceeded the link MTU."""
    PARTITION = "partition"
    """Sender and receiver are on opposite sides of an active partition."""
    NAT_FILTER = "nat_filter"
    """A NAT's filtering rule rejected an inbound datagram for an existing mapping."""
    NAT_NO_MAPPING = "nat_no_mapping"
    """Inbound datagram to a NAT port with no live mapping (never made, or timed out)."""
    NAT_PORTS_EXHAUSTED = "nat_ports_exhausted"
    """The NAT had no free external port for a new mapping."""
    HAIRPIN = "hairpin"
    """An inside host sent to its NAT's public address and the NAT does not hairpin."""
    NO_ROUTE = "no_route"
    """No host or NAT owns the destination address."""
    NO_SOCKET = "no_socket"
    """The destination host has no socket bound on the destination port."""
    SOCKET_BUFFER = "socket_buffer"
    """The receiving socket's buffer was full (the reader is too slow)."""


def _zero_drops() -> dict[str, int]:
    return {cause.value: 0 for cause in DropCause}


@dataclass
class LinkCounters:
    """One direction of one link. Packets counted at the moment they enter the link.

    ``packets_out`` counts copies scheduled to leave the far end (duplicates included), so
    ``packets_in == packets_out - duplicated + sum(dropped.values())``.
    """

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    duplicated: int = 0
    reordered: int = 0
    dropped: dict[str, int] = field(default_factory=_zero_drops)

    def copy(self) -> LinkCounters:
        """An independent snapshot."""
        return copy.deepcopy(self)


@dataclass
class HostCounters:
    """One host: what its sockets sent and received, and the fate of what it sent.

    ``dropped`` counts datagrams *sent by this host* that were dropped anywhere on their way, by
    cause; sizes are payload bytes (no headers).
    """

    sent: int = 0
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=_zero_drops)

    def copy(self) -> HostCounters:
        """An independent snapshot."""
        return copy.deepcopy(self)


@dataclass
class NatCounters:
    """One NAT box: translations done, mappings made and expired, datagrams it dropped."""

    outbound: int = 0
    inbound: int = 0
    hairpinned: int = 0
    mappings_created: int = 0
    mappings_expired: int = 0
    dropped: dict[str, int] = field(default_factory=_zero_drops)

    def copy(self) -> NatCounters:
        """An independent snapshot."""
        return copy.deepcopy(self)


@dataclass
class NetworkCounters:
    """The whole network: datagrams sent by sockets, delivered to sockets, dropped by cause."""

    sent: int = 0
    delivered: int = 0
    duplicated: int = 0
    dropped: dict[str, int] = field(default_factory=_zero_drops)

    def copy(self) -> NetworkCounters:
        """An independent snapshot."""
        return copy.deepcopy(self)


class TraceKind(enum.StrEnum):
    """What happened to a datagram in one :class:`TraceEvent`."""

    SEND = "send"
    DELIVER = "deliver"
    DROP = "drop"


@dataclass(frozen=True)
class TraceEvent:
    """One step in a datagram's life, recorded when the network is built with ``trace=True``.

    ``time`` is trio's clock in seconds. ``src``/``dst`` are the addresses at that moment (after
    any NAT rewriting), ``size_bytes`` is the payload size. A duplicated datagram keeps its
    ``packet_id``, so it can be delivered twice.
    """

    time: float
    kind: TraceKind
    packet_id: int
    src: Address
    dst: Address
    size_bytes: int
    cause: DropCause | None = None

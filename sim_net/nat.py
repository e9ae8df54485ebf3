"""NAT behaviour (RFC 4787) as a pure translation table: no trio, no clock; callers pass ``now``.

Invariants:

* Each live mapping owns one external port; no two live mappings share a port (no port
  overloading, which RFC 4787 does not recommend).
* A mapping is keyed by what the mapping behaviour says makes it distinct: the internal
  endpoint (EIM), plus the destination IP (ADM), plus the destination port (APDM).
* A mapping lives until ``expires_at``; at or after that instant it is gone. Outbound traffic
  on it pushes ``expires_at`` to ``now + mapping_timeout_s`` (inbound too, if configured).
* Filtering consults the remote endpoints the mapping has sent to while it lived: EIF accepts
  anyone, ADF any port of a contacted IP, APDF only a contacted ``ip:port``.
* Expired mappings are removed lazily, when a lookup or a port allocation meets them.
* Port choices draw only from the table's own ``random.Random``: deterministic per seed.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from sim_net.counters import Address, DropCause, NatCounters


class Mapping(enum.Enum):
    """RFC 4787 section 4.1: when a NAT reuses an external port for an internal endpoint."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    """One external port per internal ``ip:port``, whatever the destination (EIM)."""
    ADDRESS_DEPENDENT = "address-dependent"
    """A new external port per destination IP (ADM)."""
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    """A new external port per destination ``ip:port`` (APDM, "symmetric NAT")."""


class Filtering(enum.Enum):
    """RFC 4787 section 5: which inbound datagrams a mapping lets through."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    """Anyone may send to a mapped port (EIF, "full cone")."""
    ADDRESS_DEPENDENT = "address-dependent"
    """Only IPs the mapping has sent to, from any port (ADF)."""
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    """Only ``ip:port`` endpoints the mapping has sent to (APDF)."""


class PortAllocation(enum.Enum):
    """RFC 4787 section 4.2.1: how the external port of a new mapping is chosen."""

    PRESERVE = "preserve"
    """Use the internal port if it is free, otherwise a pseudo-random free port."""
    RANDOM = "random"
    """Always a pseudo-random free port from ``NatConfig.port_range``."""


@dataclass(frozen=True)
class NatConfig:
    """Behaviour of one NAT box. Defaults: a common home router (EIM, APDF, port preserving,
    120 s timeout refreshed by outbound traffic only, hairpinning on).

    ``port_range`` bounds the ports picked at random (inclusive); a preserved port may lie
    outside it.
    """

    mapping: Mapping = Mapping.ENDPOINT_INDEPENDENT
    filtering: Filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    port_allocation: PortAllocation = PortAllocation.PRESERVE
    mapping_timeout_s: float = 120.0
    inbound_refreshes: bool = False
    hairpinning: bool = True
    port_range: tuple[int, int] = (1024, 65535)

    def __post_init__(self) -> None:
        if self.mapping_timeout_s <= 0:
            raise ValueError(f"mapping_timeout_s must be > 0, got {self.mapping_timeout_s!r}")
        low, high = self.port_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"port_range must satisfy 1 <= low <= high <= 65535: {low, high}")


@dataclass(frozen=True)
class NatMapping:
    """A snapshot of one live mapping: ``internal`` is seen outside as ``external``."""

    internal: Address
    external: Address
    expires_at: float


_MappingKey = tuple[str, int, str, int]


@dataclass
class _Entry:
    key: _MappingKey
    internal: Address
    external_port: int
    expires_at: float
    contacted: set[Address] = field(default_factory=set)
    contacted_ips: set[str] = field(default_factory=set)


# Random probes before falling back to a scan when few ports are free.
_RANDOM_PORT_ATTEMPTS = 64


class NatTable:
    """The mapping table of one NAT with public address ``public_ip``.

    ``outbound`` and ``inbound`` translate one datagram each and return either the translated
    value or the :class:`DropCause` that stops it. Times are seconds on the caller's clock.
    """

    def __init__(self, public_ip: str, config: NatConfig, rng: random.Random) -> None:
        self.public_ip = public_ip
        self.config = config
        self._rng = rng
        self._by_key: dict[_MappingKey, _Entry] = {}
        self._by_port: dict[int, _Entry] = {}
        self._counters = NatCounters()

    @property
    def counters(self) -> NatCounters:
        """A snapshot of this NAT's counters."""
        return self._counters.copy()

    def count_drop(self, cause: DropCause) -> None:
        """Record a drop decided outside the table (e.g. hairpinning disabled)."""
        self._counters.dropped[cause.value] += 1

    def count_hairpin(self) -> None:
        """Record a datagram turned around to an inside host."""
        self._counters.hairpinned += 1

    def outbound(self, src: Address, dst: Address, now: float) -> int | DropCause:
        """Translate a datagram from inside ``src`` to ``dst``; return its external port."""
        key = self._key(src, dst)
        entry = self._by_key.get(key)
        if entry is not None and now >= entry.expires_at:
            self._remove(entry)
            entry = None
        if entry is None:
            port = self._allocate_port(src[1], now)
            if port is None:
                self._counters.dropped[DropCause.NAT_PORTS_EXHAUSTED.value] += 1
                return DropCause.NAT_PORTS_EXHAUSTED
            entry = _Entry(key, src, port, now)
            self._by_key[key] = entry
            self._by_port[port] = entry
            self._counters.mappings_created += 1
        entry.expires_at = now + self.config.mapping_timeout_s
        entry.contacted.add(dst)
        entry.contacted_ips.add(dst[0])
        self._counters.outbound += 1
        return entry.external_port

    def inbound(self, src: Address, external_port: int, now: float) -> Address | DropCause:
        """Translate a datagram from ``src`` to ``public_ip:external_port``; return the inside
        address it goes to."""
        entry = self._live_entry_on_port(external_port, now)
        if entry is None:
            self._counters.dropped[DropCause.NAT_NO_MAPPING.value] += 1
            return DropCause.NAT_NO_MAPPING
        if not self._filter_accepts(entry, src):
            self._counters.dropped[DropCause.NAT_FILTER.value] += 1
            return DropCause.NAT_FILTER
        if self.config.inbound_refreshes:
            entry.expires_at = now + self.config.mapping_timeout_s
        self._counters.inbound += 1
        return entry.internal

    def mappings(self, now: float) -> list[NatMapping]:
        """The mappings live at ``now``, ordered by external port."""
        return [
            NatMapping(entry.internal, (self.public_ip, port), entry.expires_at)
            for port, entry in sorted(self._by_port.items())
            if now < entry.expires_at
        ]

    def _key(self, src: Address, dst: Address) -> _MappingKey:
        mapping = self.config.mapping
        if mapping is Mapping.ENDPOINT_INDEPENDENT:
            return (src[0], src[1], "", 0)
        if mapping is Mapping.ADDRESS_DEPENDENT:
            return (src[0], src[1], dst[0], 0)
        return (src[0], src[1], dst[0], dst[1])

    def _filter_accepts(self, entry: _Entry, src: Address) -> bool:
        filtering = self.config.filtering
        if filtering is Filtering.ENDPOINT_INDEPENDENT:
            return True
        if filtering is Filtering.ADDRESS_DEPENDENT:
            return src[0] in entry.contacted_ips
        return src in entry.contacted

    def _live_entry_on_port(self, port: int, now: float) -> _Entry | None:
        entry = self._by_port.get(port)
        if entry is not None and now >= entry.expires_at:
            self._remove(entry)
            return None
        return entry

    def _remove(self, entry: _Entry) -> None:
        del self._by_key[entry.key]
        del self._by_port[entry.external_port]
        self._counters.mappings_expired += 1

    def _allocate_port(self, internal_port: int, now: float) -> int | None:
        if self.config.port_allocation is PortAllocation.PRESERVE and (
            self._live_entry_on_port(internal_port, now) is None
        ):
            return internal_port
        low, high = self.config.port_range
        for _ in range(_RANDOM_PORT_ATTEMPTS):
            port = self._rng.randint(low, high)
            if self._live_entry_on_port(port, now) is None:
                return port
        # Nearly full: scan once from a random start so every free port is found.
        size = high - low + 1
        start = self._rng.randrange(size)
        for offset in range(size):
            port = low + (start + offset) % size
            if self._live_entry_on_port(port, now) is None:
                return port
        return None

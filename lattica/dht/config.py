"""``DhtConfig``: the tunables of the DHT (the ``[dht]`` table of ``config.toml``).

Field types carry their bounds (:mod:`lattica.setting_types`, checked when a file is loaded);
``__post_init__`` also refuses values that cannot work when a config is built in code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from lattica.dht.messages import MAX_CLOSER_PEERS
from lattica.errors import LocalProtocolError
from lattica.net.address import PeerAddr
from lattica.setting_types import ByteSize, Count, NonNegativeCount, Seconds

HOUR_S = 3600.0


@dataclass(frozen=True, kw_only=True)
class DhtConfig:
    """Tunables of the DHT. Times are seconds; the defaults follow libp2p where it has one.

    Raises :class:`LocalProtocolError` for values that cannot work (e.g. ``k`` above the
    message limit of 32 closer peers).
    """

    k: Annotated[int, msgspec.Meta(ge=1, le=MAX_CLOSER_PEERS)] = 20
    """Bucket size and replication factor (at most 32, the closer-peers limit of a message)."""
    alpha: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3
    """Parallel queries per lookup path."""
    disjoint_paths: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    """S/Kademlia disjoint lookup paths (1 = plain Kademlia)."""
    query_timeout_s: Seconds = 10.0
    """Deadline of one request to one peer."""
    lookup_timeout_s: Seconds = 60.0
    """Deadline of a whole iterative lookup (partial results are used after it)."""
    put_quorum: NonNegativeCount = 1
    """Remote acknowledgements ``put`` needs to succeed."""
    provide_quorum: NonNegativeCount = 1
    """Remote acknowledgements ``provide`` needs to succeed."""
    get_quorum: Count = 1
    """Valid records (a local copy counts) after which ``get`` answers with the newest so far."""
    get_value_count: Count = 3
    """Valid records after which a ``get``'s lookup stops. Between ``get_quorum`` and this, it
    goes on in the background, so holders of an older version are still found and repaired."""
    client_mode: bool = False
    """Not publicly reachable: ask others not to add us to their routing tables."""
    max_peers_per_subnet: NonNegativeCount = 2
    """Per bucket, at most this many peers from one /24 (IPv4) or /48 (IPv6); 0 = no limit."""
    diversity_applies_to_private: bool = False
    """Apply the subnet limit to non-global addresses too (loopback/LAN are exempt by default)."""
    max_failures: Count = 2
    """Consecutive failed requests after which a peer is evicted from the routing table."""
    default_record_ttl_s: Seconds = 24 * HOUR_S
    """Record lifetime when ``put`` is given no ``ttl_s``."""
    max_record_ttl_s: Seconds = 7 * 24 * HOUR_S
    """Longest record lifetime accepted (ours and others')."""
    provider_ttl_s: Seconds = 48 * HOUR_S
    """Lifetime of a provider record (libp2p: 48 h)."""
    provider_republish_interval_s: Seconds = 22 * HOUR_S
    """How often our provider records are re-signed and re-announced (libp2p: 22 h)."""
    record_republish_interval_s: Seconds = 1 * HOUR_S
    """How often our own unexpired records are pushed again to the current closest peers."""
    bucket_refresh_interval_s: Seconds = 1 * HOUR_S
    """A bucket with no lookup for this long is refreshed with a lookup of a random id in it."""
    maintenance_interval_s: Seconds = 60.0
    """How often ``run`` checks for refresh, republish, expiry, re-bootstrap and persistence."""
    table_save_delay_s: Seconds = 5.0
    """After the routing table gained or lost a peer, it is saved this much later (changes in
    between are saved together); last-seen times are saved every maintenance round."""
    bootstrap_peers: tuple[PeerAddr, ...] = ()
    """Peers to (re-)bootstrap from, in addition to those given to ``bootstrap``. Not a file
    setting: ``config.toml`` lists them in the top-level ``bootstrap``, which ``Node`` appends."""
    failure_backoff_s: Seconds = 60.0
    """After a request to a peer fails, lookups and puts skip the peer for this long (doubled
    per consecutive failure, up to ``bucket_refresh_interval_s``); maintenance then pings it if
    it is in the routing table. Only failures of requests sent after the previous failure count
    towards ``max_failures``, so one outage counts once."""
    max_store_bytes: ByteSize = 256 * 1024 * 1024
    """Cap on the records and provider records this node stores for others and itself (encoded
    bytes); beyond it, entries farthest from our id are evicted for nearer ones."""
    max_store_bytes_per_writer: ByteSize = 4 * 1024 * 1024
    """Cap on one other writer's records plus provider records stored here: one identity
    cannot fill the store."""
    stale_peer_ping_s: Seconds = 1800.0
    """Maintenance pings routing-table peers not heard from for this long (wall clock), so a
    peer that left is evicted even when no lookup of ours happened to ask it."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_CLOSER_PEERS:
            raise LocalProtocolError(f"k must be in 1..{MAX_CLOSER_PEERS}")
        if self.alpha < 1 or self.disjoint_paths < 1:
            raise LocalProtocolError("alpha and disjoint_paths must be at least 1")
        if self.put_quorum < 0 or self.provide_quorum < 0 or min(self.get_quorum, self.get_value_count) < 1:
            raise LocalProtocolError("put/provide quorums must be >= 0, get_quorum and get_value_count >= 1")
        if self.max_store_bytes_per_writer > self.max_store_bytes:
            raise LocalProtocolError("max_store_bytes_per_writer must not exceed max_store_bytes")

"""Kademlia DHT over ``net`` RPC: routing table, iterative lookups, signed records, providers.

Key space: 256 bits; a node's id is ``sha256(peer_id.key)``. Messages travel as one RPC
protocol, :data:`PROTOCOL_ID` (``/lattica/kad/1.0.0``), a msgpack tagged union
(:mod:`lattica.dht.messages`).

Service API (:class:`Dht`)::

    Dht(identity, transport: RpcTransport, store: DhtStore, *,
        remember_addresses: Callable[[PeerId, list[Address]], None],
        own_addresses: Callable[[], list[Address]],
        config: DhtConfig | None = None,
        wall_clock: Callable[[], float] = time.time,     # unix seconds, for record expiry
        rng: random.Random | None = None)                 # refresh ids

    await dht.run(task_status=...)            # maintenance + liveness checks until cancelled
    await dht.bootstrap(addrs: list[PeerAddr] | None = None) -> int   # other peers that answered;
                                              #   BootstrapError if none
    await dht.put(key: bytes, value: bytes, ttl_s: float | None = None, *,
                  quorum: int | None = None) -> PutResult   # .acks; QuorumError, RecordTooLargeError
    await dht.get(key: bytes, writer: PeerId | None = None, *,
                  quorum: int | None = None) -> GetResult   # .record: newest of quorum copies
    await dht.provide(cid: bytes) -> PutResult    # .acks; QuorumError
    await dht.stop_providing(cid: bytes) -> None
    await dht.find_providers(cid: bytes, count: int = 20) -> ProvidersResult   # .providers
    await dht.find_peer(peer_id: PeerId) -> PeerResult   # .addresses (None: not found)
    await dht.refresh(*, all_buckets: bool = False) -> int
    await dht.maintain() -> None              # one maintenance round
    dht.routing_table_snapshot() -> list[RoutingEntry]
    await dht.persist_routing_table() -> None

Every result carries ``stats: LookupStats | None``: queries, hops, ... of that call's own lookup
(None when it was answered without one).

The service composes sans-I/O parts: :mod:`~lattica.dht.responder` (answers requests),
:mod:`~lattica.dht.queries` (what a lookup asks and when it stops), :mod:`~lattica.dht.lookup`,
:mod:`~lattica.dht.routing`, :mod:`~lattica.dht.peer_health` (failed peers: skip, evict) and
:mod:`~lattica.dht.maintenance` (what upkeep is due).

Records live in their writer's namespace: ``get(key, writer)`` reads the record ``put(key, ...)``
by ``writer`` stored at ``sha256(b"lattica/record/" + writer.key + key)``. Values are at most
64 KiB; records and provider records are Ed25519-signed and verified by every receiver; the
newest ``(seq, expires_at)`` wins; stale and forged records are refused and never forwarded.
The persistent store is :class:`DhtStore` (sqlite, WAL, ``synchronous=FULL``, writes group-committed
on a worker thread: see :mod:`lattica.storage`).
"""

from lattica.dht.errors import (
    BootstrapError,
    InvalidRecordError,
    QuorumError,
    RecordTooLargeError,
    StaleRecordError,
    StoreFullError,
    WriterQuotaError,
)
from lattica.dht.keys import (
    KEY_BITS,
    bucket_index,
    node_key,
    provider_key,
    record_key,
    xor_distance,
)
from lattica.dht.lookup import Lookup, LookupStats
from lattica.dht.messages import PROTOCOL_ID
from lattica.dht.records import (
    MAX_VALUE_BYTES,
    ProviderRecord,
    SignedRecord,
    sign_provider_record,
    sign_record,
    validate_provider_record,
    validate_record,
)
from lattica.dht.results import GetResult, PeerResult, ProvidersResult, PutResult
from lattica.dht.routing import DhtNode, RoutingTable
from lattica.dht.service import Dht, DhtConfig, RoutingEntry
from lattica.dht.store import DhtStore
from lattica.dht.transport import RpcTransport

__all__ = [
    "KEY_BITS",
    "MAX_VALUE_BYTES",
    "PROTOCOL_ID",
    "BootstrapError",
    "Dht",
    "DhtConfig",
    "DhtNode",
    "DhtStore",
    "GetResult",
    "InvalidRecordError",
    "Lookup",
    "LookupStats",
    "PeerResult",
    "ProviderRecord",
    "ProvidersResult",
    "PutResult",
    "QuorumError",
    "RecordTooLargeError",
    "RoutingEntry",
    "RoutingTable",
    "RpcTransport",
    "SignedRecord",
    "StaleRecordError",
    "StoreFullError",
    "WriterQuotaError",
    "bucket_index",
    "node_key",
    "provider_key",
    "record_key",
    "sign_provider_record",
    "sign_record",
    "validate_provider_record",
    "validate_record",
    "xor_distance",
]

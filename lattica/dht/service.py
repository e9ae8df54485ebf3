"""The ``Dht`` trio service: drives the sans-I/O pieces over an :class:`RpcTransport`.

Everything protocol-shaped lives elsewhere (routing rules in ``routing``, lookups in ``lookup``,
validation in ``records``, persistence in ``store``); this module only sends requests, feeds
answers to the state machines, serves incoming requests and runs the periodic maintenance.

Invariants:

* Only peers that talked to us themselves (authenticated by the transport) enter the routing
  table, never peers merely mentioned by others, and never peers in client mode.
* Nothing is stored, returned or forwarded before it validated (signature, key, expiry).
* ``put``/``provide`` return the number of remote nodes that acknowledged and raise
  :class:`QuorumError` when that is below the quorum; there is no false success.
* Record expiry uses ``wall_clock`` (unix seconds, shared meaning across nodes); timeouts use
  trio's clock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from lattica.dht.errors import (
    BootstrapError,
    InvalidRecordError,
    QuorumError,
    RecordTooLargeError,
    StaleRecordError,
    StoreFullError,
)
from lattica.dht.keys import bucket_index, provider_key, random_key_between, record_key
from lattica.dht.lookup import Lookup, LookupStats
from lattica.dht.messages import (
    MAX_CLOSER_PEERS,
    MAX_PROVIDERS,
    PROTOCOL_ID,
    Ack,
    AddProvider,
    Error,
    FindNode,
    GetProviders,
    GetValue,
    Nodes,
    PeerInfo,
    Ping,
    Pong,
    Providers,
    PutValue,
    Request,
    Response,
    Value,
    decode_request,
    decode_response,
    encode_message,
)
from lattica.dht.peer_health import PeerHealth
from lattica.dht.records import (
    MAX_SEQ,
    MAX_VALUE_BYTES,
    ProviderRecord,
    SignedRecord,
    check_record_signature,
    is_dialable_address,
    sign_provider_record,
    sign_record,
    validate_provider_record,
    validate_record,
)
from lattica.dht.routing import DhtNode, RoutingTable
from lattica.dht.store import DhtStore, StoredPeer
from lattica.dht.transport import RememberAddresses, RpcTransport
from lattica.errors import LatticaError, LocalProtocolError, RemoteProtocolError
from lattica.identity import Identity, PeerId
from lattica.net.address import PeerAddr
from lattica.net.datagram import Address

log = logging.getLogger(__name__)

V = TypeVar("V")
R = TypeVar("R", bound=Response)

HOUR_S = 3600.0
CLOCK_SKEW_ALLOWANCE_S = 300.0


@dataclass(frozen=True, kw_only=True)
class DhtConfig:
    """Tunables of the DHT. Times are seconds; the defaults follow libp2p where it has one.

    Raises :class:`LocalProtocolError` for values that cannot work (e.g. ``k`` above the
    message limit of 32 closer peers).
    """

    k: int = 20
    """Bucket size and replication factor."""
    alpha: int = 3
    """Parallel queries per lookup path."""
    disjoint_paths: int = 1
    """S/Kademlia disjoint lookup paths (1 = plain Kademlia)."""
    query_timeout_s: float = 10.0
    """Deadline of one request to one peer."""
    lookup_timeout_s: float = 60.0
    """Deadline of a whole iterative lookup (partial results are used after it)."""
    put_quorum: int = 1
    """Remote acknowledgements ``put`` needs to succeed."""
    provide_quorum: int = 1
    """Remote acknowledgements ``provide`` needs to succeed."""
    get_quorum: int = 1
    """Valid records (a local copy counts) after which ``get`` answers with the newest so far."""
    get_value_count: int = 3
    """Valid records after which a ``get``'s lookup stops. Between ``get_quorum`` and this, it
    goes on in the background, so holders of an older version are still found and repaired."""
    client_mode: bool = False
    """Not publicly reachable: ask others not to add us to their routing tables."""
    max_peers_per_subnet: int = 2
    """Per bucket, at most this many peers from one /24 (IPv4) or /48 (IPv6); 0 = no limit."""
    diversity_applies_to_private: bool = False
    """Apply the subnet limit to non-global addresses too (loopback/LAN are exempt by default)."""
    max_failures: int = 2
    """Consecutive failed requests after which a peer is evicted from the routing table."""
    default_record_ttl_s: float = 24 * HOUR_S
    """Record lifetime when ``put`` is given no ``ttl_s``."""
    max_record_ttl_s: float = 7 * 24 * HOUR_S
    """Longest record lifetime accepted (ours and others')."""
    provider_ttl_s: float = 48 * HOUR_S
    """Lifetime of a provider record (libp2p: 48 h)."""
    provider_republish_interval_s: float = 22 * HOUR_S
    """How often our provider records are re-signed and re-announced (libp2p: 22 h)."""
    record_republish_interval_s: float = 1 * HOUR_S
    """How often our own unexpired records are pushed again to the current closest peers."""
    bucket_refresh_interval_s: float = 1 * HOUR_S
    """A bucket with no lookup for this long is refreshed with a lookup of a random id in it."""
    maintenance_interval_s: float = 60.0
    """How often ``run`` checks for refresh, republish, expiry, re-bootstrap and persistence."""
    table_save_delay_s: float = 5.0
    """After the routing table gained or lost a peer, it is saved this much later (changes in
    between are saved together); last-seen times are saved every maintenance round."""
    bootstrap_peers: tuple[PeerAddr, ...] = ()
    """Peers to (re-)bootstrap from, in addition to those given to ``bootstrap``."""
    failure_backoff_s: float = 60.0
    """After a request to a peer fails, lookups and puts skip the peer for this long (doubled
    per consecutive failure, up to ``bucket_refresh_interval_s``); maintenance then pings it if
    it is in the routing table. Only failures of requests sent after the previous failure count
    towards ``max_failures``, so one outage counts once."""
    stale_peer_ping_s: float = 1800.0
    """Maintenance pings routing-table peers not heard from for this long (wall clock), so a
    peer that left is evicted even when no lookup of ours happened to ask it."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_CLOSER_PEERS:
            raise LocalProtocolError(f"k must be in 1..{MAX_CLOSER_PEERS}")
        if self.alpha < 1 or self.disjoint_paths < 1:
            raise LocalProtocolError("alpha and disjoint_paths must be at least 1")
        if self.put_quorum < 0 or self.provide_quorum < 0 or min(self.get_quorum, self.get_value_count) < 1:
            raise LocalProtocolError("put/provide quorums must be >= 0, get_quorum and get_value_count >= 1")


@dataclass(frozen=True)
class RoutingEntry:
    """One row of ``lattica dht routing``: a peer in bucket ``bucket`` (log2 of its distance)."""

    bucket: int
    peer_id: PeerId
    addresses: list[Address]
    first_seen: float
    last_seen: float


class _QueryFailed(Exception):
    pass


@dataclass
class Replication:
    """What the nodes sent a record (or provider record) answered."""

    asked: int
    acks: int = 0
    stale: int = 0
    refused: int = 0
    unreachable: int = 0
    lookup_failures: int = 0
    """Peers that did not answer the lookup for where to store it."""
    reasons: list[str] = field(default_factory=list)
    held: list[SignedRecord] = field(default_factory=list)
    """Records quoted by stale refusals (unverified)."""

    def count(self, ack: Ack) -> None:
        """Count one answer."""
        if ack.stored:
            self.acks += 1
        elif ack.reason.startswith("stale"):
            self.stale += 1
            if ack.held is not None and len(self.held) < MAX_CLOSER_PEERS:
                self.held.append(ack.held)
        else:
            self.refused += 1
            if len(self.reasons) < 3 and ack.reason not in self.reasons:
                self.reasons.append(ack.reason[:80])

    def newest_held_seq(self, record: SignedRecord) -> int | None:
        """The highest sequence number among genuine versions of ``record`` (same writer and
        key, validly signed) that refusals quoted, if one is at least ``record.seq``."""
        best: int | None = None
        for held in self.held:
            try:
                check_record_signature(held, expected_dht_key=record.dht_key)
            except InvalidRecordError:
                continue
            if held.seq >= record.seq and held.seq < MAX_SEQ and (best is None or held.seq > best):
                best = held.seq
        return best

    def error(self, operation: str, quorum: int) -> QuorumError:
        """The :class:`QuorumError` saying why fewer than ``quorum`` acknowledged."""
        return QuorumError(
            operation,
            self.acks,
            quorum,
            asked=self.asked,
            stale=self.stale,
            refused=self.refused,
            unreachable=self.unreachable + self.lookup_failures,
            reasons=tuple(self.reasons),
        )


@dataclass
class _Outcome(Generic[V]):
    closer: list[PeerInfo] = field(default_factory=list)
    value: V | None = None


def _newest(found: list[tuple[PeerId, SignedRecord]]) -> SignedRecord | None:
    best: SignedRecord | None = None
    for _peer, record in found:
        if best is None or record.supersedes(best):
            best = record
    return best


class Dht:
    """A Kademlia DHT node (see the package docstring for the API contract).

    ``transport`` carries requests; ``remember_addresses(peer, addrs)`` tells the transport's
    address book where a peer lives; ``own_addresses()`` returns our current dialable
    addresses; ``wall_clock()`` returns unix seconds (records' expiry); ``rng`` picks refresh
    ids. The constructor registers the request handler for :data:`PROTOCOL_ID` and loads the
    persisted routing table. Liveness checks of full buckets, read repair and maintenance need
    :meth:`run` to be running.
    """

    def __init__(
        self,
        identity: Identity,
        transport: RpcTransport,
        store: DhtStore,
        *,
        remember_addresses: RememberAddresses,
        own_addresses: Callable[[], list[Address]],
        config: DhtConfig | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.own_key = self.peer_id.dht_key()
        self.config = config or DhtConfig()
        self._transport = transport
        self._store = store
        self._remember = remember_addresses
        self._own_addresses = own_addresses
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self.routing_table = RoutingTable(
            self.own_key,
            k=self.config.k,
            max_peers_per_subnet=self.config.max_peers_per_subnet,
            diversity_applies_to_private=self.config.diversity_applies_to_private,
            now=wall_clock(),
        )
        self._liveness_checks: set[bytes] = set()
        self._health = PeerHealth(
            max_failures=self.config.max_failures,
            backoff_s=self.config.failure_backoff_s,
            max_backoff_s=max(self.config.failure_backoff_s, self.config.bucket_refresh_interval_s),
        )
        self._nursery: trio.Nursery | None = None
        self._bootstrap_addrs: list[PeerAddr] = list(self.config.bootstrap_peers)
        self._record_published_at: dict[bytes, float] = {}
        self._background = 0
        self._background_idle = trio.Event()
        self._table_changed = trio.Event()
        self._fill_retry: dict[tuple[int, int], tuple[float, float]] = {}
        """Empty far bucket range -> (next fill attempt, current retry interval), wall clock."""
        self.last_lookup_stats: LookupStats | None = None
        """Statistics of the most recent lookup a call answered from, or None.

        Set with no checkpoint before ``get``/``find_providers``/``find_peer`` return: read
        right after awaiting one of them, it describes that call's lookup as of its answer (a
        ``get`` may answer before its lookup ends), unless the call answered from the local
        store (then it is unchanged).
        """
        self._load_routing_table()
        self._had_peers = len(self.routing_table) > 0
        transport.add_handler(PROTOCOL_ID, self._handle_request)

    # == public API ============================================================================

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve liveness checks and run maintenance until cancelled.

        Every ``maintenance_interval_s``: re-bootstrap when the routing table lost every peer, refresh
        stale buckets, republish own records and provider records that are due, purge expired
        entries, and persist the routing table (also on exit, and ``table_save_delay_s`` after
        it gains or loses a peer).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._save_table_when_changed)
                task_status.started()
                while True:
                    await self.maintain()
                    await trio.sleep(self.config.maintenance_interval_s)
        finally:
            self._nursery = None
            self.persist_routing_table()

    async def bootstrap(self, addrs: list[PeerAddr] | None = None) -> int:
        """Join the DHT through ``addrs`` (plus configured and remembered bootstrap peers).

        Asks each for peers near our own id, then looks up our own id to fill the routing table.
        Our own id or listen address is never dialled, and an answer from ourselves (an address
        that turned out to be ours) does not count. Returns how many other peers answered;
        raises :class:`BootstrapError` when none did (saying so when every address was ours).
        """
        own_addresses = set(self._own_addresses())

        def is_self(addr: PeerAddr) -> bool:
            return addr.peer_id == self.peer_id or (addr.peer_id is None and addr.address in own_addresses)

        for addr in addrs or ():
            if addr not in self._bootstrap_addrs and not is_self(addr):
                self._bootstrap_addrs.append(addr)
        given = list(addrs) if addrs else list(self._bootstrap_addrs)
        if not given:
            raise BootstrapError("no bootstrap peers given; pass PEERID@HOST:PORT of a DHT node")
        targets = [a for a in given if not is_self(a)]
        helpers: list[PeerId] = []
        seeds: list[PeerId] = []
        answered = 0
        reached_self = len(given) - len(targets)

        async def contact(addr: PeerAddr) -> None:
            nonlocal answered, reached_self
            if addr.peer_id is not None:
                self._remember(addr.peer_id, [addr.address])
            try:
                reply = await self._request(addr.peer_id or addr, self._find_node(self.own_key), Nodes)
            except _QueryFailed:
                return
            claimed = PeerId(reply.sender.peer_id)
            if claimed == self.peer_id:
                reached_self += 1  # an address of ours we did not know as such (e.g. 0.0.0.0)
                return
            answered += 1
            if addr.peer_id is None:
                # An unverified claim: remember where it answered, verify by querying it by id.
                self._remember(claimed, [addr.address, *reply.sender.address_list()])
            helpers.append(claimed)
            seeds.extend(self._learn(reply.closer))

        async with trio.open_nursery() as nursery:
            for addr in targets:
                nursery.start_soon(contact, addr)
        if not answered:
            shown = ", ".join(str(a) for a in given[:3])
            if reached_self == len(given):
                raise BootstrapError(
                    f"the bootstrap address(es) given ({shown}) are this node itself; "
                    "pass PEERID@HOST:PORT of another DHT node"
                )
            ours = f", {reached_self} of them this node itself" if reached_self else ""
            raise BootstrapError(
                f"none of the {len(given)} bootstrap peer(s) answered ({shown}{ours}); "
                "check the addresses and that they are running"
            )
        await self._find_closest(self.own_key, seeds=helpers + seeds)
        # Kademlia's join ends by refreshing the buckets beyond our closest neighbour. Only the
        # empty ones need it, and their lookups must start outside our own table: when many
        # nodes join at once, two neighbouring groups of ids can each fill their own lookups
        # (k nodes) without ever meeting, and a lookup seeded from our table stays in our group.
        await self._fill_empty_buckets(helpers)
        self._had_peers = True
        # A node killed right after joining still knows its peers when it comes back.
        self.persist_routing_table()
        return answered

    async def put(self, key: bytes, value: bytes, ttl_s: float | None = None, *, quorum: int | None = None) -> int:
        """Sign ``value`` under ``key`` in our namespace and store it on the k closest nodes.

        ``ttl_s`` defaults to ``config.default_record_ttl_s``. The sequence number is the larger
        of (last one we used for ``key``) + 1 and the current unix time in milliseconds. The
        record is kept locally and republished while it lives. Returns the number of remote
        nodes that acknowledged. Raises :class:`RecordTooLargeError` for a value above 64 KiB,
        :class:`LocalProtocolError` for a bad ``ttl_s``, :class:`QuorumError` when fewer than
        ``quorum`` (default ``config.put_quorum``) nodes acknowledged.
        """
        if len(value) > MAX_VALUE_BYTES:
            raise RecordTooLargeError(
                f"value is {len(value)} bytes; the DHT limit is {MAX_VALUE_BYTES} bytes "
                "(publish large data as content and put its id in the DHT)"
            )
        ttl = self.config.default_record_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= self.config.max_record_ttl_s:
            raise LocalProtocolError(f"ttl_s must be in (0, {self.config.max_record_ttl_s:.0f}] seconds, got {ttl}")
        now = self._wall_clock()
        dht_key = record_key(self.peer_id, key)
        held = self._store.get_record(dht_key, now=-math.inf)
        seq = max(held.seq + 1 if held else 0, int(now * 1000))
        record = sign_record(self.identity, key, value, seq=seq, expires_at=int(now + ttl))
        self._store.put_record(record, own=True)
        closest, outcome = await self._replicate_record(record)
        newest_held = outcome.newest_held_seq(record)
        if newest_held is not None:
            # Holders keep a version we signed with a higher sequence number than ours (we lost
            # our database and our clock is behind): beat it and send again to the same peers.
            record = sign_record(self.identity, key, value, seq=newest_held + 1, expires_at=int(now + ttl))
            log.info("put: peers hold seq %d of this record; re-signed with seq %d", newest_held, record.seq)
            self._store.put_record(record, own=True)
            lookup_failures = outcome.lookup_failures
            outcome = await self._send_records(closest, record)
            outcome.lookup_failures = lookup_failures
        self._record_published_at[dht_key] = now
        needed = self.config.put_quorum if quorum is None else quorum
        if outcome.acks < needed:
            raise outcome.error("put", needed)
        return outcome.acks

    async def get(self, key: bytes, writer: PeerId | None = None, *, quorum: int | None = None) -> SignedRecord | None:
        """The newest valid record ``key`` in ``writer``'s namespace (default: ours), or None.

        Answers with the newest of the first ``quorum`` (default ``config.get_quorum``) valid
        records, counting a local copy, or with the newest found when the lookup ends with
        fewer. While :meth:`run` is running, the lookup then goes on in the background up to
        ``config.get_value_count`` records, and every holder of an older version (us included)
        is sent the newest one. A larger ``quorum`` trades latency for freshness.
        """
        need = self.config.get_quorum if quorum is None else quorum
        if need < 1:
            raise LocalProtocolError("quorum must be at least 1")
        writer = writer or self.peer_id
        dht_key = record_key(writer, key)
        local = self._store.get_record(dht_key, now=self._wall_clock())
        found: list[tuple[PeerId, SignedRecord]] = [(self.peer_id, local)] if local is not None else []
        answered = trio.Event()
        stats: list[LookupStats] = []

        def extract(peer: PeerId, reply: Value) -> _Outcome[SignedRecord]:
            record = reply.record
            if record is not None:
                try:
                    validate_record(
                        record,
                        now=self._wall_clock(),
                        max_ttl_s=self.config.max_record_ttl_s + CLOCK_SKEW_ALLOWANCE_S,
                        expected_dht_key=dht_key,
                    )
                except InvalidRecordError as exc:
                    log.info("dropping invalid record from %s: %s", peer.short(), exc)
                    record = None
                else:
                    found.append((peer, record))
            return _Outcome(reply.closer, record)

        def stop_when(lookup: Lookup[SignedRecord]) -> bool:
            if len(found) >= need and not answered.is_set():
                stats.append(lookup.stats())
                answered.set()
            return len(found) >= max(need, self.config.get_value_count)

        async def look_up_and_repair() -> None:
            try:
                lookup = await self._lookup(
                    dht_key,
                    GetValue(sender=self._me(), client=self.config.client_mode, key=dht_key),
                    Value,
                    extract,
                    stop_when=stop_when,
                )
                if not answered.is_set():
                    stats.append(lookup.stats())
            finally:
                answered.set()  # also when the DHT shuts down under us: answer with what we have
            await self._repair(dht_key, found)

        if self._nursery is None:
            await look_up_and_repair()
        else:
            if len(found) >= need:
                answered.set()
            self._background += 1  # counted before it starts, so background_done() sees it
            self._nursery.start_soon(self._in_background, look_up_and_repair)
            await answered.wait()
        if stats:
            self.last_lookup_stats = stats[0]
        return _newest(found)

    async def background_done(self) -> None:
        """Wait until the work calls left running (a ``get``'s lookup and repairs) has ended."""
        while self._background:
            await self._background_idle.wait()

    async def _in_background(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        finally:
            self._background -= 1
            if not self._background:
                self._background_idle.set()
                self._background_idle = trio.Event()

    async def _repair(self, dht_key: bytes, found: list[tuple[PeerId, SignedRecord]]) -> None:
        """Send the newest of ``found`` to every peer in it that returned an older version."""
        best = _newest(found)
        if best is None:
            return
        outdated = list(dict.fromkeys(p for p, record in found if best.supersedes(record)))
        if self.peer_id in outdated:
            outdated.remove(self.peer_id)
            self._accept_record(best)
        if outdated:
            await self._send_records(outdated, best)

    async def provide(self, cid: bytes) -> int:
        """Announce that we serve ``cid`` at our current addresses; republished every 22 h.

        Returns the number of remote nodes that stored the provider record; raises
        :class:`QuorumError` below ``config.provide_quorum``.
        """
        now = self._wall_clock()
        record = sign_provider_record(
            self.identity, cid, self._own_addresses(), expires_at=int(now + self.config.provider_ttl_s)
        )
        self._store.add_provided(cid)
        try:
            self._store.add_provider(record)
        except StoreFullError as exc:
            log.warning("not keeping our own provider record locally: %s", exc)
        lookup = await self._find_closest(record.dht_key)
        message = AddProvider(sender=self._me(), client=self.config.client_mode, record=record)
        outcome = await self._send_to_all(lookup.result(), message)
        outcome.lookup_failures = lookup.stats().failures
        if outcome.acks < self.config.provide_quorum:
            raise outcome.error("provide", self.config.provide_quorum)
        return outcome.acks

    def stop_providing(self, cid: bytes) -> None:
        """Stop republishing ``cid`` (existing provider records expire on their own)."""
        self._store.remove_provided(cid)

    async def find_providers(self, cid: bytes, count: int = 20) -> list[ProviderRecord]:
        """Up to ``count`` valid provider records for ``cid``, longest-lived first.

        The providers' addresses are handed to ``remember_addresses`` so they can be dialled.
        """
        dht_key = provider_key(cid)
        now = self._wall_clock()
        found: dict[bytes, ProviderRecord] = {
            r.provider: r for r in self._store.get_providers(dht_key, now=now, limit=count)
        }

        def extract(peer: PeerId, reply: Providers) -> _Outcome[list[ProviderRecord]]:
            valid = []
            for record in reply.providers:
                try:
                    validate_provider_record(
                        record,
                        now=self._wall_clock(),
                        max_ttl_s=self.config.provider_ttl_s + CLOCK_SKEW_ALLOWANCE_S,
                        expected_dht_key=dht_key,
                    )
                except InvalidRecordError as exc:
                    log.info("dropping invalid provider record from %s: %s", peer.short(), exc)
                    continue
                if record.cid != cid:
                    continue
                held = found.get(record.provider)
                if held is None or record.expires_at > held.expires_at:
                    found[record.provider] = record
                valid.append(record)
            return _Outcome(reply.closer, valid or None)

        if len(found) < count:
            lookup = await self._lookup(
                dht_key,
                GetProviders(sender=self._me(), client=self.config.client_mode, key=dht_key),
                Providers,
                extract,
                stop_when=lambda _lk: len(found) >= count,
            )
            self.last_lookup_stats = lookup.stats()
        records = sorted(found.values(), key=lambda r: r.expires_at, reverse=True)[:count]
        for record in records:
            if record.provider != self.peer_id.key and record.addresses:
                self._remember(record.provider_id, record.address_list())
        return records

    async def find_peer(self, peer_id: PeerId) -> list[Address] | None:
        """Where ``peer_id`` can be dialled: from the routing table, else by a DHT lookup.

        Returns None when no node on the path knows the peer.
        """
        if peer_id == self.peer_id:
            return self._own_addresses()
        node = self.routing_table.get(peer_id)
        if node is not None and node.addresses:
            return list(node.addresses)
        found: list[Address] | None = None

        def extract(peer: PeerId, reply: Nodes) -> _Outcome[None]:
            nonlocal found
            if peer == peer_id:
                found = reply.sender.address_list()
            for info in reply.closer:
                if info.peer_id == peer_id.key and found is None:
                    found = info.address_list()
            return _Outcome(reply.closer, None)

        target = peer_id.dht_key()
        lookup = await self._lookup(
            target, self._find_node(target), Nodes, extract, stop_when=lambda _lk: found is not None
        )
        self.last_lookup_stats = lookup.stats()
        return found

    async def refresh(self, *, all_buckets: bool = False) -> int:
        """Look up a random id in each stale bucket (or every bucket); returns lookups run.

        An empty bucket's lookup starts from what peers with a wider view know (see
        :meth:`_fill_range`), since our own table has nobody near its range.
        """
        now = self._wall_clock()
        max_age = -math.inf if all_buckets else self.config.bucket_refresh_interval_s
        ranges = self.routing_table.stale_buckets(now, max_age)
        empty = set(self.routing_table.empty_far_buckets())
        for low, high in ranges:
            if (low, high) in empty:
                await self._fill_range(low, high, helpers=[])
            else:
                await self._find_closest(random_key_between(low, high, self._rng))
        return len(ranges)

    async def maintain(self) -> None:
        """One maintenance round (what :meth:`run` does every ``maintenance_interval_s``)."""
        now = self._wall_clock()
        purged = self._store.purge_expired(now=now)
        if purged:
            log.debug("purged %d expired DHT entries", purged)
        if len(self.routing_table) == 0 and self._had_peers:
            # Lost every peer. (A node that never joined is joining through ``bootstrap``, with
            # its own retries; a second bootstrap alongside would only double the work.) Losing
            # every peer at once says more about our own network than theirs: forget their
            # failures, or the peers they name would be skipped.
            self._health.clear()
            await self._rebootstrap()
        if len(self.routing_table) == 0:
            return
        self._had_peers = True
        await self._probe_peers(now)
        await self._fill_empty_buckets([], only_due=True)
        await self.refresh()
        await self._republish(now)
        self.persist_routing_table()

    async def _probe_peers(self, now: float) -> None:
        """Ping routing-table peers whose failure backoff is over, and those not heard from for
        ``stale_peer_ping_s`` (wall clock ``now``): an answer clears them, a failure counts
        towards eviction."""
        peers = list(self.routing_table.peers())
        due = set(self._health.due_probes((n.peer_id for n in peers), trio.current_time()))
        due.update(n.peer_id for n in peers if now - n.last_seen >= self.config.stale_peer_ping_s)
        limiter = trio.CapacityLimiter(max(self.config.alpha, 1) * 4)

        async def probe(peer: PeerId) -> None:
            async with limiter:
                with contextlib.suppress(_QueryFailed):
                    await self._request(peer, Ping(sender=self._me(), client=self.config.client_mode), Pong)

        async with trio.open_nursery() as nursery:
            for peer in sorted(due, key=lambda p: p.key):
                nursery.start_soon(probe, peer)

    def routing_table_snapshot(self) -> list[RoutingEntry]:
        """The routing table, farthest bucket first, least recently seen first within one."""
        entries = [
            RoutingEntry(
                bucket=bucket_index(self.own_key, node.key),
                peer_id=node.peer_id,
                addresses=list(node.addresses),
                first_seen=node.first_seen,
                last_seen=node.last_seen,
            )
            for node in self.routing_table.peers()
        ]
        entries.sort(key=lambda e: -e.bucket)
        return entries

    def persist_routing_table(self) -> None:
        """Write the routing table (peer ids, addresses, last seen) to the store."""
        self._store.save_peers(
            [StoredPeer(n.peer_id, list(n.addresses), n.last_seen) for n in self.routing_table.peers()]
        )

    # == serving ==============================================================================

    async def _handle_request(self, peer: PeerId, payload: bytes) -> bytes:
        try:
            request = decode_request(payload)
        except RemoteProtocolError as exc:
            return self._error("malformed", str(exc))
        if request.sender.peer_id != peer.key:
            return self._error("bad-sender", "sender peer id differs from the connection's")
        self._on_peer_seen(peer, request.sender.address_list(), client=request.client)
        return encode_message(self._serve(peer, request))

    def _serve(self, peer: PeerId, request: Request) -> Response:
        me, client = self._me(), self.config.client_mode
        now = self._wall_clock()
        match request:
            case Ping():
                return Pong(sender=me, client=client)
            case FindNode(target=target):
                return Nodes(sender=me, client=client, closer=self._closer(target, peer))
            case GetValue(key=key):
                return Value(
                    sender=me,
                    client=client,
                    record=self._store.get_record(key, now=now),
                    closer=self._closer(key, peer),
                )
            case PutValue(record=record):
                stored, reason = self._accept_record(record)
                held = None
                if reason.startswith("stale"):
                    held = self._store.get_record(record.dht_key, now=-math.inf)
                return Ack(sender=me, client=client, stored=stored, reason=reason, held=held)
            case AddProvider(record=provider_record):
                stored, reason = self._accept_provider(peer, provider_record)
                return Ack(sender=me, client=client, stored=stored, reason=reason)
            case GetProviders(key=key):
                return Providers(
                    sender=me,
                    client=client,
                    providers=self._store.get_providers(key, now=now, limit=MAX_PROVIDERS),
                    closer=self._closer(key, peer),
                )
        raise AssertionError(f"unhandled request {type(request).__name__}")  # pragma: no cover

    def _accept_record(self, record: SignedRecord) -> tuple[bool, str]:
        try:
            validate_record(
                record,
                now=self._wall_clock(),
                max_ttl_s=self.config.max_record_ttl_s + CLOCK_SKEW_ALLOWANCE_S,
            )
            own = record.writer == self.peer_id.key
            self._store.put_record(record, own=own)
        except StaleRecordError as exc:
            return False, f"stale: {exc}"[:200]
        except InvalidRecordError as exc:
            return False, f"invalid: {exc}"[:200]
        except StoreFullError:
            return False, "store full"
        return True, ""

    def _accept_provider(self, peer: PeerId, record: ProviderRecord) -> tuple[bool, str]:
        if record.provider != peer.key:
            return False, "invalid: a provider record must be announced by its provider"
        try:
            validate_provider_record(
                record,
                now=self._wall_clock(),
                max_ttl_s=self.config.provider_ttl_s + CLOCK_SKEW_ALLOWANCE_S,
            )
            self._store.add_provider(record)
        except InvalidRecordError as exc:
            return False, f"invalid: {exc}"[:200]
        except StoreFullError:
            return False, "store full"
        return True, ""

    def _closer(self, target: bytes, requester: PeerId) -> list[PeerInfo]:
        nodes = self.routing_table.closest(target, self.config.k, exclude=(requester.dht_key(),))
        return [PeerInfo.of(n.peer_id, n.addresses) for n in nodes]

    def _error(self, code: str, reason: str) -> bytes:
        return encode_message(Error(sender=self._me(), client=self.config.client_mode, code=code, reason=reason[:200]))

    # == peers =================================================================================

    def _me(self) -> PeerInfo:
        return PeerInfo.of(self.peer_id, self._own_addresses())

    def _find_node(self, target: bytes) -> FindNode:
        return FindNode(sender=self._me(), client=self.config.client_mode, target=target)

    def _on_peer_failed(self, peer: PeerId, sent_at: float) -> None:
        if self._health.on_failure(peer, sent_at=sent_at, now=trio.current_time()) and peer in self.routing_table:
            log.debug("evicting %s after %d failed requests", peer.short(), self._health.failures(peer))
            self.routing_table.remove(peer)  # the newest admissible replacement takes its place
            self._table_changed.set()

    def _usable(self, peers: list[PeerId]) -> list[PeerId]:
        """``peers`` without those in their backoff after a failure (see :mod:`peer_health`)."""
        now = trio.current_time()
        return [p for p in peers if not self._health.is_suspect(p, now)]

    def _on_peer_seen(self, peer: PeerId, addresses: list[Address], *, client: bool) -> None:
        if peer == self.peer_id:
            return
        self._health.on_success(peer)
        if addresses:
            self._remember(peer, addresses)
        if client:
            return
        result = self.routing_table.add_contact(DhtNode(peer, addresses), now=self._wall_clock())
        if result.outcome == "added":
            self._table_changed.set()
        elif result.outcome == "full" and result.check is not None:
            self._start_liveness_check(result.check)

    def _start_liveness_check(self, node: DhtNode) -> None:
        if node.key in self._liveness_checks or self._nursery is None:
            return
        self._liveness_checks.add(node.key)
        self._nursery.start_soon(self._check_liveness, node)

    async def _check_liveness(self, node: DhtNode) -> None:
        try:
            await self._request(node.peer_id, Ping(sender=self._me(), client=self.config.client_mode), Pong)
        except _QueryFailed:
            log.debug("evicting unresponsive peer %s", node.peer_id.short())
            self.routing_table.remove(node.peer_id)
            self._table_changed.set()
        else:
            self.routing_table.mark_alive(node.peer_id, self._wall_clock())
        finally:
            self._liveness_checks.discard(node.key)

    def _learn(self, closer: list[PeerInfo]) -> list[PeerId]:
        peers = []
        now = trio.current_time()
        for info in closer:
            peer = PeerId(info.peer_id)
            if peer == self.peer_id or self._health.is_suspect(peer, now):
                continue
            addresses = info.address_list()
            if addresses and peer not in self.routing_table:
                self._remember(peer, addresses)
            peers.append(peer)
        return peers

    def _load_routing_table(self) -> None:
        for stored in self._store.load_peers():
            if stored.peer_id == self.peer_id:
                continue
            # A table saved by an older version may hold addresses no message may carry now
            # (a host with a NUL byte crashed the node on every start): such entries are skipped.
            addresses = [(h, p) for h, p in stored.addresses if is_dialable_address(h, p)]
            if not addresses:
                continue
            self._remember(stored.peer_id, addresses)
            node = DhtNode(
                stored.peer_id,
                addresses,
                first_seen=stored.last_seen,
                last_seen=stored.last_seen,
            )
            self.routing_table.add_contact(node, now=stored.last_seen)

    # == requests and lookups =================================================================

    async def _request(self, peer: PeerId | PeerAddr, message: Request, expect: type[R]) -> R:
        """One request; raises ``_QueryFailed`` on any failure (and counts it against ``peer``)."""
        expected = peer if isinstance(peer, PeerId) else peer.peer_id
        if expected == self.peer_id:
            raise _QueryFailed("that is our own id")  # never dial ourselves
        sent_at = trio.current_time()
        timeout_s = self.config.query_timeout_s
        reply: Response | None = None
        with trio.move_on_after(timeout_s * 1.5):  # in case the transport ignores timeout_s
            try:
                raw = await self._transport.request(peer, PROTOCOL_ID, encode_message(message), timeout_s=timeout_s)
                reply = decode_response(raw)
            except (LatticaError, trio.BrokenResourceError, OSError) as exc:
                log.debug("DHT request to %s failed: %s", peer, exc)
        if reply is None or (expected is not None and reply.sender.peer_id != expected.key):
            if expected is not None:
                self._on_peer_failed(expected, sent_at)
            raise _QueryFailed(str(peer))
        if expected is not None:
            self._on_peer_seen(expected, reply.sender.address_list(), client=reply.client)
        if not isinstance(reply, expect):
            raise _QueryFailed(f"{peer} answered {type(reply).__name__}")
        return reply

    async def _query_into(
        self,
        peer: PeerId,
        message: Request,
        expect: type[R],
        results: trio.MemorySendChannel[tuple[PeerId, R | None]],
    ) -> None:
        try:
            reply: R | None = await self._request(peer, message, expect)
        except _QueryFailed:
            reply = None
        await results.send((peer, reply))

    async def _lookup(
        self,
        target: bytes,
        message: Request,
        expect: type[R],
        extract: Callable[[PeerId, R], _Outcome[V]],
        *,
        stop_when: Callable[[Lookup[V]], bool] | None = None,
        seeds: list[PeerId] | None = None,
    ) -> Lookup[V]:
        """Drive a :class:`Lookup` to completion with up to alpha*paths requests in flight."""
        config = self.config
        if not seeds:
            seeds = [n.peer_id for n in self.routing_table.closest(target, config.k * config.disjoint_paths)]
        seeds = self._usable(seeds)
        deadline = trio.current_time() + config.lookup_timeout_s
        lookup: Lookup[V] = Lookup(
            target,
            seeds,
            k=config.k,
            alpha=config.alpha,
            disjoint_paths=config.disjoint_paths,
            own_id=self.own_key,
            deadline=deadline,
        )
        self.routing_table.touch_bucket(target, self._wall_clock())
        send, receive = trio.open_memory_channel[tuple[PeerId, R | None]](math.inf)
        async with trio.open_nursery() as nursery:
            while True:
                for peer in lookup.next_queries(trio.current_time()):
                    nursery.start_soon(self._query_into, peer, message, expect, send)
                if lookup.done or lookup.in_flight == 0:
                    break
                with trio.move_on_at(deadline):
                    peer, reply = await receive.receive()
                    if reply is None:
                        lookup.on_failure(peer)
                    else:
                        outcome = extract(peer, reply)
                        lookup.on_response(peer, self._learn(outcome.closer), outcome.value)
                        if stop_when is not None and stop_when(lookup):
                            lookup.stop()
            nursery.cancel_scope.cancel()
        return lookup

    async def _find_closest(
        self,
        target: bytes,
        *,
        seeds: list[PeerId] | None = None,
        stop_when: Callable[[Lookup[None]], bool] | None = None,
    ) -> Lookup[None]:
        def extract(_peer: PeerId, reply: Nodes) -> _Outcome[None]:
            return _Outcome(reply.closer, None)

        lookup = await self._lookup(
            target, self._find_node(target), Nodes, extract, seeds=seeds, stop_when=stop_when
        )
        self.last_lookup_stats = lookup.stats()
        return lookup

    async def _fill_empty_buckets(self, helpers: list[PeerId], *, only_due: bool = False) -> int:
        """Look up a random id in every empty far bucket (``only_due``: those whose retry is
        due); returns how many lookups ran.

        A bucket that stays empty is tried again after one maintenance interval, then after
        twice that, and so on up to the bucket refresh interval: nodes that joined at the same
        time as we did may not have been known to anyone on the first try, while a range that
        really holds nobody costs only a few lookups before the hourly refresh takes over.
        """
        now = self._wall_clock()
        ranges = self.routing_table.empty_far_buckets()
        self._fill_retry = {r: self._fill_retry[r] for r in ranges if r in self._fill_retry}
        ran = 0
        for low, high in ranges:
            due_at, interval = self._fill_retry.get((low, high), (now, 0.0))
            if only_due and due_at > now:
                continue
            interval = min(max(2 * interval, self.config.maintenance_interval_s), self.config.bucket_refresh_interval_s)
            self._fill_retry[(low, high)] = (now + interval, interval)
            await self._fill_range(low, high, helpers=helpers)
            ran += 1
        return ran

    async def _fill_range(self, low: int, high: int, *, helpers: list[PeerId]) -> None:
        """Look up a random id in ``[low, high]``, seeded by what ``helpers`` (plus up to alpha
        peers from our nearest farther bucket) know near it, and by our own closest peers.

        The lookup stops once alpha peers of the range have answered (and so joined the
        bucket): lookups need one live peer per non-empty range, and traffic fills the bucket
        further. Running it to convergence costs about three times the requests, most of them
        to peers not yet connected.
        """
        target = random_key_between(low, high, self._rng)
        wide = [n.peer_id for n in self.routing_table.wider_view(low, high, self.config.alpha)]
        asked = self._usable(list(dict.fromkeys(helpers + wide)))
        seeds: list[PeerId] = []

        async def ask(peer: PeerId) -> None:
            try:
                reply = await self._request(peer, self._find_node(target), Nodes)
            except _QueryFailed:
                return
            seeds.extend(self._learn(reply.closer))

        async with trio.open_nursery() as nursery:
            for peer in asked:
                nursery.start_soon(ask, peer)
        own = [n.peer_id for n in self.routing_table.closest(target, self.config.k)]
        enough = self.config.alpha
        await self._find_closest(
            target,
            seeds=list(dict.fromkeys(seeds + own)),
            stop_when=lambda _lk: self.routing_table.bucket_population(target) >= enough,
        )

    async def _send_to_all(self, peers: list[PeerId], message: PutValue | AddProvider) -> Replication:
        outcome = Replication(asked=len(peers))

        async def send_one(peer: PeerId) -> None:
            try:
                ack = await self._request(peer, message, Ack)
            except _QueryFailed:
                outcome.unreachable += 1
                return
            outcome.count(ack)
            if not ack.stored:
                log.info("%s refused a record: %s", peer.short(), ack.reason)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(send_one, peer)
        return outcome

    async def _replicate_record(self, record: SignedRecord) -> tuple[list[PeerId], Replication]:
        lookup = await self._find_closest(record.dht_key)
        closest = lookup.result()
        outcome = await self._send_records(closest, record)
        outcome.lookup_failures = lookup.stats().failures
        return closest, outcome

    async def _send_records(self, peers: list[PeerId], record: SignedRecord) -> Replication:
        message = PutValue(sender=self._me(), client=self.config.client_mode, record=record)
        return await self._send_to_all(peers, message)

    # == maintenance ==========================================================================

    async def _save_table_when_changed(self) -> None:
        while True:
            await self._table_changed.wait()
            await trio.sleep(self.config.table_save_delay_s)
            self._table_changed = trio.Event()
            self.persist_routing_table()

    async def _rebootstrap(self) -> None:
        addrs = list(self._bootstrap_addrs)
        for stored in self._store.load_peers():
            for address in [a for a in stored.addresses if is_dialable_address(*a)][:1]:
                addrs.append(PeerAddr(address, stored.peer_id))
        if not addrs:
            return
        try:
            await self.bootstrap(addrs)
        except BootstrapError as exc:
            log.warning("re-bootstrap failed: %s", exc)

    async def _republish(self, now: float) -> None:
        interval = self.config.record_republish_interval_s
        for record in self._store.own_records(now=now):
            if record.writer != self.peer_id.key:
                continue
            if self._record_published_at.get(record.dht_key, -math.inf) + interval > now:
                continue
            _closest, outcome = await self._replicate_record(record)
            if outcome.acks:
                self._record_published_at[record.dht_key] = now
        due_after = self.config.provider_ttl_s - self.config.provider_republish_interval_s
        for cid in self._store.provided():
            ours = [
                r
                for r in self._store.get_providers(provider_key(cid), now=now, limit=MAX_PROVIDERS)
                if r.provider == self.peer_id.key
            ]
            if ours and max(r.expires_at for r in ours) - now > due_after:
                continue
            try:
                await self.provide(cid)
            except QuorumError as exc:
                log.warning("republishing provider record failed: %s", exc)

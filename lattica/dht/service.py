"""The ``Dht`` trio service: the only DHT code that awaits, sleeps or reads a clock.

It composes the sans-I/O parts and drives them over an :class:`RpcTransport`:

* :mod:`~lattica.dht.responder` decides how to answer a request (and what to store first);
* :mod:`~lattica.dht.lookup` decides whom to ask next, :mod:`~lattica.dht.queries` what to ask,
  how to judge answers and when to stop;
* :mod:`~lattica.dht.routing` keeps the k-buckets, :mod:`~lattica.dht.peer_health` the peers
  that failed lately;
* :mod:`~lattica.dht.maintenance` plans the periodic upkeep;
* :mod:`~lattica.dht.store` persists records, provider records and the routing table. Every
  store *write* is made here (and only here), after the decision and before the answer.

Invariants:

* Only peers that talked to us themselves (authenticated by the transport) enter the routing
  table, never peers merely mentioned by others, never peers in client mode, never ourselves.
* Nothing is stored, returned or forwarded before it validated (signature, key, expiry).
* ``put``/``provide`` return the number of remote nodes that acknowledged and raise
  :class:`QuorumError` when that is below the quorum; there is no false success.
* Each call returns its own result and lookup statistics (:mod:`~lattica.dht.results`).
* Record expiry uses ``wall_clock`` (unix seconds, shared meaning across nodes); timeouts and
  failure backoffs use trio's clock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import trio

from lattica.dht.config import DhtConfig as DhtConfig  # re-exported: older imports use this path
from lattica.dht.errors import (
    BootstrapError,
    InvalidRecordError,
    QuorumError,
    RecordTooLargeError,
    StoreFullError,
)
from lattica.dht.keys import bucket_index, provider_key, random_key_between, record_key
from lattica.dht.lookup import Lookup, LookupStats
from lattica.dht.maintenance import (
    Action,
    FillBucket,
    MaintenancePlanner,
    ProbePeers,
    PurgeExpired,
    Rebootstrap,
    RefreshBucket,
    Reprovide,
    RepublishRecord,
    SaveRoutingTable,
)
from lattica.dht.messages import (
    PROTOCOL_ID,
    Ack,
    AddProvider,
    Nodes,
    PeerInfo,
    Ping,
    Pong,
    PutValue,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_message,
)
from lattica.dht.peer_health import PeerHealth
from lattica.dht.queries import ClosestQuery, PeerQuery, ProvidersQuery, Query, ValueQuery
from lattica.dht.records import (
    MAX_VALUE_BYTES,
    SignedRecord,
    is_dialable_address,
    sign_provider_record,
    sign_record,
)
from lattica.dht.responder import Responder, StoreProvider, StoreRecord, Write
from lattica.dht.results import GetResult, PeerResult, ProvidersResult, PutResult, Replication
from lattica.dht.routing import DhtNode, RoutingTable
from lattica.dht.store import DhtStore, StoredPeer
from lattica.dht.transport import RememberAddresses, RpcTransport
from lattica.errors import LatticaError, LocalProtocolError, RemoteProtocolError
from lattica.identity import Identity, PeerId
from lattica.net.address import PeerAddr
from lattica.net.datagram import Address
from lattica.storage import StorageError

log = logging.getLogger(__name__)

_SEED_FACTOR = 3
"""Routing-table peers handed to a lookup, as a multiple of ``k`` per path (see ``_run_query``)."""

R = TypeVar("R", bound=Response)
V = TypeVar("V")

__all__ = ["Dht", "DhtConfig", "RoutingEntry"]


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
        self.config = config = config or DhtConfig()
        self._transport = transport
        self._store = store
        self._remember = remember_addresses
        self._own_addresses = own_addresses
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self.routing_table = RoutingTable(
            self.own_key,
            k=config.k,
            max_peers_per_subnet=config.max_peers_per_subnet,
            diversity_applies_to_private=config.diversity_applies_to_private,
            now=wall_clock(),
        )
        self._health = PeerHealth(
            max_failures=config.max_failures,
            backoff_s=config.failure_backoff_s,
            max_backoff_s=max(config.failure_backoff_s, config.bucket_refresh_interval_s),
        )
        self._responder = Responder(
            self.peer_id,
            store,
            self.routing_table,
            own_addresses=own_addresses,
            client_mode=config.client_mode,
            k=config.k,
            max_record_ttl_s=config.max_record_ttl_s,
            provider_ttl_s=config.provider_ttl_s,
        )
        self._liveness_checks: set[bytes] = set()
        self._nursery: trio.Nursery | None = None
        self._bootstrap_addrs: list[PeerAddr] = list(config.bootstrap_peers)
        self._background = 0
        # Wake-ups use ParkingLot plus the state they wait for (as lattica.net does), never a
        # re-created Event: a waiter re-checks the state after every wake-up.
        self._background_idle = trio.lowlevel.ParkingLot()
        self._table_changed = False
        self._table_changed_lot = trio.lowlevel.ParkingLot()
        self._load_routing_table()
        self._planner = MaintenancePlanner(
            self.peer_id,
            self.routing_table,
            store,
            self._health,
            maintenance_interval_s=config.maintenance_interval_s,
            bucket_refresh_interval_s=config.bucket_refresh_interval_s,
            record_republish_interval_s=config.record_republish_interval_s,
            provider_ttl_s=config.provider_ttl_s,
            provider_republish_interval_s=config.provider_republish_interval_s,
            stale_peer_ping_s=config.stale_peer_ping_s,
        )
        transport.add_handler(PROTOCOL_ID, self._handle_request)

    # == public API ============================================================================

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve liveness checks and run maintenance until cancelled.

        Every ``maintenance_interval_s`` a maintenance round (:meth:`maintain`); the routing
        table is also saved on exit and ``table_save_delay_s`` after it gains or loses a peer.
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
            with trio.CancelScope(shield=True):
                await self.persist_routing_table()

    @property
    def client_mode(self) -> bool:
        """Whether we ask peers not to add us to their routing tables (see ``set_client_mode``)."""
        return self.config.client_mode

    def set_client_mode(self, client_mode: bool) -> None:
        """Switch between server and client mode while running (reachability decides it).

        In client mode we still query, but every message says ``client`` so receivers do not add
        us to their routing tables (and drop us if they had us); on switching to it, the peers
        in our table are pinged so they learn at once."""
        if client_mode == self.config.client_mode:
            return
        self.config = replace(self.config, client_mode=client_mode)
        self._responder.set_client_mode(client_mode)
        log.info("DHT now in %s mode", "client" if client_mode else "server")
        if client_mode and self._nursery is not None:
            self._nursery.start_soon(self._probe, tuple(node.peer_id for node in self.routing_table.peers()))

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
                message = ClosestQuery(self.own_key).request(*self._me())
                reply = await self._request(addr.peer_id or addr, message, Nodes)
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
        await self._run_query(ClosestQuery(self.own_key), seeds=helpers + seeds)
        # Kademlia's join ends by refreshing the buckets beyond our closest neighbour. Only the
        # empty ones need it, and their lookups must start outside our own table: when many
        # nodes join at once, two neighbouring groups of ids can each fill their own lookups
        # (k nodes) without ever meeting, and a lookup seeded from our table stays in our group.
        for low, high in self._planner.fills(self._wall_clock(), only_due=False):
            await self._fill_range(low, high, helpers=helpers)
        self._planner.joined()
        # A node killed right after joining still knows its peers when it comes back.
        await self.persist_routing_table()
        return answered

    async def put(
        self, key: bytes, value: bytes, ttl_s: float | None = None, *, quorum: int | None = None
    ) -> PutResult:
        """Sign ``value`` under ``key`` in our namespace and store it on the k closest nodes.

        ``ttl_s`` defaults to ``config.default_record_ttl_s``. The sequence number is the larger
        of (last one we used for ``key``) + 1 and the current unix time in milliseconds; when
        holders refuse it as stale, quoting a version we signed with a higher one (we lost our
        database and our clock is behind), it is re-signed above that and sent again. The
        record is kept locally and republished while it lives. Returns the acknowledgements.
        Raises :class:`RecordTooLargeError` for a value above 64 KiB,
        :class:`LocalProtocolError` for a bad ``ttl_s``, :class:`QuorumError` (saying whether
        nodes refused it or did not answer) when fewer than ``quorum`` (default
        ``config.put_quorum``) nodes acknowledged.
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
        await self._store.put_record(record, own=True)
        closest, outcome, stats = await self._replicate_record(record)
        newest_held = outcome.newest_held_seq(record)
        if newest_held is not None:
            record = sign_record(self.identity, key, value, seq=newest_held + 1, expires_at=int(now + ttl))
            log.info("put: peers hold seq %d of this record; re-signed with seq %d", newest_held, record.seq)
            await self._store.put_record(record, own=True)
            lookup_failures = outcome.lookup_failures
            outcome = await self._send_records(closest, record)
            outcome.lookup_failures = lookup_failures
        self._planner.record_published(dht_key, now)
        needed = self.config.put_quorum if quorum is None else quorum
        if outcome.acks < needed:
            raise outcome.error("put", needed)
        return PutResult(outcome.acks, outcome.asked, stats)

    async def get(self, key: bytes, writer: PeerId | None = None, *, quorum: int | None = None) -> GetResult:
        """The newest valid record ``key`` in ``writer``'s namespace (default: ours), or None.

        Answers with the newest of the first ``quorum`` (default ``config.get_quorum``) valid
        records, counting a local copy, or with the newest found when the lookup ends with
        fewer (``GetResult.copies`` says how many). While :meth:`run` is running, the lookup
        then goes on in the background up to ``config.get_value_count`` records, and every
        holder of an older version (us included) is sent the newest one. A larger ``quorum``
        trades latency for freshness. Raises :class:`LocalProtocolError` for a ``quorum`` below 1.
        """
        need = self.config.get_quorum if quorum is None else quorum
        if need < 1:
            raise LocalProtocolError("quorum must be at least 1")
        dht_key = record_key(writer or self.peer_id, key)
        local = self._store.get_record(dht_key, now=self._wall_clock())
        query = ValueQuery(
            dht_key,
            need=need,
            value_count=self.config.get_value_count,
            max_record_ttl_s=self.config.max_record_ttl_s,
            local=(self.peer_id, local) if local is not None else None,
        )
        answered = trio.Event()
        stats_at_answer: list[LookupStats] = []

        def on_progress(lookup: Lookup[SignedRecord]) -> None:
            if query.has_quorum() and not answered.is_set():
                stats_at_answer.append(lookup.stats())
                answered.set()

        async def look_up_and_repair() -> None:
            try:
                stats = await self._run_query(query, on_progress=on_progress)
                if not answered.is_set():
                    stats_at_answer.append(stats)
            finally:
                answered.set()  # also when the DHT shuts down under us: answer with what we have
            await self._repair(query)

        if self._nursery is None:
            await look_up_and_repair()
        else:
            if query.has_quorum():
                answered.set()
            self._background += 1  # counted before it starts, so background_done() sees it
            self._nursery.start_soon(self._in_background, look_up_and_repair)
            await answered.wait()
        return GetResult(query.newest(), stats_at_answer[0] if stats_at_answer else None, copies=len(query.found))

    async def background_done(self) -> None:
        """Wait until the work calls left running (a ``get``'s lookup and repairs) has ended."""
        while self._background:
            await self._background_idle.park()

    async def provide(self, cid: bytes) -> PutResult:
        """Announce that we serve ``cid`` at our current addresses; republished every 22 h.

        Returns the acknowledgements; raises :class:`QuorumError` below
        ``config.provide_quorum``, :class:`LocalProtocolError` for a bad ``cid``.
        """
        now = self._wall_clock()
        record = sign_provider_record(
            self.identity, cid, self._own_addresses(), expires_at=int(now + self.config.provider_ttl_s)
        )
        await self._store.add_provided(cid)
        try:
            await self._store.add_provider(record)
        except StoreFullError as exc:
            log.warning("not keeping our own provider record locally: %s", exc)
        query = ClosestQuery(record.dht_key)
        stats, lookup = await self._run_query_with_lookup(query)
        message = AddProvider(sender=self._responder.me(), client=self.config.client_mode, record=record)
        outcome = await self._send_to_all(lookup.result(), message)
        outcome.lookup_failures = stats.failures
        if outcome.acks < self.config.provide_quorum:
            raise outcome.error("provide", self.config.provide_quorum)
        return PutResult(outcome.acks, outcome.asked, stats)

    async def stop_providing(self, cid: bytes) -> None:
        """Stop republishing ``cid`` (existing provider records expire on their own)."""
        await self._store.remove_provided(cid)

    async def find_providers(self, cid: bytes, count: int = 20) -> ProvidersResult:
        """Up to ``count`` valid provider records for ``cid``, longest-lived first.

        The providers' addresses are handed to ``remember_addresses`` so they can be dialled.
        """
        now = self._wall_clock()
        local = self._store.get_providers(provider_key(cid), now=now, limit=count)
        query = ProvidersQuery(
            cid,
            count=count,
            provider_ttl_s=self.config.provider_ttl_s,
            local=[r for r in local if all(is_dialable_address(h, p) for h, p in r.addresses)],
        )
        stats = None if query.satisfied() else await self._run_query(query)
        records = query.result()
        for record in records:
            if record.provider != self.peer_id.key and record.addresses:
                self._remember(record.provider_id, record.address_list())
        return ProvidersResult(records, stats)

    async def find_peer(self, peer_id: PeerId) -> PeerResult:
        """Where ``peer_id`` can be dialled: from the routing table, else by a DHT lookup.

        ``addresses`` is None when no node on the path knows the peer.
        """
        if peer_id == self.peer_id:
            return PeerResult(self._own_addresses(), None)
        node = self.routing_table.get(peer_id)
        if node is not None and node.addresses:
            return PeerResult(list(node.addresses), None)
        query = PeerQuery(peer_id)
        stats = await self._run_query(query)
        return PeerResult(query.addresses, stats)

    async def refresh(self, *, all_buckets: bool = False) -> int:
        """Look up a random id in each stale bucket (or every bucket); returns lookups run.

        An empty bucket's lookup starts from what peers with a wider view know (see
        :meth:`_fill_range`), since our own table has nobody near its range.
        """
        actions = self._planner.refreshes(self._wall_clock(), all_buckets=all_buckets)
        for action in actions:
            await self._perform(action)
        return len(actions)

    async def maintain(self) -> None:
        """One maintenance round (what :meth:`run` does every ``maintenance_interval_s``):
        the actions :class:`~lattica.dht.maintenance.MaintenancePlanner` finds due, in order."""
        for action in self._planner.due(self._wall_clock(), trio.current_time()):
            await self._perform(action)

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

    async def persist_routing_table(self) -> None:
        """Write the routing table (peer ids, addresses, last seen) to the store.

        Best effort: a storage failure is logged (the table is saved again next time).
        """
        try:
            await self._store.save_peers(
                [StoredPeer(n.peer_id, list(n.addresses), n.last_seen) for n in self.routing_table.peers()]
            )
        except StorageError as exc:
            log.warning("saving the routing table failed: %s", exc)

    # == serving ==============================================================================

    async def _handle_request(self, peer: PeerId, payload: bytes) -> bytes:
        try:
            request = decode_request(payload)
        except RemoteProtocolError as exc:
            return encode_message(self._responder.error("malformed", str(exc)))
        if request.sender.peer_id != peer.key:
            return encode_message(self._responder.error("bad-sender", "sender peer id differs from the connection's"))
        self._on_peer_seen(peer, request.sender.address_list(), client=request.client)
        reply = self._responder.handle(peer, request, self._wall_clock())
        response: Response = reply.response
        if reply.write is not None:
            try:
                await self._write(reply.write)
            except (InvalidRecordError, StoreFullError) as exc:  # a newer record came meanwhile, or full
                response = self._responder.write_failed(reply.write, exc)
            except StorageError as exc:
                log.warning("could not store a record: %s", exc)
                response = self._responder.write_failed(reply.write, exc)
        return encode_message(response)

    async def _write(self, write: Write) -> None:
        """Perform a write the responder (or our own read repair) decided on; acknowledged
        after its commit. Raises :class:`StoreFullError`, :class:`InvalidRecordError` (a newer
        record arrived meanwhile) or :class:`~lattica.storage.StorageError`."""
        match write:
            case StoreRecord(record=record, own=own):
                await self._store.put_record(record, own=own)
            case StoreProvider(record=provider_record):
                await self._store.add_provider(provider_record)

    # == peers =================================================================================

    def _me(self) -> tuple[PeerInfo, bool]:
        return self._responder.me(), self.config.client_mode

    def _on_peer_seen(self, peer: PeerId, addresses: list[Address], *, client: bool) -> None:
        if peer == self.peer_id:
            return
        observed = self._transport.observed_address(peer)
        if observed is not None:
            # What a peer claims for itself is not believed: it could make us hand out, and
            # dial, an address it does not own. One socket serves a node's dials and its
            # listening, so the address its connection comes from is the one to give out.
            addresses = [observed]
        elif self._transport.reached_through_relay(peer):
            # Behind a NAT (that is why a relay carries it): its claimed addresses are private
            # ones nobody can dial, and it cannot serve the DHT to strangers. Remember nothing
            # and treat it as a client; its relayed addresses come from its relay record.
            addresses = []
            client = True
        self._health.on_success(peer)
        if addresses:
            self._remember(peer, addresses)
        if client:
            if peer in self.routing_table:
                # It switched to client mode (found not publicly reachable): stop handing it out.
                self.routing_table.remove(peer)
                self._mark_table_changed()
            return
        result = self.routing_table.add_contact(DhtNode(peer, addresses), now=self._wall_clock())
        if result.outcome == "added":
            self._mark_table_changed()
        elif result.outcome == "full" and result.check is not None:
            self._start_liveness_check(result.check)

    def _on_peer_failed(self, peer: PeerId, sent_at: float) -> None:
        if self._health.on_failure(peer, sent_at=sent_at, now=trio.current_time()) and peer in self.routing_table:
            log.debug("evicting %s after %d failed requests", peer.short(), self._health.failures(peer))
            self.routing_table.remove(peer)  # the newest admissible replacement takes its place
            self._mark_table_changed()

    def _usable(self, peers: list[PeerId]) -> list[PeerId]:
        """``peers`` without those in their backoff after a failure (see :mod:`peer_health`)."""
        now = trio.current_time()
        return [p for p in peers if not self._health.is_suspect(p, now)]

    def _start_liveness_check(self, node: DhtNode) -> None:
        if node.key in self._liveness_checks or self._nursery is None:
            return
        self._liveness_checks.add(node.key)
        self._nursery.start_soon(self._check_liveness, node)

    async def _check_liveness(self, node: DhtNode) -> None:
        try:
            await self._ping(node.peer_id)
        except _QueryFailed:
            # Kademlia section 2.2: the head of a full bucket that does not answer gives way.
            log.debug("evicting unresponsive peer %s", node.peer_id.short())
            self.routing_table.remove(node.peer_id)
            self._mark_table_changed()
        else:
            self.routing_table.mark_alive(node.peer_id, self._wall_clock())
        finally:
            self._liveness_checks.discard(node.key)

    async def _ping(self, peer: PeerId) -> None:
        await self._request(peer, Ping(sender=self._responder.me(), client=self.config.client_mode), Pong)

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
            node = DhtNode(stored.peer_id, addresses, first_seen=stored.last_seen, last_seen=stored.last_seen)
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

    async def _run_query(
        self,
        query: Query[R, V],
        *,
        seeds: list[PeerId] | None = None,
        on_progress: Callable[[Lookup[V]], None] | None = None,
    ) -> LookupStats:
        """Drive ``query`` to completion; returns its lookup's statistics."""
        stats, _lookup = await self._run_query_with_lookup(query, seeds=seeds, on_progress=on_progress)
        return stats

    async def _run_query_with_lookup(
        self,
        query: Query[R, V],
        *,
        seeds: list[PeerId] | None = None,
        on_progress: Callable[[Lookup[V]], None] | None = None,
    ) -> tuple[LookupStats, Lookup[V]]:
        """Drive a :class:`Lookup` for ``query`` with up to alpha*paths requests in flight,
        starting from ``seeds`` (default: our closest peers to the target)."""
        config = self.config
        target = query.target
        if not seeds:
            # More seeds than the lookup shows at once: each path's heap exposes only its k closest,
            # so the extra ones stay out of the way unless the closest fail. Without them a lookup
            # whose k closest known peers all left (the holders of a record, after churn) ends
            # with no answer at all, until maintenance evicts the dead from the table.
            seed_count = config.k * config.disjoint_paths * _SEED_FACTOR
            seeds = [n.peer_id for n in self.routing_table.closest(target, seed_count)]
        deadline = trio.current_time() + config.lookup_timeout_s
        lookup: Lookup[V] = Lookup(
            target,
            self._usable(seeds),
            k=config.k,
            alpha=config.alpha,
            disjoint_paths=config.disjoint_paths,
            own_id=self.own_key,
            deadline=deadline,
        )
        self.routing_table.touch_bucket(target, self._wall_clock())
        message = query.request(*self._me())
        send, receive = trio.open_memory_channel[tuple[PeerId, R | None]](math.inf)
        async with trio.open_nursery() as nursery:
            while True:
                for peer in lookup.next_queries(trio.current_time()):
                    nursery.start_soon(self._query_into, peer, message, query.expect, send)
                if lookup.done or lookup.in_flight == 0:
                    break
                with trio.move_on_at(deadline):
                    peer, reply = await receive.receive()
                    if reply is None:
                        lookup.on_failure(peer)
                    else:
                        outcome = query.on_reply(peer, reply, self._wall_clock())
                        lookup.on_response(peer, self._learn(outcome.closer), outcome.value)
                        if on_progress is not None:
                            on_progress(lookup)
                        if query.satisfied():
                            lookup.stop()
            nursery.cancel_scope.cancel()
        return lookup.stats(), lookup

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
        message = ClosestQuery(target).request(*self._me())

        async def ask(peer: PeerId) -> None:
            try:
                reply = await self._request(peer, message, Nodes)
            except _QueryFailed:
                return
            seeds.extend(self._learn(reply.closer))

        async with trio.open_nursery() as nursery:
            for peer in asked:
                nursery.start_soon(ask, peer)
        own = [n.peer_id for n in self.routing_table.closest(target, self.config.k)]
        enough = self.config.alpha
        query = ClosestQuery(target, stop_when=lambda: self.routing_table.bucket_population(target) >= enough)
        await self._run_query(query, seeds=list(dict.fromkeys(seeds + own)))

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

    async def _replicate_record(self, record: SignedRecord) -> tuple[list[PeerId], Replication, LookupStats]:
        stats, lookup = await self._run_query_with_lookup(ClosestQuery(record.dht_key))
        closest = lookup.result()
        outcome = await self._send_records(closest, record)
        outcome.lookup_failures = stats.failures
        return closest, outcome, stats

    async def _send_records(self, peers: list[PeerId], record: SignedRecord) -> Replication:
        message = PutValue(sender=self._responder.me(), client=self.config.client_mode, record=record)
        return await self._send_to_all(peers, message)

    async def _repair(self, query: ValueQuery) -> None:
        """Send the newest record ``query`` found to every peer that returned an older one."""
        best = query.newest()
        outdated = query.outdated()
        if best is None or not outdated:
            return
        if self.peer_id in outdated:
            outdated.remove(self.peer_id)
            write = self._responder.check_record(best, self._wall_clock()).write
            if write is not None:
                with contextlib.suppress(InvalidRecordError, StoreFullError, StorageError):
                    await self._write(write)
        if outdated:
            await self._send_records(outdated, best)

    async def _in_background(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        finally:
            self._background -= 1
            if not self._background:
                self._background_idle.unpark_all()

    # == maintenance ==========================================================================

    async def _perform(self, action: Action) -> None:
        """Carry out one planned maintenance action."""
        now = self._wall_clock()
        match action:
            case PurgeExpired():
                try:
                    purged = await self._store.purge_expired(now=now)
                except StorageError as exc:
                    log.warning("purging expired DHT entries failed: %s", exc)
                else:
                    if purged:
                        log.debug("purged %d expired DHT entries", purged)
            case Rebootstrap():
                # Losing every peer at once says more about our own network than theirs: forget
                # their failures, or the peers they name would be skipped.
                self._health.clear()
                await self._rebootstrap()
            case ProbePeers(peers=peers):
                await self._probe(peers)
            case FillBucket(low=low, high=high):
                await self._fill_range(low, high, helpers=[])
            case RefreshBucket(low=low, high=high):
                await self._run_query(ClosestQuery(random_key_between(low, high, self._rng)))
            case RepublishRecord(record=record):
                _closest, outcome, _stats = await self._replicate_record(record)
                if outcome.acks:
                    self._planner.record_published(record.dht_key, now)
            case Reprovide(cid=cid):
                try:
                    await self.provide(cid)
                except (QuorumError, StorageError) as exc:
                    log.warning("republishing provider record failed: %s", exc)
            case SaveRoutingTable():
                await self.persist_routing_table()

    async def _probe(self, peers: tuple[PeerId, ...]) -> None:
        """Ping ``peers`` (a few at a time): an answer clears them, a failure counts."""
        limiter = trio.CapacityLimiter(self.config.alpha * 4)

        async def probe(peer: PeerId) -> None:
            async with limiter:
                with contextlib.suppress(_QueryFailed):
                    await self._ping(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(probe, peer)

    def _mark_table_changed(self) -> None:
        self._table_changed = True
        self._table_changed_lot.unpark_all()

    async def _save_table_when_changed(self) -> None:
        while True:
            while not self._table_changed:
                await self._table_changed_lot.park()
            await trio.sleep(self.config.table_save_delay_s)
            self._table_changed = False  # changes from here on are saved next time
            await self.persist_routing_table()

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

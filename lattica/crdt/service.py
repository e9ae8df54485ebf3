"""``CrdtService`` (``node.crdt``): the trio driver of replicated spaces.

It owns the :class:`~lattica.crdt.replica.SpaceReplica` of every space this node holds, answers
``/lattica/crdt/1`` (:mod:`lattica.crdt.sync`), pushes new envelopes to a bounded fanout of
replicas, runs anti-entropy rounds, finds replicas through DHT provider records and persists
accepted envelopes (:class:`~lattica.crdt.store.SpaceStore`) before acknowledging them.

Rules (invariants):

* An envelope is forwarded (pushed) only after this replica applied it and its log COMMIT
  returned; refused envelopes are never stored or forwarded.
* A peer's request ends with that request: malformed input is answered with ``protocol-error``
  and changes nothing; nothing a peer sends escapes into the node's nursery.
* Per space: at most ``max_replicas`` remembered replicas, ``fanout`` pushes per new envelope,
  ``batch_envelopes``/``batch_bytes`` per message, ``max_updates_per_s`` (with
  ``update_burst``) per writer for local writes and for pushes received.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pycrdt
import trio

from lattica.crdt.config import CrdtConfig
from lattica.crdt.envelope import Envelope, EnvelopeKind, verify_envelope
from lattica.crdt.errors import (
    InvalidSpaceIdError,
    JoinError,
    MalformedEnvelopeError,
    NotOwnerError,
    RateLimitedError,
    SpaceLimitError,
    UnknownSpaceError,
)
from lattica.crdt.replica import Change, ReplicaLimits, SpaceReplica
from lattica.crdt.space_id import Genesis, SpaceId, decode_genesis, encode_genesis, make_genesis
from lattica.crdt.store import SpaceStore
from lattica.crdt.sync import (
    MAX_BATCH,
    MAX_REPLICAS_SHARED,
    PROTOCOL_ID,
    Push,
    PushReply,
    SyncReply,
    SyncRequest,
    decode_reply,
    decode_request,
    encode_message,
    vector_from_wire,
    vector_to_wire,
)
from lattica.crdt.values import check_value
from lattica.dht import Dht, QuorumError
from lattica.errors import LatticaError, RpcError
from lattica.identity import Identity, PeerId
from lattica.net import Rpc
from lattica.storage import StorageError
from lattica.token_bucket import TokenBucket

log = logging.getLogger("lattica.crdt")

CHANGE_BUFFER = 1024
"""Changes buffered per :meth:`CrdtService.changes` subscriber; one that falls further behind
is closed (it sees ``EndOfChannel``) and should re-read the state and subscribe again."""
_MAX_SYNC_ROUNDS = 64
_CID_PREFIX = b"lattica/crdt/space/"


def space_cid(space: SpaceId) -> bytes:
    """The DHT provider key (content id) under which replicas of ``space`` announce themselves."""
    return _CID_PREFIX + space.key


@dataclass(frozen=True, slots=True)
class SpaceInfo:
    """What ``spaces()`` and the space calls report about one space."""

    space_id: SpaceId
    name: str
    owner: PeerId
    writers: list[PeerId]
    size_bytes: int
    """Bytes of envelopes held for this space."""
    replicas_seen: int
    """Other replicas this node knows of."""
    version_vector: dict[PeerId, int]
    """Author -> highest contiguous seq held here."""
    can_write: bool
    """True when this node may write now."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """A local write that is durable: in the log (COMMIT returned) and applied here."""

    space_id: SpaceId
    key: str
    author: PeerId
    seq: int
    update_bytes: int


@dataclass
class _Space:
    replica: SpaceReplica
    replicas: dict[PeerId, float] = field(default_factory=dict)
    """Replicas heard from (they answered or called us), by when: pushes go to these."""
    hints: dict[PeerId, float] = field(default_factory=dict)
    """Replicas other replicas named, not heard from yet: each is tried once by anti-entropy
    and becomes a replica only if it answers (review finding: one hostile replica's invented
    ids filled every replica table)."""
    outbox: list[tuple[Envelope, PeerId | None]] = field(default_factory=list)
    outbox_ready: trio.Event = field(default_factory=trio.Event)
    subscribers: list[trio.MemorySendChannel[Change]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    buckets: dict[bytes, TokenBucket] = field(default_factory=dict)
    pushing: set[PeerId] = field(default_factory=set)
    """Replicas with a push of ours in flight (one at a time each)."""
    backlog: dict[PeerId, list[Envelope]] = field(default_factory=dict)
    """Envelopes a replica busy with a push would have been sent meanwhile (bounded); they go
    when that push succeeds, and are dropped when it fails."""
    syncing: set[PeerId] = field(default_factory=set)
    """Replicas with an anti-entropy sync of ours in flight (one at a time each)."""
    updates_since_snapshot: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class CrdtStats:
    """Bytes and messages of the sync protocol sent and received by this node."""

    bytes_sent: int = 0
    bytes_received: int = 0
    envelopes_sent: int = 0
    refused: int = 0


class CrdtService:
    """Replicated spaces of one node (see the module docstring).

    ``store`` None keeps everything in memory (tests). ``rng`` seeds peer choices.
    """

    def __init__(
        self,
        identity: Identity,
        rpc: Rpc,
        dht: Dht | None,
        store: SpaceStore | None,
        config: CrdtConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.rpc = rpc
        self.dht = dht
        self.store = store
        self.config = config or CrdtConfig()
        self.stats = CrdtStats()
        self._rng = rng or random.Random()
        self._spaces: dict[SpaceId, _Space] = {}
        self._nursery: trio.Nursery | None = None
        self._limits = ReplicaLimits(
            max_update_bytes=self.config.max_update_bytes,
            max_space_bytes=self.config.max_space_bytes,
            max_pending=self.config.max_pending,
            max_pending_per_author=self.config.max_pending_per_author,
            max_pending_bytes=self.config.max_pending_bytes,
        )
        rpc.add_handler(PROTOCOL_ID, self._handle_request)

    # -- lifetime --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load stored spaces, then run their sync tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.store is not None:
                for stored in self.store.load():
                    self._restore(stored.genesis, stored.envelopes, stored.snapshot, stored.snapshot_vv)
            task_status.started()
            await trio.sleep_forever()

    def _restore(
        self, genesis_bytes: bytes, envelopes: list[bytes], snapshot: bytes | None, vv: dict[bytes, int]
    ) -> None:
        # Our own log: trusted, so decoded without re-verifying every signature.
        genesis = msgspec.msgpack.decode(genesis_bytes, type=Genesis)
        replica = SpaceReplica(genesis, self.identity.peer_id, self._limits)
        replica.restore([msgspec.msgpack.decode(e, type=Envelope) for e in envelopes], snapshot, vv)
        self._add(replica)

    def _add(self, replica: SpaceReplica) -> _Space:
        space = _Space(replica)
        if replica.owner != self.identity.peer_id:
            space.replicas[replica.owner] = 0.0
        self._spaces[replica.space_id] = space
        if self._nursery is not None:
            self._nursery.start_soon(self._space_loop, space)
            self._nursery.start_soon(self._pusher, space)
        return space

    # -- lookup ----------------------------------------------------------------------------------

    def resolve(self, space_ref: str | SpaceId) -> SpaceId:
        """The id of a held space from its id (object or text) or its local name.

        Raises :class:`UnknownSpaceError` when no held space matches (an id that parses but is
        not held is returned only by :meth:`parse_ref`)."""
        if isinstance(space_ref, SpaceId):
            if space_ref in self._spaces:
                return space_ref
            raise UnknownSpaceError(f"no space {space_ref} here; join it first")
        try:
            space_id = SpaceId.parse(space_ref)
        except InvalidSpaceIdError:
            matches = [s for s, sp in self._spaces.items() if sp.replica.genesis.name == space_ref]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise UnknownSpaceError(f"{len(matches)} spaces are named {space_ref!r}; use the space id") from None
            raise UnknownSpaceError(f"no space named {space_ref!r} here") from None
        return self.resolve(space_id)

    def _space(self, space_ref: str | SpaceId) -> _Space:
        return self._spaces[self.resolve(space_ref)]

    def info(self, space_ref: str | SpaceId) -> SpaceInfo:
        """:class:`SpaceInfo` of one held space; :class:`UnknownSpaceError` otherwise."""
        space = self._space(space_ref)
        replica = space.replica
        return SpaceInfo(
            space_id=replica.space_id,
            name=replica.genesis.name,
            owner=replica.owner,
            writers=replica.writers(),
            size_bytes=replica.size_bytes,
            replicas_seen=len(space.replicas),
            version_vector={PeerId(a): s for a, s in sorted(replica.version_vector.items())},
            can_write=replica.acl.is_writer(self.identity.peer_id),
        )

    def spaces(self) -> list[SpaceInfo]:
        """Every space held here, by name then id."""
        infos = [self.info(s) for s in self._spaces]
        return sorted(infos, key=lambda i: (i.name, i.space_id))

    def get(self, space_ref: str | SpaceId, key: str | None = None) -> Any:
        """The value stored at ``key`` (``KeyError`` if absent) or the whole map, as plain
        JSON-like Python by the values rule (:mod:`lattica.crdt.values`)."""
        return self._space(space_ref).replica.get(key)

    def doc(self, space_ref: str | SpaceId) -> pycrdt.Doc[Any]:
        """The space's pycrdt ``Doc`` (root map :data:`~lattica.crdt.replica.ROOT_MAP`) for
        reading. Write through :meth:`set`: changes made directly are not signed or replicated.
        The object is replaced when a revoke forces a rebuild: call again after changes."""
        return self._space(space_ref).replica.doc

    def replica(self, space_ref: str | SpaceId) -> SpaceReplica:
        """The sans-I/O replica of a held space: its envelopes (``log``), version vector and
        writer list, for inspection and export. Change it only through this service."""
        return self._space(space_ref).replica

    async def wait_change(self, space_ref: str | SpaceId) -> None:
        """Return after the next envelope is applied to the space here (a local write, a
        replicated update, a writer-list change), whether or not it changed a visible value."""
        await self._space(space_ref).changed.wait()

    def changes(self, space_ref: str | SpaceId) -> trio.MemoryReceiveChannel[Change]:
        """A channel of every later :class:`Change` to the space, in the order applied here.

        Close it when done. A subscriber more than :data:`CHANGE_BUFFER` changes behind is
        closed by the service (``trio.EndOfChannel``)."""
        send, receive = trio.open_memory_channel[Change](CHANGE_BUFFER)
        self._space(space_ref).subscribers.append(send)
        return receive

    # -- local operations -----------------------------------------------------------------------

    async def create_space(self, name: str, writers: Sequence[PeerId] = ()) -> SpaceInfo:
        """Create a space owned by this node, granting ``writers``; announce it in the DHT.

        Raises :class:`ValueError` for a bad name, :class:`SpaceLimitError` at ``max_spaces``,
        :class:`~lattica.storage.StorageError` when it cannot be stored."""
        self._check_room()
        genesis = make_genesis(self.identity, name, os.urandom(16))
        replica = SpaceReplica(genesis, self.identity.peer_id, self._limits)
        envelopes = [e for w in writers if (e := replica.grant(self.identity, w)) is not None]
        if self.store is not None:
            await self.store.add_space(genesis)
            await self.store.append(replica.space_id, envelopes)
        self._add(replica)
        self._announce(replica.space_id)
        return self.info(replica.space_id)

    def _check_room(self) -> None:
        if len(self._spaces) >= self.config.max_spaces:
            raise SpaceLimitError(f"this node holds crdt.max_spaces ({self.config.max_spaces}) spaces")

    async def set(self, space_ref: str | SpaceId, key: str, value: Any) -> WriteResult:
        """Store ``value`` at ``key``; returns once the signed update is in the log (durable)
        and applied here; it is then pushed to replicas.

        Raises :class:`UnknownSpaceError`, :class:`~lattica.crdt.errors.InvalidValueError`,
        :class:`~lattica.crdt.errors.NotWriterError`, :class:`RateLimitedError`,
        :class:`~lattica.crdt.errors.UpdateTooLargeError`, :class:`~lattica.storage.StorageError`.
        """
        checked = check_value(value)
        if not isinstance(key, str) or not key:
            raise ValueError("a key is a non-empty string")
        return await self._write(space_ref, key, lambda m: m.__setitem__(key, checked))

    async def delete(self, space_ref: str | SpaceId, key: str) -> WriteResult:
        """Remove ``key`` (durable like :meth:`set`); ``KeyError`` if it is absent."""
        space = self._space(space_ref)
        if key not in space.replica.root:
            raise KeyError(key)
        return await self._write(space_ref, key, lambda m: m.pop(key))

    async def _write(self, space_ref: str | SpaceId, key: str, mutate: Any) -> WriteResult:
        space = self._space(space_ref)
        me = self.identity.peer_id
        if not self._bucket(space, me.key).take(trio.current_time()):
            raise RateLimitedError(
                f"more than crdt.max_updates_per_s ({self.config.max_updates_per_s:g}) updates; try again shortly"
            )
        envelope, changes = space.replica.write(self.identity, mutate)
        await self._persist_local(space, envelope)
        self._publish(space, changes)
        self._enqueue(space, [envelope])
        return WriteResult(space.replica.space_id, key, me, envelope.seq, len(envelope.body))

    async def grant(self, space_ref: str | SpaceId, peer: PeerId) -> None:
        """Owner only: let ``peer`` write (durable before it returns). Raises
        :class:`NotOwnerError` on any other node."""
        await self._acl(space_ref, peer, grant=True)

    async def revoke(self, space_ref: str | SpaceId, peer: PeerId) -> None:
        """Owner only: refuse ``peer``'s updates after the last one this node accepted
        (durable before it returns). Raises :class:`NotOwnerError` on any other node."""
        await self._acl(space_ref, peer, grant=False)

    async def _acl(self, space_ref: str | SpaceId, peer: PeerId, *, grant: bool) -> None:
        space = self._space(space_ref)
        if space.replica.owner != self.identity.peer_id:
            raise NotOwnerError(f"only the owner {space.replica.owner} may change the writers of this space")
        replica = space.replica
        envelope = replica.grant(self.identity, peer) if grant else replica.revoke(self.identity, peer)
        if envelope is None:
            return
        await self._persist_local(space, envelope)
        self._publish(space, [])
        self._enqueue(space, [envelope])

    async def join_space(self, space_ref: str | SpaceId, *, peers: Sequence[PeerId] = ()) -> SpaceInfo:
        """Replicate a space created elsewhere: find replicas (``peers`` first, then DHT
        providers), fetch the genesis and the history, announce this node as a replica.

        Returns at once for a space already held. Raises :class:`InvalidSpaceIdError`,
        :class:`JoinError` when no replica answered, :class:`SpaceLimitError`."""
        space_id = space_ref if isinstance(space_ref, SpaceId) else SpaceId.parse(space_ref)
        if space_id in self._spaces:
            return self.info(space_id)
        self._check_room()
        candidates = [p for p in peers if p != self.identity.peer_id]
        candidates += [p for p in await self._find_replicas(space_id) if p not in candidates]
        failures: list[str] = []
        for peer in candidates:
            try:
                reply = await self._call(peer, SyncRequest(space_id.key, [], want_genesis=True))
                if not isinstance(reply, SyncReply) or reply.genesis is None:
                    raise MalformedEnvelopeError("no genesis in the reply")
                genesis = decode_genesis(reply.genesis)
                if genesis.space_id != space_id:
                    raise MalformedEnvelopeError("the genesis does not hash to the space id")
            except (LatticaError, RpcError) as exc:
                failures.append(f"{peer.short()}: {exc}")
                continue
            if space_id in self._spaces:  # a concurrent join won
                return self.info(space_id)
            replica = SpaceReplica(genesis, self.identity.peer_id, self._limits)
            if self.store is not None:
                await self.store.add_space(genesis)
            space = self._add(replica)
            for other in candidates:
                self._remember(space, other)
            await self._absorb(space, peer, reply)
            # Fetch the history now from the first replica that serves it whole; if none does,
            # the space is held anyway and anti-entropy goes on fetching it.
            for source in [peer, *(c for c in candidates if c != peer)]:
                if await self._sync_with(space, source):
                    break
            self._announce(space_id)
            return self.info(space_id)
        detail = "; ".join(failures[:3]) or "no replica found in the DHT"
        raise JoinError(f"cannot join space {space_id}: {detail}")

    async def sync_now(self, space_ref: str | SpaceId) -> int:
        """One anti-entropy round with every known replica (tests, ``state join``); returns how
        many answered."""
        space = self._space(space_ref)
        answered = 0
        for peer in list(space.replicas):
            if await self._sync_with(space, peer):
                answered += 1
        return answered

    # -- discovery ------------------------------------------------------------------------------

    def _announce(self, space_id: SpaceId) -> None:
        if self.dht is not None and self._nursery is not None:
            self._nursery.start_soon(self._provide, space_id)

    async def _provide(self, space_id: SpaceId) -> None:
        assert self.dht is not None
        try:
            await self.dht.provide(space_cid(space_id))
        except (QuorumError, LatticaError, RpcError) as exc:
            log.debug("could not announce space %s in the DHT: %s", space_id.short(), exc)

    async def _find_replicas(self, space_id: SpaceId) -> list[PeerId]:
        if self.dht is None:
            return []
        try:
            result = await self.dht.find_providers(space_cid(space_id), count=self.config.max_replicas)
        except (LatticaError, RpcError) as exc:
            log.debug("provider lookup for %s failed: %s", space_id.short(), exc)
            return []
        return [r.provider_id for r in result.providers if r.provider_id != self.identity.peer_id]

    def _remember(self, space: _Space, peer: PeerId) -> None:
        if peer == self.identity.peer_id:
            return
        space.hints.pop(peer, None)
        _bounded_put(space.replicas, peer, trio.current_time(), self.config.max_replicas)

    def _hint(self, space: _Space, peer: PeerId) -> None:
        if peer == self.identity.peer_id or peer in space.replicas:
            return
        _bounded_put(space.hints, peer, trio.current_time(), self.config.max_replicas)

    # -- background work ----------------------------------------------------------------------

    async def _space_loop(self, space: _Space) -> None:
        interval = self.config.anti_entropy_interval_s
        next_discovery = trio.current_time()
        # The first round runs at once: a node restarted after being offline catches up now,
        # not one interval later.
        async with trio.open_nursery() as syncs:
            while True:
                if trio.current_time() >= next_discovery and self.dht is not None:
                    next_discovery = trio.current_time() + self.config.discovery_interval_s
                    for peer in await self._find_replicas(space.replica.space_id):
                        self._remember(space, peer)
                # A round does not wait for its sync: one with a gone or partitioned replica
                # lasts request_timeout_s, and the rounds after it must still reach the others.
                # At most one sync per replica runs at a time.
                idle = [peer for peer in sorted(space.replicas) if peer not in space.syncing]
                if idle:
                    peer = self._rng.choice(idle)
                    space.syncing.add(peer)
                    syncs.start_soon(self._sync_in_round, space, peer)
                # Beside it, one named replica is tried: it becomes a replica if it answers,
                # and is forgotten either way.
                hinted = [peer for peer in sorted(space.hints) if peer not in space.syncing]
                if hinted:
                    peer = self._rng.choice(hinted)
                    del space.hints[peer]
                    space.syncing.add(peer)
                    syncs.start_soon(self._sync_in_round, space, peer)
                # Jittered, so replicas started together do not sync in lockstep.
                await trio.sleep(interval * (0.5 + self._rng.random()))

    async def _sync_in_round(self, space: _Space, peer: PeerId) -> None:
        try:
            await self._sync_with(space, peer)
        finally:
            space.syncing.discard(peer)

    async def _pusher(self, space: _Space) -> None:
        async with trio.open_nursery() as pushes:
            while True:
                await space.outbox_ready.wait()
                # Let a burst gather: one push per replica carries all of it.
                await trio.sleep(self.config.push_delay_s)
                space.outbox_ready = trio.Event()
                batch, space.outbox = space.outbox, []
                targets = sorted(space.replicas)
                self._rng.shuffle(targets)
                # A replica still busy with an earlier push (gone, partitioned or slow: up to
                # request_timeout_s) is skipped, not waited for: the next batch goes to replicas
                # free now. Waiting held every later update back by a timeout per gossip hop
                # (a partitioned half of 50 replicas took ~80 s to converge); what a skipped
                # replica misses reaches it through other replicas' pushes or anti-entropy.
                # A busy replica that the draw picked gets the batch after its push ends, if
                # that push succeeds (it is alive, only slow: review finding, such a replica
                # waited for anti-entropy).
                for peer in targets[: self.config.fanout]:
                    if peer in space.pushing:
                        self._hold_back(space, peer, [e for e, source in batch if source != peer])
                free = [peer for peer in targets if peer not in space.pushing]
                for peer in free[: self.config.fanout]:
                    # Never echo an envelope back to the replica it came from.
                    envelopes = [e for e, source in batch if source != peer]
                    if envelopes:
                        space.pushing.add(peer)
                        pushes.start_soon(self._push_to, space, peer, envelopes)

    def _hold_back(self, space: _Space, peer: PeerId, envelopes: list[Envelope]) -> None:
        held = space.backlog.setdefault(peer, [])
        room = self.config.batch_envelopes - len(held)  # beyond it, anti-entropy catches up
        held.extend(envelopes[: max(0, room)])

    async def _push_to(self, space: _Space, peer: PeerId, batch: list[Envelope]) -> None:
        try:
            while batch:
                for start in range(0, len(batch), self.config.batch_envelopes):
                    chunk = batch[start : start + self.config.batch_envelopes]
                    try:
                        await self._call(peer, Push(space.replica.space_id.key, chunk))
                    except (LatticaError, RpcError) as exc:
                        log.debug("push to %s failed: %s", peer.short(), exc)
                        return
                batch = space.backlog.pop(peer, [])  # what it missed while this push ran
        finally:
            space.pushing.discard(peer)
            space.backlog.pop(peer, None)

    def _enqueue(self, space: _Space, envelopes: list[Envelope], source: PeerId | None = None) -> None:
        if envelopes:
            space.outbox.extend((e, source) for e in envelopes)
            space.outbox_ready.set()

    async def _sync_with(self, space: _Space, peer: PeerId) -> bool:
        """Pull what ``peer`` has and we lack, then push what it lacks. False if it failed."""
        replica = space.replica
        try:
            for round_ in range(_MAX_SYNC_ROUNDS):
                request = SyncRequest(replica.space_id.key, vector_to_wire(replica.version_vector))
                reply = await self._call(peer, request)
                if not isinstance(reply, SyncReply):
                    raise MalformedEnvelopeError("expected a sync reply")
                # The replicas a reply names are taken from its first reply only: one sync
                # cannot name more than MAX_REPLICAS_SHARED.
                await self._absorb(space, peer, reply, learn_replicas=round_ == 0)
                if not reply.more:
                    break
            theirs = vector_from_wire(reply.version_vector) if isinstance(reply, SyncReply) else {}
            for _ in range(_MAX_SYNC_ROUNDS):
                missing, more = replica.missing_for(
                    theirs, max_envelopes=self.config.batch_envelopes, max_bytes=self.config.batch_bytes
                )
                if not missing:
                    break
                await self._call(peer, Push(replica.space_id.key, missing))
                for envelope in missing:
                    theirs[envelope.author] = max(theirs.get(envelope.author, 0), envelope.seq)
                if not more:
                    break
        except (LatticaError, RpcError) as exc:
            log.debug("sync of %s with %s failed: %s", replica.space_id.short(), peer.short(), exc)
            return False
        return True

    async def _absorb(self, space: _Space, peer: PeerId, reply: SyncReply, *, learn_replicas: bool = True) -> None:
        self._remember(space, peer)
        for key in reply.replicas[:MAX_REPLICAS_SHARED] if learn_replicas else ():
            try:
                self._hint(space, PeerId(key))
            except LatticaError:
                continue
        # Pulled envelopes are not gossiped on: whoever lacks them pulls them in its own
        # anti-entropy round, and a joiner would otherwise re-push the whole history.
        await self._accept(space, reply.envelopes, source=peer, rate_limited=False, forward=False)

    async def _accept(
        self, space: _Space, envelopes: list[Envelope], *, source: PeerId, rate_limited: bool, forward: bool = True
    ) -> tuple[int, list[str]]:
        """Verify, rate-limit, apply, persist, publish and forward; returns how many applied and
        the refusal reason of each envelope refused (``bad-signature``, ``rate-limited`` or one
        of :data:`~lattica.crdt.replica.REFUSAL_REASONS`); buffered envelopes are neither."""
        now = trio.current_time()
        verified: list[Envelope] = []
        refused: list[str] = []
        replica = space.replica
        for envelope in envelopes:
            held = replica.log.get(envelope.author, {}).get(envelope.seq)
            if held is not None and held == envelope:
                continue  # gossip brings most envelopes more than once: skip the signature check
            try:
                verify_envelope(envelope)
            except MalformedEnvelopeError:
                self.stats.refused += 1
                refused.append("bad-signature")
                continue
            if rate_limited and not self._bucket(space, envelope.author).take(now):
                self.stats.refused += 1
                refused.append("rate-limited")
                continue
            verified.append(envelope)
        if not verified:
            return 0, refused
        result = replica.offer(verified)
        self.stats.refused += len(result.refused)
        refused.extend(r.reason for r in result.refused)
        # Published with no await after the offer: the document already shows these changes,
        # and a watcher that subscribes while the log write below is pending must not be sent
        # changes from before it subscribed.
        self._publish(space, result.changes, applied=bool(result.applied or result.removed))
        if self.store is not None:
            for author, after_seq in result.removed:
                await self.store.remove_after(space.replica.space_id, author, after_seq)
        await self._persist(space, result.applied)
        if forward:
            self._enqueue(space, result.applied, source)
        return len(result.applied), refused

    async def _persist_local(self, space: _Space, envelope: Envelope) -> None:
        """Log this node's own new envelope; if that fails it is undone here (never
        acknowledged, never sent) and the storage error propagates."""
        try:
            await self._persist(space, [envelope])
        except Exception:
            # Not on cancellation: a cancelled waiter's write still commits (SqliteWriter), so
            # the envelope stays and anti-entropy serves it.
            space.replica.undo_local(envelope)
            raise

    async def _persist(self, space: _Space, envelopes: list[Envelope]) -> None:
        if not envelopes or self.store is None:
            return
        await self.store.append(space.replica.space_id, envelopes)
        space.updates_since_snapshot += sum(1 for e in envelopes if e.kind == EnvelopeKind.UPDATE)
        if space.updates_since_snapshot >= self.config.compact_every_updates:
            space.updates_since_snapshot = 0
            replica = space.replica
            try:
                await self.store.save_snapshot(replica.space_id, replica.doc.get_update(), dict(replica.version_vector))
            except StorageError as exc:
                # The envelopes are committed; without a new snapshot a restart replays more.
                log.warning("could not write the snapshot of space %s: %s", replica.space_id.short(), exc)

    def _publish(self, space: _Space, changes: list[Change], *, applied: bool = True) -> None:
        if applied:
            # Any applied envelope wakes wait_change, even one whose effect lost a conflict.
            space.changed.set()
            space.changed = trio.Event()
        if not changes:
            return
        keep = []
        for channel in space.subscribers:
            try:
                for change in changes:
                    channel.send_nowait(change)
            except trio.WouldBlock:
                channel.close()  # too far behind: the subscriber sees EndOfChannel
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the subscriber went away
            else:
                keep.append(channel)
        space.subscribers = keep

    def _bucket(self, space: _Space, author: bytes) -> TokenBucket:
        bucket = space.buckets.get(author)
        if bucket is None:
            burst = float(self.config.update_burst)
            bucket = TokenBucket.full(self.config.max_updates_per_s, burst, trio.current_time())
            space.buckets[author] = bucket
        return bucket

    # -- the wire ---------------------------------------------------------------------------------

    async def _call(self, peer: PeerId, message: SyncRequest | Push) -> SyncReply | PushReply:
        payload = encode_message(message)
        self.stats.bytes_sent += len(payload)
        if isinstance(message, Push):
            self.stats.envelopes_sent += len(message.envelopes)
        reply = await self.rpc.request(peer, PROTOCOL_ID, payload, timeout_s=self.config.request_timeout_s)
        self.stats.bytes_received += len(reply)
        return decode_reply(reply)

    async def _handle_request(self, peer: PeerId, payload: bytes) -> bytes:
        self.stats.bytes_received += len(payload)
        try:
            request = decode_request(payload)
        except MalformedEnvelopeError as exc:
            raise RpcError("protocol-error", str(exc)) from None
        space = self._spaces.get(SpaceId(request.space))
        if space is None:
            raise RpcError("not-found", "this node does not hold that space")
        self._remember(space, peer)
        replica = space.replica
        if isinstance(request, Push):
            applied, refused = await self._accept(space, request.envelopes, source=peer, rate_limited=True)
            # One reason per refused envelope of the push (at most MAX_BATCH, like the push).
            reply: SyncReply | PushReply = PushReply(applied, refused[:MAX_BATCH])
        else:
            theirs = vector_from_wire(request.version_vector)
            if request.want_genesis:
                # A joiner's first question stays small (one round trip even on a lossy path);
                # the history follows in batches of its own sync requests.
                missing: list[Envelope] = []
                more = bool(replica.log)
            else:
                missing, more = replica.missing_for(
                    theirs, max_envelopes=self.config.batch_envelopes, max_bytes=self.config.batch_bytes
                )
            others = [p.key for p in sorted(space.replicas) if p != peer]
            self._rng.shuffle(others)
            reply = SyncReply(
                version_vector=vector_to_wire(replica.version_vector),
                envelopes=missing,
                more=more,
                genesis=encode_genesis(replica.genesis) if request.want_genesis else None,
                replicas=others[:MAX_REPLICAS_SHARED],
            )
            self.stats.envelopes_sent += len(missing)
        data = encode_message(reply)
        self.stats.bytes_sent += len(data)
        return data


def _bounded_put(table: dict[PeerId, float], peer: PeerId, now: float, max_entries: int) -> None:
    """``table[peer] = now``, first forgetting the entry heard from least recently when the
    table is full and ``peer`` is new (the tables stay bounded)."""
    if peer not in table and len(table) >= max_entries:
        oldest = min(table, key=lambda p: table[p])
        del table[oldest]
    table[peer] = now

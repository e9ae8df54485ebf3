"""One replica of one space: verified envelopes in, document state and events out (sans-I/O).

:class:`SpaceReplica` holds the genesis, the writer list, the accepted envelopes, the per-author
version vector and the pycrdt document. It never reads a clock, never sleeps, never does I/O.

Rules (invariants):

* An envelope is applied only when it is the author's next seq (``vv[author] + 1``); later ones
  wait in a bounded buffer (``max_pending`` in all, ``max_pending_per_author`` per author,
  ``max_pending_bytes`` of envelopes, at most ``max_ahead`` seqs ahead); the version vector maps
  author -> highest contiguous settled seq and is the whole sync summary.
* Only what could be applied once the missing seqs arrive is buffered: the author may write
  that seq under the current writer list (a revoked writer's seqs past its cutoff are refused
  at once) and the body is within ``max_update_bytes``. A revoke drops the revoked writer's
  buffered envelopes past its cutoff.
* Applied means: signature checked (by the decoder), the author allowed to write that seq
  (:class:`~lattica.crdt.access.AccessList`), the body within ``max_update_bytes``, the Yrs
  update's structs all under the author's client id, and Yrs accepted the bytes. Any failure
  is a :class:`Refused` with a reason; a refused envelope is never stored or forwarded.
* A pycrdt exception (including a Rust panic surfacing as ``PanicException``) while applying
  peer bytes becomes the refusal ``malformed-update``; it never escapes.
* A REVOKE whose cutoff is below what this replica already accepted from that writer removes
  the writer's envelopes above the cutoff and rebuilds the document from the remaining log,
  so every replica converges to the same set whatever order things arrived in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pycrdt

from lattica.crdt.access import AccessList, yrs_client_id
from lattica.crdt.envelope import (
    AclOp,
    Envelope,
    EnvelopeKind,
    decode_acl_op,
    encode_acl_op,
    sign_envelope,
)
from lattica.crdt.errors import MalformedEnvelopeError, NotOwnerError, NotWriterError, UpdateTooLargeError
from lattica.crdt.space_id import Genesis, SpaceId
from lattica.crdt.values import to_plain
from lattica.identity import Identity, PeerId

ROOT_MAP = "state"
"""Name of the root ``Map`` holding a space's keys (a Yjs client reads ``doc.getMap("state")``)."""

REFUSAL_REASONS = frozenset(
    {
        "wrong-space",
        "unauthorized",
        "revoked",
        "replayed",
        "equivocation",
        "too-large",
        "too-far-ahead",
        "buffer-full",
        "malformed-update",
        "foreign-client-id",
        "invalid-acl-op",
        "space-full",
    }
)


@dataclass(frozen=True, slots=True)
class Refused:
    """Why an envelope was not applied; ``reason`` is one of :data:`REFUSAL_REASONS`."""

    author: PeerId
    seq: int
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    """One key of the root map changed (``deleted``: it was removed; ``value`` is then None).

    ``author``/``seq`` name the envelope that changed it (None after a rebuild caused by a
    revoke, where the change is the removal of the revoked writer's later updates).
    """

    key: str
    value: Any
    author: PeerId | None
    seq: int | None
    deleted: bool = False


@dataclass
class OfferResult:
    """What offering envelopes did: applied (in order), refused, buffered, changes made."""

    applied: list[Envelope] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    buffered: int = 0
    changes: list[Change] = field(default_factory=list)
    removed: list[tuple[bytes, int]] = field(default_factory=list)
    """``(author, after_seq)``: the author's envelopes above ``after_seq`` were removed by a revoke."""


@dataclass(frozen=True, slots=True)
class ReplicaLimits:
    """Bounds of one replica (see ``CrdtConfig``)."""

    max_update_bytes: int = 256 * 1024
    max_space_bytes: int = 64 << 20
    max_pending: int = 1024
    max_pending_per_author: int = 256
    max_pending_bytes: int = 8 << 20
    max_ahead: int = 4096
    max_authors: int = 1024


def _read_varuint(data: bytes, offset: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise MalformedEnvelopeError("truncated or oversized varuint in update")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, offset


def update_client_ids(update: bytes) -> list[int]:
    """Client ids of the struct section of a Yjs v1 update, as far as the header says: the
    update must hold structs of at most one client (what one transaction of one writer makes).

    Returns ``[]`` (only deletions) or ``[client]``; raises :class:`MalformedEnvelopeError`
    for more clients or a header that does not parse.
    """
    count, offset = _read_varuint(update, 0)
    if count == 0:
        return []
    if count > 1:
        raise MalformedEnvelopeError(f"update carries structs of {count} clients; one is allowed")
    _structs, offset = _read_varuint(update, offset)
    client, _ = _read_varuint(update, offset)
    return [client]


def _is_pycrdt_failure(exc: BaseException) -> bool:
    # pyo3 turns a Rust panic into pyo3_runtime.PanicException, a BaseException subclass that
    # cannot be imported by name.
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class SpaceReplica:
    """Sans-I/O state of one space on one node (see the module invariants).

    ``local`` is this node's peer id (its Yrs client id is derived from it). Feed peers'
    envelopes to :meth:`offer`; make local writes with :meth:`write`, :meth:`grant`,
    :meth:`revoke`; read with :attr:`doc`, :meth:`get`, :attr:`version_vector`.
    """

    def __init__(self, genesis: Genesis, local: PeerId, limits: ReplicaLimits | None = None) -> None:
        self.genesis = genesis
        self.space_id: SpaceId = genesis.space_id
        self.owner = genesis.owner_id
        self.local = local
        self.limits = limits or ReplicaLimits()
        self.acl = AccessList(self.owner)
        self.version_vector: dict[bytes, int] = {}
        self.log: dict[bytes, dict[int, Envelope]] = {}
        self.size_bytes = 0
        self._pending: dict[tuple[bytes, int], Envelope] = {}
        self._pending_per_author: dict[bytes, int] = {}
        self.pending_bytes = 0
        """Wire bytes of the envelopes waiting in the out-of-order buffer (``max_pending_bytes``)."""
        self.highest_seen: dict[bytes, int] = {}
        """Writer -> highest seq of any validly signed envelope seen (even refused ones): a
        re-grant starts after it, so updates made while revoked stay refused."""
        self._current: Envelope | None = None
        self._changes: list[Change] = []
        self.doc, self.root = self._new_doc()

    # -- document ------------------------------------------------------------------------------

    def _new_doc(self) -> tuple[pycrdt.Doc[Any], pycrdt.Map[Any]]:
        doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=yrs_client_id(self.local))
        root: pycrdt.Map[Any] = doc.get(ROOT_MAP, type=pycrdt.Map)
        root.observe(self._on_root_event)
        return doc, root

    def _on_root_event(self, event: Any) -> None:
        author = self._current.author_id if self._current else None
        seq = self._current.seq if self._current else None
        for key, delta in event.keys.items():
            if delta.get("action") == "delete":
                self._changes.append(Change(str(key), None, author, seq, deleted=True))
            else:
                self._changes.append(Change(str(key), to_plain(delta.get("newValue")), author, seq))

    def get(self, key: str | None = None) -> Any:
        """The value at ``key`` (KeyError if absent), or the whole root map, by the values rule."""
        if key is None:
            return {str(k): to_plain(v) for k, v in self.root.items()}
        return to_plain(self.root[key])

    def writers(self) -> list[PeerId]:
        """Current writers, owner first."""
        return self.acl.writers()

    # -- local writes ----------------------------------------------------------------------------

    def _next_local_seq(self) -> int:
        return self.version_vector.get(self.local.key, 0) + 1

    def write(self, identity: Identity, mutate: Callable[[pycrdt.Map[Any]], None]) -> tuple[Envelope, list[Change]]:
        """Run ``mutate(root_map)`` in one transaction and sign the update it made.

        Returns the envelope (already applied and logged here) and the changes. Raises
        :class:`NotWriterError` when this node may not write, :class:`UpdateTooLargeError` when
        the update exceeds ``max_update_bytes`` (the document is rebuilt without it).
        """
        if identity.peer_id != self.local:
            raise ValueError("identity is not this replica's local peer")
        seq = self._next_local_seq()
        if not self.acl.allows(self.local.key, seq):
            raise NotWriterError(f"{self.local} may not write to space {self.space_id}")
        updates: list[bytes] = []
        subscription = self.doc.observe(lambda event: updates.append(bytes(event.update)))
        self._changes = []
        try:
            with self.doc.transaction():
                mutate(self.root)
        finally:
            self.doc.unobserve(subscription)
        changes, self._changes = self._changes, []
        body = b"".join(updates[:1]) if len(updates) == 1 else pycrdt.merge_updates(*updates) if updates else b""
        if len(body) > self.limits.max_update_bytes:
            self._rebuild()
            raise UpdateTooLargeError(
                f"update of {len(body)} bytes exceeds crdt.max_update_bytes ({self.limits.max_update_bytes})"
            )
        envelope = sign_envelope(identity, self.space_id, seq, EnvelopeKind.UPDATE, body)
        self._store(envelope)
        changes = [Change(c.key, c.value, self.local, seq, c.deleted) for c in changes]
        return envelope, changes

    def undo_local(self, envelope: Envelope) -> None:
        """Take back this node's newest envelope (its log write failed, so it was never
        acknowledged nor sent): drop it and rebuild the document without it.

        Raises :class:`ValueError` unless ``envelope`` is this node's newest envelope.
        """
        held = self.log.get(self.local.key, {})
        if envelope.author != self.local.key or max(held, default=0) != envelope.seq:
            raise ValueError("only this node's newest envelope can be undone")
        self.size_bytes -= held.pop(envelope.seq).wire_size()
        self.version_vector[self.local.key] = envelope.seq - 1
        if envelope.kind == EnvelopeKind.UPDATE:
            self._rebuild()
        else:  # a writer-list change: fold the owner's remaining ones again
            self.acl = AccessList(self.owner)
            for seq in sorted(held):
                if held[seq].kind != EnvelopeKind.UPDATE:
                    self.acl.apply(EnvelopeKind(held[seq].kind), decode_acl_op(held[seq].body))

    def _acl_envelope(self, identity: Identity, kind: EnvelopeKind, peer: PeerId) -> Envelope:
        if identity.peer_id != self.owner:
            raise NotOwnerError(f"only the owner {self.owner} may change the writers of {self.space_id}")
        if peer == self.owner:
            raise ValueError("the owner is always a writer")
        accepted = self.version_vector.get(peer.key, 0)
        # A revoke names the last seq accepted; a grant starts after everything ever seen.
        after = accepted if kind is EnvelopeKind.REVOKE else max(accepted, self.highest_seen.get(peer.key, 0))
        op = AclOp(peer.key, after)
        envelope = sign_envelope(identity, self.space_id, self._next_local_seq(), kind, encode_acl_op(op))
        result = self.offer([envelope])
        if result.refused:
            raise NotOwnerError(f"writer-list change refused: {result.refused[0].reason}")
        return envelope

    def grant(self, identity: Identity, peer: PeerId) -> Envelope | None:
        """Owner only: allow ``peer`` to write. None when it already may. Raises
        :class:`NotOwnerError` for anyone else."""
        if identity.peer_id == self.owner and self.acl.is_writer(peer):
            return None
        return self._acl_envelope(identity, EnvelopeKind.GRANT, peer)

    def revoke(self, identity: Identity, peer: PeerId) -> Envelope | None:
        """Owner only: refuse ``peer``'s updates after the last one this replica accepted.
        None when ``peer`` is not a writer. Raises :class:`NotOwnerError` for anyone else."""
        if identity.peer_id == self.owner and not self.acl.is_writer(peer):
            return None
        return self._acl_envelope(identity, EnvelopeKind.REVOKE, peer)

    # -- peers' envelopes -------------------------------------------------------------------------

    def offer(self, envelopes: Iterable[Envelope]) -> OfferResult:
        """Apply verified envelopes (from :func:`~lattica.crdt.envelope.decode_envelope`) in
        any order; see the module rules. Never raises for anything a peer can send."""
        result = OfferResult()
        self._changes = []
        for envelope in envelopes:
            self._offer_one(envelope, result)
        result.changes, self._changes = self._changes + result.changes, []
        return result

    def _offer_one(self, envelope: Envelope, result: OfferResult) -> None:
        author, seq = envelope.author, envelope.seq
        if envelope.space != self.space_id.key:
            result.refused.append(Refused(PeerId(author), seq, "wrong-space"))
            return
        if not self.acl.ever_granted(author):
            # Not a writer yet: its grant may still be on its way; it is retried by sync.
            result.refused.append(Refused(PeerId(author), seq, "unauthorized"))
            return
        self.highest_seen[author] = max(self.highest_seen.get(author, 0), seq)
        have = self.version_vector.get(author, 0)
        if seq <= have:
            held = self.log.get(author, {}).get(seq)
            reason = (
                "replayed"
                if held is not None and held.digest == envelope.digest
                else ("equivocation" if held is not None else "revoked")
            )
            result.refused.append(Refused(PeerId(author), seq, reason))
            return
        if seq > have + 1:
            refusal = self._buffer_refusal(envelope, have)
            if refusal is not None:
                result.refused.append(Refused(PeerId(author), seq, refusal[0], refusal[1]))
            else:
                self._pend(envelope)
                result.buffered += 1
            return
        self._apply_next(envelope, result)
        self._drain_pending(result)

    def _buffer_refusal(self, envelope: Envelope, have: int) -> tuple[str, str] | None:
        """Why an out-of-order envelope may not wait in the buffer, or None. Refused here is
        what this replica could not apply when its turn came under the writer list it holds
        now; a re-grant that arrives later makes sync offer such envelopes again."""
        author, seq = envelope.author, envelope.seq
        limits = self.limits
        if envelope.kind != EnvelopeKind.UPDATE and author != self.owner.key:
            return ("unauthorized", "only the owner changes the writer list")
        if not self.acl.allows(author, seq):
            return ("revoked", "past the writer's cutoff")
        if len(envelope.body) > limits.max_update_bytes:
            return ("too-large", f"{len(envelope.body)} > {limits.max_update_bytes} bytes")
        if seq > have + limits.max_ahead:
            return ("too-far-ahead", f"more than {limits.max_ahead} seqs ahead")
        if (author, seq) in self._pending:
            return ("replayed", "already buffered")
        if self._pending_per_author.get(author, 0) >= limits.max_pending_per_author:
            return ("buffer-full", f"{limits.max_pending_per_author} envelopes of this author wait")
        if len(self._pending) >= limits.max_pending:
            return ("buffer-full", f"{limits.max_pending} envelopes wait")
        if self.pending_bytes + envelope.wire_size() > limits.max_pending_bytes:
            return ("buffer-full", f"{limits.max_pending_bytes} bytes wait")
        return None

    def _pend(self, envelope: Envelope) -> None:
        self._pending[(envelope.author, envelope.seq)] = envelope
        self._pending_per_author[envelope.author] = self._pending_per_author.get(envelope.author, 0) + 1
        self.pending_bytes += envelope.wire_size()

    def _unpend(self, key: tuple[bytes, int]) -> Envelope | None:
        envelope = self._pending.pop(key, None)
        if envelope is not None:
            left = self._pending_per_author[key[0]] - 1
            if left:
                self._pending_per_author[key[0]] = left
            else:
                del self._pending_per_author[key[0]]
            self.pending_bytes -= envelope.wire_size()
        return envelope

    @property
    def pending_count(self) -> int:
        """Envelopes waiting in the out-of-order buffer."""
        return len(self._pending)

    def _pending_authors(self) -> set[bytes]:
        return set(self._pending_per_author)

    def _drain_pending(self, result: OfferResult) -> None:
        progress = True
        while progress:
            progress = False
            for author in list(self._pending_authors() | set(self.acl._ranges)):
                have = self.version_vector.get(author, 0)
                skip_to = self.acl.settled_empty_through(author, have + 1)
                if skip_to is not None:
                    self.version_vector[author] = skip_to
                    for key in [k for k in self._pending if k[0] == author and k[1] <= skip_to]:
                        self._unpend(key)
                    progress = True
                    continue
                envelope = self._unpend((author, have + 1))
                if envelope is not None:
                    self._apply_next(envelope, result)
                    progress = True

    def _apply_next(self, envelope: Envelope, result: OfferResult) -> None:
        refusal = self._check_and_apply(envelope, result)
        if refusal is None:
            result.applied.append(envelope)
        else:
            result.refused.append(Refused(envelope.author_id, envelope.seq, refusal[0], refusal[1]))

    def _check_and_apply(self, envelope: Envelope, result: OfferResult) -> tuple[str, str] | None:
        author, seq, kind = envelope.author, envelope.seq, envelope.kind
        if kind != EnvelopeKind.UPDATE:
            if author != self.owner.key:
                return ("unauthorized", "only the owner changes the writer list")
            try:
                op = decode_acl_op(envelope.body)
            except MalformedEnvelopeError as exc:
                return ("invalid-acl-op", str(exc))
            if op.peer == self.owner.key:
                return ("invalid-acl-op", "the owner cannot be granted or revoked")
            if op.peer not in self.version_vector and len(self.version_vector) >= self.limits.max_authors:
                return ("space-full", f"{self.limits.max_authors} writers")
            self._store(envelope)
            self.acl.apply(EnvelopeKind(kind), op)
            if kind == EnvelopeKind.REVOKE:
                self._cut(op, result)
            return None
        if not self.acl.allows(author, seq):
            return ("revoked" if self.acl.ever_granted(author) else "unauthorized", "")
        if len(envelope.body) > self.limits.max_update_bytes:
            return ("too-large", f"{len(envelope.body)} > {self.limits.max_update_bytes} bytes")
        if self.size_bytes + envelope.wire_size() > self.limits.max_space_bytes:
            return ("space-full", f"space at its {self.limits.max_space_bytes}-byte limit")
        try:
            clients = update_client_ids(envelope.body)
        except MalformedEnvelopeError as exc:
            return ("malformed-update", str(exc))
        if clients and clients[0] != yrs_client_id(author):
            return ("foreign-client-id", f"structs of client {clients[0]}")
        self._current = envelope
        try:
            self.doc.apply_update(envelope.body)
        except BaseException as exc:
            if not _is_pycrdt_failure(exc):
                raise
            return ("malformed-update", f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            self._current = None
        self._store(envelope)
        return None

    def _store(self, envelope: Envelope) -> None:
        self.log.setdefault(envelope.author, {})[envelope.seq] = envelope
        self.version_vector[envelope.author] = envelope.seq
        self.size_bytes += envelope.wire_size()

    def _cut(self, op: AclOp, result: OfferResult) -> None:
        held = self.log.get(op.peer, {})
        doomed = [s for s in held if s > op.after_seq]
        for key in [k for k in self._pending if k[0] == op.peer and k[1] > op.after_seq]:
            self._unpend(key)
        if not doomed:
            return
        for s in doomed:
            self.size_bytes -= held.pop(s).wire_size()
        self.version_vector[op.peer] = min(self.version_vector.get(op.peer, 0), op.after_seq)
        result.removed.append((op.peer, op.after_seq))
        before = self.get()
        self._rebuild()
        after = self.get()
        for key in sorted(before.keys() | after.keys()):
            if key not in after:
                self._changes.append(Change(key, None, None, None, deleted=True))
            elif before.get(key, _MISSING) != after[key]:
                self._changes.append(Change(key, after[key], None, None))

    def _rebuild(self) -> None:
        """A fresh document from the logged updates (authors in id order, each in seq order)."""
        self.doc, self.root = self._new_doc()
        for author in sorted(self.log):
            for seq in sorted(self.log[author]):
                envelope = self.log[author][seq]
                if envelope.kind == EnvelopeKind.UPDATE and envelope.body:
                    self.doc.apply_update(envelope.body)
        self._changes = []

    # -- sync summary -----------------------------------------------------------------------------

    def missing_for(
        self, theirs: dict[bytes, int], *, max_envelopes: int, max_bytes: int
    ) -> tuple[list[Envelope], bool]:
        """Envelopes this replica holds that a peer with version vector ``theirs`` lacks, oldest
        first per author, at most ``max_envelopes`` / ``max_bytes``; and whether more remain."""
        out: list[Envelope] = []
        size = 0
        # Owner first: the writer list must reach the peer before the writers' updates.
        authors = sorted(self.log, key=lambda a: (a != self.owner.key, a))
        for author in authors:
            held = self.log[author]
            start = theirs.get(author, 0)
            for seq in sorted(s for s in held if s > start):
                envelope = held[seq]
                if len(out) >= max_envelopes or (out and size + envelope.wire_size() > max_bytes):
                    return out, True
                out.append(envelope)
                size += envelope.wire_size()
        return out, False

    def restore(self, envelopes: Iterable[Envelope], snapshot: bytes | None, snapshot_vv: dict[bytes, int]) -> None:
        """Rebuild from this node's own log (trusted: it holds only envelopes accepted before):
        the writer list from the owner's envelopes, the document from ``snapshot`` (a full
        Yrs update taken when the version vector was ``snapshot_vv``) plus the newer updates."""
        by_author: dict[bytes, dict[int, Envelope]] = {}
        for envelope in envelopes:
            by_author.setdefault(envelope.author, {})[envelope.seq] = envelope
        owner_log = by_author.get(self.owner.key, {})
        for seq in sorted(owner_log):
            envelope = owner_log[seq]
            if envelope.kind != EnvelopeKind.UPDATE:
                self.acl.apply(EnvelopeKind(envelope.kind), decode_acl_op(envelope.body))
        if snapshot:
            self.doc.apply_update(snapshot)
        for author in sorted(by_author, key=lambda a: (a != self.owner.key, a)):
            for seq in sorted(by_author[author]):
                envelope = by_author[author][seq]
                have = self.version_vector.get(author, 0)
                skip_to = self.acl.settled_empty_through(author, have + 1)
                if skip_to is not None and seq > skip_to:
                    self.version_vector[author] = skip_to
                    have = skip_to
                if seq != have + 1:
                    break  # a hole in the log: the rest is fetched from peers again
                self._store(envelope)
                if envelope.kind == EnvelopeKind.UPDATE and envelope.body and seq > snapshot_vv.get(author, 0):
                    self.doc.apply_update(envelope.body)
        self._changes = []


_MISSING = object()

"""The writer list of a space: a fold of the owner's GRANT and REVOKE envelopes (sans-I/O).

Rules (invariants):

* The owner may always write. Every other author may write exactly the seqs inside one of its
  *ranges*: a GRANT with ``after_seq = a`` opens the range ``a < seq``; a REVOKE with
  ``after_seq = c`` closes the open range at ``seq <= c``. ``c`` is the writer's last seq the
  owner had accepted, so "after the revoke" is exact and the same on every replica: seqs
  ``<= c`` stay valid wherever and whenever they arrive, seqs ``> c`` are refused everywhere.
* Only the owner's envelopes change the list, applied in the owner's seq order, so every
  replica that has the owner's envelopes ``1..n`` has the same list.
* Seqs between a revoke's cutoff and a later grant's ``after_seq`` are *settled empty*: no
  replica will ever accept them, so the per-author version vector steps over them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from lattica.crdt.envelope import AclOp, EnvelopeKind
from lattica.identity import PeerId

_CLIENT_DOMAIN = b"lattica/crdt/yrs-client/v1\x00"


def yrs_client_id(peer: PeerId | bytes) -> int:
    """The Yrs/Yjs client id an author must use in its updates (32 bits, as Yjs draws them).

    Binding the client id to the author means the structs of a signed update can only claim
    the author's own client id, so one writer cannot forge another writer's items. A Yjs client
    writing as this peer sets ``doc.clientID = yrs_client_id(peer)``.
    """
    key = peer.key if isinstance(peer, PeerId) else peer
    return int.from_bytes(hashlib.sha256(_CLIENT_DOMAIN + key).digest()[:4], "big")


@dataclass
class _Range:
    after: int
    until: int | None = None  # None: still open


@dataclass
class AccessList:
    """The writer list of one space, derived from its owner's ACL envelopes."""

    owner: PeerId
    _ranges: dict[bytes, list[_Range]] = field(default_factory=dict)

    def apply(self, kind: EnvelopeKind, op: AclOp) -> bool:
        """Fold one owner operation in; returns False (and changes nothing) when it is a
        no-op: granting a current writer, revoking a non-writer, or naming the owner."""
        if op.peer == self.owner.key:
            return False
        ranges = self._ranges.setdefault(op.peer, [])
        open_range = ranges[-1] if ranges and ranges[-1].until is None else None
        if kind is EnvelopeKind.GRANT:
            if open_range is not None:
                return False
            last = ranges[-1].until if ranges else 0
            ranges.append(_Range(after=max(op.after_seq, last or 0)))
            return True
        if kind is EnvelopeKind.REVOKE:
            if open_range is None:
                return False
            open_range.until = max(op.after_seq, open_range.after)
            return True
        return False

    def allows(self, author: bytes, seq: int) -> bool:
        """True when ``author`` may write its envelope number ``seq``."""
        if author == self.owner.key:
            return True
        return any(r.after < seq and (r.until is None or seq <= r.until) for r in self._ranges.get(author, ()))

    def ever_granted(self, author: bytes) -> bool:
        """True for the owner and every peer that was granted at least once."""
        return author == self.owner.key or bool(self._ranges.get(author))

    def is_writer(self, peer: PeerId | bytes) -> bool:
        """True when ``peer`` may write now (owner, or granted and not revoked since)."""
        key = peer.key if isinstance(peer, PeerId) else peer
        if key == self.owner.key:
            return True
        ranges = self._ranges.get(key)
        return bool(ranges) and ranges[-1].until is None  # type: ignore[index]

    def settled_empty_through(self, author: bytes, seq: int) -> int | None:
        """If ``seq`` can never be accepted but a later range exists, the last seq before
        that range (the version vector may jump there); otherwise None."""
        if self.allows(author, seq):
            return None
        for r in self._ranges.get(author, ()):
            if r.after >= seq:
                return r.after
        return None

    def writers(self) -> list[PeerId]:
        """Current writers, the owner first, then by peer id."""
        others = sorted(PeerId(k) for k in self._ranges if self.is_writer(k))
        return [self.owner, *others]

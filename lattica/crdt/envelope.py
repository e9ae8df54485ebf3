"""Signed envelopes: the unit every replica verifies, stores and forwards.

An envelope carries one pycrdt (Yrs, Yjs v1 encoding) update, or one owner's writer-list
operation, from one author. Invariants:

* ``digest == sha256(body)`` and ``signature`` is the author's Ed25519 signature over
  ``ENVELOPE_DOMAIN || msgpack([version, space, author, seq, kind, digest])`` (msgspec's msgpack
  encoding of a tuple of ints and bytes is canonical: one encoding per value).
* ``seq`` counts from 1 per (space, author) with no gaps: the pair ``(author, seq)`` names the
  envelope, so a replay is recognised by its name and an equivocation (two bodies for one
  name) by a differing digest.
* Sizes are bounded at decode: ``body`` by :data:`MAX_BODY_BYTES` (the configured
  ``crdt.max_update_bytes`` is checked on top), every id by its exact length.
* :func:`decode_envelope` returns a fully validated, signature-checked envelope or raises
  :class:`~lattica.crdt.errors.MalformedEnvelopeError`; nothing else.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Annotated

import msgspec

from lattica.crdt.errors import MalformedEnvelopeError
from lattica.crdt.space_id import SPACE_ID_BYTES, SpaceId
from lattica.identity import PEER_ID_BYTES, Identity, PeerId

ENVELOPE_VERSION = 1
ENVELOPE_DOMAIN = b"lattica/crdt/envelope/v1\x00"
MAX_BODY_BYTES = 1 << 20
"""Hard ceiling on one envelope's body (1 MiB); ``crdt.max_update_bytes`` may only lower it."""
MAX_SEQ = (1 << 53) - 1
_encoder = msgspec.msgpack.Encoder()


class EnvelopeKind(enum.IntEnum):
    """What an envelope's body is."""

    UPDATE = 0
    """A Yrs update (v1 encoding) to the space's document."""
    GRANT = 1
    """Owner only: an encoded :class:`AclOp` allowing a writer."""
    REVOKE = 2
    """Owner only: an encoded :class:`AclOp` refusing a writer's later updates."""


class AclOp(msgspec.Struct, frozen=True, array_like=True):
    """Body of a GRANT or REVOKE envelope.

    GRANT allows ``peer``'s envelopes with ``seq > after_seq``; REVOKE refuses those with
    ``seq > after_seq`` (``after_seq`` is the last of the writer's seqs the owner accepted:
    what the revoke comes causally after).
    """

    peer: Annotated[bytes, msgspec.Meta(min_length=PEER_ID_BYTES, max_length=PEER_ID_BYTES)]
    after_seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    """One signed unit of a space's history (see the module invariants)."""

    version: int
    space: Annotated[bytes, msgspec.Meta(min_length=SPACE_ID_BYTES, max_length=SPACE_ID_BYTES)]
    author: Annotated[bytes, msgspec.Meta(min_length=PEER_ID_BYTES, max_length=PEER_ID_BYTES)]
    seq: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ)]
    kind: Annotated[int, msgspec.Meta(ge=0, le=2)]
    digest: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    body: Annotated[bytes, msgspec.Meta(max_length=MAX_BODY_BYTES)]
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]

    @property
    def author_id(self) -> PeerId:
        """The author as a :class:`PeerId`."""
        return PeerId(self.author)

    @property
    def space_id(self) -> SpaceId:
        """The space as a :class:`SpaceId`."""
        return SpaceId(self.space)

    @property
    def name(self) -> tuple[bytes, int]:
        """``(author, seq)``: what identifies this envelope within its space."""
        return (self.author, self.seq)

    def wire_size(self) -> int:
        """Approximate encoded size in bytes (body plus fixed fields)."""
        return len(self.body) + 32 + 32 + 32 + 64 + 16


def signing_bytes(version: int, space: bytes, author: bytes, seq: int, kind: int, digest: bytes) -> bytes:
    """The domain-separated canonical bytes an envelope's signature covers."""
    return ENVELOPE_DOMAIN + _encoder.encode((version, space, author, seq, kind, digest))


def sign_envelope(identity: Identity, space: SpaceId, seq: int, kind: EnvelopeKind, body: bytes) -> Envelope:
    """Build and sign an envelope by ``identity``.

    Raises :class:`ValueError` for a seq outside ``1..2**53-1`` or a body above
    :data:`MAX_BODY_BYTES`.
    """
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} out of range")
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"envelope body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    digest = hashlib.sha256(body).digest()
    author = identity.peer_id.key
    signature = identity.sign(signing_bytes(ENVELOPE_VERSION, space.key, author, seq, int(kind), digest))
    return Envelope(ENVELOPE_VERSION, space.key, author, seq, int(kind), digest, body, signature)


def verify_envelope(envelope: Envelope) -> None:
    """Check version, digest and signature. Raises :class:`MalformedEnvelopeError`."""
    if envelope.version != ENVELOPE_VERSION:
        raise MalformedEnvelopeError(f"envelope version {envelope.version} (this node speaks {ENVELOPE_VERSION})")
    if hashlib.sha256(envelope.body).digest() != envelope.digest:
        raise MalformedEnvelopeError("envelope digest does not match its body")
    message = signing_bytes(
        envelope.version, envelope.space, envelope.author, envelope.seq, envelope.kind, envelope.digest
    )
    if not PeerId(envelope.author).verify(message, envelope.signature):
        raise MalformedEnvelopeError("envelope signature does not verify")


def encode_envelope(envelope: Envelope) -> bytes:
    """The msgpack bytes of ``envelope`` (what the log stores)."""
    return _encoder.encode(envelope)


def decode_envelope(data: bytes) -> Envelope:
    """Decode and verify an envelope from untrusted bytes.

    Returns a signature-checked envelope or raises :class:`MalformedEnvelopeError`.
    """
    try:
        envelope = msgspec.msgpack.decode(data, type=Envelope)
    except (msgspec.DecodeError, ValueError) as exc:
        raise MalformedEnvelopeError(f"not an envelope: {exc}") from exc
    except RecursionError:
        raise MalformedEnvelopeError("envelope nested too deeply") from None
    verify_envelope(envelope)
    return envelope


def decode_acl_op(body: bytes) -> AclOp:
    """Decode a GRANT/REVOKE body; raises :class:`MalformedEnvelopeError`."""
    try:
        return msgspec.msgpack.decode(body, type=AclOp)
    except (msgspec.DecodeError, ValueError) as exc:
        raise MalformedEnvelopeError(f"not a writer-list operation: {exc}") from exc
    except RecursionError:
        raise MalformedEnvelopeError("writer-list operation nested too deeply") from None


def encode_acl_op(op: AclOp) -> bytes:
    """The body bytes of a GRANT/REVOKE envelope."""
    return _encoder.encode(op)

"""Messages of the sync protocol ``/lattica/crdt/1`` and their bounded codec (sans-I/O).

One RPC protocol, request/response, msgpack tagged unions:

* ``SyncRequest(space, version_vector, want_genesis)`` -> ``SyncReply(genesis, version_vector,
  envelopes, more, replicas)``: the callee sends what the caller's vector lacks (at most one
  batch) plus its own vector, so the caller can push back what the callee lacks. That pair is
  one anti-entropy round; only missing envelopes travel, never the document.
* ``Push(space, envelopes)`` -> ``PushReply(applied, refused)``: new envelopes, gossiped to a
  bounded fanout of replicas by every replica that accepts them.

Every list and byte string is bounded at decode (:data:`MAX_VECTOR_ENTRIES`,
:data:`MAX_BATCH`, envelope bodies by the envelope codec); a malformed message raises
:class:`~lattica.crdt.errors.MalformedEnvelopeError`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from lattica.crdt.envelope import MAX_SEQ, Envelope
from lattica.crdt.errors import MalformedEnvelopeError
from lattica.crdt.space_id import SPACE_ID_BYTES
from lattica.identity import PEER_ID_BYTES

PROTOCOL_ID = "/lattica/crdt/1"
MAX_VECTOR_ENTRIES = 4096
MAX_BATCH = 4096
MAX_REPLICAS_SHARED = 16

SpaceKey = Annotated[bytes, msgspec.Meta(min_length=SPACE_ID_BYTES, max_length=SPACE_ID_BYTES)]
PeerKey = Annotated[bytes, msgspec.Meta(min_length=PEER_ID_BYTES, max_length=PEER_ID_BYTES)]
VectorEntry = tuple[PeerKey, Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]]
Vector = Annotated[list[VectorEntry], msgspec.Meta(max_length=MAX_VECTOR_ENTRIES)]
Batch = Annotated[list[Envelope], msgspec.Meta(max_length=MAX_BATCH)]


class SyncRequest(msgspec.Struct, frozen=True, tag="sync"):
    """Caller's version vector for ``space``; asks for what it lacks."""

    space: SpaceKey
    version_vector: Vector
    want_genesis: bool = False


class SyncReply(msgspec.Struct, frozen=True, tag="sync-reply"):
    """Envelopes the caller lacks (``more``: another round would bring more), the callee's
    vector, and a few other replicas of the space (peer exchange)."""

    version_vector: Vector
    envelopes: Batch
    more: bool = False
    genesis: Annotated[bytes, msgspec.Meta(max_length=1024)] | None = None
    replicas: Annotated[list[PeerKey], msgspec.Meta(max_length=MAX_REPLICAS_SHARED)] = []


class Push(msgspec.Struct, frozen=True, tag="push"):
    """New envelopes of ``space``."""

    space: SpaceKey
    envelopes: Batch


class PushReply(msgspec.Struct, frozen=True, tag="push-reply"):
    """How many of a push were applied, and one refusal reason per refused envelope (bounded):
    ``bad-signature``, ``rate-limited`` or one of ``lattica.crdt.REFUSAL_REASONS``. Envelopes
    buffered until their predecessors arrive are in neither."""

    applied: int
    refused: Annotated[list[str], msgspec.Meta(max_length=MAX_BATCH)] = []


CrdtRequest = SyncRequest | Push
CrdtReply = SyncReply | PushReply

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(CrdtRequest)
_reply_decoder = msgspec.msgpack.Decoder(CrdtReply)


def encode_message(message: CrdtRequest | CrdtReply) -> bytes:
    """msgpack bytes of a sync message."""
    return _encoder.encode(message)


def _decode(decoder: msgspec.msgpack.Decoder[object], data: bytes) -> object:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:
        raise MalformedEnvelopeError(f"bad crdt message: {exc}") from exc
    except RecursionError:
        raise MalformedEnvelopeError("crdt message nested too deeply") from None


def decode_request(data: bytes) -> CrdtRequest:
    """Decode a request from a peer; raises :class:`MalformedEnvelopeError`. Envelopes inside
    are shape-checked only: verify each with :func:`~lattica.crdt.envelope.verify_envelope`."""
    message = _decode(_request_decoder, data)  # type: ignore[arg-type]
    assert isinstance(message, SyncRequest | Push)
    return message


def decode_reply(data: bytes) -> CrdtReply:
    """Decode a reply from a peer; raises :class:`MalformedEnvelopeError` (envelopes inside are
    shape-checked only, as for :func:`decode_request`)."""
    message = _decode(_reply_decoder, data)  # type: ignore[arg-type]
    assert isinstance(message, SyncReply | PushReply)
    return message


def vector_to_wire(vector: dict[bytes, int]) -> list[tuple[bytes, int]]:
    """A version vector as a sorted list of ``(author, seq)``."""
    return sorted(vector.items())


def vector_from_wire(entries: list[tuple[bytes, int]]) -> dict[bytes, int]:
    """A version vector from the wire (a repeated author keeps its highest seq)."""
    out: dict[bytes, int] = {}
    for author, seq in entries:
        out[author] = max(seq, out.get(author, 0))
    return out

"""Wire messages of the content exchange protocol (``/lattica/content/1``).

One stream per peer per fetch, opened by the fetching side (the *client*). Frames are
:mod:`lattica.wire` frames (``u32`` length, version byte, msgpack body) of msgspec Structs,
tagged unions in each direction. Requests carry a client-chosen ``id`` (increasing per stream)
so replies can be matched and requests cancelled while many are in flight (pipelining).

Client -> server: :class:`Want` (send block ``digest``), :class:`Has` (do you hold it?),
:class:`Cancel` (forget request ``id``).

Server -> client: :class:`Piece` (part of a block: ``offset`` into it and its ``total`` length;
a block is sent as consecutive pieces of at most :data:`MAX_PIECE_BYTES`), :class:`HasReply`,
:class:`Refused` (``code`` in :data:`REFUSAL_CODES`).

Bounds: a frame is at most :data:`MAX_FRAME_BYTES`, so neither side ever buffers more than one
piece of a frame; ids are unsigned 32-bit; digests are exactly 32 bytes (BLAKE3). Blocks are
identified by their digest only, so the bytes a peer sends are verified by hashing them; the
manifest of a content id is the block named by the id's digest.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from lattica.content.cid import DIGEST_BYTES

PROTOCOL_ID: Final = "/lattica/content/1"
"""The protocol id of exchange streams (``Rpc.add_stream_handler``)."""

MAX_PIECE_BYTES: Final = 256 * 1024
"""Largest ``data`` in one :class:`Piece`, bytes."""
MAX_FRAME_BYTES: Final = MAX_PIECE_BYTES + 256
"""Largest frame either side accepts: a full piece plus its fields and framing."""

NOT_FOUND: Final = "not-found"
"""The server does not hold that block."""
BUSY: Final = "busy"
"""The server is serving its limit of uploads; try again later or elsewhere."""
TOO_LARGE: Final = "too-large"
"""The block is larger than the client said it could take."""
REFUSAL_CODES: Final = frozenset({NOT_FOUND, BUSY, TOO_LARGE})

RequestId = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
Digest = Annotated[bytes, msgspec.Meta(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)]
BlockBytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]


class Want(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="want"):
    """Send block ``digest``, if it is at most ``max_bytes`` long (else :data:`TOO_LARGE`)."""

    id: RequestId
    digest: Digest
    max_bytes: BlockBytes


class Has(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="has"):
    """Whether the server holds block ``digest`` (answered with :class:`HasReply`)."""

    id: RequestId
    digest: Digest


class Cancel(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="cancel"):
    """Stop serving request ``id`` (its pieces may still arrive; the client ignores them)."""

    id: RequestId


class Piece(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="piece"):
    """Bytes ``offset .. offset+len(data)`` of the block requested as ``id``, ``total`` long."""

    id: RequestId
    offset: BlockBytes
    total: BlockBytes
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_PIECE_BYTES)]


class HasReply(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="has-reply"):
    """Answer to :class:`Has` ``id``."""

    id: RequestId
    held: bool


class Refused(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="refused"):
    """Request ``id`` will not be served; ``code`` says why (:data:`REFUSAL_CODES`)."""

    id: RequestId
    code: Literal["not-found", "busy", "too-large"]


ClientMessage = Want | Has | Cancel
"""What a client sends."""
ServerMessage = Piece | HasReply | Refused
"""What a server sends."""

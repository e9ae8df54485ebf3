"""Wire messages of the content exchange protocol (``/lattica/content/1``).

One stream per peer per fetch, opened by the fetching side (the *client*). Frames are
:mod:`lattica.wire` frames (``u32`` length, version byte, msgpack body) of msgspec Structs,
tagged unions in each direction. Requests carry a client-chosen ``id`` (increasing per stream)
so replies can be matched and requests cancelled while many are in flight (pipelining).

Client -> server: :class:`Want` (send block ``digest``), :class:`Has` (do you hold it?),
:class:`Cancel` (forget request ``id``).

Server -> client: :class:`Piece` (part of a block: ``offset`` into it and its ``total`` length;
a block is sent as consecutive pieces of at most :data:`MAX_PIECE_BYTES`: a whole 1 MiB block in
one piece on a lane, which carries nothing else, :data:`PIECE_BYTES` where streams share a
connection), :class:`HasReply`, :class:`Refused` (``code`` in :data:`REFUSAL_CODES`). The
client decodes pieces as :class:`PieceView`: the same bytes, the data taken in place.

Bounds: a frame is at most :data:`MAX_FRAME_BYTES`, so neither side ever buffers more than one
piece of a frame; ids are unsigned 32-bit; digests are exactly 32 bytes (BLAKE3). Blocks are
identified by their digest only, so the bytes a peer sends are verified by hashing them; the
manifest of a content id is the block named by the id's digest.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from lattica.content.cid import DIGEST_BYTES
from lattica.errors import RemoteProtocolError

PROTOCOL_ID: Final = "/lattica/content/1"
"""The protocol id of exchange streams (``Rpc.add_stream_handler``)."""

MAX_PIECE_BYTES: Final = 1024 * 1024
"""Largest ``data`` in one :class:`Piece`, bytes (a whole default-sized chunk)."""
MIN_PIECE_BYTES: Final = 16 * 1024
"""Least ``data`` in a :class:`Piece` that does not end its block (an honest server sends full
pieces; tiny ones would cost the client a message each for a byte or two: review finding)."""
PIECE_BYTES: Final = 256 * 1024
"""``data`` per :class:`Piece` on a connection that other streams share (QUIC, yamux): each
piece is a turn for the others, and bounds what a cancel leaves in flight."""
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


class PieceView(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag="piece"):
    """:class:`Piece` as the client decodes it: ``data`` is the msgpack ``bin`` object as it
    lies in the frame (no copy); :func:`piece_payload` checks it and gives its bytes."""

    id: RequestId
    offset: BlockBytes
    total: BlockBytes
    data: msgspec.Raw


def piece_payload(piece: PieceView) -> memoryview:
    """The bytes of ``piece`` (a read-only view into its frame). Raises
    :class:`~lattica.errors.RemoteProtocolError` if ``data`` is not a msgpack ``bin`` (RFC-less,
    but see the msgpack spec's bin 8/16/32 formats) or holds more than :data:`MAX_PIECE_BYTES`."""
    raw = memoryview(piece.data)
    marker = raw[0] if raw else -1
    if marker == 0xC4:
        start = 2
    elif marker == 0xC5:
        start = 3
    elif marker == 0xC6:
        start = 5
    else:
        raise RemoteProtocolError("a piece whose data is not bytes")
    size = int.from_bytes(raw[1:start], "big")
    if start + size != len(raw):  # msgspec checked the object's extent; this is belt and braces
        raise RemoteProtocolError("a piece whose data length is inconsistent")
    if size > MAX_PIECE_BYTES:
        raise RemoteProtocolError(f"a piece of {size} bytes; at most {MAX_PIECE_BYTES} are allowed")
    return raw[start:]


ClientMessage = Want | Has | Cancel
"""What a client sends."""
ServerMessage = Piece | HasReply | Refused
"""What a server sends."""
ServerMessageView = PieceView | HasReply | Refused
"""What a server sends, as the client decodes it (pieces in place)."""

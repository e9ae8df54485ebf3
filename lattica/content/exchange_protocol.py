"""The content exchange protocol's two sides as sans-I/O state machines.

:class:`ExchangeServer` turns the bytes a client sent into :class:`BlockWanted` /
:class:`HasAsked` / :class:`RequestCancelled` events and frames the replies;
:class:`ExchangeClient` frames requests and turns the server's bytes into
:class:`BlockReceived` / :class:`BlockRefused` / :class:`HasAnswered` events. Neither does I/O
or reads a clock; the trio drivers live in :mod:`lattica.content.exchange_service` and
:mod:`lattica.content.exchange_fetch`. Messages: :mod:`lattica.content.exchange_messages`.

Every byte from the other side is hostile, so both sides raise
:class:`~lattica.errors.RemoteProtocolError` (subclasses from :mod:`lattica.wire`) for:
frames above :data:`~lattica.content.exchange_messages.MAX_FRAME_BYTES` (before buffering
them), malformed or over-nested bodies, request ids that do not increase, more than
``max_outstanding`` requests at once (server), pieces that do not continue the block they
belong to or overrun the size the client allowed, and replies to requests never made
(client). A protocol error ends the stream (one peer's transfer), never the node.

Not verified here: whether a block's bytes hash to its digest. The fetch driver hands blocks to
:meth:`~lattica.content.block_store.BlockStore.put_many`, which stores nothing unverified.
"""

from __future__ import annotations

from dataclasses import dataclass

from lattica.content.exchange_messages import (
    MAX_FRAME_BYTES,
    MAX_PIECE_BYTES,
    MIN_PIECE_BYTES,
    PIECE_BYTES,
    Cancel,
    ClientMessage,
    Has,
    HasReply,
    Piece,
    PieceView,
    Refused,
    ServerMessage,
    ServerMessageView,
    Want,
    piece_payload,
)
from lattica.errors import LocalProtocolError, RemoteProtocolError
from lattica.wire import FrameDecoder, encode_frame, encode_frame_parts

DEFAULT_MAX_OUTSTANDING = 64
"""Requests a server accepts in flight on one stream (the client's window must stay below)."""
_CLIENT_FRAME_BYTES = 128  # Want is the largest client message: ~50 bytes
_MAX_ID = 0xFFFFFFFF
_MAX_CANCELLED_KEPT = 4096  # cancelled requests whose late replies are still accepted


def _frame(message: ClientMessage | ServerMessage) -> bytes:
    return encode_frame(message, max_frame_bytes=MAX_FRAME_BYTES)


# -- server ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockWanted:
    """The client asks for block ``digest`` (at most ``max_bytes``) as request ``id``."""

    id: int
    digest: bytes
    max_bytes: int


@dataclass(frozen=True, slots=True)
class HasAsked:
    """The client asks whether block ``digest`` is held here (request ``id``)."""

    id: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The client no longer wants request ``id``."""

    id: int


ServerEvent = BlockWanted | HasAsked | RequestCancelled


class ExchangeServer:
    """The serving side of one exchange stream (see the module docstring).

    ``max_outstanding`` bounds the requests accepted and not yet answered; one more is a
    :class:`RemoteProtocolError`.
    """

    def __init__(self, *, max_outstanding: int = DEFAULT_MAX_OUTSTANDING) -> None:
        if max_outstanding < 1:
            raise LocalProtocolError("max_outstanding must be at least 1")
        self.max_outstanding = max_outstanding
        self._decoder: FrameDecoder[ClientMessage] = FrameDecoder(
            ClientMessage,  # type: ignore[arg-type]
            max_frame_bytes=_CLIENT_FRAME_BYTES,
        )
        self._outstanding: set[int] = set()
        self._last_id = -1

    @property
    def outstanding(self) -> int:
        """Requests accepted and not yet answered or cancelled."""
        return len(self._outstanding)

    def is_wanted(self, request_id: int) -> bool:
        """Whether request ``request_id`` still awaits an answer (not cancelled, not answered)."""
        return request_id in self._outstanding

    def receive(self, data: bytes) -> list[ServerEvent]:
        """Feed bytes from the client; returns the requests they complete. Raises
        :class:`RemoteProtocolError` (see the module docstring)."""
        self._decoder.feed(data)
        events: list[ServerEvent] = []
        while (message := self._decoder.next_message()) is not None:
            if isinstance(message, Cancel):
                if message.id in self._outstanding:
                    self._outstanding.discard(message.id)
                    events.append(RequestCancelled(message.id))
                continue
            if message.id <= self._last_id:
                raise RemoteProtocolError(f"request id {message.id} does not increase")
            if len(self._outstanding) >= self.max_outstanding:
                raise RemoteProtocolError(f"more than {self.max_outstanding} requests in flight")
            self._last_id = message.id
            self._outstanding.add(message.id)
            if isinstance(message, Want):
                events.append(BlockWanted(message.id, message.digest, message.max_bytes))
            else:
                events.append(HasAsked(message.id, message.digest))
        return events

    def end_of_stream(self) -> None:
        """The client closed its side; raises :class:`RemoteProtocolError` inside a frame."""
        self._decoder.end_of_stream()

    def block_frames(
        self, request_id: int, offset: int, total: int, data: bytes | memoryview, *, piece_bytes: int = PIECE_BYTES
    ) -> list[tuple[bytes, memoryview]]:
        """Frames carrying ``data``, bytes ``offset ..`` of a ``total``-byte block, for request
        ``request_id``, a piece of at most ``piece_bytes`` each; the request is answered once
        the range reaches ``total``. Nothing for a request that was cancelled meanwhile. Each
        frame is its two parts (:func:`~lattica.wire.encode_frame_parts`): its head and its
        piece of ``data``, not copied. Raises :class:`LocalProtocolError` for ``piece_bytes``
        outside 1 .. :data:`MAX_PIECE_BYTES`."""
        if not 1 <= piece_bytes <= MAX_PIECE_BYTES:
            raise LocalProtocolError(f"piece_bytes must be within 1 .. {MAX_PIECE_BYTES}")
        if request_id not in self._outstanding:
            return []
        if offset + len(data) >= total:
            self._outstanding.discard(request_id)
        if not data:
            return [(_frame(Piece(request_id, offset, total, b"")), memoryview(b""))]
        view = memoryview(data)
        return [
            encode_frame_parts(
                Piece(request_id, offset + start, total, b""),
                view[start : start + piece_bytes],
                max_frame_bytes=MAX_FRAME_BYTES,
            )
            for start in range(0, len(view), piece_bytes)
        ]

    def refuse(self, request_id: int, code: str) -> bytes:
        """The frame refusing request ``request_id`` with ``code`` (b"" if it was cancelled)."""
        if request_id not in self._outstanding:
            return b""
        self._outstanding.discard(request_id)
        return _frame(Refused(request_id, code))  # type: ignore[arg-type]

    def has_reply(self, request_id: int, held: bool) -> bytes:
        """The frame answering :class:`HasAsked` ``request_id`` (b"" if it was cancelled)."""
        if request_id not in self._outstanding:
            return b""
        self._outstanding.discard(request_id)
        return _frame(HasReply(request_id, held))


# -- client ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockReceived:
    """Request ``id`` for ``digest`` arrived whole (not yet verified). ``data`` is read-only:
    a view into the frame it came in when it came in one piece."""

    id: int
    digest: bytes
    data: memoryview


@dataclass(frozen=True, slots=True)
class BlockRefused:
    """Request ``id`` for ``digest`` was refused with ``code``."""

    id: int
    digest: bytes
    code: str


@dataclass(frozen=True, slots=True)
class HasAnswered:
    """The server answered whether it holds ``digest``."""

    id: int
    digest: bytes
    held: bool


ClientEvent = BlockReceived | BlockRefused | HasAnswered


@dataclass
class _Pending:
    digest: bytes
    max_bytes: int | None  # None: a Has request
    pieces: list[memoryview]  # views into their frames; joined once, when the block is whole
    received: int = 0
    total: int | None = None


class ExchangeClient:
    """The fetching side of one exchange stream (see the module docstring)."""

    def __init__(self) -> None:
        self._decoder: FrameDecoder[ServerMessageView] = FrameDecoder(
            ServerMessageView,  # type: ignore[arg-type]
            max_frame_bytes=MAX_FRAME_BYTES,
            keeps_views=True,
        )
        self._pending: dict[int, _Pending] = {}
        # Cancelled requests whose rest may still come, and how many bytes of it (oldest first).
        self._late_allowance: dict[int, int] = {}
        self._next_id = 0

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered or cancelled."""
        return len(self._pending)

    def _new_id(self) -> int:
        if self._next_id > _MAX_ID:
            raise LocalProtocolError("request ids exhausted on this stream")
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def want(self, digest: bytes, max_bytes: int) -> tuple[int, bytes]:
        """Ask for block ``digest`` of at most ``max_bytes``; returns the request id and frame."""
        request_id = self._new_id()
        self._pending[request_id] = _Pending(digest, max_bytes, [])
        return request_id, _frame(Want(request_id, digest, max_bytes))

    def has(self, digest: bytes) -> tuple[int, bytes]:
        """Ask whether the server holds ``digest``; returns the request id and frame."""
        request_id = self._new_id()
        self._pending[request_id] = _Pending(digest, None, [])
        return request_id, _frame(Has(request_id, digest))

    def cancel(self, request_id: int) -> bytes:
        """Forget request ``request_id``; returns the frame telling the server (b"" if it had
        already been answered). Late replies to it are ignored, up to the bytes it still
        allowed; more is a :class:`RemoteProtocolError` when it arrives."""
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return b""
        allowed = 0 if pending.max_bytes is None else pending.max_bytes - pending.received
        self._late_allowance[request_id] = allowed
        if len(self._late_allowance) > _MAX_CANCELLED_KEPT:
            del self._late_allowance[next(iter(self._late_allowance))]  # the oldest: long over
        return _frame(Cancel(request_id))

    def receive(self, data: bytes | memoryview, *, owned: bool = False) -> list[ClientEvent]:
        """Feed bytes from the server; returns the replies they complete. ``owned``: ``data``
        is a view nobody changes (``QuicStream.receive_buffer``); a piece's bytes are then kept
        as views of it, not copied. Raises :class:`RemoteProtocolError` (see the module
        docstring)."""
        self._decoder.feed(data, owned=owned)
        events: list[ClientEvent] = []
        while (message := self._decoder.next_message()) is not None:
            event = self._handle(message)
            if event is not None:
                events.append(event)
        return events

    def end_of_stream(self) -> None:
        """The server closed its side; raises :class:`RemoteProtocolError` inside a frame."""
        self._decoder.end_of_stream()

    def _late_reply(self, message: ServerMessageView) -> None:
        """A reply to a request no longer pending: the rest of one we cancelled, within what it
        still allowed. Anything else would be bytes for nothing that a peer could send without
        end, and its stream would look busy (review finding: junk for old requests held a
        fetch's requests through the "its bytes keep arriving" rule)."""
        allowed = self._late_allowance.get(message.id)
        if allowed is None:
            raise RemoteProtocolError(f"reply to request {message.id}, which was answered already")
        if not isinstance(message, PieceView):
            del self._late_allowance[message.id]  # a refusal or a has-reply ends it
            return
        data = piece_payload(message)
        allowed -= len(data)
        if allowed < 0:
            raise RemoteProtocolError(f"more bytes for cancelled request {message.id} than it asked for")
        if message.offset + len(data) >= message.total:
            del self._late_allowance[message.id]
        else:
            self._late_allowance[message.id] = allowed

    def _handle(self, message: ServerMessageView) -> ClientEvent | None:
        pending = self._pending.get(message.id)
        if pending is None:
            if message.id >= self._next_id:
                raise RemoteProtocolError(f"reply to request {message.id}, which was never made")
            self._late_reply(message)
            return None
        if isinstance(message, Refused):
            del self._pending[message.id]
            return BlockRefused(message.id, pending.digest, message.code)
        if isinstance(message, HasReply):
            if pending.max_bytes is not None:
                raise RemoteProtocolError(f"a has-reply to block request {message.id}")
            del self._pending[message.id]
            return HasAnswered(message.id, pending.digest, message.held)
        if pending.max_bytes is None:
            raise RemoteProtocolError(f"a piece in reply to has-request {message.id}")
        if message.total > pending.max_bytes:
            raise RemoteProtocolError(f"block of {message.total} bytes; at most {pending.max_bytes} were asked for")
        if pending.total is None:
            pending.total = message.total
        if message.total != pending.total or message.offset != pending.received:
            raise RemoteProtocolError(f"piece of request {message.id} does not continue its block")
        data = piece_payload(message)
        if not self._decoder.last_frame_alone:
            # A view would keep every frame read with this one alive (review finding: 1-byte
            # pieces beside large fillers held 1.2 GiB): keep a copy of the piece alone.
            data = memoryview(bytes(data))
        if message.offset + len(data) > message.total:
            raise RemoteProtocolError(f"piece of request {message.id} runs past its block")
        if not data and message.total:
            # Only an empty block is sent as an empty piece; endless empty pieces of a block
            # would cost a list entry and a turn each, forever (review finding).
            raise RemoteProtocolError(f"empty piece of request {message.id}, a block of {message.total} bytes")
        if len(data) < MIN_PIECE_BYTES and message.offset + len(data) < message.total:
            raise RemoteProtocolError(
                f"a {len(data)}-byte piece inside request {message.id}'s block (at least {MIN_PIECE_BYTES})"
            )
        pending.pieces.append(data)
        pending.received += len(data)
        if pending.received < pending.total:
            return None
        del self._pending[message.id]
        whole = pending.pieces[0] if len(pending.pieces) == 1 else memoryview(b"".join(pending.pieces))
        return BlockReceived(message.id, pending.digest, whole)

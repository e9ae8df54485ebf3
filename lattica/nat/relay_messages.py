"""Relay protocol messages (sans-I/O), after libp2p circuit relay v2's HOP and STOP protocols.

Two stream protocols over authenticated connections (``lattica.net.rpc`` stream handlers):

* ``/lattica/relay/hop/1`` (client -> relay). The first frame decides what the stream is:
  ``Reserve`` makes it the client's *reservation stream*: the relay answers ``Reserved`` (TTL and
  circuit limits) or ``Refused``, and the client renews by sending ``Reserve`` again on the same
  stream before the TTL runs out; the reservation ends when the stream does or expires.
  ``Connect(target)`` asks for a circuit: the relay answers ``Connected(limits)`` once the
  target accepted, or ``Refused``; after ``Connected`` the stream carries circuit frames.
* ``/lattica/relay/stop/1`` (relay -> target, over the target's reserved connection):
  ``StopConnect(source, limits)``; the target answers ``StopAccepted`` or ``Refused``; after
  ``StopAccepted`` the stream carries circuit frames.

Control frames are ``lattica.wire`` frames (u32 length, version, msgpack), at most
:data:`MAX_RELAY_FRAME_BYTES`. Circuit frames are the end-to-end QUIC datagrams, each as a u16
big-endian length and the datagram (1..:data:`MAX_CIRCUIT_DATAGRAM_BYTES` bytes); the relay
forwards them as opaque bytes and never parses them.

Every decoder yields a valid message or a :class:`~lattica.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from typing import Annotated, Final, Literal

import msgspec

from lattica.errors import FrameTooLargeError, MalformedMessageError, RemoteProtocolError
from lattica.identity import PeerId

HOP_PROTOCOL: Final = "/lattica/relay/hop/1"
STOP_PROTOCOL: Final = "/lattica/relay/stop/1"

MAX_RELAY_FRAME_BYTES: Final = 1024
"""Largest control frame either side reads (the largest message is ~200 bytes)."""
MAX_CIRCUIT_DATAGRAM_BYTES: Final = 2048
"""Largest datagram a circuit frame may carry (QUIC sends at most ~1,500-byte datagrams)."""
MAX_REFUSAL_MESSAGE_CHARS: Final = 200

RefusalCode = Literal[
    "service-disabled",
    "resource-limit",
    "too-many-per-peer",
    "no-reservation",
    "connection-failed",
    "permission-denied",
    "malformed",
    "unexpected-message",
]
"""Why a relay (or a target) refused, as circuit relay v2's status codes name them:
``service-disabled`` (this node offers no relay), ``resource-limit`` (a global cap),
``too-many-per-peer`` (a per-peer or per-IP cap), ``no-reservation`` (the target holds none
here), ``connection-failed`` (the target could not be reached or did not answer),
``permission-denied`` (the target refused), ``malformed`` / ``unexpected-message``."""

_PeerIdBytes = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=366 * 24 * 3600.0)]
_ByteCount = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]


class CircuitLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a circuit may carry before the relay closes it."""

    duration_s: _NonNegativeSeconds
    """Seconds from the circuit's opening to its closing."""
    max_bytes: _ByteCount
    """Bytes forwarded in each direction before the circuit is closed."""


class Reserve(msgspec.Struct, frozen=True, tag="reserve", forbid_unknown_fields=True):
    """Ask for (or renew) a reservation: the relay will accept circuits to us."""


class Connect(msgspec.Struct, frozen=True, tag="connect", forbid_unknown_fields=True):
    """Ask for a circuit to ``target``, which must hold a reservation on this relay."""

    target: _PeerIdBytes


class Reserved(msgspec.Struct, frozen=True, tag="reserved", forbid_unknown_fields=True):
    """The reservation holds for ``ttl_s`` seconds from now (relative: clocks differ)."""

    ttl_s: _NonNegativeSeconds
    limits: CircuitLimits


class Connected(msgspec.Struct, frozen=True, tag="connected", forbid_unknown_fields=True):
    """The circuit is open; circuit frames follow on this stream."""

    limits: CircuitLimits


class Refused(msgspec.Struct, frozen=True, tag="refused", forbid_unknown_fields=True):
    """A typed refusal; the stream ends after it."""

    code: RefusalCode
    message: Annotated[str, msgspec.Meta(max_length=MAX_REFUSAL_MESSAGE_CHARS)] = ""


class StopConnect(msgspec.Struct, frozen=True, tag="stop-connect", forbid_unknown_fields=True):
    """The relay tells a target that ``source`` wants a circuit to it."""

    source: _PeerIdBytes
    limits: CircuitLimits


class StopAccepted(msgspec.Struct, frozen=True, tag="stop-accepted", forbid_unknown_fields=True):
    """The target takes the circuit; circuit frames follow on this stream."""


HopMessage = Reserve | Connect | Reserved | Connected | Refused
"""Every frame of the HOP protocol."""
StopMessage = StopConnect | StopAccepted | Refused
"""Every frame of the STOP protocol."""


def refused(code: RefusalCode, message: str) -> Refused:
    """A :class:`Refused` with ``message`` cut to the wire limit."""
    return Refused(code, message[:MAX_REFUSAL_MESSAGE_CHARS])


def peer_id_from_wire(raw: bytes) -> PeerId:
    """The peer id of 32 validated bytes (the decoder checked the length)."""
    return PeerId(raw)


# -- circuit frames ---------------------------------------------------------------------------

_DATAGRAM_LENGTH = struct.Struct(">H")


class CircuitFrameError(RemoteProtocolError):
    """A circuit frame announced an empty or oversize datagram."""


def encode_circuit_frames(datagrams: list[bytes]) -> bytes:
    """Circuit frames for ``datagrams``, in order. Raises ``ValueError`` for an empty or
    oversize datagram (our own QUIC never produces one)."""
    parts: list[bytes] = []
    for datagram in datagrams:
        if not 1 <= len(datagram) <= MAX_CIRCUIT_DATAGRAM_BYTES:
            raise ValueError(f"a circuit datagram is 1..{MAX_CIRCUIT_DATAGRAM_BYTES} bytes, not {len(datagram)}")
        parts.append(_DATAGRAM_LENGTH.pack(len(datagram)))
        parts.append(datagram)
    return b"".join(parts)


class CircuitDecoder:
    """Splits a circuit's byte stream into datagrams. Buffers at most one partial frame
    (< 2 + :data:`MAX_CIRCUIT_DATAGRAM_BYTES` bytes) between calls."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The whole datagrams ``data`` completes. Raises :class:`CircuitFrameError` for a frame
        announcing 0 or more than :data:`MAX_CIRCUIT_DATAGRAM_BYTES` bytes (the circuit must
        then be closed: the stream cannot be resynchronised)."""
        buffer = self._buffer
        buffer += data
        datagrams: list[bytes] = []
        offset = 0
        while len(buffer) - offset >= 2:
            (length,) = _DATAGRAM_LENGTH.unpack_from(buffer, offset)
            if not 1 <= length <= MAX_CIRCUIT_DATAGRAM_BYTES:
                raise CircuitFrameError(f"circuit frame announces a {length}-byte datagram")
            end = offset + 2 + length
            if end > len(buffer):
                break
            datagrams.append(bytes(buffer[offset + 2 : end]))
            offset = end
        del buffer[:offset]
        return datagrams

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def check_control_frame_length(length: int) -> None:
    """Raise :class:`FrameTooLargeError` for a control frame longer than the limit, before its
    body is read; :class:`MalformedMessageError` for an empty one."""
    if length > MAX_RELAY_FRAME_BYTES:
        raise FrameTooLargeError(f"relay frame of {length} bytes; the limit is {MAX_RELAY_FRAME_BYTES}")
    if length < 1:
        raise MalformedMessageError("empty relay frame")

"""AutoNAT wire formats: the ``/lattica/autonat/1`` RPC messages and the dial-back datagrams.

A client asks a server (over an authenticated connection) to dial it back on candidate
addresses (:class:`DialBackRequest`). The server sends :class:`DialBackPacket` datagrams
(kind ``dial-back``, a random nonce) from a *separate ephemeral socket*; the client echoes the
nonce (kind ``echo``) to the datagram's source, and the server answers the RPC with a
:class:`DialBackResponse` naming the address it dialled and the nonce.

Invariants:

* Decoders yield a validated value or :class:`~lattica.errors.MalformedMessageError`
  (:class:`~lattica.errors.FrameTooLargeError` above the size limit); never anything else.
* Addresses are canonical IP literals (:func:`~lattica.nat.identify.checked_address`).
* Dial-back datagrams have the QUIC fixed bit (0x40) clear and can never be valid STUN (the
  bytes where STUN's magic cookie sits start with ``0x4c``, never ``0x21``), so they share the
  node's socket with QUIC and STUN without ambiguity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final, Literal, TypeVar

import msgspec

from lattica.errors import FrameTooLargeError, MalformedMessageError
from lattica.nat.identify import WireAddress, checked_address
from lattica.net.datagram import Address

AUTONAT_PROTOCOL: Final = "/lattica/autonat/1"
MAX_DIAL_BACK_ADDRESSES: Final = 4
NONCE_BYTES: Final = 16
MAX_AUTONAT_MESSAGE_BYTES: Final = 1024

RefusalCode = Literal["third-party-address", "no-address", "rate-limited", "unavailable"]
"""Why a server refuses to dial back: the request names an IP other than the one its
connection comes from; it names none; the requester or the server is over its rate; the
server cannot dial back (no separate socket)."""


class DialBackRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Please dial me back at one of ``addresses`` (each must carry the IP you see me at)."""

    addresses: Annotated[list[WireAddress], msgspec.Meta(min_length=1, max_length=MAX_DIAL_BACK_ADDRESSES)]

    def __post_init__(self) -> None:
        for address in self.addresses:
            checked_address(address)

    def address_list(self) -> list[Address]:
        """The addresses, canonical."""
        return [checked_address(a) for a in self.addresses]


class DialBackResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The server's answer.

    ``status``: ``ok`` (the client echoed the nonce), ``no-echo`` (dialled, no echo before the
    server's timeout) or ``refused`` (``refusal`` says why; nothing was sent)."""

    status: Literal["ok", "no-echo", "refused"]
    address: WireAddress | None = None
    nonce: Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)] | None = None
    refusal: RefusalCode | None = None

    def __post_init__(self) -> None:
        if self.address is not None:
            checked_address(self.address)
        if self.status == "refused":
            if self.refusal is None:
                raise ValueError("a refusal needs a refusal code")
        elif self.address is None or self.nonce is None:
            raise ValueError("a dial-back result needs the address and nonce")


_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[DialBackRequest] = msgspec.msgpack.Decoder(DialBackRequest)
_response_decoder: msgspec.msgpack.Decoder[DialBackResponse] = msgspec.msgpack.Decoder(DialBackResponse)


def encode_autonat(message: DialBackRequest | DialBackResponse) -> bytes:
    """The RPC payload for ``message``."""
    return _encoder.encode(message)


T = TypeVar("T")


def _decode(decoder: msgspec.msgpack.Decoder[T], data: bytes, what: str) -> T:
    if len(data) > MAX_AUTONAT_MESSAGE_BYTES:
        raise FrameTooLargeError(f"AutoNAT {what} of {len(data)} bytes exceeds {MAX_AUTONAT_MESSAGE_BYTES}")
    try:
        return decoder.decode(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessageError(f"bad AutoNAT {what}: {exc}") from None


def decode_dial_back_request(data: bytes) -> DialBackRequest:
    """Decode a client's request; raises ``MalformedMessageError`` / ``FrameTooLargeError``."""
    return _decode(_request_decoder, data, "request")


def decode_dial_back_response(data: bytes) -> DialBackResponse:
    """Decode a server's response; raises ``MalformedMessageError`` / ``FrameTooLargeError``."""
    return _decode(_response_decoder, data, "response")


# -- dial-back datagrams --------------------------------------------------------------------

_MAGIC: Final = b"LDBK"
_KIND_BYTES: Final = {"dial-back": 0x02, "echo": 0x03}
_KINDS: Final = {value: kind for kind, value in _KIND_BYTES.items()}
DIAL_BACK_PACKET_BYTES: Final = 1 + len(_MAGIC) + NONCE_BYTES


@dataclass(frozen=True, slots=True)
class DialBackPacket:
    """A dial-back datagram (server to client) or its echo (client to server)."""

    kind: Literal["dial-back", "echo"]
    nonce: bytes


def is_dial_back_packet(data: bytes) -> bool:
    """Whether ``data`` claims to be a dial-back datagram (its magic is in place)."""
    return len(data) >= 5 and data[0] in _KINDS and data[1:5] == _MAGIC


def encode_dial_back_packet(packet: DialBackPacket) -> bytes:
    """The datagram for ``packet``; raises ``ValueError`` for a nonce of the wrong size."""
    if len(packet.nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
    return bytes([_KIND_BYTES[packet.kind]]) + _MAGIC + packet.nonce


def decode_dial_back_packet(data: bytes) -> DialBackPacket:
    """Decode a dial-back datagram; raises :class:`~lattica.errors.MalformedMessageError`."""
    if len(data) != DIAL_BACK_PACKET_BYTES or not is_dial_back_packet(data):
        raise MalformedMessageError("not a dial-back datagram")
    kind: Literal["dial-back", "echo"] = "dial-back" if data[0] == _KIND_BYTES["dial-back"] else "echo"
    return DialBackPacket(kind, bytes(data[5:]))

"""A sans-I/O STUN codec for the Binding method (RFC 8489), and nothing else.

Rules this module keeps (every decoder input is untrusted):

* :func:`decode_message` returns a :class:`StunMessage` or raises a subclass of
  :class:`StunDecodeError` (a :class:`~lattica.errors.RemoteProtocolError`); nothing else.
* A message is at most :data:`MAX_MESSAGE_BYTES` with at most :data:`MAX_ATTRIBUTES`
  attributes; the header's two top bits are zero, the magic cookie is present and the length
  field is a multiple of 4 that covers the datagram exactly (RFC 8489 section 5).
* Attributes are kept as raw ``(type, value)`` pairs (padding checked, not kept); only
  XOR-MAPPED-ADDRESS is interpreted, by :func:`xor_mapped_address` (section 14.2).
* Unknown comprehension-required attributes (type < 0x8000, section 14) are reported by
  :func:`unknown_comprehension_required`; the caller decides. Lattica's responder drops such a
  request unanswered instead of sending a 420 error (section 6.3.1 says it SHOULD answer 420);
  every Lattica client sends none, and silence costs a stranger more than an answer would.
* No authentication (MESSAGE-INTEGRITY, FINGERPRINT) is produced or checked: an observed
  address is a hint about our NAT, never a proof of anything.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

from lattica.errors import RemoteProtocolError
from lattica.net.datagram import Address

MAGIC_COOKIE = 0x2112A442
"""RFC 8489 section 5: the fixed value in bytes 4..7 of every message."""
HEADER_BYTES = 20
TRANSACTION_ID_BYTES = 12
MAX_MESSAGE_BYTES = 548
"""Upper bound on a message we decode, in bytes (RFC 8489 section 6.1 advises IPv4 messages below
576 bytes including IP and UDP headers; Binding needs far less)."""
MAX_ATTRIBUTES = 16
"""Upper bound on attributes per message we decode."""

BINDING_METHOD = 0x001
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_ERROR_CODE = 0x0009
_COMPREHENSION_REQUIRED_BELOW = 0x8000
_KNOWN_REQUIRED = frozenset({ATTR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS, ATTR_ERROR_CODE})

_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE_HEADER = struct.Struct("!HH")
_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02


class StunDecodeError(RemoteProtocolError):
    """A datagram is not a valid STUN message (its sender's fault)."""


class NotStunError(StunDecodeError):
    """The datagram is too short, has a top bit set, or lacks the magic cookie."""


class StunMessageTooLargeError(StunDecodeError):
    """The message exceeds :data:`MAX_MESSAGE_BYTES` or :data:`MAX_ATTRIBUTES`."""


class MalformedStunError(StunDecodeError):
    """The header is STUN but a length, padding or attribute value is wrong."""


class StunClass(enum.IntEnum):
    """The message class (RFC 8489 section 5), as the two-bit value C1C0."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


@dataclass(frozen=True, slots=True)
class StunMessage:
    """One decoded STUN message. ``attributes`` holds ``(type, value)`` in wire order,
    values without padding."""

    method: int
    message_class: StunClass
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()


def _message_type(method: int, message_class: StunClass) -> int:
    # RFC 8489 section 5: M11..M7 C1 M6..M4 C0 M3..M0.
    c = int(message_class)
    return (
        (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | ((c & 0b01) << 4) | ((c & 0b10) << 7)
    )


def _split_message_type(message_type: int) -> tuple[int, StunClass]:
    method = (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    c = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, StunClass(c)


def encode_message(message: StunMessage) -> bytes:
    """The wire form of ``message`` (attributes padded to 4 bytes).

    Raises ``ValueError`` for a transaction id that is not 12 bytes, a method above 0xFFF, or
    an attribute value above 65535 bytes (a bug on this side, not the peer's).
    """
    if len(message.transaction_id) != TRANSACTION_ID_BYTES:
        raise ValueError("a STUN transaction id is 96 bits (12 bytes)")
    if not 0 <= message.method <= 0xFFF:
        raise ValueError("a STUN method is 12 bits")
    body = bytearray()
    for attribute_type, value in message.attributes:
        if len(value) > 0xFFFF or not 0 <= attribute_type <= 0xFFFF:
            raise ValueError("a STUN attribute type and length are 16 bits")
        body += _ATTRIBUTE_HEADER.pack(attribute_type, len(value)) + value
        body += bytes(-len(value) % 4)
    header = _HEADER.pack(
        _message_type(message.method, message.message_class),
        len(body),
        MAGIC_COOKIE,
        message.transaction_id,
    )
    return header + bytes(body)


def decode_message(data: bytes) -> StunMessage:
    """Decode one STUN message (RFC 8489 sections 5 and 14). Raises :class:`NotStunError`,
    :class:`StunMessageTooLargeError` or :class:`MalformedStunError`; nothing else."""
    if len(data) < HEADER_BYTES:
        raise NotStunError(f"{len(data)} bytes is shorter than a STUN header")
    message_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise NotStunError("the two top bits of a STUN message are zero")
    if cookie != MAGIC_COOKIE:
        raise NotStunError("no STUN magic cookie")
    if len(data) > MAX_MESSAGE_BYTES:
        raise StunMessageTooLargeError(f"{len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if length % 4 or length != len(data) - HEADER_BYTES:
        raise MalformedStunError(f"length field {length} does not match {len(data) - HEADER_BYTES} body bytes")
    attributes: list[tuple[int, bytes]] = []
    offset = HEADER_BYTES
    while offset < len(data):
        if len(attributes) == MAX_ATTRIBUTES:
            raise StunMessageTooLargeError(f"more than {MAX_ATTRIBUTES} attributes")
        if len(data) - offset < _ATTRIBUTE_HEADER.size:
            raise MalformedStunError("truncated attribute header")
        attribute_type, value_length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        start = offset + _ATTRIBUTE_HEADER.size
        end = start + value_length
        padded_end = end + (-value_length % 4)
        if padded_end > len(data):
            raise MalformedStunError(f"attribute 0x{attribute_type:04x} runs past the message")
        attributes.append((attribute_type, bytes(data[start:end])))
        offset = padded_end
    method, message_class = _split_message_type(message_type)
    return StunMessage(method, message_class, bytes(transaction_id), tuple(attributes))


def unknown_comprehension_required(message: StunMessage) -> list[int]:
    """Attribute types in ``message`` that are comprehension-required (below 0x8000, RFC 8489
    section 14) and not understood by this codec."""
    return [t for t, _ in message.attributes if t < _COMPREHENSION_REQUIRED_BELOW and t not in _KNOWN_REQUIRED]


def encode_binding_request(transaction_id: bytes) -> bytes:
    """A Binding request with no attributes (20 bytes; RFC 8489 section 6.1)."""
    return encode_message(StunMessage(BINDING_METHOD, StunClass.REQUEST, transaction_id))


def new_transaction_id(random_bytes: Callable[[int], bytes]) -> bytes:
    """A 96-bit transaction id from ``random_bytes`` (``os.urandom`` or ``Random.randbytes``).

    RFC 8489 section 5 wants it cryptographically random in production: it is all that stops an
    off-path sender forging our observed address."""
    transaction_id = random_bytes(TRANSACTION_ID_BYTES)
    if len(transaction_id) != TRANSACTION_ID_BYTES:
        raise ValueError("random_bytes returned the wrong number of bytes")
    return transaction_id


def encode_xor_mapped_address(address: Address, transaction_id: bytes) -> bytes:
    """The value of an XOR-MAPPED-ADDRESS attribute for an IP literal ``address``
    (RFC 8489 section 14.2). Raises ``ValueError`` for a host that is not an IP literal."""
    host, port = address
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    mask = MAGIC_COOKIE.to_bytes(4) + transaction_id
    family = _FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6
    packed = bytes(a ^ b for a, b in zip(ip.packed, mask, strict=False))
    return struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + packed


def xor_mapped_address(message: StunMessage) -> Address | None:
    """The address in the first XOR-MAPPED-ADDRESS attribute of ``message`` as ``(host, port)``
    with canonical host text, or ``None`` if there is none. Raises :class:`MalformedStunError`
    for a value of the wrong family or length (RFC 8489 section 14.2)."""
    for attribute_type, value in message.attributes:
        if attribute_type != ATTR_XOR_MAPPED_ADDRESS:
            continue
        if len(value) < 4:
            raise MalformedStunError("XOR-MAPPED-ADDRESS shorter than 4 bytes")
        family, xport = value[1], int.from_bytes(value[2:4])
        expected = {_FAMILY_IPV4: 8, _FAMILY_IPV6: 20}.get(family)
        if expected is None or len(value) != expected:
            raise MalformedStunError(f"XOR-MAPPED-ADDRESS family {family} with {len(value)} bytes")
        mask = MAGIC_COOKIE.to_bytes(4) + message.transaction_id
        packed = bytes(a ^ b for a, b in zip(value[4:], mask, strict=False))
        ip = ipaddress.ip_address(packed)
        return str(ip), xport ^ (MAGIC_COOKIE >> 16)
    return None


def encode_binding_success(transaction_id: bytes, mapped: Address) -> bytes:
    """A Binding success response carrying ``mapped`` in XOR-MAPPED-ADDRESS: 32 bytes for IPv4,
    44 for IPv6 (at most 24 bytes more than the 20-byte request it answers)."""
    value = encode_xor_mapped_address(mapped, transaction_id)
    attributes = ((ATTR_XOR_MAPPED_ADDRESS, value),)
    return encode_message(StunMessage(BINDING_METHOD, StunClass.SUCCESS, transaction_id, attributes))


def error_code(message: StunMessage) -> int | None:
    """The number in the first ERROR-CODE attribute (RFC 8489 section 14.8; e.g. 420), or
    ``None`` if absent. Raises :class:`MalformedStunError` for a value shorter than 4 bytes."""
    for attribute_type, value in message.attributes:
        if attribute_type == ATTR_ERROR_CODE:
            if len(value) < 4:
                raise MalformedStunError("ERROR-CODE shorter than 4 bytes")
            return (value[2] & 0x07) * 100 + value[3]
    return None

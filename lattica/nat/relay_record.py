"""The relayed-address record: how a node behind a NAT is found through the DHT.

A node that holds relay reservations publishes its relayed addresses
(``RELAYPEERID@HOST:PORT/relay/OURPEERID``) as a DHT record under :data:`RELAYED_ADDRESSES_KEY`
in its own namespace: the DHT signs it with the node's key, so a reader that asks for the
record of writer ``P`` gets only what ``P`` signed. (Such a node runs the DHT as a client and is
in nobody's routing table, so ``find_peer`` cannot find it; this record is what libp2p's signed
peer records with ``/p2p-circuit`` addresses do.)

Decoding is strict because the value comes from the network: a msgpack list of at most
:data:`MAX_RELAYED_ADDRESSES` strings, each a relayed address whose relay host is an IP literal
(:func:`~lattica.net.address.network_address`: no name is ever resolved) and whose target is the
record's writer.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from lattica.errors import RemoteProtocolError
from lattica.identity import PeerId
from lattica.nat.relay_address import RelayedAddr
from lattica.net.address import InvalidAddressError, network_address

RELAYED_ADDRESSES_KEY: Final = b"/lattica/relayed-addresses/1"
"""The DHT key (in the writer's namespace) of a node's relayed addresses."""

MAX_RELAYED_ADDRESSES: Final = 8
MAX_RELAYED_ADDRESS_CHARS: Final = 256
MAX_RECORD_BYTES: Final = 4096

_Entries = Annotated[
    list[Annotated[str, msgspec.Meta(max_length=MAX_RELAYED_ADDRESS_CHARS)]],
    msgspec.Meta(max_length=MAX_RELAYED_ADDRESSES),
]
_decoder = msgspec.msgpack.Decoder(_Entries)
_encoder = msgspec.msgpack.Encoder()


class RelayRecordDecodeError(RemoteProtocolError):
    """A relayed-address record that is malformed, too large, or names a bad address."""


def encode_relayed_addresses(addresses: list[RelayedAddr]) -> bytes:
    """The record value for ``addresses`` (the first :data:`MAX_RELAYED_ADDRESSES`)."""
    return _encoder.encode([str(a) for a in addresses[:MAX_RELAYED_ADDRESSES]])


def decode_relayed_addresses(data: bytes, writer: PeerId) -> list[RelayedAddr]:
    """The relayed addresses in a record ``writer`` signed.

    Raises :class:`RelayRecordDecodeError` for anything but a list of relayed addresses of
    ``writer`` through relays at IP literals."""
    if len(data) > MAX_RECORD_BYTES:
        raise RelayRecordDecodeError(f"relayed-address record of {len(data)} bytes (limit {MAX_RECORD_BYTES})")
    try:
        entries = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise RelayRecordDecodeError(f"bad relayed-address record: {exc}") from None
    addresses: list[RelayedAddr] = []
    for text in entries:
        try:
            address = RelayedAddr.parse(text)
            network_address(*address.relay.address)
        except InvalidAddressError as exc:
            raise RelayRecordDecodeError(f"bad relayed address in a record: {exc}") from None
        if address.target != writer:
            raise RelayRecordDecodeError(f"a record of {writer} names another target: {address.target}")
        if address not in addresses:
            addresses.append(address)
    return addresses

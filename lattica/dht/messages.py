"""The DHT wire protocol: one RPC protocol id, a tagged union of requests and responses.

Every request and response names its sender (peer id, listen addresses, and whether it runs in
client mode). For requests, the transport has already authenticated the sender's peer id in the
QUIC handshake, and the receiver rejects a request whose claimed id differs. Receivers never add
a sender in client mode to their routing tables.

Invariants:

* Decoding yields a fully validated message or :class:`~lattica.errors.MalformedMessageError`
  (or :class:`~lattica.errors.FrameTooLargeError` above :data:`MAX_MESSAGE_BYTES`).
* Every address (a peer's or a provider record's) is an IP literal with a port in 1..65535
  (:func:`~lattica.dht.records.is_dialable_address`); a message holding any other is malformed
  as a whole (it is one peer's answer; dropping entries silently would hide a lying peer), so
  nothing from it is stored, handed to the transport or passed on.
* Lists are bounded: at most :data:`MAX_CLOSER_PEERS` closer peers, :data:`MAX_PROVIDERS`
  provider records, :data:`~lattica.dht.records.MAX_ADDRESSES_PER_PEER` addresses per peer;
  values at most :data:`~lattica.dht.records.MAX_VALUE_BYTES`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from lattica.dht.records import (
    MAX_ADDRESSES_PER_PEER,
    AddressList,
    Key32,
    ProviderRecord,
    SignedRecord,
    is_dialable_address,
)
from lattica.errors import FrameTooLargeError, MalformedMessageError
from lattica.identity import PeerId
from lattica.net.datagram import Address

PROTOCOL_ID = "/lattica/kad/1.0.0"
MAX_CLOSER_PEERS = 32
MAX_PROVIDERS = 64
MAX_MESSAGE_BYTES = 256 * 1024
MAX_REASON_CHARS = 256


class PeerInfo(msgspec.Struct, frozen=True):
    """A peer and where it can be dialled (claims of the sender; dialling verifies the id)."""

    peer_id: Key32
    addresses: AddressList

    def __post_init__(self) -> None:
        # Runs on decode too: msgspec turns this ValueError into a ValidationError.
        for host, port in self.addresses:
            if not is_dialable_address(host, port):
                raise ValueError(f"bad peer address {host[:64]!r}:{port} (an IP literal and a port 1..65535)")

    @classmethod
    def of(cls, peer: PeerId, addresses: list[Address]) -> PeerInfo:
        """Build from a :class:`PeerId` and addresses (extra and non-IP-literal ones are dropped)."""
        valid = [(str(h), int(p)) for h, p in addresses if is_dialable_address(str(h), int(p))]
        return cls(peer.key, valid[:MAX_ADDRESSES_PER_PEER])

    def address_list(self) -> list[Address]:
        """The addresses as ``(host, port)`` tuples."""
        return [(host, port) for host, port in self.addresses]


CloserPeers = Annotated[list[PeerInfo], msgspec.Meta(max_length=MAX_CLOSER_PEERS)]


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    sender: PeerInfo
    client: bool = False


# --- requests ---------------------------------------------------------------------------------


class Ping(_Message, frozen=True, tag="ping"):
    """Liveness check; answered with :class:`Pong`."""


class FindNode(_Message, frozen=True, tag="find_node"):
    """Ask for the peers closest to ``target``; answered with :class:`Nodes`."""

    target: Key32


class GetValue(_Message, frozen=True, tag="get_value"):
    """Ask for the record at ``key`` and closer peers; answered with :class:`Value`."""

    key: Key32


class PutValue(_Message, frozen=True, tag="put_value"):
    """Offer a signed record for storage; answered with :class:`Ack`."""

    record: SignedRecord


class AddProvider(_Message, frozen=True, tag="add_provider"):
    """Announce a provider record (the sender must be the provider); answered with :class:`Ack`."""

    record: ProviderRecord


class GetProviders(_Message, frozen=True, tag="get_providers"):
    """Ask for providers stored at ``key`` and closer peers; answered with :class:`Providers`."""

    key: Key32


Request = Ping | FindNode | GetValue | PutValue | AddProvider | GetProviders

# --- responses --------------------------------------------------------------------------------


class Pong(_Message, frozen=True, tag="pong"):
    """Answer to :class:`Ping`."""


class Nodes(_Message, frozen=True, tag="nodes"):
    """Answer to :class:`FindNode`: the responder's closest known peers to the target."""

    closer: CloserPeers = []


class Value(_Message, frozen=True, tag="value"):
    """Answer to :class:`GetValue`: the record if held, and closer peers."""

    record: SignedRecord | None = None
    closer: CloserPeers = []


class Providers(_Message, frozen=True, tag="providers"):
    """Answer to :class:`GetProviders`: provider records held, and closer peers."""

    providers: Annotated[list[ProviderRecord], msgspec.Meta(max_length=MAX_PROVIDERS)] = []
    closer: CloserPeers = []


class Ack(_Message, frozen=True, tag="ack"):
    """Answer to :class:`PutValue` / :class:`AddProvider`: ``stored`` or why not.

    A :class:`PutValue` refused as stale carries the record the responder holds in ``held``
    (signed by the same writer): a writer that lost its state learns from it which sequence
    number to beat, and can verify it, which a bare number would not allow (a liar could make
    the writer jump to the largest sequence number and exhaust its namespace).
    """

    stored: bool
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)] = ""
    held: SignedRecord | None = None


class Error(_Message, frozen=True, tag="error"):
    """The request could not be understood or served (``code``: ``malformed``, ``bad-sender``)."""

    code: Annotated[str, msgspec.Meta(max_length=64)]
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)] = ""


Response = Pong | Nodes | Value | Providers | Ack | Error

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_response_decoder: msgspec.msgpack.Decoder[Response] = msgspec.msgpack.Decoder(Response)


def encode_message(message: Request | Response) -> bytes:
    """Encode a request or response as an RPC payload."""
    return _encoder.encode(message)


def _check_size(data: bytes) -> None:
    if len(data) > MAX_MESSAGE_BYTES:
        raise FrameTooLargeError(f"DHT message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")


def _check_provider_addresses(records: list[ProviderRecord]) -> None:
    for record in records:
        for host, port in record.addresses:
            if not is_dialable_address(host, port):
                raise MalformedMessageError(f"provider record with bad address {host[:64]!r}:{port}")


def decode_request(data: bytes) -> Request:
    """Decode a request payload; raises :class:`MalformedMessageError`/:class:`FrameTooLargeError`."""
    _check_size(data)
    try:
        request = _request_decoder.decode(data)
    except (ValueError, RecursionError) as exc:  # msgspec errors, UnicodeDecodeError it leaks, deep nesting
        raise MalformedMessageError(f"bad DHT request: {exc}") from exc
    if isinstance(request, AddProvider):
        _check_provider_addresses([request.record])
    return request


def decode_response(data: bytes) -> Response:
    """Decode a response payload; raises :class:`MalformedMessageError`/:class:`FrameTooLargeError`."""
    _check_size(data)
    try:
        response = _response_decoder.decode(data)
    except (ValueError, RecursionError) as exc:  # msgspec errors, UnicodeDecodeError it leaks, deep nesting
        raise MalformedMessageError(f"bad DHT response: {exc}") from exc
    if isinstance(response, Providers):
        _check_provider_addresses(response.providers)
    return response

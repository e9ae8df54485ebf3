"""Identify (like libp2p identify): what two peers tell each other on every new connection.

Each side sends one :class:`IdentifyMessage`: its listen addresses, the protocol ids it serves,
its agent version, and the address it sees the *other* side at (the connection's remote address:
the other side's observed, server-reflexive address). The dialler sends its message as the
request of ``/lattica/identify/1`` and the listener answers with its own, so one round trip
informs both.

Invariants:

* Decoding yields a fully validated message or :class:`~lattica.errors.MalformedMessageError`
  (:class:`~lattica.errors.FrameTooLargeError` above :data:`MAX_IDENTIFY_BYTES`); deep nesting
  is a malformed message, never a ``RecursionError``.
* Every address is a canonical IP literal with a port in 1..65535
  (:func:`~lattica.net.address.network_address`); names are never accepted. A message with a
  bad address is malformed as a whole.
* Lists and strings are bounded: :data:`MAX_LISTEN_ADDRESSES` addresses,
  :data:`MAX_PROTOCOLS` protocol ids of at most 256 characters, an agent version of at most
  :data:`MAX_AGENT_VERSION_CHARS`.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from lattica.errors import FrameTooLargeError, MalformedMessageError
from lattica.net.address import InvalidAddressError, network_address
from lattica.net.datagram import Address

IDENTIFY_PROTOCOL: Final = "/lattica/identify/1"
MAX_LISTEN_ADDRESSES: Final = 16
MAX_PROTOCOLS: Final = 64
MAX_PROTOCOL_ID_CHARS: Final = 256
MAX_AGENT_VERSION_CHARS: Final = 128
MAX_IDENTIFY_BYTES: Final = 16 * 1024

WireHost = Annotated[str, msgspec.Meta(min_length=1, max_length=45)]
WirePort = Annotated[int, msgspec.Meta(ge=1, le=65535)]
WireAddress = tuple[WireHost, WirePort]
"""An address on the wire: ``[host, port]``, checked further with ``network_address``."""


def checked_address(address: WireAddress) -> Address:
    """``address`` in canonical form; raises ``ValueError`` (msgspec turns it into a
    validation error when raised from ``__post_init__``) for anything but an IP literal."""
    try:
        return network_address(*address)
    except InvalidAddressError as exc:
        raise ValueError(str(exc)) from None


class IdentifyMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One side's identify message (see the module docstring)."""

    listen_addresses: Annotated[list[WireAddress], msgspec.Meta(max_length=MAX_LISTEN_ADDRESSES)]
    """Addresses the sender says it listens on (claims: only dialling proves them)."""
    protocols: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PROTOCOL_ID_CHARS)]],
        msgspec.Meta(max_length=MAX_PROTOCOLS),
    ]
    """Protocol ids the sender serves. A node in DHT client mode leaves out the DHT's."""
    agent_version: Annotated[str, msgspec.Meta(max_length=MAX_AGENT_VERSION_CHARS)]
    observed_address: WireAddress | None
    """Where the sender sees the receiver's packets come from (None if it cannot say)."""

    def __post_init__(self) -> None:
        # Runs on decode too: a ValueError here becomes a msgspec ValidationError.
        for address in self.listen_addresses:
            checked_address(address)
        if self.observed_address is not None:
            checked_address(self.observed_address)

    def listen_address_list(self) -> list[Address]:
        """The listen addresses, canonical."""
        return [checked_address(a) for a in self.listen_addresses]

    def observed(self) -> Address | None:
        """The observed address, canonical, or None."""
        return None if self.observed_address is None else checked_address(self.observed_address)


_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[IdentifyMessage] = msgspec.msgpack.Decoder(IdentifyMessage)


def build_identify(
    *,
    listen_addresses: list[Address],
    protocols: list[str],
    agent_version: str,
    observed_address: Address | None,
) -> IdentifyMessage:
    """Our message, trimmed to the limits (addresses that are not IP literals are left out).

    Raises ``ValueError`` if ``observed_address`` is not a dialable IP literal address."""
    listen: list[WireAddress] = []
    for host, port in listen_addresses:
        try:
            listen.append(network_address(host, port))
        except InvalidAddressError:
            continue
    return IdentifyMessage(
        listen_addresses=listen[:MAX_LISTEN_ADDRESSES],
        protocols=[p for p in protocols if 1 <= len(p) <= MAX_PROTOCOL_ID_CHARS][:MAX_PROTOCOLS],
        agent_version=agent_version[:MAX_AGENT_VERSION_CHARS],
        observed_address=None if observed_address is None else network_address(*observed_address),
    )


def encode_identify(message: IdentifyMessage) -> bytes:
    """The RPC payload for ``message``."""
    return _encoder.encode(message)


def decode_identify(data: bytes) -> IdentifyMessage:
    """Decode a peer's identify payload.

    Raises :class:`~lattica.errors.FrameTooLargeError` above :data:`MAX_IDENTIFY_BYTES`,
    :class:`~lattica.errors.MalformedMessageError` for anything else that is not a valid message.
    """
    if len(data) > MAX_IDENTIFY_BYTES:
        raise FrameTooLargeError(f"identify message of {len(data)} bytes exceeds {MAX_IDENTIFY_BYTES}")
    try:
        return _decoder.decode(data)
    except (ValueError, RecursionError) as exc:  # msgspec errors, UnicodeDecodeError, deep nesting
        raise MalformedMessageError(f"bad identify message: {exc}") from None

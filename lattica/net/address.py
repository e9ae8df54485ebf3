"""Dialable addresses: ``HOST:PORT``, ``[V6]:PORT`` and ``PEERID@HOST:PORT``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from lattica.errors import InvalidPeerIdError
from lattica.identity import PeerId
from lattica.net.datagram import Address


class InvalidAddressError(ValueError):
    """A dial string could not be parsed."""


# An unbracketed host is an IPv4 address or a DNS name (IDNs in their ASCII "xn--" form).
_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]+")


def parse_host_port(text: str) -> Address:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``; raises :class:`InvalidAddressError`."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise InvalidAddressError(f"expected [IPV6]:PORT, got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidAddressError(f"expected [IPV6]:PORT, got {text!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not _HOST_CHARS.fullmatch(host):
            raise InvalidAddressError(f"expected HOST:PORT, got {text!r}")
    # int() would also accept "+80", "8_0", " 80" and non-ASCII digits; a port is ASCII digits.
    if not (port_text.isascii() and port_text.isdigit()):
        raise InvalidAddressError(f"bad port in {text!r}")
    port = int(port_text)
    if port > 65535:
        raise InvalidAddressError(f"port out of range in {text!r}")
    return host, port


def format_host_port(address: Address) -> str:
    """The text form of an address, bracketing IPv6 hosts."""
    host, port = address
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class PeerAddr:
    """Where to dial, and optionally who must answer there."""

    address: Address
    peer_id: PeerId | None = None

    @classmethod
    def parse(cls, text: str) -> PeerAddr:
        """Parse ``PEERID@HOST:PORT`` or ``HOST:PORT``; raises :class:`InvalidAddressError`."""
        peer_id: PeerId | None = None
        if "@" in text:
            peer_text, _, rest = text.partition("@")
            try:
                peer_id = PeerId.parse(peer_text)
            except InvalidPeerIdError as exc:
                raise InvalidAddressError(f"bad peer id in {text!r}: {exc}") from None
            text = rest
        return cls(parse_host_port(text), peer_id)

    def __str__(self) -> str:
        hp = format_host_port(self.address)
        return f"{self.peer_id}@{hp}" if self.peer_id else hp

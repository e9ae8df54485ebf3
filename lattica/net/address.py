"""Addresses: dial strings a user writes, and addresses that arrive from the network.

Two entry points with different trust:

* :meth:`PeerAddr.parse` / :func:`parse_host_port` read what a *user* wrote: ``HOST:PORT``,
  ``[V6]:PORT`` and ``PEERID@HOST:PORT``. A host is an IP literal or a DNS name. Names are
  accepted (as libp2p's ``/dns`` addresses and iroh's relay URLs are) and resolved by the
  connection manager with trio's asynchronous ``getaddrinfo`` when dialled, never by the
  kernel's synchronous resolution inside ``sendto``. Anything that is neither a valid IP literal
  nor a valid DNS name (legacy numeric forms such as ``127.1`` or ``0x7f000001``, which
  ``getaddrinfo`` would silently turn into an address) is refused here, at parse time.
* :func:`network_address` checks a ``(host, port)`` that a *peer* sent us (DHT answers,
  sender info): an IP literal only, never a name (a name from the network would make us query
  a resolver on a stranger's behalf), a port in 1..65535, and returns its canonical text form,
  so two spellings of one address compare equal. Decoders call it at decode time.

Invariant: every address the connection manager hands to the endpoint has passed
:func:`network_address` (canonical IP literal, port 1..65535).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from lattica.errors import InvalidPeerIdError, LatticaError
from lattica.identity import PeerId
from lattica.net.datagram import Address


class InvalidAddressError(LatticaError, ValueError):
    """An address (a dial string, or a host/port a peer sent) is not acceptable."""


# An unbracketed host is an IPv4 address or a DNS name (IDNs in their ASCII "xn--" form).
_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# WHATWG URL's "ends in a number": a last label like this makes getaddrinfo (inet_aton) read the
# whole name as a legacy IPv4 form, so "127.1" or "0x7f.1" would silently dial 127.0.0.1.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_MAX_DNS_NAME_CHARS = 253


def parse_host_port(text: str) -> Address:
    """Parse ``HOST:PORT`` or ``[V6]:PORT`` (port 0..65535, so it also reads listen addresses).

    Raises :class:`InvalidAddressError`.
    """
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
        if sep and ":" in host:
            raise InvalidAddressError(f"an IPv6 address needs brackets: [IPV6]:PORT, got {text!r}")
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


def canonical_ip(host: str) -> str | None:
    """The canonical text of an IP literal (IPv4-mapped IPv6 as plain IPv4, IPv6 compressed,
    no zone), or ``None`` if ``host`` is not one (a name, a zone id, anything else)."""
    if not isinstance(host, str) or not host or len(host) > 45 or "%" in host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def address_group(host: str, *, ipv6_prefix_bits: int) -> str:
    """The group an address counts in for per-source limits: an IPv4 address (IPv4-mapped IPv6
    as plain IPv4), or the IPv6 ``/ipv6_prefix_bits`` network (text), since one host or site is
    routinely given a whole IPv6 prefix (RFC 4291 section 2.5.1).

    ``host`` should be an IP literal (a connection's remote address); anything else is its own
    group by its text (emulated or unusual addresses still count once each)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix_bits), strict=False))
    return str(ip)


def is_dns_name(host: str) -> bool:
    """Whether ``host`` is a syntactically valid DNS name that cannot be read as an IP address
    (RFC 1123 labels; the last label not numeric). A trailing root dot is allowed."""
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > _MAX_DNS_NAME_CHARS:
        return False
    labels = name.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return False
    return not _NUMERIC_LABEL.fullmatch(labels[-1])


def dialable_port(port: object) -> int:
    """``port`` if it is an int in 1..65535; raises :class:`InvalidAddressError` otherwise."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidAddressError(f"port must be an integer in 1..65535, got {port!r:.20}")
    return port


def network_address(host: object, port: object) -> Address:
    """Validate a ``(host, port)`` that arrived from the network; return it canonical.

    ``host`` must be an IP literal (no names, no zone ids) that can be a unicast destination
    (not ``0.0.0.0``/``::``, multicast or the IPv4 broadcast address); ``port`` an int in
    1..65535. IPv4-mapped IPv6 comes back as plain IPv4. Raises :class:`InvalidAddressError`
    (a DHT decoder turns it into its own malformed-message error).
    """
    port = dialable_port(port)
    canonical = canonical_ip(host) if isinstance(host, str) else None
    if canonical is None:
        raise InvalidAddressError(f"host must be an IP address literal, got {host!r:.80}")
    ip = ipaddress.ip_address(canonical)
    if ip.is_unspecified or ip.is_multicast or canonical == "255.255.255.255":
        raise InvalidAddressError(f"{canonical} is not a unicast destination")
    return canonical, port


def family_mismatch(local_host: str, remote_host: str) -> str | None:
    """Why a socket bound to ``local_host`` cannot send to IP literal ``remote_host``, or ``None``.

    A socket bound to ``::`` is dual-stack (see :class:`~lattica.net.datagram.UdpSocket`) and
    reaches both families; one bound to an IPv4 address (or ``0.0.0.0``) reaches only IPv4, one
    bound to a specific IPv6 address only IPv6.
    """
    try:
        local = ipaddress.ip_address(local_host.partition("%")[0])
        remote = ipaddress.ip_address(remote_host)
    except ValueError:
        return None  # not IP literals (an emulated socket names itself as it likes)
    if local.version == remote.version or (local.version == 6 and local.is_unspecified):
        return None
    family = "IPv4" if local.version == 4 else "IPv6"
    return (
        f"this node's socket is {family}-only (bound to {local_host}) and cannot reach "
        f"IPv{remote.version} address {remote_host}; listen on [::] to reach both families"
    )


@dataclass(frozen=True, slots=True)
class PeerAddr:
    """Where to dial, and optionally who must answer there."""

    address: Address
    peer_id: PeerId | None = None

    @classmethod
    def parse(cls, text: str) -> PeerAddr:
        """Parse ``PEERID@HOST:PORT`` or ``HOST:PORT`` for dialling.

        The host is an IP literal (no zone id: a link-local reply could not be routed back) or
        a DNS name (resolved asynchronously when dialled); the port is 1..65535.
        Raises :class:`InvalidAddressError` with a message that says what is wrong.
        """
        peer_id: PeerId | None = None
        if "@" in text:
            peer_text, _, rest = text.partition("@")
            try:
                peer_id = PeerId.parse(peer_text)
            except InvalidPeerIdError as exc:
                raise InvalidAddressError(f"bad peer id in {text!r}: {exc}") from None
            text = rest
        host, port = parse_host_port(text)
        if port == 0:
            raise InvalidAddressError(f"port 0 cannot be dialled in {text.strip()!r}")
        if "%" in host:
            raise InvalidAddressError(
                f"IPv6 zone ids are not supported in dial addresses: {text.strip()!r}"
            )
        if canonical_ip(host) is None and not is_dns_name(host):
            raise InvalidAddressError(
                f"{host!r} is neither an IP address nor a valid DNS name in {text.strip()!r}"
            )
        return cls((host, port), peer_id)

    def __str__(self) -> str:
        hp = format_host_port(self.address)
        return f"{self.peer_id}@{hp}" if self.peer_id else hp

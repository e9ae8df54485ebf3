"""Local interface addresses, to turn a wildcard listen address into dialable ones."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915


def ipv4_interface_addresses() -> list[str]:
    """IPv4 addresses of the up interfaces (Linux ioctl; loopback last); never sends a packet."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            found.append(socket.inet_ntoa(reply[20:24]))
    return sorted(set(found), key=lambda a: (ipaddress.ip_address(a).is_loopback, a))


def dialable_hosts(bound_host: str) -> list[str]:
    """The hosts peers can dial for a socket bound to ``bound_host``."""
    if bound_host in ("0.0.0.0", ""):
        return ipv4_interface_addresses() or ["127.0.0.1"]
    if bound_host == "::":
        return ["::1", *ipv4_interface_addresses()]
    return [bound_host]

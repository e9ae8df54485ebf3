"""Specification of lattica.net.address: ``HOST:PORT``, ``[V6]:PORT``, ``PEERID@HOST:PORT``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.identity import Identity, PeerId
from lattica.net.address import (
    InvalidAddressError,
    PeerAddr,
    address_group,
    canonical_ip,
    family_mismatch,
    format_host_port,
    network_address,
    parse_host_port,
)

deterministic = settings(derandomize=True, max_examples=200, deadline=None, database=None)

PEER = Identity.from_seed(bytes(range(32))).peer_id
ports = st.integers(min_value=0, max_value=65535)
dial_ports = st.integers(min_value=1, max_value=65535)  # port 0 cannot be dialled
hostnames = st.from_regex(r"\A[a-z]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){0,2}\Z")
ipv4_hosts = st.ip_addresses(v=4).map(str)
ipv6_hosts = st.ip_addresses(v=6).map(str)
hosts = st.one_of(ipv4_hosts, ipv6_hosts, hostnames)


# --- HOST:PORT --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4001", ("127.0.0.1", 4001)),
        ("example.org:80", ("example.org", 80)),
        ("localhost:0", ("localhost", 0)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        ("[::1]:4001", ("::1", 4001)),
        ("[2001:db8::42]:443", ("2001:db8::42", 443)),
        ("[::ffff:10.0.0.1]:53", ("::ffff:10.0.0.1", 53)),
        ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
        ("  127.0.0.1:4001\n", ("127.0.0.1", 4001)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:65536",
        "127.0.0.1:99999999999999999999",
        "127.0.0.1:-1",
        "127.0.0.1:+80",
        "127.0.0.1:8_0",
        "127.0.0.1: 80",
        "127.0.0.1:0x50",
        "127.0.0.1:80.0",
        "127.0.0.1:http",
        "127.0.0.1:٨٠",  # Arabic-Indic digits: int() accepts them, a port does not
        "[::1]:65536",
        "[::1]:-1",
        "[::1]:80x",
    ],
)
def test_bad_ports_are_rejected(text: str) -> None:
    with pytest.raises(InvalidAddressError):
        parse_host_port(text)


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1", "example.org", "127.0.0.1:", "[::1]", "[::1]:", "[::1]80", "", "   "],
)
def test_a_missing_port_is_rejected(text: str) -> None:
    with pytest.raises(InvalidAddressError):
        parse_host_port(text)


@pytest.mark.parametrize(
    "text",
    [
        ":4001",
        "::1:4001",  # a bare IPv6 host is ambiguous: brackets are required
        "2001:db8::1:80",
        "[::1:4001",
        "[]:4001",
        "[127.0.0.1]:4001",
        "[example.org]:4001",
        "[::1]x:4001",
        "user@example.org:4001",
        "exa mple.org:4001",
        "example.org/path:4001",
    ],
)
def test_a_bad_host_is_rejected(text: str) -> None:
    with pytest.raises(InvalidAddressError):
        parse_host_port(text)


def test_invalid_address_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_host_port("nope")


@deterministic
@given(st.text(max_size=30) | st.from_regex(r"\A\[?[0-9a-f:.]{0,12}\]?:[0-9+_ -]{0,7}\Z"))
def test_parse_returns_a_valid_address_or_raises_invalid_address(text: str) -> None:
    try:
        host, port = parse_host_port(text)
    except InvalidAddressError:
        return
    assert isinstance(host, str)
    assert host
    assert 0 <= port <= 65535
    assert parse_host_port(format_host_port((host, port))) == (host, port)


# --- Formatting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (("127.0.0.1", 4001), "127.0.0.1:4001"),
        (("example.org", 80), "example.org:80"),
        (("::1", 4001), "[::1]:4001"),
        (("2001:db8::42", 443), "[2001:db8::42]:443"),
    ],
)
def test_format_host_port_brackets_only_ipv6(address: tuple[str, int], text: str) -> None:
    assert format_host_port(address) == text


@deterministic
@given(hosts, ports)
def test_format_then_parse_round_trips(host: str, port: int) -> None:
    assert parse_host_port(format_host_port((host, port))) == (host, port)


# --- PEERID@HOST:PORT -------------------------------------------------------------------------


def test_peer_addr_with_a_peer_id() -> None:
    parsed = PeerAddr.parse(f"{PEER}@127.0.0.1:4001")
    assert parsed == PeerAddr(("127.0.0.1", 4001), PEER)


def test_peer_addr_with_a_peer_id_and_ipv6() -> None:
    parsed = PeerAddr.parse(f"{PEER}@[::1]:4001")
    assert parsed == PeerAddr(("::1", 4001), PEER)


def test_peer_addr_without_a_peer_id() -> None:
    assert PeerAddr.parse("127.0.0.1:4001") == PeerAddr(("127.0.0.1", 4001), None)


@pytest.mark.parametrize(
    "peer_text",
    [
        pytest.param("", id="empty"),
        pytest.param("not-a-peer-id", id="garbage"),
        pytest.param(str(PEER).upper(), id="uppercase"),
        pytest.param(str(PEER)[:-1], id="too-short"),
        pytest.param(str(PEER)[:-1] + "b", id="non-canonical"),
    ],
)
def test_a_bad_peer_id_is_an_invalid_address(peer_text: str) -> None:
    with pytest.raises(InvalidAddressError):
        PeerAddr.parse(f"{peer_text}@127.0.0.1:4001")


@pytest.mark.parametrize("host_port", ["127.0.0.1", "127.0.0.1:70000", "[::1]", ""])
def test_a_bad_address_after_a_good_peer_id_is_an_invalid_address(host_port: str) -> None:
    with pytest.raises(InvalidAddressError):
        PeerAddr.parse(f"{PEER}@{host_port}")


def test_a_second_at_sign_is_rejected() -> None:
    with pytest.raises(InvalidAddressError):
        PeerAddr.parse(f"{PEER}@{PEER}@127.0.0.1:4001")


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:4001",
        "example.org:80",
        "[::1]:4001",
        f"{PEER}@127.0.0.1:4001",
        f"{PEER}@[2001:db8::1]:443",
    ],
)
def test_peer_addr_str_round_trips(text: str) -> None:
    assert str(PeerAddr.parse(text)) == text


@deterministic
@given(st.binary(min_size=32, max_size=32).map(PeerId) | st.none(), hosts, dial_ports)
def test_any_peer_addr_round_trips_through_its_text(peer_id: PeerId | None, host: str, port: int) -> None:
    addr = PeerAddr((host, port), peer_id)
    assert PeerAddr.parse(str(addr)) == addr


# --- Dial strings: every form either works or is refused here (issue 8, A5) ------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("127.1:4001", "neither an IP address nor a valid DNS name"),  # getaddrinfo: 127.0.0.1
        ("0x7f000001:4001", "neither"),  # inet_aton reads hex
        ("10.0.0.1.2:4001", "neither"),
        ("2130706433:4001", "neither"),  # a decimal IPv4
        ("-bad-.example:4001", "neither"),
        (f"{'a' * 64}.example:4001", "neither"),  # a label is at most 63 characters
        ("[fe80::1%eth0]:4001", "zone ids are not supported"),
        ("127.0.0.1:0", "port 0 cannot be dialled"),
        ("[::1]:0", "port 0 cannot be dialled"),
        ("::1:4001", "needs brackets"),
    ],
)
def test_a_dial_string_that_would_not_work_is_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidAddressError, match=why):
        PeerAddr.parse(text)


@pytest.mark.parametrize(
    "text",
    ["example.org:80", "xn--bcher-kva.example:443", "node-1.lan.:4001", "localhost:4001"],
)
def test_dns_names_are_accepted_for_dialling(text: str) -> None:
    assert PeerAddr.parse(text).address[0] == text.rpartition(":")[0]


# --- Addresses from the network (issue 8, A1) ------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 4001, ("127.0.0.1", 4001)),
        ("::1", 1, ("::1", 1)),
        ("2001:db8:0:0:0:0:0:1", 65535, ("2001:db8::1", 65535)),  # one spelling per address
        ("::ffff:198.51.100.7", 4001, ("198.51.100.7", 4001)),  # IPv4-mapped is IPv4
        ("2001:DB8::1", 4001, ("2001:db8::1", 4001)),
    ],
)
def test_network_address_accepts_ip_literals_in_canonical_form(host: str, port: int, expected: tuple[str, int]) -> None:
    assert network_address(host, port) == expected


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("a\x00b", 4001),  # made sendto raise TypeError and ended the node
        ("\udcff", 4001),
        ("example.org", 4001),  # names never come from the network
        ("localhost", 4001),
        ("fe80::1%eth0", 4001),
        ("127.0.0.1", 0),
        ("127.0.0.1", 65536),
        ("127.0.0.1", -1),
        ("127.0.0.1", True),
        ("127.0.0.1", "4001"),
        (b"127.0.0.1", 4001),
        (None, 4001),
        ("0.0.0.0", 4001),  # sendto would deliver it to this host
        ("::", 4001),
        ("224.0.0.1", 4001),
        ("ff02::1", 4001),
        ("255.255.255.255", 4001),
        ("1" * 10_000, 4001),
    ],
)
def test_network_address_refuses_anything_else_with_a_typed_error(host: object, port: object) -> None:
    with pytest.raises(InvalidAddressError):
        network_address(host, port)


@deterministic
@given(
    st.one_of(st.text(max_size=50), st.binary(max_size=8), st.integers(), st.none(), hosts),
    st.one_of(st.integers(), st.text(max_size=5), st.none()),
)
def test_network_address_is_a_typed_error_or_a_valid_address(host: object, port: object) -> None:
    try:
        checked_host, checked_port = network_address(host, port)
    except InvalidAddressError:
        return
    assert canonical_ip(checked_host) == checked_host
    assert 1 <= checked_port <= 65535


@pytest.mark.parametrize(
    ("local", "remote", "reachable"),
    [
        ("127.0.0.1", "10.0.0.1", True),
        ("0.0.0.0", "::1", False),
        ("127.0.0.1", "2001:db8::1", False),
        ("::", "127.0.0.1", True),  # dual-stack
        ("::", "::1", True),
        ("::1", "127.0.0.1", False),
    ],
)
def test_family_mismatch_says_when_a_socket_cannot_reach_an_address(local: str, remote: str, reachable: bool) -> None:
    reason = family_mismatch(local, remote)
    assert (reason is None) == reachable
    if reason is not None:
        assert local in reason and remote in reason


@pytest.mark.parametrize(
    ("host", "group"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a v4 client on a dual-stack listener
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same /64: the same source
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_an_address_group_is_an_ipv4_address_or_an_ipv6_prefix(host: str, group: str) -> None:
    # The TCP listener's per-source handshake cap counts by these (IPv6 /64).
    assert address_group(host, ipv6_prefix_bits=64) == group

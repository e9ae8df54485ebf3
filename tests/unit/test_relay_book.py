"""The relay's sans-I/O bookkeeping: reservations (expiry, renewal, caps) and circuits (caps,
byte and time limits, refusals)."""

from __future__ import annotations

import hashlib

import pytest

from lattica.errors import LocalProtocolError
from lattica.identity import Identity, PeerId
from lattica.nat.relay_book import Circuit, Refusal, RelayBook, Reservation
from lattica.nat.relay_config import RelayConfig


def peer(i: int) -> PeerId:
    return Identity.from_seed(hashlib.sha256(b"book-%d" % i).digest()).peer_id


A, B, C, D = (peer(i) for i in range(4))


def book(**settings: object) -> RelayBook:
    return RelayBook(RelayConfig(service=True, **settings))  # type: ignore[arg-type]


def test_a_reservation_lives_for_its_ttl_and_a_renewal_extends_it() -> None:
    relay = book(reservation_ttl_s=60.0)
    first = relay.reserve(A, "192.0.2.1", 0.0, holder="s1")
    assert isinstance(first, Reservation) and first.expires_at == 60.0
    assert relay.reservation(A, 59.9) is first
    assert relay.reservation(A, 60.0) is None  # at expires_at it is gone
    renewed = relay.reserve(A, "192.0.2.1", 30.0, holder="s1")
    assert renewed is first and first.expires_at == 90.0
    assert relay.reservation(A, 89.0) is first
    assert relay.expire(90.0) == [A]
    assert relay.reservation_count == 0


def test_reservations_per_ip_count_an_ipv6_slash_64_as_one_address() -> None:
    # Review finding: each IPv6 address counted alone, so one host with a /64 held all 128.
    relay = book(max_reservations_per_ip=2)
    granted = [relay.reserve(peer(500 + i), f"2001:db8:1:2::{i + 1:x}", 0.0, holder=i) for i in range(3)]
    assert [isinstance(g, Reservation) for g in granted] == [True, True, False]
    assert isinstance(relay.reserve(peer(600), "2001:db8:1:3::1", 0.0, holder="other /64"), Reservation)
    assert isinstance(relay.reserve(peer(601), "::ffff:192.0.2.9", 0.0, holder="v4"), Reservation)


def test_release_only_by_the_holder_that_last_renewed() -> None:
    relay = book()
    relay.reserve(A, "192.0.2.1", 0.0, holder="old")
    relay.reserve(A, "192.0.2.1", 1.0, holder="new")
    relay.release(A, holder="old")
    assert relay.reservation(A, 2.0) is not None
    relay.release(A, holder="new")
    assert relay.reservation(A, 2.0) is None


def test_the_global_reservation_cap_refuses_new_peers_but_not_renewals() -> None:
    relay = book(max_reservations=2)
    assert isinstance(relay.reserve(A, "192.0.2.1", 0.0, holder=1), Reservation)
    assert isinstance(relay.reserve(B, "192.0.2.2", 0.0, holder=2), Reservation)
    refusal = relay.reserve(C, "192.0.2.3", 0.0, holder=3)
    assert isinstance(refusal, Refusal) and refusal.code == "resource-limit"
    assert isinstance(relay.reserve(A, "192.0.2.1", 1.0, holder=1), Reservation)
    # Expired reservations free their slots.
    assert isinstance(relay.reserve(C, "192.0.2.3", 3601.5, holder=3), Reservation)


def test_the_per_ip_cap_counts_reservations_from_one_address() -> None:
    relay = book(max_reservations_per_ip=2)
    relay.reserve(A, "192.0.2.1", 0.0, holder=1)
    relay.reserve(B, "192.0.2.1", 0.0, holder=2)
    refusal = relay.reserve(C, "192.0.2.1", 0.0, holder=3)
    assert isinstance(refusal, Refusal) and refusal.code == "too-many-per-peer"
    assert isinstance(relay.reserve(C, "192.0.2.9", 0.0, holder=3), Reservation)
    relay.release(A, holder=1)
    assert isinstance(relay.reserve(D, "192.0.2.1", 0.0, holder=4), Reservation)


def test_a_circuit_needs_a_live_reservation_of_its_target() -> None:
    relay = book(reservation_ttl_s=10.0)
    refusal = relay.open_circuit(A, B, 0.0)
    assert isinstance(refusal, Refusal) and refusal.code == "no-reservation"
    relay.reserve(B, "192.0.2.2", 0.0, holder=1)
    assert isinstance(relay.open_circuit(A, B, 5.0), Circuit)
    expired = relay.open_circuit(A, B, 10.0)
    assert isinstance(expired, Refusal) and expired.code == "no-reservation"
    to_self = relay.open_circuit(B, B, 5.0)
    assert isinstance(to_self, Refusal) and to_self.code == "malformed"


def test_one_address_cannot_take_every_circuit_to_a_target_with_fresh_peer_ids() -> None:
    # Review finding: eight peer ids minted on one host used up a NATed node's eight circuits
    # on a relay, and nobody else could reach it there.
    relay = book(max_circuits_per_peer=8, max_circuits_per_ip_to_target=2)
    relay.reserve(B, "192.0.2.2", 0.0, holder=B)
    minted = [peer(100 + i) for i in range(8)]
    opened = [relay.open_circuit(p, B, 0.0, source_group="198.51.100.7") for p in minted]
    assert [isinstance(o, Circuit) for o in opened] == [True, True] + [False] * 6
    refused = opened[2]
    assert isinstance(refused, Refusal) and refused.code == "too-many-per-peer"
    assert isinstance(relay.open_circuit(A, B, 0.0, source_group="203.0.113.9"), Circuit)  # others still can
    assert isinstance(relay.open_circuit(C, B, 0.0), Circuit)  # no address known: the peer caps only
    first = opened[0]
    assert isinstance(first, Circuit)
    relay.close_circuit(first.circuit_id)
    relay.close_circuit(first.circuit_id)  # idempotent: the address's count drops once
    assert isinstance(relay.open_circuit(minted[2], B, 0.0, source_group="198.51.100.7"), Circuit)
    assert isinstance(relay.open_circuit(minted[3], B, 0.0, source_group="198.51.100.7"), Refusal)


def test_one_address_opens_at_most_max_circuits_per_ip_in_all() -> None:
    # Review finding: the per-target cap alone let one address open two circuits to each of
    # its own eight reserved targets, 16 of the relay's 64.
    relay = book(max_circuits_per_ip=3, max_circuits_per_ip_to_target=2, max_reservations_per_ip=8)
    targets = [peer(200 + i) for i in range(4)]
    for target in targets:
        relay.reserve(target, "198.51.100.7", 0.0, holder=target)
    opened = [relay.open_circuit(peer(300 + i), targets[i], 0.0, source_group="198.51.100.7") for i in range(4)]
    assert [isinstance(o, Circuit) for o in opened] == [True, True, True, False]
    refused = opened[3]
    assert isinstance(refused, Refusal) and "circuits from your address open here" in refused.message
    assert isinstance(relay.open_circuit(peer(400), targets[3], 0.0, source_group="192.0.2.1"), Circuit)
    first = opened[0]
    assert isinstance(first, Circuit)
    relay.close_circuit(first.circuit_id)
    assert isinstance(relay.open_circuit(peer(303), targets[3], 0.0, source_group="198.51.100.7"), Circuit)


def test_circuit_caps_global_and_per_peer() -> None:
    relay = book(max_circuits=3, max_circuits_per_peer=2)
    for target, ip in ((B, "192.0.2.2"), (C, "192.0.2.3"), (D, "192.0.2.4")):
        relay.reserve(target, ip, 0.0, holder=target)
    first = relay.open_circuit(A, B, 0.0)
    assert isinstance(first, Circuit)
    assert isinstance(relay.open_circuit(A, C, 0.0), Circuit)
    source_cap = relay.open_circuit(A, D, 0.0)
    assert isinstance(source_cap, Refusal) and source_cap.code == "too-many-per-peer"
    assert isinstance(relay.open_circuit(C, B, 0.0), Circuit)  # B: 2nd as target
    assert relay.circuit_count == 3
    global_cap = relay.open_circuit(D, C, 0.0)
    assert isinstance(global_cap, Refusal) and global_cap.code == "resource-limit"
    relay.close_circuit(first.circuit_id)
    relay.close_circuit(first.circuit_id)  # idempotent
    target_cap = relay.open_circuit(D, B, 0.0)
    assert isinstance(target_cap, Circuit)
    assert isinstance(relay.open_circuit(D, B, 0.0), Refusal)  # B is target of 2 again


def test_a_circuit_forwards_up_to_its_byte_limit_per_direction_and_until_its_deadline() -> None:
    relay = book(circuit_bytes=1000, circuit_duration_s=30.0)
    relay.reserve(B, "192.0.2.2", 0.0, holder=1)
    circuit = relay.open_circuit(A, B, 0.0)
    assert isinstance(circuit, Circuit)
    assert circuit.limits.duration_s == 30.0 and circuit.limits.max_bytes == 1000
    cid = circuit.circuit_id
    assert relay.forwardable_bytes(cid, "to-target", 1.0) == 1000
    relay.forwarded(cid, "to-target", 600)
    assert relay.forwardable_bytes(cid, "to-target", 1.0) == 400
    assert relay.forwardable_bytes(cid, "to-source", 1.0) == 1000
    with pytest.raises(LocalProtocolError):
        relay.forwarded(cid, "to-target", 401)
    relay.forwarded(cid, "to-target", 400)
    assert relay.forwardable_bytes(cid, "to-target", 1.0) == 0
    assert relay.forwardable_bytes(cid, "to-source", 30.0) == 0  # time is up
    closed = relay.close_circuit(cid)
    assert closed is not None and closed.forwarded == {"to-target": 1000, "to-source": 0}

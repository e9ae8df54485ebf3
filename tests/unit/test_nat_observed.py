"""The observed-address book: agreement by distinct observer groups, expiry, forged claims,
mapping behaviour."""

from __future__ import annotations

import pytest

from lattica.nat.observed import ObservedAddressBook, observer_group

OURS = ("203.0.113.1", 40000)
FORGED = ("192.0.2.66", 6666)


def test_an_address_is_believed_only_when_three_groups_agree() -> None:
    book = ObservedAddressBook(min_agreeing_observers=3, window_s=60)
    assert not book.observe("198.51.100.1", OURS, now=0)
    assert not book.observe("198.51.100.2", OURS, now=1)
    assert book.believed(now=2) == []
    assert book.mapping_behaviour(now=2) == "unknown"
    assert book.observe("198.51.100.3", OURS, now=2)  # the believed set changed
    [believed] = book.believed(now=3)
    assert believed.address == OURS and believed.observers == 3
    assert book.mapping_behaviour(now=3) == "endpoint-independent"
    assert book.candidates(now=3) == [OURS]


def test_many_peer_ids_behind_one_ip_are_one_observer() -> None:
    book = ObservedAddressBook(min_agreeing_observers=3)
    attacker = observer_group("192.0.2.66")
    for i in range(100):  # a hundred forged claims (as many peer ids) from one address
        book.observe(attacker, FORGED, now=i)
    book.observe("198.51.100.1", OURS, now=100)
    assert book.believed(now=100) == []
    assert book.observer_count(now=100) == 2


def test_ipv6_observers_group_by_slash_56_and_ipv4_mapped_is_ipv4() -> None:
    assert observer_group("2001:db8:0:1::1") == observer_group("2001:db8:0:ff::2") == "2001:db8::/56"
    assert observer_group("2001:db8:0:100::1") != observer_group("2001:db8::1")
    assert observer_group("::ffff:198.51.100.7") == "198.51.100.7"
    assert observer_group("198.51.100.7") != observer_group("198.51.100.8")


def test_one_group_holds_one_vote_its_latest() -> None:
    book = ObservedAddressBook(min_agreeing_observers=2)
    book.observe("198.51.100.1", OURS, now=0)
    book.observe("198.51.100.2", OURS, now=0)
    assert [b.address for b in book.believed(now=0)] == [OURS]
    assert book.observe("198.51.100.2", FORGED, now=1)  # it changed its mind: OURS loses a vote
    assert book.believed(now=1) == []


def test_observations_expire_after_the_window() -> None:
    book = ObservedAddressBook(min_agreeing_observers=2, window_s=60)
    book.observe("198.51.100.1", OURS, now=0)
    book.observe("198.51.100.2", OURS, now=30)
    assert book.believed(now=59.9) != []
    assert book.expire(now=60)  # the first vote is 60 s old: no longer counts
    assert book.believed(now=60) == []
    assert book.observer_count(now=60) == 1


def test_different_ports_for_one_ip_mean_endpoint_dependent_mapping() -> None:
    book = ObservedAddressBook(min_agreeing_observers=3)
    for i, port in enumerate((40001, 40002, 40003)):
        book.observe(f"198.51.100.{i + 1}", ("203.0.113.1", port), now=0)
    assert book.believed(now=0) == []
    assert book.mapping_behaviour(now=0) == "endpoint-dependent"
    assert len(book.candidates(now=0)) == 3


def test_one_liar_cannot_make_a_cone_look_symmetric() -> None:
    book = ObservedAddressBook(min_agreeing_observers=3)
    for i in range(3):
        book.observe(f"198.51.100.{i + 1}", OURS, now=0)
    book.observe("192.0.2.66", ("203.0.113.1", 1), now=0)
    assert book.mapping_behaviour(now=0) == "endpoint-independent"


def test_memory_is_bounded_by_max_groups() -> None:
    book = ObservedAddressBook(min_agreeing_observers=1, max_groups=8)
    for i in range(1000):
        book.observe(f"10.0.{i // 250}.{i % 250}", (f"10.1.{i // 250}.{i % 250}", 1), now=i)
    assert book.observer_count(now=1000) == 8


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        ObservedAddressBook(min_agreeing_observers=0)

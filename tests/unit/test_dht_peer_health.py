"""PeerHealth: failure memory, backoff and eviction rule (sans-I/O, times passed in)."""

from __future__ import annotations

import pytest

from lattica.dht.peer_health import PeerHealth
from lattica.errors import LocalProtocolError
from lattica.identity import Identity

PEERS = [Identity.from_seed(bytes([i + 1]) * 32).peer_id for i in range(4)]


def test_failures_of_requests_that_overlapped_one_outage_count_once() -> None:
    health = PeerHealth(max_failures=2, backoff_s=60)
    peer = PEERS[0]
    assert not health.on_failure(peer, sent_at=0.0, now=10.0)
    # Sent before the counted failure was seen: the same outage.
    assert not health.on_failure(peer, sent_at=5.0, now=10.5)
    assert health.failures(peer) == 1
    # A request sent after it (the maintenance probe) failing too: evict.
    assert health.on_failure(peer, sent_at=70.0, now=80.0)


def test_a_failed_peer_is_skipped_for_a_doubling_backoff_until_it_answers() -> None:
    health = PeerHealth(max_failures=5, backoff_s=60, max_backoff_s=100)
    peer = PEERS[1]
    health.on_failure(peer, sent_at=0.0, now=0.0)
    assert health.is_suspect(peer, 59.9) and not health.is_suspect(peer, 60.0)
    assert health.due_probes(PEERS, 59.9) == [] and health.due_probes(PEERS, 60.0) == [peer]
    health.on_failure(peer, sent_at=60.0, now=61.0)
    assert health.is_suspect(peer, 61.0 + 99.9) and not health.is_suspect(peer, 61.0 + 100.0)  # capped
    health.on_success(peer)
    assert not health.is_suspect(peer, 62.0) and health.failures(peer) == 0


def test_memory_is_bounded_and_limits_are_checked() -> None:
    health = PeerHealth(capacity=2)
    for i, peer in enumerate(PEERS):
        health.on_failure(peer, sent_at=i, now=i)
    assert len(health) == 2 and health.failures(PEERS[0]) == 0 and health.failures(PEERS[3]) == 1
    with pytest.raises(LocalProtocolError):
        PeerHealth(max_failures=0)

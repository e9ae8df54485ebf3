"""MaintenancePlanner: which upkeep is due when (no I/O, times passed in)."""

from __future__ import annotations

from lattica.dht.maintenance import (
    MaintenancePlanner,
    ProbePeers,
    PurgeExpired,
    Rebootstrap,
    Reprovide,
    RepublishRecord,
    SaveRoutingTable,
)
from lattica.dht.peer_health import PeerHealth
from lattica.dht.records import sign_record
from lattica.dht.routing import DhtNode, RoutingTable
from lattica.dht.store import DhtStore
from lattica.identity import Identity

NOW = 1_800_000_000.0
ME = Identity.from_seed(bytes([1]) * 32)
PEER = Identity.from_seed(bytes([2]) * 32).peer_id


def planner() -> tuple[MaintenancePlanner, RoutingTable, DhtStore, PeerHealth]:
    table = RoutingTable(ME.peer_id.dht_key(), now=NOW)
    store = DhtStore(":memory:", own_key=ME.peer_id.dht_key())
    health = PeerHealth(max_failures=2, backoff_s=60)
    plan = MaintenancePlanner(
        ME.peer_id,
        table,
        store,
        health,
        maintenance_interval_s=60,
        bucket_refresh_interval_s=3600,
        record_republish_interval_s=3600,
        provider_ttl_s=48 * 3600,
        provider_republish_interval_s=22 * 3600,
        stale_peer_ping_s=600,
    )
    return plan, table, store, health


def test_an_empty_table_is_rebootstrapped_only_after_we_had_joined() -> None:
    plan, _table, _store, _health = planner()
    assert plan.due(NOW, 0.0) == [PurgeExpired()]
    plan.joined()
    assert plan.due(NOW, 0.0) == [PurgeExpired(), Rebootstrap()]


async def test_own_records_and_provider_records_are_republished_when_due() -> None:
    plan, table, store, _health = planner()
    table.add_contact(DhtNode(PEER, [("198.51.100.2", 4001)]), now=NOW)
    record = sign_record(ME, b"k", b"v", seq=1, expires_at=int(NOW) + 86400)
    await store.put_record(record, own=True)
    await store.add_provided(b"cid")
    actions = plan.due(NOW, 0.0)
    assert RepublishRecord(record) in actions and Reprovide(b"cid") in actions
    assert actions[0] == PurgeExpired() and actions[-1] == SaveRoutingTable()
    plan.record_published(record.dht_key, NOW)
    assert RepublishRecord(record) not in plan.due(NOW + 3599, 0.0)
    assert RepublishRecord(record) in plan.due(NOW + 3600, 0.0)


def test_failed_peers_past_their_backoff_and_silent_peers_are_probed() -> None:
    plan, table, _store, health = planner()
    table.add_contact(DhtNode(PEER, [("198.51.100.2", 4001)]), now=NOW)
    assert not any(isinstance(a, ProbePeers) for a in plan.due(NOW + 10, 0.0))
    health.on_failure(PEER, sent_at=0.0, now=1.0)
    assert not any(isinstance(a, ProbePeers) for a in plan.due(NOW + 10, 60.0))
    assert ProbePeers((PEER,)) in plan.due(NOW + 10, 61.0)
    health.on_success(PEER)
    assert ProbePeers((PEER,)) in plan.due(NOW + 600, 61.0)  # not heard from for 600 s

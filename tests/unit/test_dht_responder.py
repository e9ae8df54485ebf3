"""Responder: answers decided synchronously, store writes left to the caller."""

from __future__ import annotations

import msgspec

from lattica.dht.errors import StoreFullError, WriterQuotaError
from lattica.dht.messages import Ack, AddProvider, PeerInfo, Ping, Pong, PutValue
from lattica.dht.records import sign_provider_record, sign_record
from lattica.dht.responder import Responder, StoreProvider, StoreRecord
from lattica.dht.routing import RoutingTable
from lattica.dht.store import DhtStore
from lattica.identity import Identity

NOW = 1_800_000_000.0
ME = Identity.from_seed(bytes([1]) * 32)
WRITER = Identity.from_seed(bytes([2]) * 32)
OTHER = Identity.from_seed(bytes([3]) * 32)


def responder() -> tuple[Responder, DhtStore]:
    store = DhtStore(":memory:", own_key=ME.peer_id.dht_key())
    table = RoutingTable(ME.peer_id.dht_key())
    return (
        Responder(
            ME.peer_id,
            store,
            table,
            own_addresses=lambda: [("198.51.100.1", 4001)],
            client_mode=False,
            k=20,
            max_record_ttl_s=7 * 86400,
            provider_ttl_s=48 * 3600,
        ),
        store,
    )


def put(record: object) -> PutValue:
    return PutValue(sender=PeerInfo.of(WRITER.peer_id, []), record=record)  # type: ignore[arg-type]


def test_a_valid_record_yields_its_write_and_the_acknowledgement_to_send_after_it() -> None:
    r, store = responder()
    record = sign_record(WRITER, b"k", b"v", seq=5, expires_at=int(NOW) + 3600)
    reply = r.handle(WRITER.peer_id, put(record), NOW)
    assert reply.write == StoreRecord(record, own=False)
    assert isinstance(reply.response, Ack) and reply.response.stored
    assert store.get_record(record.dht_key, now=NOW) is None  # the responder never writes


async def test_a_stale_record_is_refused_quoting_the_record_held() -> None:
    r, store = responder()
    held = sign_record(WRITER, b"k", b"new", seq=9, expires_at=int(NOW) + 3600)
    await store.put_record(held)
    reply = r.handle(OTHER.peer_id, put(sign_record(WRITER, b"k", b"old", seq=3, expires_at=int(NOW) + 3600)), NOW)
    assert reply.write is None
    assert isinstance(reply.response, Ack) and not reply.response.stored
    assert reply.response.reason.startswith("stale") and reply.response.held == held
    # The same version again is acknowledged without a second write.
    again = r.handle(OTHER.peer_id, put(held), NOW)
    assert again.write is None and isinstance(again.response, Ack) and again.response.stored


def test_forged_records_and_provider_records_of_others_are_refused_without_a_write() -> None:
    r, _store = responder()
    record = sign_record(WRITER, b"k", b"v", seq=5, expires_at=int(NOW) + 3600)
    forged = msgspec.structs.replace(record, value=b"evil")
    reply = r.handle(WRITER.peer_id, put(forged), NOW)
    assert reply.write is None and isinstance(reply.response, Ack) and reply.response.reason.startswith("invalid")
    provider = sign_provider_record(WRITER, b"cid", [("198.51.100.2", 4001)], expires_at=int(NOW) + 3600)
    announce = AddProvider(sender=PeerInfo.of(OTHER.peer_id, []), record=provider)
    assert r.handle(OTHER.peer_id, announce, NOW).write is None
    assert r.handle(WRITER.peer_id, announce, NOW).write == StoreProvider(provider)


def test_a_write_the_store_refused_becomes_the_refusal_sent() -> None:
    r, _store = responder()
    record = sign_record(WRITER, b"k", b"v", seq=5, expires_at=int(NOW) + 3600)
    refusal = r.write_failed(StoreRecord(record, own=False), StoreFullError("full"))
    assert not refusal.stored and refusal.reason == "store full"
    over_quota = r.write_failed(StoreRecord(record, own=False), WriterQuotaError("quota"))
    assert not over_quota.stored and over_quota.reason == "writer over quota"
    assert isinstance(r.handle(OTHER.peer_id, Ping(sender=PeerInfo.of(OTHER.peer_id, [])), NOW).response, Pong)

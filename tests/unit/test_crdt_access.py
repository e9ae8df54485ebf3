"""Access rules of a space replica: who may write which seq, in any arrival order."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.crdt import REFUSAL_REASONS, Envelope, EnvelopeKind, SpaceReplica, make_genesis, sign_envelope
from lattica.crdt.access import yrs_client_id
from lattica.crdt.envelope import AclOp, encode_acl_op
from lattica.crdt.errors import NotOwnerError, NotWriterError, UpdateTooLargeError
from lattica.crdt.replica import ReplicaLimits
from lattica.identity import Identity


def ident(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(name.encode()).digest())


OWNER, WRITER, STRANGER, READER = ident("owner"), ident("writer"), ident("stranger"), ident("reader")
GENESIS = make_genesis(OWNER, "shards", bytes(16))


def replica(who: Identity, **limits: int) -> SpaceReplica:
    return SpaceReplica(GENESIS, who.peer_id, ReplicaLimits(**limits))


def put(key: str, value: object):  # type: ignore[no-untyped-def]
    return lambda m: m.__setitem__(key, value)


def settle(target: SpaceReplica, envelopes: Sequence[Envelope]) -> None:
    """Offer everything until nothing more applies (what repeated anti-entropy rounds do)."""
    while target.offer(envelopes).applied:
        pass


def test_an_unauthorized_writer_is_refused_and_not_recorded() -> None:
    stranger_side = replica(STRANGER)
    stranger_side.acl.apply(EnvelopeKind.GRANT, AclOp(STRANGER.peer_id.key, 0))  # lies to itself
    envelope, _ = stranger_side.write(STRANGER, put("k", "forged"))
    owner_side = replica(OWNER)
    result = owner_side.offer([envelope])
    assert [r.reason for r in result.refused] == ["unauthorized"]
    assert owner_side.get() == {} and STRANGER.peer_id.key not in owner_side.version_vector


def test_a_writer_cannot_write_locally_before_it_is_granted() -> None:
    with pytest.raises(NotWriterError):
        replica(WRITER).write(WRITER, put("k", 1))


def test_only_the_owner_changes_the_writer_list() -> None:
    owner_side = replica(OWNER)
    grant = owner_side.grant(OWNER, WRITER.peer_id)
    assert grant is not None
    writer_side = replica(WRITER)
    settle(writer_side, [grant])
    with pytest.raises(NotOwnerError):
        writer_side.grant(WRITER, STRANGER.peer_id)
    # A GRANT signed by a writer (not the owner) is refused by every replica.
    forged = sign_envelope(
        WRITER, GENESIS.space_id, 1, EnvelopeKind.GRANT, encode_acl_op(AclOp(STRANGER.peer_id.key, 0))
    )
    result = replica(READER).offer([grant, forged])
    assert [r.reason for r in result.refused] == ["unauthorized"]


def revoke_scenario() -> tuple[list[Envelope], dict[str, object]]:
    """Owner grants W; W writes 1, 2; the owner, having seen 1 and 2, revokes; W, not yet
    knowing, writes 3. Returns the envelopes and the state every replica must end with."""
    owner_side, writer_side = replica(OWNER), replica(WRITER)
    base, _ = owner_side.write(OWNER, put("base", 0))
    grant = owner_side.grant(OWNER, WRITER.peer_id)
    assert grant is not None
    settle(writer_side, [base, grant])
    w1, _ = writer_side.write(WRITER, put("w1", 1))
    w2, _ = writer_side.write(WRITER, put("w2", 2))
    settle(owner_side, [w1, w2])
    revoke = owner_side.revoke(OWNER, WRITER.peer_id)
    assert revoke is not None
    w3, _ = writer_side.write(WRITER, put("w3", 3))  # concurrent with the revoke
    assert owner_side.offer([w3]).refused[0].reason == "revoked"
    return [base, grant, w1, w2, revoke, w3], owner_side.get()


def test_a_revoke_refuses_exactly_the_updates_after_its_cutoff_in_every_arrival_order() -> None:
    envelopes, expected = revoke_scenario()
    assert expected == {"base": 0, "w1": 1, "w2": 2}
    for order in itertools.permutations(envelopes):
        reader = replica(READER)
        settle(reader, list(order))
        assert reader.get() == expected, order
        assert reader.version_vector[WRITER.peer_id.key] == 2


def test_a_revoke_arriving_after_a_later_update_removes_that_update() -> None:
    base, grant, w1, w2, revoke, w3 = revoke_scenario()[0]
    reader = replica(READER)
    settle(reader, [base, grant, w1, w2, w3])
    assert reader.get("w3") == 3
    result = reader.offer([revoke])
    assert result.removed == [(WRITER.peer_id.key, 2)]
    assert [(c.key, c.deleted) for c in result.changes] == [("w3", True)]
    assert "w3" not in reader.get()
    assert reader.offer([w3]).refused[0].reason == "revoked"


def test_a_revoked_writer_learns_it_and_stops() -> None:
    base, grant, w1, w2, revoke, _w3 = revoke_scenario()[0]
    writer_side = replica(WRITER)
    settle(writer_side, [base, grant, w1, w2, revoke])
    with pytest.raises(NotWriterError):
        writer_side.write(WRITER, put("later", 1))


def test_a_regrant_starts_after_what_the_writer_wrote_while_revoked() -> None:
    envelopes, _ = revoke_scenario()
    owner_side = replica(OWNER)
    settle(owner_side, envelopes)  # sees w3 (refused) and remembers its seq
    regrant = owner_side.grant(OWNER, WRITER.peer_id)
    assert regrant is not None
    writer_side = replica(WRITER)
    settle(writer_side, [*envelopes, regrant])
    assert writer_side.version_vector[WRITER.peer_id.key] == 3  # seq 3 is settled empty
    w4, _ = writer_side.write(WRITER, put("w4", 4))
    assert w4.seq == 4
    reader = replica(READER)
    settle(reader, [*envelopes, regrant, w4])
    assert reader.get() == {"base": 0, "w1": 1, "w2": 2, "w4": 4}


def test_replays_and_equivocations_are_refused() -> None:
    owner_side = replica(OWNER)
    e1, _ = owner_side.write(OWNER, put("a", 1))
    other_history = replica(OWNER)
    e1_other, _ = other_history.write(OWNER, put("a", 2))
    reader = replica(READER)
    assert reader.offer([e1]).applied == [e1]
    assert reader.offer([e1]).refused[0].reason == "replayed"
    assert reader.offer([e1_other]).refused[0].reason == "equivocation"
    assert reader.get() == {"a": 1}


def test_out_of_order_envelopes_wait_in_a_bounded_buffer() -> None:
    owner_side = replica(OWNER)
    envelopes = [owner_side.write(OWNER, put(f"k{i}", i))[0] for i in range(6)]
    reader = replica(READER, max_pending=2, max_ahead=4)
    result = reader.offer(envelopes[1:3])
    assert result.buffered == 2 and not result.applied
    assert reader.offer([envelopes[3]]).refused[0].reason == "buffer-full"
    assert reader.offer([envelopes[5]]).refused[0].reason == "too-far-ahead"
    result = reader.offer([envelopes[0]])
    assert [e.seq for e in result.applied] == [1, 2, 3]
    settle(reader, envelopes)
    assert reader.get() == owner_side.get()


def test_an_update_with_another_clients_structs_is_refused() -> None:
    grant = replica(OWNER).grant(OWNER, WRITER.peer_id)
    assert grant is not None
    foreign = pycrdt.Doc(client_id=yrs_client_id(OWNER.peer_id))
    foreign.get("state", type=pycrdt.Map)["k"] = "impersonated"
    forged = sign_envelope(WRITER, GENESIS.space_id, 1, EnvelopeKind.UPDATE, foreign.get_update())
    result = replica(READER).offer([grant, forged])
    assert [r.reason for r in result.refused] == ["foreign-client-id"]


def test_updates_above_the_size_limit_are_refused_both_ways() -> None:
    owner_side = replica(OWNER, max_update_bytes=200)
    with pytest.raises(UpdateTooLargeError):
        owner_side.write(OWNER, put("big", "x" * 500))
    assert owner_side.get() == {}  # rebuilt without it
    big, _ = replica(OWNER).write(OWNER, put("big", "x" * 500))
    assert replica(READER, max_update_bytes=200).offer([big]).refused[0].reason == "too-large"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_update_bytes_from_a_writer_never_crash_the_replica(body: bytes) -> None:
    reader = replica(READER)
    owner_side = replica(OWNER)
    first, _ = owner_side.write(OWNER, put("before", 1))
    settle(reader, [first])
    garbage = sign_envelope(OWNER, GENESIS.space_id, 2, EnvelopeKind.UPDATE, body)
    result = reader.offer([garbage])
    assert len(result.applied) + len(result.refused) == 1
    assert all(r.reason in REFUSAL_REASONS for r in result.refused)
    assert reader.get("before") == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_writer_list_operations_are_refused(body: bytes) -> None:
    reader = replica(READER)
    for kind in (EnvelopeKind.GRANT, EnvelopeKind.REVOKE):
        envelope = sign_envelope(OWNER, GENESIS.space_id, 1, kind, body)
        result = reader.offer([envelope])
        assert result.applied or result.refused[0].reason == "invalid-acl-op"


def writer_updates(first_seq: int, count: int, body_bytes: int = 64) -> list[Envelope]:
    """WRITER's envelopes ``first_seq..`` with ``body_bytes`` bodies (never applied: only buffered)."""
    return [
        sign_envelope(WRITER, GENESIS.space_id, seq, EnvelopeKind.UPDATE, bytes(body_bytes))
        for seq in range(first_seq, first_seq + count)
    ]


def granted_then_revoked() -> tuple[SpaceReplica, Envelope]:
    owner_side = replica(OWNER)
    owner_side.grant(OWNER, WRITER.peer_id)
    revoke = owner_side.revoke(OWNER, WRITER.peer_id)
    assert revoke is not None
    return owner_side, revoke


def test_a_revoked_writers_envelopes_past_its_cutoff_are_refused_not_buffered() -> None:
    owner_side, _ = granted_then_revoked()
    result = owner_side.offer(writer_updates(10, 50, body_bytes=10_000))
    assert result.buffered == 0
    assert {r.reason for r in result.refused} == {"revoked"} and len(result.refused) == 50
    assert owner_side.pending_count == 0 and owner_side.pending_bytes == 0


def test_a_revoke_drops_the_revoked_writers_buffered_envelopes() -> None:
    owner_side = replica(OWNER)
    grant = owner_side.grant(OWNER, WRITER.peer_id)
    reader = replica(READER)
    reader.offer([grant])  # type: ignore[list-item]
    assert reader.offer(writer_updates(5, 20)).buffered == 20
    assert reader.pending_bytes > 0
    revoke = owner_side.revoke(OWNER, WRITER.peer_id)  # cutoff 0: nothing of WRITER's counts
    reader.offer([revoke])  # type: ignore[list-item]
    assert reader.pending_count == 0 and reader.pending_bytes == 0


def test_an_out_of_order_envelope_above_the_size_limit_is_refused_before_buffering() -> None:
    reader = replica(READER, max_update_bytes=1000)
    reader.offer([replica(OWNER).grant(OWNER, WRITER.peer_id)])  # type: ignore[list-item]
    result = reader.offer(writer_updates(5, 3, body_bytes=5000))
    assert [r.reason for r in result.refused] == ["too-large"] * 3
    assert reader.pending_count == 0


def test_one_writer_cannot_fill_the_buffer_the_others_need() -> None:
    owner_side = replica(OWNER)
    grant = owner_side.grant(OWNER, WRITER.peer_id)
    owner_updates = [owner_side.write(OWNER, put(f"k{i}", i))[0] for i in range(4)]
    reader = replica(READER, max_pending=10, max_pending_per_author=5)
    reader.offer([grant])  # type: ignore[list-item]
    flood = reader.offer(writer_updates(5, 20))
    assert flood.buffered == 5 and {r.reason for r in flood.refused} == {"buffer-full"}
    # The owner's seq 2 (the grant) is applied; its updates 3.. wait for nothing else.
    honest = reader.offer(owner_updates[1:])
    assert honest.buffered == 3 and not honest.refused


def test_the_buffer_holds_at_most_max_pending_bytes() -> None:
    reader = replica(READER, max_pending_bytes=50_000)
    reader.offer([replica(OWNER).grant(OWNER, WRITER.peer_id)])  # type: ignore[list-item]
    result = reader.offer(writer_updates(5, 20, body_bytes=10_000))
    assert result.buffered == 4 and [r.reason for r in result.refused] == ["buffer-full"] * 16
    assert 40_000 <= reader.pending_bytes <= 50_000

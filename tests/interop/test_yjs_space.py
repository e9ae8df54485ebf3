"""A Lattica space and a real Yjs client: what a space exports decodes in Yjs, and an update a
Yjs client makes applies to the space once a writer signs it (and only then)."""

from __future__ import annotations

import hashlib
from typing import Any

from lattica.crdt import (
    ROOT_MAP,
    EnvelopeKind,
    SpaceReplica,
    decode_envelope,
    encode_envelope,
    make_genesis,
    sign_envelope,
    yrs_client_id,
)
from lattica.identity import Identity

from .yjs_client import YjsClient, canonical

ROOTS = {ROOT_MAP: "map"}


def _identity(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"yjs-interop-" + name.encode()).digest())


OWNER, WRITER, STRANGER = _identity("owner"), _identity("writer"), _identity("stranger")


def _space_with_history() -> SpaceReplica:
    """A space owned by OWNER, WRITER granted, and a few writes of every value kind."""
    replica = SpaceReplica(make_genesis(OWNER, "catalog", b"\x01" * 16), OWNER.peer_id)
    replica.grant(OWNER, WRITER.peer_id)
    writes: list[dict[str, Any]] = [
        {"model": "llama-3-8b", "shards": 4, "ratio": 0.25, "ready": False, "note": None},
        {"assignments": {"peer-a": [0, 1], "peer-b": [2, 3]}, "ready": True},
        {"shards": 8, "history": ["v1", "v2", {"v": 3, "tags": []}]},
    ]
    for values in writes:
        replica.write(OWNER, lambda root, values=values: root.update(values))
    return replica


def _deliver(replica: SpaceReplica, author: Identity, seq: int, update: bytes) -> Any:
    """Sign ``update`` as ``author`` and offer it the way bytes from a peer arrive (decoded and
    verified first)."""
    envelope = sign_envelope(author, replica.space_id, seq, EnvelopeKind.UPDATE, update)
    return replica.offer([decode_envelope(encode_envelope(envelope))])


def test_a_spaces_updates_decode_in_yjs_to_what_get_returns(yjs: YjsClient) -> None:
    replica = _space_with_history()
    # The owner's log holds its writer-list envelopes too; those are not document updates.
    bodies = [
        e.body
        for author_log in replica.log.values()
        for _, e in sorted(author_log.items())
        if e.kind == EnvelopeKind.UPDATE
    ]
    expected = {ROOT_MAP: replica.get()}
    assert expected[ROOT_MAP]["shards"] == 8 and expected[ROOT_MAP]["assignments"]["peer-b"] == [2, 3]
    # The update log one envelope at a time, and the whole document as one update.
    assert canonical(yjs.decode(bodies, ROOTS)) == canonical(expected)
    assert canonical(yjs.decode([replica.doc.get_update()], ROOTS)) == canonical(expected)


def test_a_yjs_update_signed_by_a_writer_applies_to_the_space(yjs: YjsClient) -> None:
    replica = _space_with_history()
    edits = [{"root": ROOT_MAP, "set": {"from_yjs": {"shard": 5, "peers": ["x", "y"]}, "shards": 16}}]
    update, yjs_json = yjs.encode(
        ROOTS, edits, base=[replica.doc.get_update()], client_id=yrs_client_id(WRITER.peer_id)
    )
    result = _deliver(replica, WRITER, 1, update)
    assert result.refused == [] and len(result.applied) == 1
    assert sorted(c.key for c in result.changes) == ["from_yjs", "shards"]
    assert all(c.author == WRITER.peer_id and c.seq == 1 for c in result.changes)
    assert canonical({ROOT_MAP: replica.get()}) == canonical(yjs_json)
    assert replica.get("shards") == 16 and replica.get("from_yjs") == {"shard": 5, "peers": ["x", "y"]}


def test_a_yjs_update_is_refused_unless_its_signer_may_write_as_its_client(yjs: YjsClient) -> None:
    replica = _space_with_history()
    before = replica.get()
    edits = [{"root": ROOT_MAP, "set": {"shards": 999}}]
    base = [replica.doc.get_update()]
    # Signed by a peer that was never granted.
    update, _ = yjs.encode(ROOTS, edits, base=base, client_id=yrs_client_id(STRANGER.peer_id))
    assert [r.reason for r in _deliver(replica, STRANGER, 1, update).refused] == ["unauthorized"]
    # Signed by a writer, but the Yjs client id is someone else's: the writer cannot forge items
    # in another author's name.
    update, _ = yjs.encode(ROOTS, edits, base=base, client_id=yrs_client_id(OWNER.peer_id))
    assert [r.reason for r in _deliver(replica, WRITER, 1, update).refused] == ["foreign-client-id"]
    assert replica.get() == before

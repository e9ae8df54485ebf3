"""The service's sqlite log: what ``set`` acknowledged is there after a restart (snapshot + tail)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattica.crdt import CrdtConfig, CrdtService, NotOwnerError, SpaceLimitError, SpaceStore, UnknownSpaceError
from lattica.crdt.errors import RateLimitedError
from lattica.crdt.space_id import encode_genesis
from lattica.errors import RpcError
from lattica.identity import Identity
from lattica.storage import DiskFullError, SqliteWriter

OWNER = Identity.from_seed(hashlib.sha256(b"owner").digest())
WRITER = Identity.from_seed(hashlib.sha256(b"writer").digest())


class NoRpc:
    """No network: the handler is registered, every call fails as if the peer were away."""

    def add_handler(self, protocol_id: str, handler: Any) -> None:
        self.protocol_id = protocol_id

    async def request(self, *args: Any, **kwargs: Any) -> bytes:
        raise RpcError("connect-failed", "no network in unit tests")


def service(writer: SqliteWriter | None, **config: Any) -> CrdtService:
    store = SpaceStore(writer) if writer is not None else None
    return CrdtService(OWNER, NoRpc(), None, store, CrdtConfig(anti_entropy_interval_s=math.inf, **config))  # type: ignore[arg-type]


async def test_acknowledged_writes_survive_a_restart_from_snapshot_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "lattica.db"
    writer = SqliteWriter(path)
    async with trio.open_nursery() as nursery:
        crdt = service(writer, compact_every_updates=3)
        await nursery.start(crdt.run)
        info = await crdt.create_space("models", writers=[WRITER.peer_id])
        for i in range(7):  # two snapshots (after 3 and 6 updates) and a tail of one
            await crdt.set("models", f"k{i}", {"i": i, "blob": bytes([i])})
        await crdt.delete("models", "k0")
        await crdt.revoke("models", WRITER.peer_id)
        expected = crdt.get("models")
        nursery.cancel_scope.cancel()
    writer.close()  # what kill -9 leaves: only what was committed

    assert writer.commit_count >= 1
    reopened = SqliteWriter(path)
    async with trio.open_nursery() as nursery:
        crdt = service(reopened)
        await nursery.start(crdt.run)
        assert crdt.get(info.space_id) == expected
        assert crdt.get("models", "k6") == {"i": 6, "blob": b"\x06"}
        again = crdt.info("models")
        assert again.writers == [OWNER.peer_id]
        assert again.version_vector[OWNER.peer_id] == 1 + 7 + 1 + 1  # grant, 7 sets, delete, revoke
        # Writing continues the seq where the log ends.
        result = await crdt.set("models", "after", 1)
        assert result.seq == 11
        nursery.cancel_scope.cancel()
    reopened.close()


async def test_a_restart_without_snapshot_replays_the_log(tmp_path: Path) -> None:
    path = tmp_path / "lattica.db"
    writer = SqliteWriter(path)
    async with trio.open_nursery() as nursery:
        crdt = service(writer)
        await nursery.start(crdt.run)
        await crdt.create_space("s")
        await crdt.set("s", "a", [1, 2])
        nursery.cancel_scope.cancel()
    writer.close()
    reopened = SqliteWriter(path)
    async with trio.open_nursery() as nursery:
        crdt = service(reopened)
        await nursery.start(crdt.run)
        assert crdt.get("s") == {"a": [1, 2]}
        nursery.cancel_scope.cancel()
    reopened.close()


async def test_names_resolve_and_errors_are_typed() -> None:
    async with trio.open_nursery() as nursery:
        crdt = service(None, max_spaces=2, max_updates_per_s=1.0, update_burst=2)
        await nursery.start(crdt.run)
        info = await crdt.create_space("a")
        assert crdt.resolve("a") == info.space_id == crdt.resolve(str(info.space_id))
        with pytest.raises(UnknownSpaceError):
            crdt.resolve("nope")
        await crdt.create_space("b")
        with pytest.raises(SpaceLimitError):
            await crdt.create_space("c")
        await crdt.set("a", "x", 1)
        await crdt.set("a", "x", 2)
        with pytest.raises(RateLimitedError):
            await crdt.set("a", "x", 3)
        assert crdt.get("a", "x") == 2
        changes = crdt.changes("a")
        await trio.sleep(1.0)
        await crdt.set("a", "y", 4)
        change = changes.receive_nowait()
        assert (change.key, change.value, change.author, change.seq) == ("y", 4, OWNER.peer_id, 3)
        assert [s.name for s in crdt.spaces()] == ["a", "b"]
        nursery.cancel_scope.cancel()


async def test_only_the_owner_grants() -> None:
    async with trio.open_nursery() as nursery:
        owner = service(None)
        await nursery.start(owner.run)
        info = await owner.create_space("a")
        other = CrdtService(WRITER, NoRpc(), None, None, CrdtConfig())  # type: ignore[arg-type]
        await nursery.start(other.run)
        # A replica of the owner's space, as a join would make it.
        other._restore(encode_genesis(owner.replica(info.space_id).genesis), [], None, {})
        with pytest.raises(NotOwnerError):
            await other.grant(info.space_id, OWNER.peer_id)
        nursery.cancel_scope.cancel()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
async def test_a_malformed_request_ends_only_that_request(data: bytes) -> None:
    crdt = service(None)
    async with trio.open_nursery() as nursery:
        await nursery.start(crdt.run)
        await crdt.create_space("s")
        try:
            await crdt._handle_request(WRITER.peer_id, data)  # the RPC layer's entry point
        except RpcError as exc:
            assert exc.code in {"protocol-error", "not-found"}
        assert crdt.get("s") == {}
        nursery.cancel_scope.cancel()


class FailingStore(SpaceStore):
    """A log whose writes fail the way a full disk makes them fail."""

    async def append(self, space: Any, envelopes: Any) -> None:
        raise DiskFullError("disk full", path="x", cause="SQLITE_FULL")


async def test_a_write_the_log_refused_is_undone_and_raises() -> None:
    writer = SqliteWriter(":memory:")
    crdt = CrdtService(OWNER, NoRpc(), None, FailingStore(writer), CrdtConfig())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(crdt.run)
        crdt.store = None  # create the space in memory, then let the log fail
        await crdt.create_space("s", writers=[WRITER.peer_id])
        crdt.store = FailingStore(writer)
        with pytest.raises(DiskFullError):
            await crdt.set("s", "k", 1)
        with pytest.raises(DiskFullError):
            await crdt.revoke("s", WRITER.peer_id)
        assert crdt.get("s") == {}
        info = crdt.info("s")
        assert info.version_vector[OWNER.peer_id] == 1 and WRITER.peer_id in info.writers
        crdt.store = None
        assert (await crdt.set("s", "k", 2)).seq == 2  # the seq was not used up
        nursery.cancel_scope.cancel()
    writer.close()

"""``content.verify``: a manifest whose chunks match its id but whose file SHA-256 lies."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from lattica.content import ChunkNotFoundError, Cid
from lattica.content.publish import publish
from lattica.control.content_methods import CidParams, VerifyReply, register_content_methods
from lattica.control.registry import MethodRegistry
from lattica.node import Node
from tests.unit.content_samples import lying_manifest, open_store


async def verify(content: SimpleNamespace, cid: Cid) -> VerifyReply:
    """``content.verify`` of ``cid`` on a node whose content service is ``content``."""
    registry = MethodRegistry()
    register_content_methods(registry, cast(Node, SimpleNamespace(content=content)))
    method = registry.get("content.verify")
    assert method is not None
    reply = await method.handler(CidParams(str(cid)))
    assert isinstance(reply, VerifyReply)
    return reply


async def test_verify_checks_whole_files_against_the_manifest_sha256(tmp_path: Path) -> None:
    # Review finding: `lattica verify` said 0 bad for content whose file SHA-256 differs.
    with open_store(tmp_path / "store") as store:
        cid, _real = await lying_manifest(tmp_path, store)
        await store.add_root(store.read_block(cid.digest), store.manifest(cid), pinned=True)
        reply = await verify(SimpleNamespace(store=store), cid)  # verify starts no fetch here
        assert (reply.bad, reply.missing, reply.repair_fetch_id) == (0, 0, None)
        assert reply.sha256_mismatch == ["model.safetensors"]
        (root,) = [r for r in store.roots() if r.cid == cid]
        assert not root.pinned and root.failed is not None


async def test_verify_of_partial_content_checks_what_is_held_and_fetches_nothing(tmp_path: Path) -> None:
    # Review finding: verify after a --tensors fetch counted the chunks never fetched as
    # missing and "repaired" them by downloading the whole model.
    source = tmp_path / "m"
    source.mkdir()
    for i in range(4):
        (source / f"part{i}.bin").write_bytes(bytes([i]) * 5000)
    with open_store(tmp_path / "store") as store:
        result = await publish(store, source)
        never_fetched = [result.manifest.file("part3.bin").chunks[0].digest]
        await store._unindex(never_fetched)
        started: list[Cid] = []
        reply = await verify(SimpleNamespace(store=store, start_fetch=lambda cid: started.append(cid)), result.cid)
        assert (reply.checked, reply.bad, reply.missing, reply.not_held) == (3, 0, 0, 1)
        assert reply.repair_fetch_id is None and started == []


async def test_verify_repairs_chunks_dropped_since_they_were_held(tmp_path: Path) -> None:
    # Review finding: a seeder that found a chunk of its fetched file edited dropped it; a
    # later verify called it "never fetched here" and repaired nothing.
    source = tmp_path / "m"
    source.mkdir()
    for i in range(3):
        (source / f"part{i}.bin").write_bytes(bytes([i]) * 5000)
    with open_store(tmp_path / "store") as store:
        result = await publish(store, source)
        digest = result.manifest.file("part1.bin").chunks[0].digest
        (source / "part1.bin").write_bytes(b"X" * 5000)  # edited in place: same inode
        with pytest.raises(ChunkNotFoundError):
            store.read_block(digest)  # a read (serving, say) finds it changed and drops it
        started: list[Cid] = []
        content = SimpleNamespace(store=store, start_fetch=lambda cid: started.append(cid) or SimpleNamespace(id=7))
        reply = await verify(content, result.cid)
        assert (reply.bad, reply.not_held, reply.repair_fetch_id) == (1, 0, 7)
        assert started == [result.cid]
        assert store.dropped([digest]) == {digest}
        await store.put(bytes([1]) * 5000)  # fetched again: no longer counted as dropped
        assert store.dropped([digest]) == set()

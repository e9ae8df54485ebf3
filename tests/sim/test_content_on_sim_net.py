"""Multi-peer content fetch between real nodes on sim_net, in virtual time: 1 publisher and
4 seeders on 10 MB/s uplinks with 5% loss; corrupt and vanishing seeders; resume."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.content import Cid, ContentConfig, OutputConflictError
from lattica.content.exchange_fetch import FetchFailedError, FetchProgress
from lattica.content.exchange_messages import PIECE_BYTES, PROTOCOL_ID, Cancel
from lattica.content.exchange_protocol import BlockReceived, BlockWanted, ExchangeClient, ExchangeServer, HasAsked
from lattica.content.exchange_service import ContentService
from lattica.control.messages import NoParams
from lattica.control.node_methods import register_node_methods
from lattica.control.registry import MethodRegistry
from lattica.errors import RemoteProtocolError
from lattica.identity import Identity
from lattica.net.address import PeerAddr
from lattica.net.config import NetConfig
from lattica.net.rpc_messages import Error
from lattica.net.stream import QuicStream
from lattica.node import Node
from lattica.wire import encode_frame
from sim_net import Host, LinkConfig, Network
from tests.conftest import MakeTmpfs
from tests.sim.content_hogs import trickle
from tests.sim.dht_cluster import FAST_DHT
from tests.unit.content_samples import KIB, random_bytes

PORT = 4001
# 10 MB/s uplinks; 2.53% loss on each access link gives 1 - 0.9747**2 = 5% per path.
UPLINK = LinkConfig(latency_s=0.01, loss=0.0253, bandwidth_bps=80e6, queue_bytes=512 * KIB)
DOWNLINK = LinkConfig(latency_s=0.01, loss=0.0253)
DARK = LinkConfig(loss=1.0)
QUIET = LinkConfig(latency_s=0.01)  # 40 ms round trips, nothing lost, no bandwidth cap
CONTENT = ContentConfig(chunk_bytes=32 * KIB, fetch_request_timeout_s=5.0, fetch_stall_timeout_s=20.0)
CONFIG = NodeConfig(net=NetConfig(keepalive_interval_s=math.inf), content=CONTENT)
# A seeder whose block files a test overwrites to make it lie: published chunks as block files
# (a chunk held as a range of the published file is checked on every read, never served bad).
COPYING = replace(CONFIG, content=replace(CONTENT, publish_link=False))
SIZE = 2 * 1024 * KIB


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"content-sim-%d" % i).digest())


@dataclass
class Cluster:
    net: Network
    nodes: list[Node]
    scopes: list[trio.CancelScope]
    hosts: list[Host]

    def content(self, i: int) -> ContentService:
        service = self.nodes[i].content
        assert service is not None
        return service

    def crash(self, i: int) -> None:
        self.hosts[i].set_link(DARK)
        self.scopes[i].cancel()


def addr(i: int) -> PeerAddr:
    return PeerAddr((f"10.0.0.{i + 1}", PORT), identity(i).peer_id)


@asynccontextmanager
async def cluster(
    tmp_path: Path,
    count: int,
    seed: int = 1,
    *,
    dht: bool = False,
    configs: dict[int, NodeConfig] | None = None,
    up: LinkConfig = UPLINK,
    down: LinkConfig = DOWNLINK,
    without_content: frozenset[int] = frozenset(),
) -> AsyncIterator[Cluster]:
    async with Network(seed=seed) as net, trio.open_nursery() as nursery:
        hosts = [net.add_host(f"10.0.0.{i + 1}", up=up, down=down) for i in range(count)]
        nodes: list[Node] = []
        scopes: list[trio.CancelScope] = []

        async def run(i: int, *, task_status: trio.TaskStatus[Node]) -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                config = (configs or {}).get(i, CONFIG)
                if dht and i:  # everyone joins the DHT through node 0
                    config = replace(CONFIG, dht=replace(FAST_DHT, bootstrap_peers=(addr(0),)))
                blocks_dir = None if i in without_content else tmp_path / f"node{i}"
                node = Node(identity(i), hosts[i].bind(PORT), config, blocks_dir=blocks_dir, rng=random.Random(i))
                async with node:
                    task_status.started(node)
                    await trio.sleep_forever()

        async with AsyncExitStack():
            for i in range(count):
                nodes.append(await nursery.start(run, i))
            yield Cluster(net, nodes, scopes, hosts)
            nursery.cancel_scope.cancel()


async def publish_everywhere(c: Cluster, source: Path, indices: range) -> str:
    cids = {str((await c.content(i).publish(source)).cid) for i in indices}
    assert len(cids) == 1  # the same bytes give the same id on every node
    return cids.pop()


async def connect_all(c: Cluster, downloader: int, seeders: range) -> None:
    for i in seeders:
        node = c.nodes[i]
        await c.nodes[downloader].connect(PeerAddr(node.listen_addresses()[0], node.peer_id))


def source_file(tmp_path: Path, size: int = SIZE) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(random_bytes(size, seed=7))
    return path


def when(progress: FetchProgress, fraction: float, event: trio.Event) -> Callable[[FetchProgress], None]:
    def check(p: FetchProgress) -> None:
        if p.received_bytes >= fraction * p.total_bytes:
            event.set()

    return check


async def test_fetch_from_publisher_and_four_seeders_under_loss(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = source_file(tmp_path)
    async with cluster(tmp_path, 6) as c:
        cid = await publish_everywhere(c, source, range(5))
        await connect_all(c, 5, range(5))
        result = await c.content(5).fetch(Cid.parse(cid), out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert result.received_bytes == SIZE and result.held_bytes == SIZE
        assert len(result.peer_bytes) >= 3  # the load was spread over the sources
        assert result.chunks_requested == SIZE // (32 * KIB)
        report = await c.content(5).store.verify()
        assert report.ok


async def test_corrupt_seeder_is_detected_and_dropped(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    source = source_file(tmp_path, 1024 * KIB)
    async with cluster(tmp_path, 3, configs={1: COPYING}) as c:
        cid = await publish_everywhere(c, source, range(2))
        store = c.content(1).store
        manifest = store.manifest(Cid.parse(cid))
        for chunk in manifest.files[0].chunks:  # node 1 now serves garbage for every chunk
            path = store.block_path(chunk.digest)
            path.write_bytes(bytes(len(path.read_bytes())))
        await connect_all(c, 2, range(2))
        result = await c.content(2).fetch(Cid.parse(cid), out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        bad = str(c.nodes[1].peer_id)
        assert bad in result.dropped and "verification" in result.dropped[bad]
        assert result.peer_bytes.get(bad, 0) == 0
        assert (await c.content(2).store.verify()).ok


async def test_a_seeder_vanishing_mid_transfer_does_not_stall(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = source_file(tmp_path)
    async with cluster(tmp_path, 4) as c:
        cid = await publish_everywhere(c, source, range(3))
        await connect_all(c, 3, range(3))
        third = trio.Event()
        progress = FetchProgress(cid)
        progress.on_update = when(progress, 1 / 3, third)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: c.content(3).fetch(Cid.parse(cid), out_dir=tmp_path / "out", progress=progress))
            await third.wait()
            vanished = str(c.nodes[0].peer_id)
            before = progress.peer_bytes.get(vanished, 0)
            c.crash(0)
        assert progress.state == "done"
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert before > 0 and progress.peer_bytes[vanished] == before  # nothing more came from it
        # Crashed at a third: it was replaced well before the stall timeout.
        assert progress.finished_at is not None
        assert progress.finished_at - progress.started_at < CONTENT.fetch_stall_timeout_s


async def test_an_interrupted_fetch_resumes_with_only_the_missing_chunks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = source_file(tmp_path)
    async with cluster(tmp_path, 3) as c:
        cid_text = await publish_everywhere(c, source, range(2))
        await connect_all(c, 2, range(2))
        cid = Cid.parse(cid_text)
        half = trio.Event()
        first = FetchProgress(cid_text)
        first.on_update = when(first, 0.5, half)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: c.content(2).fetch(cid, progress=first))
            await half.wait()
            nursery.cancel_scope.cancel()
        store = c.content(2).store
        chunks = store.manifest(cid).unique_chunks()
        missing = store.missing(chunks)
        assert 0 < len(missing) < len(chunks) // 2 + 1
        second = await c.content(2).fetch(cid, out_dir=tmp_path / "out")
        assert second.chunks_requested == len(missing)
        assert second.received_bytes == sum(chunks[d] for d in missing)
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()


async def test_fetch_without_any_provider_fails_and_keeps_nothing_pinned_wrongly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = source_file(tmp_path, 64 * KIB)
    async with cluster(tmp_path, 2) as c:
        cid_text = await publish_everywhere(c, source, range(1))
        # Node 1 is connected to nobody and the DHT is empty: no manifest anywhere.
        with pytest.raises(FetchFailedError, match="cannot get the manifest"):
            await c.content(1).fetch(Cid.parse(cid_text))
        assert c.content(1).store.roots() == []


async def test_providers_are_found_through_dht_provider_records(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = source_file(tmp_path, 512 * KIB)
    async with cluster(tmp_path, 4, dht=True) as c:
        for node in c.nodes[1:]:
            await node.joined_dht.wait()
        cid_text = await publish_everywhere(c, source, range(1, 3))
        cid = Cid.parse(cid_text)
        for i in (1, 2):
            await c.content(i).dht.provide(cid.to_bytes())
        # Node 3 was never told about the seeders: the DHT's provider records name them.
        found = await c.content(3).dht.find_providers(cid.to_bytes())
        assert {r.provider_id for r in found.providers} == {c.nodes[1].peer_id, c.nodes[2].peer_id}
        result = await c.content(3).fetch(cid, out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert set(result.peer_bytes) <= {str(c.nodes[1].peer_id), str(c.nodes[2].peer_id)}  # not node 0
        assert sum(result.peer_bytes.values()) == 512 * KIB
        # Having all of it, node 3 now announces itself: a downloader becomes a seeder.
        await c.content(3).announcements_done()
        providers = await c.content(0).dht.find_providers(cid.to_bytes())
        assert {r.provider_id for r in providers.providers} == {c.nodes[i].peer_id for i in (1, 2, 3)}


async def test_a_busy_seeder_refuses_and_is_retried_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = source_file(tmp_path, 512 * KIB)
    one_upload = replace(CONFIG, content=replace(CONTENT, max_uploads=1))
    async with cluster(tmp_path, 3, configs={0: one_upload}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        await connect_all(c, 2, range(1))
        results: dict[int, FetchProgress] = {}

        async def fetch(i: int) -> None:
            results[i] = await c.content(i).fetch(cid, out_dir=tmp_path / f"out{i}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, 1)
            nursery.start_soon(fetch, 2)
        for i in (1, 2):
            assert (tmp_path / f"out{i}" / "data.bin").read_bytes() == source.read_bytes()
        # Both completed from the one seeder: one was refused while the other held the only
        # upload slot, and came back later.
        assert sorted(r.busy_refusals > 0 for r in results.values()) == [False, True]
        assert all(r.peer_bytes == {str(c.nodes[0].peer_id): 512 * KIB} for r in results.values())


async def _hog(c: Cluster, by: int, of: int, streams: int, stop: trio.Event) -> None:
    """Node ``by`` holds ``streams`` exchange streams open to node ``of``, each kept alive
    with a ``Has`` every 10 s (below ``upload_timeout_s``), as the review's hog did."""

    async def hold() -> None:
        stream = await c.nodes[by].rpc.open_stream(c.nodes[of].peer_id, PROTOCOL_ID)
        client = ExchangeClient()
        # Closed (and the slot freed) once told to stop, or reset by the seeder (preempted).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                while not stop.is_set():
                    _id, frame = client.has(b"\x01" * 32)
                    await stream.send_all(frame)
                    with trio.move_on_after(10):
                        await stream.receive_some(65536)
                    with trio.move_on_after(10):
                        await stop.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(hold)


async def test_one_peer_cannot_hold_every_upload_slot(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # Review finding: one peer's idle streams took all of max_uploads and every other peer's
    # fetch failed "busy" at once. The per-peer cap leaves the other slots to others.
    source = source_file(tmp_path, 128 * KIB)
    capped = replace(CONFIG, content=replace(CONTENT, max_uploads=4, max_uploads_per_peer=2))
    async with cluster(tmp_path, 3, configs={0: capped}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        await connect_all(c, 2, range(1))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hog, c, 1, 0, 4, stop)
            await trio.sleep(2)
            assert c.content(0).uploads == 2  # the hog got its share, not every slot
            result = await c.content(2).fetch(cid, out_dir=tmp_path / "out")
            stop.set()
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert result.peer_bytes == {str(c.nodes[0].peer_id): 128 * KIB}


def _keepalive_frames(client: ExchangeClient, how: str, digest: bytes, n: int) -> bytes:
    """What a slot hog sends every few seconds: a Cancel of a request never made, a Has, or a
    Want of a real chunk cancelled in the same breath."""
    if how == "cancel":
        return encode_frame(Cancel(1_000_000 + n))
    if how == "has":
        return client.has(digest)[1]
    request_id, want = client.want(digest, 64 * KIB)
    return want + client.cancel(request_id)


@pytest.mark.parametrize("how", ["cancel", "has", "want-and-cancel"])
async def test_a_stream_that_takes_no_block_data_loses_its_upload_slot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    # Review findings: any bytes kept an upload slot (a Cancel of a request never made, every
    # few seconds, held one for good at ~1 B/s), then any request did (a Want cancelled at
    # once). Only requests outstanding and block data sent count now.
    source = source_file(tmp_path, 64 * KIB)
    one_upload = replace(CONFIG, content=replace(CONTENT, max_uploads=1))
    async with cluster(tmp_path, 3, configs={0: one_upload}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        digest = c.content(0).store.manifest(cid).files[0].chunks[0].digest
        await connect_all(c, 1, range(1))
        await connect_all(c, 2, range(1))
        stream = await c.nodes[1].rpc.open_stream(c.nodes[0].peer_id, PROTOCOL_ID)
        client = ExchangeClient()
        closed_at: float | None = None
        async with stream, trio.open_nursery() as nursery:

            async def keep_up() -> None:
                for n in range(100):  # bounded: ~500 s of virtual time
                    await stream.send_all(_keepalive_frames(client, how, digest, n))
                    await trio.sleep(5)

            async def watch() -> None:
                nonlocal closed_at
                with contextlib.suppress(trio.BrokenResourceError, RemoteProtocolError):
                    while data := await stream.receive_some(65536):
                        client.receive(data)
                closed_at = trio.current_time()
                nursery.cancel_scope.cancel()

            started = trio.current_time()
            nursery.start_soon(keep_up)
            nursery.start_soon(watch)
        assert closed_at is not None
        assert closed_at - started <= CONTENT.upload_timeout_s + 6.0
        assert c.content(0).uploads == 0
        await c.content(2).fetch(cid, out_dir=tmp_path / "out")  # the slot is free for others
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()


async def _read_blocks_slowly(
    stream: trio.abc.Stream, client: ExchangeClient, count: int, pause_s: float
) -> list[bytes]:
    """Read 64 KiB every ``pause_s`` (virtual) seconds until ``count`` blocks arrived."""
    blocks: list[bytes] = []
    while len(blocks) < count:
        data = await stream.receive_some(64 * KIB)
        assert data, "the seeder ended the stream"
        blocks += [e.data for e in client.receive(data) if isinstance(e, BlockReceived)]
        await trio.sleep(pause_s)
    return blocks


SLOW_READER = replace(CONFIG, net=replace(CONFIG.net, stream_receive_window_bytes=64 * KIB))
TWO_MIB_CHUNKS = replace(CONFIG, content=replace(CONTENT, chunk_bytes=2048 * KIB))


async def test_a_slow_steady_reader_is_not_cut_off_inside_a_block(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: the whole answer had upload_timeout_s, so a reader taking ~26 KB/s never
    # got a 2 MiB block (its answer waits on the reader for ~37 s); each frame has it now.
    source = source_file(tmp_path, 2048 * KIB)
    async with cluster(tmp_path, 2, configs={0: TWO_MIB_CHUNKS, 1: SLOW_READER}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        (chunk,) = c.content(0).store.manifest(cid).files[0].chunks
        await connect_all(c, 1, range(1))
        stream = await c.nodes[1].rpc.open_stream(c.nodes[0].peer_id, PROTOCOL_ID)
        client = ExchangeClient()
        async with stream:
            await stream.send_all(client.want(chunk.digest, chunk.length)[1])
            started = trio.current_time()
            (block,) = await _read_blocks_slowly(stream, client, 1, pause_s=2.5)
        assert trio.current_time() - started > 2 * CONTENT.upload_timeout_s
        assert block == source.read_bytes()


async def test_a_seeder_slower_than_a_chunk_per_request_timeout_still_serves_the_fetch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: a seeder at 30 KB/s had every 1 MiB request time out (30 s) and was
    # dropped, so a fetch over a slow link failed with nothing stored. Here: 64 KiB chunks over
    # a 4 KB/s uplink (16 s each) against a 5 s request timeout. Its bytes keep coming, so its
    # requests wait for them.
    source = source_file(tmp_path, 128 * KIB)
    sixty_four = replace(CONFIG, content=replace(CONTENT, chunk_bytes=64 * KIB))
    async with cluster(tmp_path, 2, configs={0: sixty_four}, up=QUIET, down=QUIET) as c:
        c.hosts[0].set_link(QUIET, up=LinkConfig(latency_s=0.01, bandwidth_bps=32e3, queue_bytes=64 * KIB))
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        began = trio.current_time()
        result = await c.content(1).fetch(cid, out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert result.dropped == {} and result.chunks_requested == 2
        assert trio.current_time() - began > 2 * 64 * KIB / 4000  # it was that slow


async def test_a_slow_link_over_quic_gets_the_blocks_its_seeder_already_queued(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: over QUIC (no lane) a seeder at ~30 KB/s answered every request into its
    # connection's send buffer long before the reader had the blocks, closed the stream as idle
    # upload_timeout_s later and reset what was still queued, every time: the fetch never ended.
    source = source_file(tmp_path, 3 * 1024 * KIB)
    mebibyte = replace(CONFIG, content=replace(CONTENT, chunk_bytes=1024 * KIB, fetch_request_timeout_s=30.0))
    async with cluster(tmp_path, 2, configs={0: mebibyte, 1: mebibyte}, up=QUIET, down=QUIET) as c:
        c.hosts[0].set_link(QUIET, up=LinkConfig(latency_s=0.01, bandwidth_bps=240e3, queue_bytes=64 * KIB))
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        with trio.fail_after(600):  # virtual seconds; ~110 at 30 KB/s
            result = await c.content(1).fetch(cid, out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert result.dropped == {}


async def test_a_request_soon_after_a_slow_answer_finds_the_stream_open(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: an answer that ended after the idle wait was armed did not count, so
    # the stream closed upload_timeout_s after the *request*, while its answer had ended
    # seconds before and the reader was still taking it in.
    source = source_file(tmp_path, 4096 * KIB)
    async with cluster(tmp_path, 2, configs={0: TWO_MIB_CHUNKS, 1: SLOW_READER}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        chunks = c.content(0).store.manifest(cid).files[0].chunks
        await connect_all(c, 1, range(1))
        stream = await c.nodes[1].rpc.open_stream(c.nodes[0].peer_id, PROTOCOL_ID)
        client = ExchangeClient()
        blocks = []
        async with stream:
            for chunk in chunks:  # the next request as soon as the last block is in
                await stream.send_all(client.want(chunk.digest, chunk.length)[1])
                blocks += await _read_blocks_slowly(stream, client, 1, pause_s=1.5)
        assert b"".join(blocks) == source.read_bytes()


async def test_an_idle_stream_is_ended_not_reset_so_blocks_on_the_way_arrive(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The seeder closes a stream idle for upload_timeout_s; a block it already sent may still
    # wait in the reader's buffers, and a reset threw it away.
    source = source_file(tmp_path, 1024 * KIB)
    big_chunks = replace(CONFIG, content=replace(CONTENT, chunk_bytes=1024 * KIB))
    async with cluster(tmp_path, 2, configs={0: big_chunks}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        (chunk,) = c.content(0).store.manifest(cid).files[0].chunks
        await connect_all(c, 1, range(1))
        stream = await c.nodes[1].rpc.open_stream(c.nodes[0].peer_id, PROTOCOL_ID)
        client = ExchangeClient()
        async with stream:
            _id, frame = client.want(chunk.digest, chunk.length)
            await stream.send_all(frame)
            await trio.sleep(CONTENT.upload_timeout_s + 10)  # read nothing until it gave up
            events = []
            while data := await stream.receive_some(1024 * KIB):
                events += client.receive(data)
        assert [e.data for e in events if isinstance(e, BlockReceived)] == [source.read_bytes()]


async def test_a_peer_that_stops_reading_loses_its_upload_slot_but_not_its_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding (round 3): answers handed to the connection but never taken kept the stream
    # counted as active, so a fetcher that stopped reading held its upload slot until its
    # connection died, or for good while it lived. Queued answers count only while they move;
    # the stream is ended, not reset, so the reader still gets the block if it reads later.
    source = source_file(tmp_path, 1024 * KIB)
    seeder = replace(CONFIG, content=replace(CONTENT, chunk_bytes=1024 * KIB, max_uploads=1))
    alive = replace(SLOW_READER, net=replace(SLOW_READER.net, keepalive_interval_s=5.0))  # lives on
    async with cluster(tmp_path, 3, configs={0: seeder, 1: alive}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        (chunk,) = c.content(0).store.manifest(cid).files[0].chunks
        await connect_all(c, 1, range(1))
        stream = await c.nodes[1].rpc.open_stream(c.nodes[0].peer_id, PROTOCOL_ID)
        client = ExchangeClient()
        async with stream:
            await stream.send_all(client.want(chunk.digest, chunk.length)[1])
            await trio.sleep(1)  # virtual: the request has arrived
            assert c.content(0).uploads == 1
            # Virtual time: the idle check runs every upload_timeout_s; the second one sees
            # the answer sitting where the first one left it.
            await trio.sleep(2 * CONTENT.upload_timeout_s + 1)
            assert c.content(0).uploads == 0
            await connect_all(c, 2, range(1))
            await c.content(2).fetch(cid, out_dir=tmp_path / "out")  # the slot serves others
            events = []
            while data := await stream.receive_some(1024 * KIB):
                events += client.receive(data)
        assert [e.data for e in events if isinstance(e, BlockReceived)] == [source.read_bytes()]
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()


async def _rotating_hog(c: Cluster, by: int, of: int, streams: int, stop: trio.Event, every_s: float) -> None:
    """Node ``by`` holds ``streams`` exchange streams to node ``of``, each closed and reopened
    every ``every_s`` with a ``Has`` sent: what a review's attacker did to stay under a
    per-stream grace period, at ~1 KB/s."""

    async def hold() -> None:
        for _ in range(1000):  # bounded: ~8,000 virtual seconds
            if stop.is_set():
                return
            stream = await c.nodes[by].rpc.open_stream(c.nodes[of].peer_id, PROTOCOL_ID)
            async with stream:
                await stream.send_all(ExchangeClient().has(b"\x01" * 32)[1])
                with trio.move_on_after(every_s):
                    await stop.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(hold)


async def _trickling_hog(c: Cluster, by: int, of: int, streams: int, stop: trio.Event, cid: Cid) -> None:
    """Node ``by`` holds ``streams`` exchange streams to node ``of``, each asking for every
    chunk of ``cid`` and reading 1 KiB a second: active by the idle rule, for as long as it
    likes (the review's trickling reader)."""
    chunks = c.content(of).store.manifest(cid).files[0].chunks
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(trickle, c.nodes[by], c.nodes[of].peer_id, chunks, stop)


@pytest.mark.parametrize("how", ["trickle", "rotate"])
async def test_hosts_holding_every_slot_give_one_to_a_host_that_asks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    # Review findings: the caps let a few hosts hold every upload slot of a seeder (here two
    # hosts, two each), and its other peers' fetches failed "busy"; a first fix by rate floor
    # and grace period was beaten by reopening each stream before its grace ended. When all
    # slots are held, a newcomer now takes one from the host holding the most, if that host
    # holds at least two more than its own.
    source = source_file(tmp_path, 1024 * KIB)
    seeder = replace(CONFIG, content=replace(CONTENT, max_uploads=4, max_uploads_per_address=2))
    hogs = replace(SLOW_READER, net=replace(SLOW_READER.net, keepalive_interval_s=5.0))
    async with cluster(tmp_path, 4, configs={0: seeder, 1: hogs, 2: hogs}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        for i in (1, 2):
            await connect_all(c, i, range(1))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for hog in (1, 2):
                if how == "rotate":
                    nursery.start_soon(_rotating_hog, c, hog, 0, 2, stop, 8.0)
                else:
                    nursery.start_soon(_trickling_hog, c, hog, 0, 2, stop, cid)
            await trio.sleep(3 * CONTENT.upload_timeout_s)
            assert c.content(0).uploads == 4  # the two hosts hold every slot, past the idle rule
            await connect_all(c, 3, range(1))
            result = await c.content(3).fetch(cid, out_dir=tmp_path / "out")  # failed "busy" before
            stop.set()
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert result.peer_bytes == {str(c.nodes[0].peer_id): 1024 * KIB}
        assert c.content(0).upload_slots.preemptions >= 1
        # An operator sees it in `lattica status --json`.
        registry = MethodRegistry()
        register_node_methods(registry, c.nodes[0])
        status = registry.get("status")
        assert status is not None
        uploads = (await status.handler(NoParams())).uploads  # type: ignore[attr-defined]
        assert uploads["max"] == 4 and uploads["preempted"] == c.content(0).upload_slots.preemptions


async def test_fetchers_sharing_a_slow_uplink_all_finish_and_none_takes_a_slot_from_another(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: with preemption by rate floor, fetchers slow only because the seeder's
    # uplink was shared preempted each other in the middle of chunks (two such fetchers never
    # finished). Hosts holding one slot each never take from each other: the others wait.
    source = source_file(tmp_path, 2048 * KIB)
    seeder = replace(CONFIG, content=replace(CONTENT, max_uploads=2, chunk_bytes=128 * KIB))
    patient = replace(CONFIG, content=replace(CONTENT, fetch_stall_timeout_s=120.0))
    slow_up = LinkConfig(latency_s=0.01, bandwidth_bps=800e3, queue_bytes=64 * KIB)  # 100 KB/s
    configs = {0: seeder} | {i: patient for i in range(1, 6)}
    async with cluster(tmp_path, 6, configs=configs, up=slow_up, down=QUIET) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        for i in range(1, 6):
            await connect_all(c, i, range(1))
        async with trio.open_nursery() as nursery:
            for i in range(1, 6):
                nursery.start_soon(partial(c.content(i).fetch, cid, out_dir=tmp_path / f"out{i}"))
        for i in range(1, 6):
            assert (tmp_path / f"out{i}" / "data.bin").read_bytes() == source.read_bytes()
        assert c.content(0).upload_slots.preemptions == 0


async def test_a_peer_that_serves_no_content_is_reported_as_such_and_not_dropped_as_hostile(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: asked for a manifest, a node without content (a relay, say) refuses the
    # stream at the RPC layer, and the fetch reported the exchange decoder's "Expected `array`,
    # got `object`" instead of what the peer said.
    source = source_file(tmp_path, 64 * KIB)
    async with cluster(tmp_path, 3, without_content=frozenset({1})) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 2, range(1, 2))  # only the node without content
        with pytest.raises(FetchFailedError, match="unknown-protocol: no handler for /lattica/content/1") as failed:
            await c.content(2).fetch(cid, out_dir=tmp_path / "nothing")
        assert "Expected" not in str(failed.value)
        await connect_all(c, 2, range(1))  # now the seeder too: its chunks come, the other is no liar
        result = await c.content(2).fetch(cid, out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert str(c.nodes[1].peer_id) not in result.dropped


@pytest.mark.parametrize("full", ["upload slots", "rpc calls"])
async def test_a_busy_answer_for_the_manifest_is_retried_not_fatal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, full: str
) -> None:
    # "rpc calls": review finding: a "busy" from the RPC layer (the node at its call caps)
    # counted as a failure, not as busy, so the fetch did not ask that seeder again.
    source = source_file(tmp_path, 64 * KIB)
    if full == "upload slots":
        seeder = replace(CONFIG, content=replace(CONTENT, max_uploads=1))
    else:
        seeder = replace(CONFIG, net=replace(CONFIG.net, rpc_max_concurrent_inbound=1))
    async with cluster(tmp_path, 3, configs={0: seeder}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        await connect_all(c, 2, range(1))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hog, c, 1, 0, 1, stop)
            await trio.sleep(2)
            assert c.content(0).uploads == 1  # the only slot (and call) is taken
            nursery.start_soon(_release, stop, 3.0)
            await c.content(2).fetch(cid, out_dir=tmp_path / "out")
            assert stop.is_set()  # it got the manifest only after the slot was freed
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()


async def test_a_holder_that_sends_a_refusal_after_answering_is_dropped_as_hostile(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: only a stream's first bytes can be the RPC layer's refusal; a peer that
    # said it held the chunks and then sent a refusal frame where blocks belong was taken for
    # a refusal (not banned, linked again at every search) instead of a liar.
    source = source_file(tmp_path, 2048 * KIB)
    async with cluster(tmp_path, 3, without_content=frozenset({1})) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))

        async def liar(stream: QuicStream, peer: object) -> None:
            server = ExchangeServer(max_outstanding=64)
            lied = False
            while data := await stream.receive_some(65536):
                for event in server.receive(data):
                    if isinstance(event, HasAsked | BlockWanted) and not lied:
                        if isinstance(event, HasAsked):
                            await stream.send_all(server.has_reply(event.id, True))
                            await trio.sleep(0.1)  # a frame of its own, after the answer
                        await stream.send_all(encode_frame(Error("busy", "")))
                        lied = True

        c.nodes[1].rpc.add_stream_handler(PROTOCOL_ID, liar)
        await connect_all(c, 2, range(2))
        result = await c.content(2).fetch(cid, out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert str(c.nodes[1].peer_id) in result.dropped


async def _release(stop: trio.Event, after_s: float) -> None:
    await trio.sleep(after_s)
    stop.set()


async def test_a_fetch_from_a_connected_peer_does_not_wait_on_the_dht(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A provider lookup can wait many seconds on a DHT node that is gone (one query timeout per
    # dead node); the manifest and the chunks a connected peer holds must not wait for it.
    source = source_file(tmp_path, 256 * KIB)
    async with cluster(tmp_path, 2) as c:
        cid_text = await publish_everywhere(c, source, range(1))
        await connect_all(c, 1, range(1))
        lookups = 0

        async def hanging_lookup(key: bytes) -> object:
            nonlocal lookups
            lookups += 1
            await trio.sleep_forever()

        monkeypatch.setattr(c.content(1).dht, "find_providers", hanging_lookup)
        with trio.fail_after(5):  # virtual seconds: the transfer itself takes well under one
            result = await c.content(1).fetch(Cid.parse(cid_text), out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert result.peer_bytes == {str(c.nodes[0].peer_id): 256 * KIB}
        assert lookups == 1  # the DHT is still asked, beside the transfer, for more providers


async def test_a_fetch_nobody_can_finish_fails_with_its_own_error(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: a failure inside the transfer reached the user as "internal error:
    # ExceptionGroup" instead of the fetch's own message.
    source = source_file(tmp_path, 256 * KIB)
    async with cluster(tmp_path, 2, configs={0: COPYING}) as c:
        cid = await publish_everywhere(c, source, range(1))
        store = c.content(0).store
        for chunk in store.manifest(Cid.parse(cid)).files[0].chunks:  # the only seeder lies
            path = store.block_path(chunk.digest)
            path.write_bytes(bytes(len(path.read_bytes())))
        await connect_all(c, 1, range(1))
        # ... and says why the only peer was dropped (review finding: it did not).
        liar = str(c.nodes[0].peer_id)[:12]
        with pytest.raises(FetchFailedError, match=rf"no peer could supply.*dropped {liar}: .*verification"):
            await c.content(1).fetch(Cid.parse(cid), out_dir=tmp_path / "out")
        assert not (tmp_path / "out" / "data.bin").exists()


async def test_what_connected_peers_answered_for_the_manifest_is_reported(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: every connected peer's answer was dropped and the user read "no provider
    # or connected peer found".
    source = source_file(tmp_path, 64 * KIB)
    async with cluster(tmp_path, 3) as c:
        cid_text = await publish_everywhere(c, source, range(2, 3))  # only node 2 holds it
        await connect_all(c, 1, range(1))  # node 1 knows only node 0, which does not
        with pytest.raises(FetchFailedError, match=f"{c.nodes[0].peer_id}: not-found"):
            await c.content(1).fetch(Cid.parse(cid_text))


async def test_a_cancel_stops_a_block_the_server_has_begun_within_one_piece(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # At the end of a fetch, requests queued at one seeder are cancelled there and asked of a
    # faster one. The seeder may have begun the block already (it reads the next request while
    # the last one's bytes still sit in the stream's send buffer): the cancel must stop it
    # within one piece, not let the whole block go out for nothing.
    chunk = 1024 * KIB
    big = replace(CONFIG, content=replace(CONTENT, chunk_bytes=chunk))
    source = source_file(tmp_path, 3 * chunk)
    async with cluster(tmp_path, 2, configs={0: big}) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        first, second, third = (ref.digest for ref in c.content(0).store.manifest(cid).files[0].chunks)
        stream = await c.nodes[1].rpc.open_stream(c.nodes[0].peer_id, PROTOCOL_ID)
        client = ExchangeClient()
        received = 0
        arrived: set[bytes] = set()
        async with stream:
            ids = {}
            for digest in (first, second, third):
                ids[digest], frame = client.want(digest, chunk)
                await stream.send_all(frame)
            cancel_sent = False
            while third not in arrived:
                data = await stream.receive_some(1 << 20)
                assert data
                received += len(data)
                if not cancel_sent:  # the first bytes are here: the server is busy with `first`
                    await stream.send_all(client.cancel(ids[second]))
                    cancel_sent = True
                arrived |= {event.digest for event in client.receive(data) if isinstance(event, BlockReceived)}
        assert arrived == {first, third}
        framing = 16 * KIB
        assert received <= 2 * chunk + PIECE_BYTES + framing


async def test_a_connected_peer_without_the_content_gets_no_chunk_request_and_stalls_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Node 1 is connected but holds nothing. Requests ride along with the Has only to likely
    # holders (the peer that sent the manifest, DHT providers): a node connected to many peers
    # that hold nothing of this would otherwise send each of them requests that come back
    # refused, and wait a round trip for those chunks. Its "not held" answer must leave the
    # whole fetch to node 0, without a stall.
    source = source_file(tmp_path, 256 * KIB)
    async with cluster(tmp_path, 3, up=QUIET, down=QUIET) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 2, range(2))
        result = await c.content(2).fetch(cid, out_dir=tmp_path / "out")
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert set(result.peer_bytes) == {str(c.nodes[0].peer_id)}
        assert result.requests_sent == result.chunks_requested == 256 // 32


async def test_chunk_requests_go_out_with_the_has_not_a_round_trip_after_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # One 4 KiB chunk from a connected seeder over 40 ms round trips: the manifest takes one
    # round trip; the Has for it and the chunk request share the second.
    source = source_file(tmp_path, 4 * KIB)
    async with cluster(tmp_path, 2, up=QUIET, down=QUIET) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        began = trio.current_time()
        result = await c.content(1).fetch(cid)
        assert result.received_bytes == 4 * KIB
        assert trio.current_time() - began == pytest.approx(2 * 0.04, abs=0.005)


async def test_a_silent_peer_does_not_hold_up_the_manifest(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding (suspected): connected peers were asked for the manifest one at a time
    # with a 30 s timeout each, so a peer that never answers, asked first, cost 30 s.
    source = source_file(tmp_path, 64 * KIB)
    async with cluster(tmp_path, 3) as c:
        cid_text = await publish_everywhere(c, source, range(1, 2))

        async def never_answers(stream: object, peer: object) -> None:
            await trio.sleep_forever()

        c.nodes[0].rpc.add_stream_handler(PROTOCOL_ID, never_answers)
        await connect_all(c, 2, range(2))  # node 0 first: it is asked first
        with trio.fail_after(5):  # virtual seconds, far below the 30 s manifest timeout
            result = await c.content(2).fetch(Cid.parse(cid_text), out_dir=tmp_path / "out")
        assert result.peer_bytes == {str(c.nodes[1].peer_id): 64 * KIB}
        assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()


async def test_two_fetches_of_one_content_at_once_download_it_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: each of two concurrent fetches downloaded all of it (chunks the other had
    # written but not yet acknowledged counted as missing). The second now waits for the first.
    source = source_file(tmp_path, 512 * KIB)
    async with cluster(tmp_path, 2) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        results: list[FetchProgress] = []

        async def fetch_into(name: str) -> None:
            results.append(await c.content(1).fetch(cid, out_dir=tmp_path / name))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_into, "one")
            nursery.start_soon(fetch_into, "two")
        assert sorted(r.received_bytes for r in results) == [0, 512 * KIB]
        for name in ("one", "two"):
            assert (tmp_path / name / "data.bin").read_bytes() == source.read_bytes()


async def test_a_held_chunk_edited_in_its_fetched_file_is_fetched_again_in_the_same_fetch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: a fetch into a new folder copies held chunks from the first folder's
    # file; one edited there was dropped on read and the fetch failed, and only a second
    # fetch succeeded.
    source = source_file(tmp_path, 256 * KIB)
    async with cluster(tmp_path, 2) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        await c.content(1).fetch(cid, out_dir=tmp_path / "first")
        with (tmp_path / "first" / "data.bin").open("r+b") as edit:
            edit.seek(100 * KIB)
            edit.write(b"edited in place")
        again = await c.content(1).fetch(cid, out_dir=tmp_path / "second")
        assert (tmp_path / "second" / "data.bin").read_bytes() == source.read_bytes()
        assert again.received_bytes == 32 * KIB  # the one chunk that changed, from node 0


async def test_a_fetch_into_the_block_store_is_refused(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # Review finding: `fetch -o HOME/blocks/files` succeeded, and the next gc deleted the file.
    source = source_file(tmp_path, 64 * KIB)
    async with cluster(tmp_path, 2) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        with pytest.raises(OutputConflictError, match="inside the node's block store"):
            await c.content(1).fetch(cid, out_dir=c.content(1).store.files_dir)
        assert list(c.content(1).store.files_dir.iterdir()) == []


async def test_fetching_again_into_the_same_folder_keeps_the_files_in_place(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = source_file(tmp_path)
    async with cluster(tmp_path, 2) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        out = tmp_path / "out"
        await c.content(1).fetch(cid, out_dir=out)
        before = os.stat(out / "data.bin")
        await c.content(1).fetch(cid, out_dir=out)
        after = os.stat(out / "data.bin")
        # Not written again (it was rewritten whole from the store, needing room for two).
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert (out / "data.bin").read_bytes() == source.read_bytes()
        store = c.content(1).store
        assert len(list(store.files_dir.iterdir())) == 1  # one store link to the one file
        assert store.missing({chunk.digest: chunk.length for chunk in store.manifest(cid).files[0].chunks}) == []

        # A file that differs is not kept: the fetch puts the content back.
        damaged = bytearray(source.read_bytes())
        damaged[SIZE // 2] ^= 0xFF
        fd = os.open(out / "data.bin", os.O_WRONLY)  # in place: the store's link sees it too
        os.pwrite(fd, damaged[SIZE // 2 : SIZE // 2 + 1], SIZE // 2)
        os.close(fd)
        await c.content(1).fetch(cid, out_dir=out)
        assert (out / "data.bin").read_bytes() == source.read_bytes()


async def test_fetching_again_needs_no_room_for_a_second_copy(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, make_tmpfs: MakeTmpfs
) -> None:
    # Review finding: on a disk with room for one copy the second fetch failed "disk full".
    source = source_file(tmp_path)  # 2 MiB
    disk = make_tmpfs(3)  # another file system than the store: chunks are block files there
    async with cluster(tmp_path, 2) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        await c.content(1).fetch(cid, out_dir=disk / "out")
        await c.content(1).fetch(cid, out_dir=disk / "out")
        assert (disk / "out" / "data.bin").read_bytes() == source.read_bytes()
        assert sorted(p.name for p in (disk / "out").iterdir()) == ["data.bin"]


async def test_fetching_again_after_the_output_was_truncated_restores_it_in_one_fetch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: every chunk held in the truncated file was found lost one fetch at a time
    # (57 fetches for the real model); now one pass drops them all and the retry fetches them.
    source = source_file(tmp_path)
    async with cluster(tmp_path, 2) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        out = tmp_path / "out"
        await c.content(1).fetch(cid, out_dir=out)
        assert len(c.content(1).store.manifest(cid).files[0].chunks) > 2
        os.truncate(out / "data.bin", 1000)  # in place: the store's ranges of it go too
        await c.content(1).fetch(cid, out_dir=out)
        assert (out / "data.bin").read_bytes() == source.read_bytes()


async def test_a_seeder_that_restarts_mid_transfer_is_back_within_round_trips_not_a_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A seeder that crashes and comes back at the same address with the same identity and store
    # answers the old connection's next packet with a Stateless Reset (RFC 9000 section 10.3):
    # the fetcher drops the dead connection at once and dials the restarted node, instead of
    # waiting out a request timeout on a connection nobody holds any more (~10 s stalls before).
    # Two 1 MiB chunks, both asked for at once: after that the fetcher only receives, so it
    # sends nothing a reset could answer unless it asks whether the seeder is there (review
    # finding: such restarts waited for the 15 s keepalive).
    source = source_file(tmp_path, 2048 * KIB)
    big_chunks = replace(CONFIG, content=replace(CONTENT, chunk_bytes=1024 * KIB))
    slow = LinkConfig(latency_s=0.01, bandwidth_bps=8e6, queue_bytes=256 * KIB)  # 1 MB/s: ~2 s
    async with Network(seed=5) as net, trio.open_nursery() as nursery:
        seeder_host = net.add_host("10.0.0.1", up=slow, down=QUIET)
        fetcher_host = net.add_host("10.0.0.2", up=QUIET, down=QUIET)

        async def seeder(*, task_status: trio.TaskStatus[tuple[Node, trio.CancelScope]]) -> None:
            with trio.CancelScope() as life:
                # The same store and index after the restart.
                store, index = tmp_path / "seeder", tmp_path / "seeder.db"
                node = Node(identity(0), seeder_host.bind(PORT), big_chunks, blocks_dir=store, database=index)
                async with node:
                    task_status.started((node, life))
                    await trio.sleep_forever()

        first, first_life = await nursery.start(seeder)
        assert first.content is not None
        cid = (await first.content.publish(source)).cid
        # Windows larger than the file: the fetcher sends no flow-control credit either.
        roomy_net = replace(CONFIG.net, stream_receive_window_bytes=8 << 20, connection_receive_window_bytes=16 << 20)
        roomy = replace(CONFIG, net=roomy_net)
        async with Node(identity(1), fetcher_host.bind(PORT), roomy, blocks_dir=tmp_path / "fetcher") as fetcher:
            await fetcher.connect(addr(0))
            third = trio.Event()
            progress = FetchProgress(str(cid))
            progress.on_update = when(progress, 1 / 3, third)
            assert fetcher.content is not None
            content = fetcher.content
            async with trio.open_nursery() as fetching:
                fetching.start_soon(lambda: content.fetch(cid, out_dir=tmp_path / "out", progress=progress))
                await third.wait()
                first.socket.close()  # a crash: not even a CONNECTION_CLOSE leaves
                first_life.cancel()
                await trio.sleep(0.5)  # the restart takes a moment
                restarted_at = trio.current_time()
                await nursery.start(seeder)
            assert progress.state == "done"
            assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
            assert fetcher.endpoint.stats.stateless_resets_received == 1
            assert progress.finished_at is not None
            # The rest (~1.4 MB at 1 MB/s) plus a probe interval, a reset, a dial and a few round
            # trips: well inside one request timeout of lost time.
            assert progress.finished_at - restarted_at < 1.5 + CONTENT.fetch_request_timeout_s / 2
        nursery.cancel_scope.cancel()


async def test_a_seeder_gone_for_good_hands_its_requests_on_within_seconds_not_request_timeouts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Review finding: a fetch whose only seeder died for good failed ~70 s later (two 30 s
    # request timeouts before the stall timer even started). Probes nobody acknowledges give
    # the peer up after 5 s, and its requests go to others (here: nobody, so the stall timer
    # starts then).
    patient = replace(CONFIG, content=replace(CONTENT, fetch_request_timeout_s=30.0, fetch_stall_timeout_s=10.0))
    source = source_file(tmp_path, 1024 * KIB)
    slow = LinkConfig(latency_s=0.01, bandwidth_bps=8e6, queue_bytes=256 * KIB)  # 1 MB/s: ~1 s
    async with cluster(tmp_path, 2, configs={1: patient}, up=slow, down=QUIET) as c:
        cid = Cid.parse(await publish_everywhere(c, source, range(1)))
        await connect_all(c, 1, range(1))
        third = trio.Event()
        progress = FetchProgress(str(cid))
        progress.on_update = when(progress, 1 / 3, third)
        async with trio.open_nursery() as nursery:

            async def fetch() -> None:
                with pytest.raises(FetchFailedError, match="no peer could supply"):
                    await c.content(1).fetch(cid, out_dir=tmp_path / "out", progress=progress)

            nursery.start_soon(fetch)
            await third.wait()
            c.crash(0)
            crashed_at = trio.current_time()
        # Given up after 5 s of silence, then the 10 s stall timeout (and a few probes' slack).
        assert trio.current_time() - crashed_at < 5.0 + 10.0 + 2.0

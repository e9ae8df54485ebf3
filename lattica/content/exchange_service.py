"""``node.content``: the node's block store, the exchange server, publishing and fetching.

:class:`ContentService` opens a :class:`~lattica.content.block_store.BlockStore` in the node's
``blocks/`` directory with the node's sqlite writer, serves ``/lattica/content/1`` streams
(:mod:`lattica.content.exchange_protocol`) from it, publishes files and folders and fetches
content ids (:mod:`lattica.content.exchange_fetch`), and announces every root it holds whole
through ``dht.provide`` (a downloader becomes a seeder).

Serving limits (``[content]`` settings): at most ``max_uploads`` streams at once and
``max_uploads_per_peer`` to one peer and ``max_uploads_per_address`` to one host (others get
``busy`` for each request; when all slots are held, a newcomer takes one from the host holding
the most, :mod:`lattica.content.upload_slots`),
``max_requests_per_stream`` requests in flight per stream (more is a protocol error that ends
the stream), an idle stream or one whose reader takes nothing for
``upload_timeout_s`` is closed, and at most 1 MiB of a block is read into memory at a time.

Fetches started through :meth:`ContentService.start_fetch` run in the service's nursery and are
tracked by id, so a control client can poll them (``content.fetch_status``) and cancel them;
cancelling keeps what was verified (the next fetch of the id resumes from it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from lattica.content.block_store import MAX_EXTENT_BYTES, BlockStore
from lattica.content.blocking_io import run_blocking
from lattica.content.cid import Cid
from lattica.content.config import ContentConfig
from lattica.content.exchange_fetch import FetchDeps, FetchProgress, fetch_content
from lattica.content.exchange_messages import BUSY, MAX_PIECE_BYTES, NOT_FOUND, PIECE_BYTES, PROTOCOL_ID, TOO_LARGE
from lattica.content.exchange_protocol import BlockWanted, ExchangeServer, HasAsked, RequestCancelled
from lattica.content.publish import PublishResult, publish
from lattica.content.upload_slots import Upload, UploadSlots
from lattica.dht import Dht
from lattica.errors import ConnectError, LatticaError, RemoteProtocolError, RpcError
from lattica.identity import PeerId
from lattica.net import ConnectionManager, Rpc
from lattica.net.bulk_path import BulkPath
from lattica.net.rpc import source_group
from lattica.net.stream import QuicStream
from lattica.net.tcp_lane import TcpLane
from lattica.storage import SqliteWriter

log = logging.getLogger("lattica.content")

_READ_BYTES = MAX_EXTENT_BYTES
"""Serving reads a block in steps of this size: at least the longest extent, which is read
(and hashed) in one step, so what is sent is what was checked."""
_RECEIVE_BYTES = 64 * 1024
_MAX_FINISHED_FETCHES = 64


@dataclass
class FetchJob:
    """A fetch running (or finished) in the service: its id, parameters and progress."""

    id: int
    cid: Cid
    out_dir: Path | None
    progress: FetchProgress
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)


class ContentService:
    """Content on one node (see the module docstring). ``blocks_dir`` holds the chunk files;
    ``db`` is the node's database writer (the index tables are created in it). With ``bulk``
    (the node's :class:`~lattica.net.bulk_path.BulkPath`) fetches run over TLS-over-TCP where
    the peer accepts it directly, else QUIC; the node passes it only when it runs TCP itself
    (``net.tcp_listen``), so a node on sim_net never dials the kernel's TCP."""

    def __init__(
        self,
        rpc: Rpc,
        connections: ConnectionManager,
        dht: Dht,
        blocks_dir: Path,
        db: SqliteWriter,
        config: ContentConfig,
        bulk: BulkPath | None = None,
    ) -> None:
        self.rpc = rpc
        self.connections = connections
        self.dht = dht
        self.config = config
        self.bulk = bulk
        self.store = BlockStore(blocks_dir, db, max_manifest_bytes=config.max_manifest_bytes)
        self.upload_slots = UploadSlots(
            max_uploads=config.max_uploads,
            max_per_peer=config.max_uploads_per_peer,
            max_per_source=config.max_uploads_per_address,
        )
        """Who holds the upload slots (and whose slot a newcomer may take)."""
        self._served: dict[Upload, _Served] = {}  # the streams holding those slots
        self.jobs: dict[int, FetchJob] = {}
        self._job_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._announcing: set[trio.Event] = set()
        self._running: dict[Cid, trio.Event] = {}  # the fetch running per content id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the exchange protocol and run fetches until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.rpc.add_stream_handler(PROTOCOL_ID, self._serve)
            task_status.started()
            await trio.sleep_forever()

    # -- serving ---------------------------------------------------------------------------------

    @property
    def uploads(self) -> int:
        """Exchange streams being served now (upload slots held)."""
        return self.upload_slots.held

    async def _serve(self, stream: QuicStream, peer: PeerId) -> None:
        # The per-peer cap keeps one peer from holding every slot (review finding: 32 idle
        # streams from one peer made every other fetch from this node fail "busy"); the
        # per-source cap one host; sharing out by host a few hosts (upload_slots.py).
        source = source_group(stream.connection)  # None through a relay: its address is shared
        admission = self.upload_slots.admit(
            peer,
            _host_of(source, peer),
            source,
            trio.current_time(),
            {upload: served.stream.taken_bytes for upload, served in self._served.items()},
        )
        if admission.preempted is not None:
            victim = self._served.pop(admission.preempted)
            log.info("upload to %s preempted for %s: its host held more than its share", victim.peer, peer)
            victim.scope.cancel()
        upload = admission.upload
        busy = upload is None
        scope = trio.CancelScope()
        if upload is not None:
            self._served[upload] = _Served(stream, peer, scope)
        server = ExchangeServer(max_outstanding=self.config.max_requests_per_stream)
        queue: dict[int, BlockWanted | HasAsked] = {}  # by request id, in arrival order
        wake = trio.Event()
        reader_done = False
        # Idle means no request outstanding and no block data sent for upload_timeout_s: any
        # bytes (a Cancel every few seconds), then any request (a Want cancelled in the same
        # breath, a Has), held an upload slot for good (review findings: eight free peer ids
        # held every slot and fetches from this node failed "busy").
        active_at = trio.current_time()
        # What the connection had passed on of our answers when the stream last counted as
        # active: answers still queued keep the stream only while that grows (a reader taking
        # them, however slowly), not while they sit (a dead or non-reading peer would hold its
        # slot: round-3 review).
        taken_then = 0
        try:
            with scope:  # cancelled when a newcomer takes this slot
                async with trio.open_nursery() as nursery:

                    async def reader() -> None:
                        nonlocal reader_done, active_at, taken_then
                        while True:
                            data = b""
                            with trio.move_on_at(active_at + self.config.upload_timeout_s) as idle:
                                data = await stream.receive_some(_RECEIVE_BYTES)
                            if idle.cancelled_caught:
                                now = trio.current_time()
                                taken = stream.taken_bytes
                                if server.outstanding or queue or (stream.unsent_bytes and taken > taken_then):
                                    # Blocks still on their way out count too while they move: a
                                    # connection takes megabytes at once and a slow reader may
                                    # need minutes for them (review findings: closed as idle, the
                                    # rest was lost; on a lane, then over QUIC too).
                                    active_at, taken_then = now, taken
                                    continue
                                if now < active_at + self.config.upload_timeout_s:
                                    continue  # the writer sent data while this wait was armed
                                log.debug("closing an idle content stream from %s", peer)
                                # An end, not a reset: blocks already sent may still be on their
                                # way to a slow reader, and a reset would throw them away.
                                with contextlib.suppress(
                                    trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError
                                ):
                                    await stream.send_eof()
                                nursery.cancel_scope.cancel()
                                return
                            if not data:
                                server.end_of_stream()
                                reader_done = True
                                wake.set()
                                return
                            for event in server.receive(data):
                                if isinstance(event, RequestCancelled):
                                    queue.pop(event.id, None)
                                else:
                                    queue[event.id] = event
                            wake.set()

                    async def writer() -> None:
                        nonlocal wake, active_at, taken_then
                        ahead: _BlockRead | None = None
                        while True:
                            if not queue:
                                if reader_done:
                                    # FIN, not a reset: a reset could discard the last pieces.
                                    await stream.send_eof()
                                    nursery.cancel_scope.cancel()
                                    return
                                await wake.wait()
                                wake = trio.Event()
                                continue
                            request = queue.pop(next(iter(queue)))
                            first = ahead if ahead is not None and ahead.request_id == request.id else None
                            ahead = None
                            if not busy and queue and isinstance(following := next(iter(queue.values())), BlockWanted):
                                # Read the next block while this one is sent: one read ahead per
                                # stream (a reader thread's latency would otherwise sit between
                                # every two blocks on the wire).
                                ahead = _BlockRead(following.id)
                                nursery.start_soon(ahead.run, self.store, following.digest)
                            if await self._answer(stream, server, request, busy, first):
                                active_at, taken_then = trio.current_time(), stream.taken_bytes

                    nursery.start_soon(writer)
                    await reader()
        except* RemoteProtocolError as group:
            log.info("content stream from %s ended: %s", peer, group.exceptions[0])
        except* trio.TooSlowError:
            log.info("content stream from %s ended: it took no bytes for %g s", peer, self.config.upload_timeout_s)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away or reset the stream: its transfer ends, nothing else
        finally:
            if upload is not None:
                self.upload_slots.release(upload)
                self._served.pop(upload, None)

    async def _answer(
        self,
        stream: QuicStream,
        server: ExchangeServer,
        request: BlockWanted | HasAsked,
        busy: bool,
        first: _BlockRead | None = None,
    ) -> bool:
        """Answer one request; True if block data was sent. Each :data:`PIECE_BYTES` of a frame
        must be taken by the stream within ``upload_timeout_s`` (``trio.TooSlowError``):
        progress, not the whole answer, is what is timed (review finding: a reader taking
        16 KiB/s, slow but steady, was cut off in the middle of every 1 MiB block).

        A lane carries nothing but this stream: a block goes in one piece there (up to
        :data:`MAX_PIECE_BYTES`), which the client receives and writes where it landed
        (:mod:`lattica.net.frame_receiver`); streams that share a connection get
        :data:`PIECE_BYTES` pieces, each a turn for the others."""
        timeout_s = self.config.upload_timeout_s
        piece_bytes = MAX_PIECE_BYTES if isinstance(stream.connection, TcpLane) else PIECE_BYTES
        if busy:  # the client tries again later or elsewhere
            await _send(stream, server.refuse(request.id, BUSY), timeout_s)
            return False
        if isinstance(request, HasAsked):
            await _send(stream, server.has_reply(request.id, self.store.has(request.digest)), timeout_s)
            return False
        if first is None:  # not read ahead: read the start of the block now, the same way
            first = _BlockRead(request.id)
            await first.run(self.store, request.digest)
        await first.done.wait()
        if isinstance(first.error, OSError):
            log.warning("cannot read block %s to serve it: %s", request.digest.hex(), first.error)
        if first.error is not None:
            await _send(stream, server.refuse(request.id, NOT_FOUND), timeout_s)
            return False
        total = first.total
        data: bytes | None = first.data
        if total > request.max_bytes:
            await _send(stream, server.refuse(request.id, TOO_LARGE), timeout_s)
            return False
        offset = 0
        sent = False
        while server.is_wanted(request.id):
            length = min(_READ_BYTES, total - offset)
            try:
                if data is None:  # the rest of a block file (an extent came whole, checked)
                    data = await self.store.read(request.digest, offset, length)
            except (LatticaError, OSError) as exc:
                log.warning("cannot read block %s to serve it: %s", request.digest.hex(), exc)
                await _send(stream, server.refuse(request.id, NOT_FOUND), timeout_s)
                return False
            # A piece at a time, asking again before each: a cancel (the fetch moved this
            # request to a faster peer, or a copy arrived first) stops the block within one
            # piece instead of after the whole read.
            view = memoryview(data)
            for start in range(0, max(len(view), 1), piece_bytes):
                for head, payload in server.block_frames(
                    request.id, offset + start, total, view[start : start + piece_bytes], piece_bytes=piece_bytes
                ):
                    await _send_frame(stream, head, payload, timeout_s)
                    sent = True
            offset += length
            data = None
        return sent

    # -- publishing and fetching -----------------------------------------------------------------

    async def publish(self, path: Path, *, name: str | None = None, tags: Sequence[str] = ()) -> PublishResult:
        """Publish a file or folder into the store (pinned) and announce it in the background.
        Raises what :func:`~lattica.content.publish.publish` raises."""
        result = await publish(self.store, path, name=name, tags=tuple(tags), config=self.config)
        self.announce(result.cid)
        return result

    def announce(self, cid: Cid) -> None:
        """Provide ``cid`` through the DHT in the background (a failure is logged: with no DHT
        peers, connected peers still find the content by asking)."""
        if self._nursery is not None:
            done = trio.Event()
            self._announcing.add(done)
            self._nursery.start_soon(self._provide, cid, done)

    async def announcements_done(self) -> None:
        """Wait until the announcements started so far have ended (tests, orderly stops)."""
        for done in list(self._announcing):
            await done.wait()

    async def _provide(self, cid: Cid, done: trio.Event) -> None:
        try:
            await self.dht.provide(cid.to_bytes())
        except LatticaError as exc:
            log.info("announcing %s in the DHT failed: %s", cid, exc)
        finally:
            self._announcing.discard(done)
            done.set()

    async def find_candidates(self, cid: Cid) -> list[PeerId]:
        """Peers that may hold ``cid``: connected peers first, then DHT providers."""
        me = self.dht.peer_id
        peers = [c.peer_id for c in self.connections.connections()]
        try:
            result = await self.dht.find_providers(cid.to_bytes())
            peers += [record.provider_id for record in result.providers]
        except LatticaError as exc:
            log.info("provider lookup for %s failed: %s", cid, exc)
        return [p for p in dict.fromkeys(peers) if p != me]

    def fetch_deps(self) -> FetchDeps:
        """What :func:`~lattica.content.exchange_fetch.fetch_content` needs of this node."""
        return FetchDeps(
            self.store,
            self.config,
            self._open_stream,
            self.find_candidates,
            self.connected_peers,
            open_bulk_stream=self._open_bulk_stream,
        )

    def connected_peers(self) -> list[PeerId]:
        """Peers this node is connected to now (not itself)."""
        me = self.dht.peer_id
        return [p for p in dict.fromkeys(c.peer_id for c in self.connections.connections()) if p != me]

    async def _open_stream(self, peer: PeerId, protocol_id: str) -> QuicStream:
        # Bulk data takes TLS-over-TCP where the peer accepts it directly, else QUIC (see
        # ``bulk`` in the class docstring).
        if self.bulk is None:
            return await self.rpc.open_stream(peer, protocol_id)
        try:
            connection = await self.bulk.connection(peer)
        except ConnectError as exc:
            raise RpcError("connect-failed", str(exc)) from exc
        return await self.rpc.open_stream(connection, protocol_id)

    async def _open_bulk_stream(self, peer: PeerId, protocol_id: str) -> QuicStream:
        # One fetch link's stream: a lane of its own where TCP reaches the peer directly (see
        # lattica.net.tcp_lane); closing the stream closes the lane.
        if self.bulk is None:
            return await self.rpc.open_stream(peer, protocol_id)
        try:
            carrier = await self.bulk.stream_carrier(peer)
        except ConnectError as exc:
            raise RpcError("connect-failed", str(exc)) from exc
        try:
            return await self.rpc.open_stream(carrier, protocol_id)
        except BaseException:
            if isinstance(carrier, TcpLane):
                carrier.close("the stream could not start")
            raise

    async def fetch(
        self,
        cid: Cid,
        *,
        out_dir: Path | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        tensors: Sequence[str] = (),
        progress: FetchProgress | None = None,
    ) -> FetchProgress:
        """Fetch ``cid`` here (and export it to ``out_dir``), then announce it. A fetch of a
        content id another fetch here is fetching waits for that one first, then takes what it
        stored (two at once each downloaded everything: chunks written but not yet
        acknowledged count as missing). Raises what
        :func:`~lattica.content.exchange_fetch.fetch_content` raises."""
        while (running := self._running.get(cid)) is not None:
            await running.wait()
        done = self._running[cid] = trio.Event()
        try:
            result = await fetch_content(
                self.fetch_deps(),
                cid,
                out_dir=out_dir,
                include=include,
                exclude=exclude,
                tensors=tensors,
                progress=progress,
            )
        finally:
            del self._running[cid]
            done.set()
        # Announced only when held whole: a provider must be able to serve every chunk.
        if not self.store.missing(self.store.manifest(cid).unique_chunks()):
            self.announce(cid)
        return result

    def start_fetch(
        self,
        cid: Cid,
        *,
        out_dir: Path | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        tensors: Sequence[str] = (),
    ) -> FetchJob:
        """Run :meth:`fetch` in the background; poll the returned job's ``progress``."""
        if self._nursery is None:
            raise RuntimeError("the content service is not running")
        job = FetchJob(next(self._job_ids), cid, out_dir, FetchProgress(str(cid)))
        self.jobs[job.id] = job
        finished = [j for j in self.jobs.values() if j.finished.is_set()]
        for old in finished[: max(0, len(finished) - _MAX_FINISHED_FETCHES)]:
            del self.jobs[old.id]

        async def run() -> None:
            try:
                with job.scope:
                    await self.fetch(
                        cid, out_dir=out_dir, include=include, exclude=exclude, tensors=tensors, progress=job.progress
                    )
                if job.scope.cancelled_caught:
                    job.progress.state = "cancelled"
            except (LatticaError, OSError) as exc:
                job.progress.state = "failed"
                job.progress.error = str(exc)
            except Exception as exc:
                log.exception("fetch of %s failed", cid)
                job.progress.state = "failed"
                job.progress.error = f"internal error: {type(exc).__name__}"
            finally:
                job.progress.finished_at = trio.current_time()
                job.finished.set()

        self._nursery.start_soon(run)
        return job


class _BlockRead:
    """The first ``_READ_BYTES`` of a block (and its length), read on a worker thread ahead of
    its turn; ``error`` is the ``LatticaError`` (not stored) or ``OSError`` it raised."""

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.done = trio.Event()
        self.total = 0
        self.data = b""
        self.error: LatticaError | OSError | None = None

    async def run(self, store: BlockStore, digest: bytes) -> None:
        try:
            self.total, self.data = await run_blocking(lambda: store.read_start(digest, _READ_BYTES))
        except (LatticaError, OSError) as exc:
            self.error = exc
        finally:
            self.done.set()


@dataclass(eq=False)
class _Served:
    """A stream holding an upload slot, and the scope that ends its serving if preempted."""

    stream: QuicStream
    peer: PeerId
    scope: trio.CancelScope


async def _send(stream: QuicStream, frame: bytes, timeout_s: float) -> None:
    """Send ``frame`` (if any); ``trio.TooSlowError`` if the stream does not take it within
    ``timeout_s``."""
    if frame:
        with trio.fail_after(timeout_s):
            await stream.send_all(frame)


async def _send_frame(stream: QuicStream, head: bytes, payload: memoryview, timeout_s: float) -> None:
    """Send a frame given as its head and its payload (not joined: a lane takes the payload
    as it is); ``trio.TooSlowError`` if the stream does not take it within ``timeout_s`` per
    :data:`PIECE_BYTES`."""
    with trio.fail_after(timeout_s * max(1.0, len(payload) / PIECE_BYTES)):
        await stream.send_all(head)
        if payload:
            await stream.send_all(payload)


def _host_of(source: str | None, peer: PeerId) -> Hashable:
    """Who a stream counts as for the fair share of upload slots: its source address group, or
    for a peer reached through a relay the peer itself. Not the relay: every fetcher of a seeder
    behind a NAT may arrive through its relay, and as one host they could never take a slot
    from one another, attacker or not (review finding). Minting ids behind a relay is bounded
    by the relay: it gives a reserved node at most ``max_circuits_per_peer`` circuits (8)."""
    return source if source is not None else ("peer", peer)

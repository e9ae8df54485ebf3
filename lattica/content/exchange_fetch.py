"""The fetch driver: one content id from many peers into the block store, then out to files.

Steps (:func:`fetch_content`):

1. **Manifest.** From the store if held; else from the connected peers first, then from the
   DHT's providers: the first that sends a block hashing to the id's digest and decoding as a
   canonical manifest within this node's caps. It is stored as a pinned root *before* any
   chunk, so ``gc`` cannot collect a partial fetch and a restart knows what it was fetching.
   A fetch that then fails drops the pin the fetches added once the last one of that root
   ends (a cancelled one keeps it, to be resumed); one whose file does not match the
   manifest's SHA-256 marks the root failed (:meth:`~lattica.content.block_store.BlockStore.mark_failed`).
2. **What is missing.** The chunks of the selected files (``include``/``exclude`` globs) or
   only of the selected tensors (``tensors`` patterns on safetensors files), less what the
   store holds: a resumed fetch asks for nothing it already verified.
3. **Transfer.** One exchange stream per peer (:class:`_PeerLink`). Likely holders (the peer
   that sent the manifest, DHT providers) get their first chunk requests right behind the
   ``Has`` for the manifest; other connected peers once they answer that they hold it (a peer
   answering "not held" is dropped and its requests are asked of others). The DHT is asked for
   providers beside the transfer. :class:`~lattica.content.fetch_scheduler.FetchScheduler`
   decides what to ask whom. Each block is hashed once, as it arrives (a bad one drops its
   peer), and handed to a storer task that writes batches of up to ``fetch_batch_bytes`` to
   the store (:meth:`~lattica.content.block_store.BlockStore.write_unindexed`) and into the
   files being assembled, while the transfer goes on; every ``fetch_sync_bytes`` or
   ``fetch_sync_interval_s`` a flush makes them durable and indexes them (acknowledged). In
   memory: the peers' windows plus at most two batches, never a whole file.
4. **Files** (with ``out_dir``): whole files are assembled while their chunks arrive and put
   in place, checked against their SHA-256, as each completes
   (:mod:`lattica.content.file_assembly`); safetensors files under ``tensors`` are written at
   the end as a valid safetensors file of just the selected tensors (checked against the
   chunk ids only), through the same contained writer. Without ``out_dir`` the whole files
   are checked against their SHA-256 in the store.

When the scheduler reports a stall the DHT is asked again, and the fetch fails with
:class:`FetchFailedError` (keeping everything stored) after ``fetch_stall_timeout_s`` without
progress. Cancelling the task (Ctrl-C in the CLI, a daemon stop) flushes what was written and
leaves the fetch resumable by the same call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from lattica.content.block_store import BlockStore, Extent
from lattica.content.blocking_io import run_blocking
from lattica.content.cid import Cid, blake3_digest
from lattica.content.config import ContentConfig
from lattica.content.errors import (
    ChunkMismatchError,
    ContentError,
    HeldChunkLostError,
    MalformedContentError,
    NoFilesSelectedError,
    NoTensorsSelectedError,
    OutputConflictError,
)
from lattica.content.exchange_messages import BUSY, MIN_PIECE_BYTES, PROTOCOL_ID
from lattica.content.exchange_protocol import BlockReceived, BlockRefused, ClientEvent, ExchangeClient, HasAnswered
from lattica.content.export import export_files, select_files
from lattica.content.fetch_scheduler import (
    CancelChunk,
    FetchComplete,
    FetchScheduler,
    FetchStalled,
    PeerDropped,
    RequestChunk,
    WantedChunk,
)
from lattica.content.file_assembly import FileAssembly
from lattica.content.manifest import FileEntry, Manifest, decode_manifest
from lattica.content.tensor_select import TensorSelection, select_tensors
from lattica.errors import LatticaError, RemoteProtocolError, RpcError, leaf_exceptions
from lattica.identity import PeerId
from lattica.net.connection import Connection
from lattica.net.rpc import stream_refusal
from lattica.net.stream import QuicStream
from lattica.net.tcp_lane import TcpLane

log = logging.getLogger("lattica.content.fetch")

_MANIFEST_TIMEOUT_S = 30.0
_MANIFEST_PARALLEL = 4  # peers asked for a manifest at once
# A peer that delivered at least this much since the last request timeout is progressing: its
# requests wait on (about 550 B/s at the default 30 s; less is a stall).
_PROGRESS_BYTES = MIN_PIECE_BYTES
# At least a whole frame (4 + MAX_FRAME_BYTES): a frame a lane delivered whole is taken whole.
_RECEIVE_BYTES = 2 << 20
# Bytes of files already in the output folder compared per worker-thread step (~50 ms).
_CHECK_STEP_BYTES = 64 << 20
_BUSY_RETRY_S = 5.0  # a peer that said busy is asked again after this long
# A link with requests out that received nothing for this long probes its peer (one PING),
# and gives the peer up when its connection heard nothing at all (the probes unanswered) for
# _SILENT_GONE_S.
_PROBE_S = 1.0
_SILENT_GONE_S = 5.0
_MANIFEST_BUSY_FIRST_S = 0.5  # first pause before asking busy peers for a manifest again
_MANIFEST_BUSY_MAX_S = 8.0  # longest pause between those asks
_FLUSH_ON_EXIT_S = 30.0  # a cancelled fetch waits at most this long to acknowledge what it wrote


class FetchFailedError(ContentError):
    """A fetch cannot go on (no provider, no valid manifest, nobody has the missing chunks);
    what was verified so far stays stored and a later fetch resumes from it."""


class StreamOpener(Protocol):
    """Opens an exchange stream to a peer (``Rpc.open_stream``); raises ``LatticaError``."""

    async def __call__(self, peer: PeerId, protocol_id: str) -> QuicStream: ...


@dataclass
class FetchProgress:
    """Live numbers of one fetch (read by ``content.fetch_status``); bytes are chunk bytes."""

    cid: str
    state: str = "finding"
    """``finding`` (manifest), ``checking`` (files already in the output folder), ``fetching``,
    ``exporting``, ``done`` or ``failed``."""
    total_bytes: int = 0
    """Bytes of the chunks this fetch needs (held ones included)."""
    held_bytes: int = 0
    """Of those, bytes verified and stored."""
    received_bytes: int = 0
    """Bytes received from peers and stored by this fetch."""
    peer_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes stored per peer (text peer id)."""
    chunks_requested: int = 0
    """Distinct chunks asked of peers (what a resumed fetch keeps low)."""
    requests_sent: int = 0
    """Chunk requests sent, endgame duplicates included."""
    started_at: float = 0.0
    finished_at: float | None = None
    error: str | None = None
    paths: list[str] = field(default_factory=list)
    busy_refusals: int = 0
    """Times a peer refused because it was serving its limit of uploads (it is retried later)."""
    direct_bytes: int = 0
    """Bytes written into the output files with ``O_DIRECT`` (known once they are written)."""
    in_place_bytes: int = 0
    """Of those, bytes written from the memory TLS decrypted them into (a lane's whole-block
    pieces): no copy between the network and the disk."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Peers dropped for bad data or errors, and why."""
    on_update: Callable[[FetchProgress], None] | None = field(default=None, repr=False)
    """Called after each stored batch (progress displays, tests)."""


@dataclass(frozen=True)
class FetchPlan:
    """What a fetch needs: the files to write whole, the tensor selections, their chunks."""

    files: tuple[FileEntry, ...]
    selections: tuple[TensorSelection, ...]
    chunks: dict[bytes, int]


def plan_fetch(
    manifest: Manifest, include: Sequence[str] = (), exclude: Sequence[str] = (), tensors: Sequence[str] = ()
) -> FetchPlan:
    """The files and chunks a fetch of ``manifest`` needs. With ``tensors``, each selected
    safetensors file contributes only the chunks of its matching tensors (files without a
    match are left out) and other files are fetched whole. Raises
    :class:`NoFilesSelectedError` when the globs leave no file and
    :class:`NoTensorsSelectedError` when ``tensors`` matches nothing at all."""
    files: list[FileEntry] = []
    selections: list[TensorSelection] = []
    chunks: dict[bytes, int] = {}
    selected = select_files(manifest, include, exclude)
    if not selected and manifest.files:  # a typo in a glob must not look like a finished fetch
        globs = [*include, *(f"not {p}" for p in exclude)]
        raise NoFilesSelectedError(f"no file of {manifest.name!r} matches {', '.join(globs)}")
    for entry in selected:
        if tensors and entry.safetensors is not None:
            try:
                selection = select_tensors(entry, tensors)
            except NoTensorsSelectedError:
                continue
            selections.append(selection)
            chunks.update((c.digest, c.length) for c in selection.chunks)
        else:
            files.append(entry)
            chunks.update((c.digest, c.length) for c in entry.chunks)
    if tensors and not selections:
        raise NoTensorsSelectedError(f"no tensor matches {', '.join(tensors)}")
    return FetchPlan(tuple(files), tuple(selections), chunks)


# -- one peer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ready:
    held: bool


@dataclass(frozen=True)
class _Gone:
    reason: str
    hostile: bool = False


@dataclass(frozen=True)
class _Stored:
    """The storer wrote a batch (sent with no peer)."""


@dataclass(frozen=True)
class _Searched:
    """A provider search ended (sent with no peer): the loop re-arms its stall timer."""


_LinkEvent = _Ready | _Gone | _Stored | _Searched | BlockReceived | BlockRefused


class _PeerLink:
    """One exchange stream to one peer: asks whether it holds the manifest, then carries the
    scheduler's requests. Events go to the fetch loop's channel as ``(peer, event)``."""

    def __init__(
        self, peer: PeerId, manifest_digest: bytes, events: trio.MemorySendChannel[tuple[PeerId | None, _LinkEvent]]
    ) -> None:
        self.peer = peer
        self.client = ExchangeClient()
        self.ids: dict[bytes, int] = {}
        self.scope = trio.CancelScope()
        self.stream: QuicStream | None = None
        self.progress_reported = 0  # arrived_bytes() when progress was last reported
        self.probed_at_bytes = -1  # arrived_bytes() when the prober last looked
        self._events = events
        self._outbox_send, self._outbox = trio.open_memory_channel[bytes](math.inf)
        _id, frame = self.client.has(manifest_digest)
        self._outbox_send.send_nowait(frame)

    def request(self, digest: bytes, size: int) -> None:
        request_id, frame = self.client.want(digest, size)
        self.ids[digest] = request_id
        self._outbox_send.send_nowait(frame)

    def cancel(self, digest: bytes) -> None:
        request_id = self.ids.pop(digest, None)
        if request_id is not None and (frame := self.client.cancel(request_id)):
            self._outbox_send.send_nowait(frame)

    async def run(self, open_stream: StreamOpener) -> None:
        with self.scope:
            try:
                stream = self.stream = await open_stream(self.peer, PROTOCOL_ID)
            except LatticaError as exc:
                await self._events.send((self.peer, _Gone(f"cannot open a stream: {exc}")))
                return
            gone: _Gone | None = None
            try:
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, stream)
                    await self._read(stream)
                    nursery.cancel_scope.cancel()
            except* RemoteProtocolError as group:
                gone = _Gone(f"protocol error: {group.exceptions[0]}", hostile=True)
            except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
                gone = _Gone(f"stream lost: {group.exceptions[0]}")
            if gone is not None:
                await self._events.send((self.peer, gone))

    async def probe(self) -> None:
        """Ask the peer's connection whether the peer is still there (a QUIC PING: a peer that
        restarted answers with a Stateless Reset, which ends the connection and this link).
        Nothing on other carriers: TCP hears of a restarted peer by itself."""
        connection = None if self.stream is None else self.stream.connection
        if isinstance(connection, Connection):
            await connection.probe()

    def silent_s(self) -> float | None:
        """Seconds since the peer's QUIC connection received anything at all (data,
        acknowledgements of our probes), or None on other carriers."""
        connection = None if self.stream is None else self.stream.connection
        if isinstance(connection, Connection):
            return trio.current_time() - connection.last_received_at
        return None

    def arrived_bytes(self) -> int:
        """Bytes this peer sent on the link so far, counting a lane's frame still arriving (a
        whole block is one frame there, invisible until it is complete)."""
        stream = self.stream
        if stream is None:
            return 0
        if isinstance(stream.connection, TcpLane):
            return stream.connection.received_bytes
        return stream.received_bytes

    async def _write(self, stream: QuicStream) -> None:
        async for frame in self._outbox:
            await stream.send_all(frame)

    async def _read(self, stream: QuicStream) -> None:
        first = True
        while True:
            data = await stream.receive_buffer(_RECEIVE_BYTES)
            if not data:
                self.client.end_of_stream()
                await self._events.send((self.peer, _Gone("the peer closed the stream")))
                return
            if first:  # only a stream's first bytes can be the RPC layer's refusal of it
                first = False
                try:
                    events = _receive_or_refusal(self.client, data, owned=True)
                except RpcError as refused:  # no content service there, or at its stream caps
                    await self._events.send((self.peer, _Gone(f"it refused the stream: {refused}")))
                    return
            else:  # later junk that looks like a refusal is junk (review: a holder lied so)
                events = self.client.receive(data, owned=True)
            for event in events:
                if isinstance(event, HasAnswered):
                    await self._events.send((self.peer, _Ready(event.held)))
                else:
                    if self.ids.get(event.digest) == event.id:
                        del self.ids[event.digest]
                    await self._events.send((self.peer, event))


# -- the fetch ---------------------------------------------------------------------------------


def _receive_or_refusal(
    client: ExchangeClient, data: bytes | memoryview, *, owned: bool = False
) -> list[ClientEvent]:
    """``client.receive(data)``; where the exchange decoder rejects bytes that are the peer's
    RPC refusal of the stream (it serves no content, or is at its stream caps), that refusal
    as :class:`~lattica.errors.RpcError` instead of a decode error about the wrong message
    type (review finding: a fetch failed with "Expected `array`, got `object`")."""
    try:
        return client.receive(data, owned=owned)
    except RemoteProtocolError:
        refusal = stream_refusal(data)
        if refusal is None:
            raise
        raise refusal from None


async def _ask_manifest(
    cid: Cid, peer: PeerId, open_stream: StreamOpener, config: ContentConfig
) -> tuple[bytes, Manifest] | str:
    """The manifest from one peer, or the refusal code it answered (``busy``, ``not-found``).
    Raises ``trio.TooSlowError``, :class:`MalformedContentError`, ``LatticaError`` and trio's
    stream errors."""
    with trio.fail_after(_MANIFEST_TIMEOUT_S):
        stream = await open_stream(peer, PROTOCOL_ID)
        async with stream:
            client = ExchangeClient()
            _id, frame = client.want(cid.digest, config.max_manifest_bytes)
            await stream.send_all(frame)
            await stream.send_eof()  # one request: the server ends the stream after it
            reply = None
            while reply is None:
                data = await stream.receive_some(_RECEIVE_BYTES)
                if not data:
                    client.end_of_stream()
                    raise RemoteProtocolError("stream ended before the manifest")
                events = _receive_or_refusal(client, data)
                reply = events[0] if events else None
    if isinstance(reply, BlockRefused):
        return reply.code
    assert isinstance(reply, BlockReceived)
    encoded = bytes(reply.data)  # small, and kept: not a view of its frame
    manifest = decode_manifest(
        encoded,
        expected=cid,
        max_manifest_bytes=config.max_manifest_bytes,
        max_files=config.max_files,
        max_chunks=config.max_chunks,
        max_path_bytes=config.max_path_bytes,
        max_header_bytes=config.max_safetensors_header_bytes,
    )
    return encoded, manifest


async def _fetch_manifest(
    cid: Cid, candidates: Sequence[PeerId], open_stream: StreamOpener, config: ContentConfig
) -> tuple[bytes, Manifest, PeerId]:
    """The manifest from the first candidate that sends a valid one, and that peer. Peers that answer
    ``busy`` are asked again after a doubling pause (``_MANIFEST_BUSY_FIRST_S`` up to
    ``_MANIFEST_BUSY_MAX_S``) for at most ``fetch_stall_timeout_s``: a busy seeder is a
    moment's wait, not a failed fetch. Raises :class:`FetchFailedError`."""
    errors: list[str] = []
    asking = list(candidates)
    pause = _MANIFEST_BUSY_FIRST_S
    give_up_at = trio.current_time() + config.fetch_stall_timeout_s
    while True:
        found, busy = await _ask_manifest_round(cid, asking, open_stream, config, errors)
        if found is not None:
            return found
        if not busy or trio.current_time() + pause > give_up_at:
            errors += [f"{peer}: {BUSY}" for peer in busy]
            break
        await trio.sleep(pause)
        pause = min(2 * pause, _MANIFEST_BUSY_MAX_S)
        asking = busy
    detail = "; ".join(errors[:5]) if errors else "no provider or connected peer found"
    raise FetchFailedError(f"cannot get the manifest of {cid}: {detail}")


async def _ask_manifest_round(
    cid: Cid, asking: Sequence[PeerId], open_stream: StreamOpener, config: ContentConfig, errors: list[str]
) -> tuple[tuple[bytes, Manifest, PeerId] | None, list[PeerId]]:
    """Ask ``asking`` for the manifest, ``_MANIFEST_PARALLEL`` at a time: one that never answers
    must not hold the fetch for its whole timeout before the next is asked (review finding).
    Returns the first valid manifest with its sender (the other asks are cancelled) and the
    peers that answered ``busy``; other failures are appended to ``errors``."""
    busy: list[PeerId] = []
    found: tuple[bytes, Manifest, PeerId] | None = None
    limiter = trio.CapacityLimiter(_MANIFEST_PARALLEL)
    async with trio.open_nursery() as nursery:

        async def ask(peer: PeerId) -> None:
            nonlocal found
            async with limiter:
                if found is not None:
                    return
                try:
                    answer = await _ask_manifest(cid, peer, open_stream, config)
                except trio.TooSlowError:
                    errors.append(f"{peer}: no manifest within {_MANIFEST_TIMEOUT_S:g} s")
                    return
                except MalformedContentError as exc:
                    log.warning("peer %s sent a bad manifest for %s: %s", peer, cid, exc)
                    errors.append(f"{peer}: bad manifest ({exc})")
                    return
                except RpcError as exc:  # the peer's RPC layer refused the stream
                    if exc.code == BUSY:  # at its call caps: asked again, as a busy seeder is
                        busy.append(peer)
                    else:
                        errors.append(f"{peer}: {exc}")
                    return
                except (LatticaError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    errors.append(f"{peer}: {exc}")
                    return
                if isinstance(answer, tuple):
                    if found is None:
                        found = (*answer, peer)
                        nursery.cancel_scope.cancel()
                elif answer == BUSY:
                    busy.append(peer)
                else:
                    errors.append(f"{peer}: {answer}")

        for peer in asking:
            nursery.start_soon(ask, peer)
    return found, busy


@dataclass
class _Peers:
    """Whom a transfer starts with: ``likely`` holders get chunk requests right behind their
    ``Has`` (the peer that sent the manifest, DHT providers), ``ask_first`` peers only once they
    answer that they hold it; ``search_now`` asks the DHT for providers beside the transfer."""

    likely: list[PeerId] = field(default_factory=list)
    ask_first: list[PeerId] = field(default_factory=list)
    search_now: bool = True


@dataclass
class FetchDeps:
    """What a fetch uses of the node: its store, settings, stream opener and provider search."""

    store: BlockStore
    config: ContentConfig
    open_stream: StreamOpener
    find_candidates: Callable[[Cid], Awaitable[list[PeerId]]]
    """Peers that may hold a content id: connected peers and DHT providers, not this node."""
    connected_peers: Callable[[], list[PeerId]] = list
    """Peers connected now (asked first: a DHT lookup can wait seconds on a dead node)."""
    open_bulk_stream: StreamOpener | None = None
    """Opens the one long stream of a transfer per peer (a lane of its own where TCP reaches
    the peer directly); ``open_stream`` where None."""


async def fetch_content(
    deps: FetchDeps,
    cid: Cid,
    *,
    out_dir: Path | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    tensors: Sequence[str] = (),
    progress: FetchProgress | None = None,
) -> FetchProgress:
    """Fetch ``cid`` (see the module docstring) and return its final progress record.

    Raises :class:`FetchFailedError`, :class:`~lattica.content.errors.InvalidCidError` for a
    chunk id, :class:`NoFilesSelectedError`, :class:`NoTensorsSelectedError`,
    :class:`~lattica.content.errors.UnsafePathError`
    and :class:`~lattica.storage.DiskFullError` / ``OSError`` from storing or exporting."""
    store, config = deps.store, deps.config
    progress = progress or FetchProgress(str(cid))
    progress.started_at = trio.current_time()
    if not cid.is_manifest:
        raise FetchFailedError(f"{cid} names a single chunk; fetch takes a manifest id")
    peers = _Peers()
    store.fetch_started(cid)
    ended = False

    def end() -> bool:
        nonlocal ended
        ended = True
        return store.fetch_ended(cid)

    try:
        if store.has(cid.digest):
            manifest = store.manifest(cid)
            await store.add_root(store.read_block(cid.digest), manifest, pinned=True)
            peers.ask_first = deps.connected_peers()
        else:
            connected = deps.connected_peers()
            errors: list[str] = []
            found = None
            if connected:  # most fetches name content a connected peer holds: no lookup needed
                try:
                    found = await _fetch_manifest(cid, connected, deps.open_stream, config)
                except FetchFailedError as exc:
                    errors.append(str(exc))
            if found is None:
                asked = set(connected)
                others = [p for p in await deps.find_candidates(cid) if p not in asked]
                if not others and errors:
                    raise FetchFailedError(errors[0])  # what the connected peers said, not "nobody"
                found = await _fetch_manifest(cid, others, deps.open_stream, config)
                # Providers the DHT named: likely holders. Connected peers said they lack it.
                peers = _Peers(likely=others, search_now=False)
            else:
                peers.likely = [found[2]]  # it had the manifest: it most likely has the chunks
                peers.ask_first = [p for p in connected if p != found[2]]
            encoded, manifest, _source = found
            await store.add_root(encoded, manifest, pinned=True)
        try:
            await _fetch_planned(deps, cid, manifest, out_dir, include, exclude, tensors, progress, peers)
        except HeldChunkLostError as exc:
            # A chunk held here was dropped while it was copied into the output (its range of
            # a fetched file was edited): it counts as missing now, so one more pass gets it
            # from peers (review finding: the fetch failed, and only a second one succeeded).
            log.info("fetch of %s: %s; fetching it from peers", cid, exc)
            await _fetch_planned(deps, cid, manifest, out_dir, include, exclude, tensors, progress, peers)
    except ChunkMismatchError as exc:
        # The chunks match the id but a file does not match its SHA-256: the manifest lies,
        # and every copy of this id will. Unpinned and marked so gc frees it and ls shows it.
        end()
        await store.mark_failed(cid, str(exc))
        raise
    except Exception:
        # A pin the fetches added must not outlive them (gc could never free a dead fetch);
        # what was verified stays stored until gc, so fetching again still resumes. A cancelled
        # fetch (Ctrl-C, daemon stop) keeps its pin: it is meant to be resumed. Another fetch
        # of the same root still running keeps it too (review finding: it was unpinned).
        if end() and store.has(cid.digest):
            await store.set_pinned(cid, False)
        raise
    finally:
        if not ended:  # success or cancellation: the pin stays
            end()
    progress.state = "done"
    progress.finished_at = trio.current_time()
    return progress


async def _fetch_planned(
    deps: FetchDeps,
    cid: Cid,
    manifest: Manifest,
    out_dir: Path | None,
    include: Sequence[str],
    exclude: Sequence[str],
    tensors: Sequence[str],
    progress: FetchProgress,
    peers: _Peers,
) -> None:
    """Steps 2 to 4 of :func:`fetch_content` once the manifest is stored."""
    store = deps.store
    plan = plan_fetch(manifest, include, exclude, tensors)
    progress.total_bytes = sum(plan.chunks.values())
    assembly: FileAssembly | None = None
    root_fd = -1
    tag = cid.digest.hex()[:16]
    try:
        if out_dir is not None:
            root_fd = await run_blocking(lambda: _open_folder(out_dir, store.root))
            await run_blocking(lambda: FileAssembly.remove_leftovers(root_fd, manifest.files, tag=tag))
        if out_dir is not None and plan.files:
            # Whole files are written into place as their chunks are stored (see
            # :mod:`lattica.content.file_assembly`), not exported after the transfer.
            assembly = await run_blocking(
                lambda: FileAssembly(
                    root_fd,
                    out_dir,
                    plan.files,
                    tag=tag,
                    adopt=store.adopt_file,
                    direct_io=deps.config.fetch_direct_io,
                )
            )
            await run_blocking(assembly.check_targets)
            # Files already in place byte for byte (a fetch run again) stay as they are.
            progress.state = "checking"
            while not await run_blocking(lambda: assembly.keep_identical(_CHECK_STEP_BYTES)):
                pass  # a cancellation point between steps: Ctrl-C and daemon stop stay prompt
            if assembly.kept:
                await store.index_written([], assembly.take_extents())
        missing = store.missing(plan.chunks)
        progress.held_bytes = progress.total_bytes - sum(plan.chunks[d] for d in missing)
        absent = set(missing)
        held = [d for d in plan.chunks if d not in absent]
        if missing:
            progress.state = "fetching"
            wanted = [WantedChunk(d, plan.chunks[d]) for d in missing]
            await _transfer(deps, cid, wanted, progress, peers, assembly, held)
        elif assembly is not None:
            await run_blocking(lambda: assembly.add_held(held, store.read_block))
        if out_dir is not None:
            progress.state = "exporting"  # each whole file is checked against its SHA-256
            paths = [] if assembly is None else await run_blocking(assembly.finish)
            if assembly is not None:  # files completed from held chunks: their chunks move there
                await store.index_written([], assembly.take_extents())
                progress.direct_bytes, progress.in_place_bytes = assembly.direct_bytes, assembly.in_place_bytes
            if plan.selections:
                paths += await run_blocking(lambda: export_files(store, (), out_dir, plan.selections, tag=tag))
            progress.paths = [str(p) for p in paths]
        elif plan.files:
            bad = await run_blocking(lambda: store.file_sha256_mismatches(plan.files))
            if bad:
                raise ChunkMismatchError(f"{bad[0]}: SHA-256 differs from the manifest's ({len(bad)} file(s))")
    finally:
        if assembly is not None:
            assembly.discard()  # after finish() a no-op; else the temporary files go (a few unlinks)
            store.release_files(assembly.linked_names)  # indexed by now, or orphans for gc
        if root_fd >= 0:
            os.close(root_fd)


def _open_folder(out_dir: Path, store_root: Path) -> int:
    inside = os.path.realpath(out_dir)
    if os.path.commonpath([inside, os.path.realpath(store_root)]) == os.path.realpath(store_root):
        # gc removes whatever it does not know under the store (review finding: a fetch into
        # blocks/files had its files deleted by the next gc).
        raise OutputConflictError(f"{out_dir} is inside the node's block store ({store_root}): give -o another folder")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise OutputConflictError(f"{out_dir} is a file, not a folder: give -o a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputConflictError(f"cannot create the output folder {out_dir}: {exc.strerror}") from None
    return os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)


async def _transfer(
    deps: FetchDeps,
    cid: Cid,
    wanted: list[WantedChunk],
    progress: FetchProgress,
    peers: _Peers,
    assembly: FileAssembly | None = None,
    held: Sequence[bytes] = (),
) -> None:
    config = deps.config
    scheduler = FetchScheduler(
        wanted,
        max_window=config.fetch_max_window,
        request_timeout_s=config.fetch_request_timeout_s,
    )
    requested: set[bytes] = set()
    sizes = {w.chunk_id: w.size for w in wanted}
    still_missing = set(sizes)
    send, receive = trio.open_memory_channel[tuple[PeerId | None, _LinkEvent]](math.inf)
    links: dict[PeerId, _PeerLink] = {}
    banned: set[PeerId] = set()
    busy_until: dict[PeerId, float] = {}
    # Peers that said they hold the content: one whose connection went (it restarted, the
    # network dropped) is dialled again with the next search, not only if the DHT or a live
    # connection names it again (a 2-node fetch from a restarted seeder stalled to failure).
    holders: dict[PeerId, None] = {}
    stalled_since: float | None = None
    searching = False

    async with _first_error_nursery() as nursery:

        def connect(found: Sequence[PeerId], *, likely: bool) -> None:
            now = trio.current_time()
            for peer in found:
                if peer in links or peer in banned or busy_until.get(peer, 0.0) > now:
                    continue
                link = _PeerLink(peer, cid.digest, send)
                links[peer] = link
                nursery.start_soon(link.run, deps.open_bulk_stream or deps.open_stream)
                if likely:
                    # The first requests go out right behind the Has, not a round trip after
                    # it: a peer answering "not held" is removed and its requests go
                    # elsewhere. Peers merely connected wait for their answer (a node may be
                    # connected to many that hold nothing of this).
                    apply(scheduler.add_peer(peer, now))

        async def search() -> None:
            nonlocal searching
            try:
                found = await deps.find_candidates(cid)
                connect([*found, *(p for p in holders if p not in found)], likely=True)
            finally:
                searching = False
                # The loop may be waiting with no timer for the next search (it armed none
                # while this one ran): wake it.
                send.send_nowait((None, _Searched()))

        def start_search() -> None:
            nonlocal searching
            if not searching:
                searching = True
                nursery.start_soon(search)

        def close(peer: PeerId) -> None:
            link = links.pop(peer, None)
            if link is not None:
                link.scope.cancel()

        def apply(outputs: Sequence[object]) -> bool:
            nonlocal stalled_since
            progress.requests_sent = scheduler.requests_sent
            for out in outputs:
                if isinstance(out, RequestChunk):
                    link = links.get(out.peer)  # type: ignore[call-overload]
                    if link is not None:
                        link.request(out.chunk_id, sizes[out.chunk_id])
                        requested.add(out.chunk_id)
                        progress.chunks_requested = len(requested)
                elif isinstance(out, CancelChunk):
                    link = links.get(out.peer)  # type: ignore[call-overload]
                    if link is not None:
                        link.cancel(out.chunk_id)
                elif isinstance(out, PeerDropped):
                    log.info("fetch of %s: dropped peer %s: %s", cid, out.peer, out.reason)
                    progress.dropped[str(out.peer)] = out.reason
                    banned.add(out.peer)  # type: ignore[arg-type]
                    close(out.peer)  # type: ignore[arg-type]
                elif isinstance(out, FetchStalled):
                    stalled_since = stalled_since if stalled_since is not None else trio.current_time()
                    start_search()
                elif isinstance(out, FetchComplete):
                    return True
            return False

        # Verified chunks are written by one storer task, a batch at a time, while the
        # transfer goes on, and made durable and indexed every ``fetch_sync_bytes`` by a
        # flush that runs beside the next writes: a flush to disk per chunk (or per batch)
        # would cap the rate at the disk's sync latency. ``batch`` fills while the storer is
        # busy; a capacity-0 channel hands it over only when the storer is waiting, and the
        # storer's _Stored event wakes this loop.
        store_send, store_receive = trio.open_memory_channel[list[tuple[PeerId, bytes, bytes | memoryview]]](0)
        stored_all = trio.Event()

        async def storer() -> None:
            if assembly is not None and held:  # chunks held before: copied while the transfer starts
                await run_blocking(lambda: assembly.add_held(held, deps.store.read_block))
            async with trio.open_nursery() as flushes:
                flusher = _Flusher(deps.store, config.fetch_sync_bytes, config.fetch_sync_interval_s, flushes)
                try:
                    async for pending in store_receive:
                        await _write_batch(deps.store, pending, progress, assembly, flusher)
                        await send.send((None, _Stored()))
                finally:
                    # Also when cancelled (Ctrl-C, a daemon stop) or failing: what was
                    # verified and written is acknowledged, so fetching again resumes after it.
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + _FLUSH_ON_EXIT_S):
                        await flusher.flush()
            stored_all.set()

        async def prober() -> None:
            # A link with requests out that heard nothing for a probe interval asks whether its
            # peer is there: a fetcher that only receives sends nothing once its requests are
            # acknowledged, so a seeder that restarted was found only by the 15 s keepalive
            # (review finding: a restart often cost 15 s, not a round trip).
            while True:
                await trio.sleep(_PROBE_S)
                in_flight = scheduler.peers()
                for link in list(links.values()):
                    arrived = link.arrived_bytes()
                    stats = in_flight.get(link.peer)
                    if stats is not None and stats.in_flight and arrived == link.probed_at_bytes:
                        silent_s = link.silent_s()
                        if silent_s is not None and silent_s >= _SILENT_GONE_S:
                            # Not even our probes were acknowledged: the peer is gone (a crash,
                            # a dead link). Its requests go to others now, not after request
                            # timeouts; it is not banned, and a later search dials it again.
                            log.info("fetch of %s: peer %s gone: heard nothing for %.0f s", cid, link.peer, silent_s)
                            close(link.peer)
                            apply(scheduler.remove_peer(link.peer, trio.current_time()))
                            send.send_nowait((None, _Searched()))  # the loop re-arms its timers
                            continue
                        await link.probe()
                    link.probed_at_bytes = arrived

        nursery.start_soon(storer)
        nursery.start_soon(prober)
        connect(peers.likely, likely=True)
        connect(peers.ask_first, likely=False)
        if peers.search_now:
            # The DHT's providers join when the lookup answers (a lookup can wait seconds on
            # a node that is gone); without it the DHT is asked again only on a stall.
            start_search()
        stalled_since = trio.current_time()
        batch: list[tuple[PeerId, bytes, bytes | memoryview]] = []
        batch_bytes = 0
        done = False

        def hand_over() -> None:
            nonlocal batch, batch_bytes
            if batch:
                with contextlib.suppress(trio.WouldBlock):  # the storer is busy: keep filling
                    store_send.send_nowait(batch)
                    batch, batch_bytes = [], 0

        while not done:
            timer = scheduler.next_timer()
            if stalled_since is not None:
                stall_deadline = stalled_since + config.fetch_stall_timeout_s
                timer = stall_deadline if timer is None else min(timer, stall_deadline)
                if not searching:
                    # Look for providers again now and then while stalled.
                    timer = min(timer, trio.current_time() + min(5.0, config.fetch_stall_timeout_s / 4))
            if batch_bytes >= config.fetch_batch_bytes:
                # Back-pressure: stop taking blocks until the storer takes this batch.
                await store_send.send(batch)
                batch, batch_bytes = [], 0
            item: tuple[PeerId | None, _LinkEvent] | None = None
            try:
                item = receive.receive_nowait()
            except trio.WouldBlock:
                hand_over()  # idle moment: let the storer have what we hold
                with trio.move_on_at(math.inf if timer is None else timer):
                    item = await receive.receive()
            now = trio.current_time()
            if item is None:
                if stalled_since is not None and now >= stalled_since + config.fetch_stall_timeout_s:
                    raise FetchFailedError(
                        f"no peer could supply {len(scheduler.missing)} missing chunk(s) of {cid} "
                        f"for {config.fetch_stall_timeout_s:g} s{_dropped_note(progress.dropped)} "
                        "(what arrived is kept; fetch again to resume)"
                    )
                if stalled_since is not None:
                    start_search()
                for link in links.values():  # a peer still delivering keeps its requests
                    arrived = link.arrived_bytes()
                    if arrived - link.progress_reported >= _PROGRESS_BYTES:
                        link.progress_reported = arrived
                        scheduler.peer_progress(link.peer, now)
                done = apply(scheduler.handle_timer(now))
                continue
            peer, event = item
            if peer is None or isinstance(event, (_Stored, _Searched)):  # re-arm the timers
                continue
            if isinstance(event, BlockReceived):
                if event.digest not in still_missing:
                    done = apply(scheduler.chunk_received(peer, event.digest, now))  # an endgame copy
                elif blake3_digest(event.data) != event.digest:
                    done = apply(scheduler.chunk_bad(peer, event.digest, now))
                else:
                    still_missing.discard(event.digest)
                    batch.append((peer, event.digest, event.data))
                    batch_bytes += len(event.data)
                    done = apply(scheduler.chunk_received(peer, event.digest, now))
            elif isinstance(event, BlockRefused):
                if event.code == BUSY:
                    progress.busy_refusals += 1
                    busy_until[peer] = now + _BUSY_RETRY_S
                    close(peer)
                    done = apply(scheduler.remove_peer(peer, now))
                else:
                    done = apply(scheduler.chunk_refused(peer, event.digest, now))
            elif isinstance(event, _Ready):
                if event.held and peer in links:
                    holders[peer] = None
                    stalled_since = None
                    done = apply(scheduler.add_peer(peer, now))  # nothing if it started already
                else:
                    close(peer)
                    banned.add(peer)
                    done = apply(scheduler.remove_peer(peer, now))
            else:  # _Gone
                log.info("fetch of %s: peer %s gone: %s", cid, peer, event.reason)
                if event.hostile:
                    banned.add(peer)
                    progress.dropped[str(peer)] = event.reason
                links.pop(peer, None)
                done = apply(scheduler.remove_peer(peer, now))
        for link in links.values():
            link.scope.cancel()
        if batch:
            await store_send.send(batch)
        await store_send.aclose()
        await stored_all.wait()
        nursery.cancel_scope.cancel()


def _dropped_note(dropped: dict[str, str]) -> str:
    """Why peers were dropped, for a stall's message (review finding: a fetch whose only peer
    lied failed with no word of it): the first two, and how many more."""
    if not dropped:
        return ""
    shown = [f"{peer[:12]}: {reason}" for peer, reason in list(dropped.items())[:2]]
    more = f" and {len(dropped) - 2} more" if len(dropped) > 2 else ""
    return f"; dropped {'; '.join(shown)}{more}"


@contextlib.asynccontextmanager
async def _first_error_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failure is its first error itself, not an ``ExceptionGroup``: callers
    (and the user) see ``FetchFailedError`` or ``DiskFullError`` with its message. A group
    holding a ``trio.Cancelled`` passes unchanged (trio needs it); further errors are logged."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        errors = leaf_exceptions(group)
        if any(isinstance(exc, trio.Cancelled) for exc in errors):
            raise
        for extra in errors[1:]:
            log.info("fetch: a further error in the same failure: %r", extra)
        raise errors[0] from None


class _Flusher:
    """Makes written chunks durable and indexed (:meth:`BlockStore.index_written`) once
    ``sync_bytes`` of them wait or the oldest has waited ``sync_interval_s``, one flush at a
    time, in a task of ``nursery`` so the next batches are written meanwhile."""

    def __init__(self, store: BlockStore, sync_bytes: int, sync_interval_s: float, nursery: trio.Nursery) -> None:
        self.store = store
        self.sync_bytes = sync_bytes
        self.sync_interval_s = sync_interval_s
        self.nursery = nursery
        self.waiting: list[tuple[bytes, int]] = []
        self.waiting_extents: list[Extent] = []
        self.waiting_bytes = 0
        self.waiting_since = math.inf
        self.idle = trio.Event()
        self.idle.set()

    async def add(self, written: list[tuple[bytes, int]], extents: list[Extent]) -> None:
        now = trio.current_time()
        if (written or extents) and not (self.waiting or self.waiting_extents):
            self.waiting_since = now
        self.waiting += written
        self.waiting_extents += extents
        self.waiting_bytes += sum(length for _, length in written) + sum(e.length for e in extents)
        if self.waiting_bytes >= self.sync_bytes or now - self.waiting_since >= self.sync_interval_s:
            await self.idle.wait()  # one flush at a time
            self.idle = trio.Event()
            self.nursery.start_soon(self._flush, *self._take())

    async def flush(self) -> None:
        """Flush what waits now and return once every flush is done."""
        await self.idle.wait()
        self.idle = trio.Event()
        await self._flush(*self._take())

    def _take(self) -> tuple[list[tuple[bytes, int]], list[Extent]]:
        taken = self.waiting, self.waiting_extents
        self.waiting, self.waiting_extents, self.waiting_bytes, self.waiting_since = [], [], 0, math.inf
        return taken

    async def _flush(self, blocks: list[tuple[bytes, int]], extents: list[Extent]) -> None:
        try:
            await self.store.index_written(blocks, extents)
        finally:
            self.idle.set()


async def _write_batch(
    store: BlockStore,
    batch: list[tuple[PeerId, bytes, bytes | memoryview]],
    progress: FetchProgress,
    assembly: FileAssembly | None,
    flusher: _Flusher,
) -> None:
    """Write chunks verified on arrival (hashed once, in the fetch loop) into the files being
    assembled and, those not written into a file the store adopted, to the store as block
    files, on one worker thread; the flusher acknowledges them later."""

    def write() -> tuple[list[tuple[bytes, int]], list[Extent], Exception | None]:
        error: Exception | None = None
        extents: list[Extent] = []
        rest = [(data, digest) for _peer, digest, data in batch]
        if assembly is not None:
            try:
                for _peer, digest, data in batch:
                    assembly.add(digest, data)
            except Exception as exc:  # what was written stays acknowledged: see below
                error = exc
            extents = assembly.take_extents()
            rest = [(data, digest) for data, digest in rest if not assembly.is_placed(digest)]
        try:
            written = store.write_unindexed(rest)
        except Exception as exc:  # the extents are still good: hand them to the flusher
            return [], extents, error or exc
        return written, extents, error

    written, extents, error = await run_blocking(write)
    await flusher.add(written, extents)
    if error is not None:
        raise error
    for peer, _digest, data in batch:
        progress.held_bytes += len(data)
        progress.received_bytes += len(data)
        key = str(peer)
        progress.peer_bytes[key] = progress.peer_bytes.get(key, 0) + len(data)
    if progress.on_update is not None:
        progress.on_update(progress)

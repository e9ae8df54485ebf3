"""Whole files of a fetch written into the output folder while their chunks arrive.

Exporting after the transfer read every chunk back from the store, hashed it and wrote it out
again: at 256 MiB that serial tail took longer than the transfer. A :class:`FileAssembly`
instead writes each verified chunk at its offset(s) in a temporary file beside the final name
(:class:`~lattica.content.contained_write.ContainedFile`: contained, no symlink followed) as
soon as it is stored, and feeds the file's SHA-256 in file order: a chunk that arrives in
order is hashed from memory; one that arrives early is hashed when the gap before it fills,
read back from the temporary file (page cache), so nothing is held in memory. When a file's
last chunk is written its hash is complete: the file is checked against the manifest's
SHA-256 and renamed into place (fsynced) at once, never a half-written file under its final
name. A temporary file is created with the file's first chunk, so the files open at once are
the ones with chunks in flight, not all the manifest lists.

Temporary files are named ``.NAME.<16 hex of the id><8 hex of the path>.part`` (``NAME`` cut to
96 bytes) so a fetch killed with ``kill -9`` and
started again replaces its own leftover instead of littering the folder. All methods block
(file I/O, hashing): call them from a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lattica.content.block_store import MAX_EXTENT_BYTES, Extent
from lattica.content.cid import blake3_digest
from lattica.content.contained_write import (
    ContainedFile,
    name_prefix,
    named_os_error,
    open_existing,
    remove_stale_in,
)
from lattica.content.direct_write import AlignedBuffer, DirectWriter
from lattica.content.errors import (
    ChunkMismatchError,
    ChunkNotFoundError,
    HeldChunkLostError,
    OutputBusyError,
    OutputConflictError,
)
from lattica.content.manifest import ChunkRef, FileEntry
from lattica.content.paths import check_relative_path

ReadBlock = Callable[[bytes], bytes]
"""``read(digest) -> bytes``: a whole stored chunk (``BlockStore.read_block``)."""

AdoptFile = Callable[[int], "str | None"]
"""``adopt(fd) -> name | None``: link a file being assembled into the block store
(``BlockStore.adopt_file``) so its chunks are stored as extents of it, not a second time."""


# Files keep_identical opens at most per step (each costs a path walk and an open).
_CHECK_FILES_PER_STEP = 256

# Final paths the assemblies of this process are writing (claimed by check_targets): two
# fetches of different content must not race to rename different bytes under one name.
_CLAIMS: set[str] = set()
_CLAIMS_LOCK = threading.Lock()


def temporary_name(path: str, tag: str) -> str:
    """The temporary file's name (in the final file's folder) for the manifest path ``path``
    of a fetch whose content id starts with ``tag``: the same on every try, so a restarted
    fetch finds its leftover; the path's own hash keeps names unique when two files share a
    long prefix."""
    name = path.rsplit("/", 1)[-1]
    unique = hashlib.sha256(path.encode()).hexdigest()[:8]
    return f".{name_prefix(name)}.{tag}{unique}.part"


def _fits(chunk: ChunkRef) -> bool:
    # Longer chunks stay block files: serving must hash an extent in one read (MAX_EXTENT_BYTES).
    return chunk.length <= MAX_EXTENT_BYTES


def _reserve(fd: int, size: int) -> None:
    # Blocks for the whole file up front, so a disk too small for it fails now, by name,
    # rather than after the transfer; file systems without fallocate get a sparse file.
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


class _Comparison:
    """One existing file being compared with its manifest entry, a chunk at a time."""

    def __init__(self, fd: int, entry: FileEntry) -> None:
        self.fd = fd
        self.entry = entry
        self.next_chunk = 0
        self.read_bytes = 0
        self.sha256 = hashlib.sha256()

    def step(self, max_bytes: int) -> bool | None:
        """Read chunks until ``max_bytes`` were read: True when the file matches, False at the
        first difference, None when more is left. Raises ``OSError``."""
        chunks = self.entry.chunks
        start = self.read_bytes
        while self.next_chunk < len(chunks):
            if self.read_bytes - start >= max_bytes:
                return None
            chunk = chunks[self.next_chunk]  # one chunk in memory at a time
            data = os.pread(self.fd, chunk.length, chunk.offset)
            self.read_bytes += len(data)
            if len(data) != chunk.length or blake3_digest(data) != chunk.digest:
                return False
            self.sha256.update(data)
            self.next_chunk += 1
        return self.sha256.digest() == self.entry.sha256


@dataclass
class _Assembled:
    entry: FileEntry
    temporary: str
    target: ContainedFile | None = None
    writer: DirectWriter | None = None
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    written: list[bool] = field(default_factory=list)
    hashed: int = 0
    """Chunks hashed so far (a prefix of the file's chunk list)."""
    final: Path | None = None
    """Where the file went once it was complete, checked and renamed into place."""
    linked: str | None = None
    """The file's name in the block store (:data:`AdoptFile`), or ``None``."""


class FileAssembly:
    """The whole files of a fetch, assembled in temporary files under the output folder open
    as ``root_fd`` (``out_dir`` names it in messages); ``tag`` (a hex prefix of the content
    id) names the temporary files.

    A file's temporary file is created when its first chunk arrives and the file is checked
    and renamed into place as soon as its last one is written, so the files open at once are
    those with chunks in flight (a fetch asks for chunks in file order), not every file of the
    manifest. Every path is checked up front; raises
    :class:`~lattica.content.errors.UnsafePathError` for a bad one.

    With ``adopt``, each file is linked into the block store when it is begun, and the chunks
    written into it are recorded as :class:`~lattica.content.block_store.Extent` s
    (:meth:`take_extents`) for the store to index: every byte of a fetch is written once. A
    chunk that arrives is recorded where it is first written; when a file is complete, every
    chunk of it not recorded yet (chunks held before, copied in) is recorded there too, so
    the store's older copies can go.

    With ``direct_io``, the whole pages of each chunk are written with ``O_DIRECT``
    (:mod:`lattica.content.direct_write`: no page-cache copy; falls back where the file system
    refuses it). Not thread-safe: one thread at a time."""

    def __init__(
        self,
        root_fd: int,
        out_dir: Path,
        files: Sequence[FileEntry],
        *,
        tag: str,
        adopt: AdoptFile | None = None,
        direct_io: bool = False,
    ) -> None:
        self._root_fd = root_fd
        self._direct_io = direct_io
        self._buffer: AlignedBuffer | None = None
        self._direct_bytes_closed = 0
        self._in_place_bytes_closed = 0
        self._checking = 0
        self._check: _Comparison | None = None
        self.kept: list[str] = []
        """Paths :meth:`keep_identical` left in place."""
        self._out_dir = out_dir
        self._adopt = adopt
        self._placed: set[bytes] = set()
        self._extents: list[Extent] = []
        self._linked: list[str] = []
        self._claimed: list[str] = []
        self._files: list[_Assembled] = []
        self._places: dict[bytes, list[tuple[_Assembled, int]]] = {}
        for entry in files:
            check_relative_path(entry.path)
            assembled = _Assembled(entry, temporary_name(entry.path, tag), written=[False] * len(entry.chunks))
            self._files.append(assembled)
            for index, chunk in enumerate(entry.chunks):
                self._places.setdefault(chunk.digest, []).append((assembled, index))

    @staticmethod
    def remove_leftovers(root_fd: int, files: Sequence[FileEntry], *, tag: str) -> None:
        """Remove the temporary files a killed fetch of the same content left for ``files``
        (typically every file of the manifest, also those this fetch does not select: a retry
        with ``--exclude`` must not leave an earlier try's ``.part`` behind). Files another
        fetch is writing are left alone. Raises ``OSError``."""
        for entry in files:
            remove_stale_in(root_fd, entry.path, temporary_name(entry.path, tag))

    def check_targets(self) -> None:
        """Refuse, before anything is fetched, what would make putting a file in place fail
        after its bytes arrived, and claim the final names for this fetch. Refused: an output
        folder on a read-only file system or that this process cannot write to; a file's final
        name taken by a folder; a file or symlink where the content has a folder; a final name
        another fetch in this process is writing now (another content with a file of the same
        name, say). Files already there are replaced (as ``cp`` and ``curl -o`` do). Advisory
        as to safety: the checks that keep writes inside the folder happen when each file is
        written. Raises :class:`~lattica.content.errors.OutputConflictError` and
        :class:`~lattica.content.errors.OutputBusyError`; :meth:`discard` releases the claim."""
        out = self._out_dir
        if os.statvfs(out).f_flag & os.ST_RDONLY:
            raise OutputConflictError(f"{out} is on a read-only file system")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputConflictError(f"{out}: no permission to write there")
        for assembled in self._files:
            *folders, _name = assembled.entry.path.split("/")
            for depth in range(1, len(folders) + 1):
                folder = out.joinpath(*folders[:depth])
                if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
                    kind = "a symlink" if os.path.islink(folder) else "a file"
                    raise OutputConflictError(f"{folder} is {kind}; the content has a folder there")
            final = out / assembled.entry.path
            if os.path.isdir(final) and not os.path.islink(final):
                raise OutputConflictError(f"{final} is a folder; {assembled.entry.path} is a file of the content")
        self._claim()

    def _claim(self) -> None:
        base = os.path.realpath(self._out_dir)
        names = [os.path.join(base, a.entry.path) for a in self._files]
        with _CLAIMS_LOCK:
            taken = next((n for n in names if n in _CLAIMS), None)
            if taken is not None:
                raise OutputBusyError(f"{taken}: another fetch is writing this file now")
            _CLAIMS.update(names)
        self._claimed = names

    @property
    def digests(self) -> set[bytes]:
        """The chunks the files are made of."""
        return set(self._places)

    @property
    def open_files(self) -> int:
        """Temporary files open now (files begun and not finished)."""
        return sum(1 for a in self._files if a.target is not None)

    @property
    def linked_names(self) -> list[str]:
        """The block store names given to the files begun so far (for ``release_files``)."""
        return list(self._linked)

    def is_placed(self, digest: bytes) -> bool:
        """Whether the chunk was written into a file linked into the store (an extent)."""
        return digest in self._placed

    def take_extents(self) -> list[Extent]:
        """The extents recorded since the last call (the caller indexes them)."""
        extents, self._extents = self._extents, []
        return extents

    def keep_identical(self, max_bytes: int) -> bool:
        """Leave in place the files whose final name already holds exactly the file: a regular
        file of ours (owned by this process's user: another user's could change under the
        fetched content later) with the same size and mode, every chunk's BLAKE3 and the whole
        file's SHA-256 (a fetch run again into the same folder). Such a file is not written
        again, needs no room for a second copy, keeps its inode, and with ``adopt`` its chunks
        are recorded as extents of it (:meth:`take_extents`). A file that differs anywhere is
        left for the fetch to replace; reading stops at its first differing chunk.

        Works in steps: reads about ``max_bytes`` and returns False while files are left to
        look at, True when done, so a caller can stay cancellable between steps (a model folder
        is gigabytes). :attr:`kept` lists the kept paths. Raises ``OSError`` (naming the file)
        for a read that fails."""
        budget = max_bytes
        looked_at = 0
        while self._checking < len(self._files):
            assembled = self._files[self._checking]
            if self._check is None:
                if looked_at >= _CHECK_FILES_PER_STEP:  # a folder of many small files
                    return False
                looked_at += 1
                self._check = self._start_check(assembled)
                if self._check is None:
                    self._checking += 1
                    continue
            check = self._check
            read_before = check.read_bytes
            try:
                outcome = check.step(budget)
            except OSError as exc:
                self._end_check()
                raise named_os_error(exc, self._out_dir / assembled.entry.path) from exc
            if outcome is None:  # more to read
                return False
            if outcome:
                assembled.final = self._out_dir / assembled.entry.path
                self.kept.append(assembled.entry.path)
                if self._adopt is not None and any(_fits(c) for c in assembled.entry.chunks):
                    assembled.linked = self._adopt(check.fd)
                    if assembled.linked is not None:
                        self._linked.append(assembled.linked)
                        self._record_extents(assembled)
            budget -= check.read_bytes - read_before
            self._end_check()
            self._checking += 1
            if budget <= 0:
                return self._checking >= len(self._files)
        return True

    def _start_check(self, assembled: _Assembled) -> _Comparison | None:
        if assembled.final is not None or assembled.target is not None:
            return None
        path = assembled.entry.path
        try:
            fd = open_existing(self._root_fd, path)
        except OSError as exc:
            raise named_os_error(exc, self._out_dir / path) from exc
        if fd is None:
            return None
        status = os.fstat(fd)
        entry = assembled.entry
        if status.st_uid != os.geteuid() or status.st_size != entry.size or status.st_mode & 0o7777 != entry.mode:
            os.close(fd)
            return None
        return _Comparison(fd, entry)

    def _end_check(self) -> None:
        if self._check is not None:
            os.close(self._check.fd)
            self._check = None

    def add(self, digest: bytes, data: bytes | memoryview, *, held: bool = False) -> None:
        """Write a verified chunk everywhere it sits, advance the hashes it unblocks and put
        every file it completes into place. ``held``: the chunk came from the store (not
        recorded as an extent until its file is complete). A digest that no file holds is
        ignored. Raises
        :class:`ChunkMismatchError` (a completed file does not match its SHA-256: it is
        removed), :class:`~lattica.content.errors.OutputBusyError`,
        :class:`~lattica.content.errors.UnsafePathError`,
        :class:`~lattica.storage.DiskFullError` and ``OSError``."""
        for assembled, index in self._places.get(digest, ()):
            if assembled.final is not None or assembled.written[index]:
                continue
            target = self._begin(assembled)
            chunk = assembled.entry.chunks[index]
            try:
                assert assembled.writer is not None  # set with target
                # A chunk that arrived before the one ahead of it is read back for the SHA-256
                # once the gap fills: it goes through the page cache, so that read is not a
                # disk read (review finding: 64-91 MiB read back per 250 MiB fetch).
                out_of_order = index != assembled.hashed
                assembled.writer.write(memoryview(data), chunk.offset, cached=out_of_order)
            except OSError as exc:
                raise named_os_error(exc, target.final) from exc
            assembled.written[index] = True
            if assembled.linked is not None and not held and digest not in self._placed and _fits(chunk):
                self._placed.add(digest)
                self._extents.append(Extent(digest, chunk.length, assembled.linked, chunk.offset))
            self._advance(assembled, target, digest, data)

    def add_held(self, held: Sequence[bytes], read: ReadBlock) -> None:
        """:meth:`add` for chunks already in the store (a resumed fetch, chunks shared with
        content held before), one chunk in memory at a time. Raises
        :class:`~lattica.content.errors.HeldChunkLostError` when one cannot be read back (the
        store dropped it: fetching again gets it from peers), and what :meth:`add` raises."""
        lost: list[str] = []
        for digest in held:
            if digest in self._places:
                try:
                    data = read(digest)
                except ChunkNotFoundError as exc:
                    # Go on: every lost chunk is dropped from the store in this one pass, so
                    # the next gets them all from peers (review finding: a truncated fetched
                    # file took one fetch per chunk it lost).
                    lost.append(str(exc))
                    continue
                self.add(digest, data, held=True)
        if lost:
            more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
            raise HeldChunkLostError(lost[0] + more)

    def _begin(self, assembled: _Assembled) -> ContainedFile:
        if assembled.target is None:
            entry = assembled.entry
            target = ContainedFile(
                self._root_fd, self._out_dir, entry.path, mode=entry.mode, temporary=assembled.temporary
            )
            try:
                _reserve(target.fd, entry.size)
            except OSError as exc:
                target.discard()
                raise named_os_error(exc, target.final) from exc
            assembled.target = target
            assembled.writer = DirectWriter(target.fd, self._aligned_buffer())
            if self._adopt is not None and any(_fits(c) for c in entry.chunks):
                assembled.linked = self._adopt(target.fd)
                if assembled.linked is not None:
                    self._linked.append(assembled.linked)
        return assembled.target

    def _aligned_buffer(self) -> AlignedBuffer | None:
        if self._direct_io and self._buffer is None:
            self._buffer = AlignedBuffer()
        return self._buffer

    def _close_writer(self, assembled: _Assembled) -> None:
        if assembled.writer is not None:
            assembled.writer.close()
            self._direct_bytes_closed += assembled.writer.direct_bytes
            self._in_place_bytes_closed += assembled.writer.in_place_bytes
            assembled.writer = None

    @property
    def direct_bytes(self) -> int:
        """Bytes written with ``O_DIRECT`` so far (``direct_io``: the whole pages of chunks that
        arrived in file order)."""
        return self._direct_bytes_closed + sum(a.writer.direct_bytes for a in self._files if a.writer is not None)

    @property
    def in_place_bytes(self) -> int:
        """Of :attr:`direct_bytes`, those written from where they were received (page-aligned
        already: no bounce copy)."""
        return self._in_place_bytes_closed + sum(a.writer.in_place_bytes for a in self._files if a.writer is not None)

    def _advance(
        self, assembled: _Assembled, target: ContainedFile, digest: bytes | None, data: bytes | memoryview | None
    ) -> None:
        chunks = assembled.entry.chunks
        while assembled.hashed < len(chunks) and assembled.written[assembled.hashed]:
            chunk = chunks[assembled.hashed]
            if chunk.digest == digest and data is not None:
                assembled.sha256.update(data)
            else:  # written earlier, out of order: read it back (page cache, one chunk)
                assembled.sha256.update(os.pread(target.fd, chunk.length, chunk.offset))
            assembled.hashed += 1
        if assembled.hashed == len(chunks):
            self._complete(assembled, target)

    def _complete(self, assembled: _Assembled, target: ContainedFile) -> None:
        assembled.target = None
        self._close_writer(assembled)
        if assembled.sha256.digest() != assembled.entry.sha256:
            target.discard()
            raise ChunkMismatchError(f"{target.final}: SHA-256 differs from the manifest's; not written")
        assembled.final = target.commit()
        self._record_extents(assembled)

    def _record_extents(self, assembled: _Assembled) -> None:
        # A file put (or kept) in place takes over every chunk of it not recorded yet.
        if assembled.linked is not None:
            for chunk in assembled.entry.chunks:
                if chunk.digest not in self._placed and _fits(chunk):
                    self._placed.add(chunk.digest)
                    self._extents.append(Extent(chunk.digest, chunk.length, assembled.linked, chunk.offset))

    def missing(self) -> list[str]:
        """Paths of files not in place yet."""
        return [a.entry.path for a in self._files if a.final is None]

    def finish(self) -> list[Path]:
        """Put the empty files in place (they have no chunk to complete them) and return
        every final path in manifest order. Raises ``ValueError`` when a file still lacks a
        chunk (its temporary file is removed), and what :meth:`add` raises."""
        try:
            for assembled in self._files:
                if assembled.final is None and not assembled.entry.chunks:
                    self._complete(assembled, self._begin(assembled))
            if missing := self.missing():
                raise ValueError(f"{missing[0]}: not every chunk was written ({len(missing)} file(s))")
        except BaseException:
            self.discard()
            raise
        return [a.final for a in self._files if a.final is not None]

    def discard(self) -> None:
        """Remove every temporary file not yet renamed into place and release the final names
        :meth:`check_targets` claimed (idempotent; call it when the fetch ends, in any way)."""
        self._end_check()
        for assembled in self._files:
            self._close_writer(assembled)
            if assembled.target is not None:
                assembled.target.discard()
                assembled.target = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        with _CLAIMS_LOCK:
            _CLAIMS.difference_update(self._claimed)
        self._claimed = []

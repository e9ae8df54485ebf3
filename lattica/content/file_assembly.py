"""Whole files of a fetch written into the output folder while their chunks arrive.

Exporting after the transfer read every chunk back from the store, hashed it and wrote it out
again: at 256 MiB that serial tail took longer than the transfer. A :class:`FileAssembly`
instead writes each verified chunk at its offset(s) in a temporary file beside the final name
(:class:`~lattica.content.contained_write.ContainedFile`: contained, no symlink followed) as
soon as it is stored, and feeds the file's SHA-256 in file order: a chunk that arrives in
order is hashed from memory; one that arrives early is hashed when the gap before it fills,
read back from the temporary file (page cache), so nothing is held in memory. :meth:`finish`
hashes what is left, checks each file against the manifest's SHA-256 and renames it into
place (fsynced): never a half-written file under its final name.

Temporary files are named ``.NAME.CIDPREFIX.part`` so a fetch killed with ``kill -9`` and
started again replaces its own leftover instead of littering the folder. All methods block
(file I/O, hashing): call them from a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lattica.content.contained_write import ContainedFile, named_os_error
from lattica.content.errors import ChunkMismatchError
from lattica.content.manifest import FileEntry

ReadBlock = Callable[[bytes], bytes]
"""``read(digest) -> bytes``: a whole stored chunk (``BlockStore.read_block``)."""


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


@dataclass
class _Assembled:
    entry: FileEntry
    target: ContainedFile
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    written: list[bool] = field(default_factory=list)
    hashed: int = 0
    """Chunks hashed so far (a prefix of the file's chunk list)."""


class FileAssembly:
    """The whole files of a fetch, assembled in temporary files under the output folder open
    as ``root_fd`` (``out_dir`` names it in messages); ``tag`` (a hex prefix of the content
    id) names the temporary files.

    Raises what :class:`~lattica.content.contained_write.ContainedFile` raises when a file
    cannot be created (:class:`~lattica.content.errors.UnsafePathError`,
    :class:`~lattica.storage.DiskFullError`, ``OSError``); nothing is left behind then."""

    def __init__(self, root_fd: int, out_dir: Path, files: Sequence[FileEntry], *, tag: str) -> None:
        self._files: list[_Assembled] = []
        self._places: dict[bytes, list[tuple[_Assembled, int]]] = {}
        try:
            for entry in files:
                name = entry.path.rsplit("/", 1)[-1]
                target = ContainedFile(
                    root_fd, out_dir, entry.path, mode=entry.mode, temporary=f".{name[:200]}.{tag}.part"
                )
                assembled = _Assembled(entry, target, written=[False] * len(entry.chunks))
                self._files.append(assembled)
                try:
                    _reserve(target.fd, entry.size)
                except OSError as exc:
                    raise named_os_error(exc, target.final) from exc
                for index, chunk in enumerate(entry.chunks):
                    self._places.setdefault(chunk.digest, []).append((assembled, index))
        except OSError as exc:
            self.discard()
            raise named_os_error(exc, out_dir) from exc
        except BaseException:
            self.discard()
            raise

    @property
    def digests(self) -> set[bytes]:
        """The chunks the files are made of."""
        return set(self._places)

    def add(self, digest: bytes, data: bytes | memoryview) -> None:
        """Write a verified chunk everywhere it sits and advance the hashes it unblocks.
        A digest that no file holds is ignored. Raises
        :class:`~lattica.storage.DiskFullError` and ``OSError``."""
        for assembled, index in self._places.get(digest, ()):
            if assembled.written[index]:
                continue
            chunk = assembled.entry.chunks[index]
            try:
                view = memoryview(data)
                offset = chunk.offset
                while view:
                    done = os.pwrite(assembled.target.fd, view, offset)
                    view, offset = view[done:], offset + done
            except OSError as exc:
                raise named_os_error(exc, assembled.target.final) from exc
            assembled.written[index] = True
            self._advance(assembled, digest, data)

    def add_held(self, held: Sequence[bytes], read: ReadBlock) -> None:
        """:meth:`add` for chunks already in the store (a resumed fetch, chunks shared with
        content held before), one chunk in memory at a time."""
        for digest in held:
            if digest in self._places:
                self.add(digest, read(digest))

    def _advance(self, assembled: _Assembled, digest: bytes | None, data: bytes | memoryview | None) -> None:
        chunks = assembled.entry.chunks
        while assembled.hashed < len(chunks) and assembled.written[assembled.hashed]:
            chunk = chunks[assembled.hashed]
            if chunk.digest == digest and data is not None:
                assembled.sha256.update(data)
            else:  # written earlier, out of order: read it back (page cache, one chunk)
                assembled.sha256.update(os.pread(assembled.target.fd, chunk.length, chunk.offset))
            assembled.hashed += 1

    def missing(self) -> list[str]:
        """Paths of files that still lack a chunk."""
        return [a.entry.path for a in self._files if not all(a.written)]

    def finish(self) -> list[Path]:
        """Check every file against its SHA-256 and rename it into place (fsynced); returns
        the final paths in manifest order. On any error every file not yet renamed is removed.
        Raises :class:`ChunkMismatchError` (a file's bytes differ from the manifest's
        SHA-256: the manifest lies), ``ValueError`` when a chunk was never added,
        :class:`~lattica.storage.DiskFullError` and ``OSError``."""
        done: list[Path] = []
        try:
            if missing := self.missing():
                raise ValueError(f"{missing[0]}: not every chunk was written ({len(missing)} file(s))")
            for assembled in self._files:
                if assembled.sha256.digest() != assembled.entry.sha256:
                    raise ChunkMismatchError(
                        f"{assembled.target.final}: SHA-256 differs from the manifest's; not written"
                    )
            for assembled in self._files:
                done.append(assembled.target.commit())
        except BaseException:
            self.discard()
            raise
        return done

    def discard(self) -> None:
        """Remove every temporary file not yet renamed into place (idempotent)."""
        for assembled in self._files:
            assembled.target.discard()

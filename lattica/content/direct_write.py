"""Writing a file's whole pages with ``O_DIRECT``, its unaligned edges through the page cache.

Why: a fetch writes every byte it receives once, into the output file. Through the page cache
that write allocates and fills a fresh cache page per 4 KiB, and on this machine (a VM whose
balloon driver hands freed memory back to the host) that was the largest single cost of a
fetch: 45% of the fetching daemon's CPU, 0.3-0.6 s of system time per 256 MiB, where ``dd
oflag=direct`` spends 0.03 s and writes at 1.1-1.4 GB/s. A direct write copies the bytes once
into a reused page-aligned buffer and the disk reads them from there; nothing is left in the
page cache for the kernel to write back later (see ``docs/decisions.md``). Bytes that are
page-aligned in memory already (a whole-block piece where a bulk lane received it,
:mod:`lattica.net.frame_receiver`) are written from there, with no copy at all.

Rules kept:

* Only whole pages (``ALIGN_BYTES``, offsets and lengths) inside one write go direct; the
  partial pages at a range's ends go through the page cache. Two ranges that share a page
  (adjacent chunks) both write it through the cache, so no page is ever written both ways.
  The kernel keeps the page cache coherent with direct writes (it flushes and drops cached
  pages in a direct write's range), so reading the file back is always correct.
* Where the file system refuses ``O_DIRECT`` (some FUSE file systems, tmpfs before Linux 6.6:
  ``EINVAL`` when opening or writing), or ``/proc`` is not mounted, the writer falls back to the page cache for
  the rest of its life and loses nothing: a refused direct write has written nothing.
* Durability is unchanged: the owner still fsyncs the file before naming it final (a direct
  write may sit in the disk's volatile cache until then).

Not thread-safe: one :class:`AlignedBuffer` serves one thread at a time.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Final

from lattica.wire.buffers import PAGE_BYTES, is_page_aligned

ALIGN_BYTES: Final = PAGE_BYTES
"""Alignment of direct writes: memory address, file offset and length (the page size; at
least every disk's logical block)."""
MIN_DIRECT_BYTES: Final = 64 * 1024
"""A range with fewer whole pages than this goes through the page cache: the saving is per
byte, the second file descriptor's system call per write."""
DEFAULT_BUFFER_BYTES: Final = 1 << 20
"""Size of the page-aligned bounce buffer (a longer range is written in steps of it)."""

# Linux only; elsewhere every write goes through the page cache.
_O_DIRECT: Final = getattr(os, "O_DIRECT", 0)

# Errors that mean "this file (system) does not do direct I/O here", not "the write failed".
_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT, errno.ENOTDIR, errno.EACCES})


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until all of ``data`` is at ``offset`` of ``fd`` (short writes retried).
    Raises ``OSError`` (``ENOSPC`` when the disk is full)."""
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


class AlignedBuffer:
    """A reusable page-aligned buffer of ``size_bytes`` (anonymous memory, a multiple of
    ``ALIGN_BYTES``) that direct writes copy their bytes through: a Python ``bytes`` object's
    data is not page-aligned, and ``O_DIRECT`` needs it to be. Raises ``ValueError`` for a size
    that is not a positive multiple of ``ALIGN_BYTES``."""

    def __init__(self, size_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        if size_bytes <= 0 or size_bytes % ALIGN_BYTES:
            raise ValueError(f"size_bytes must be a positive multiple of {ALIGN_BYTES}")
        self._map = mmap.mmap(-1, size_bytes)
        self.view = memoryview(self._map)
        """The whole buffer (page-aligned: ``mmap`` returns whole pages)."""

    def close(self) -> None:
        """Release the memory (idempotent)."""
        if not self._map.closed:
            self.view.release()
            self._map.close()


class DirectWriter:
    """Writes byte ranges into the open regular file ``fd`` (which it does not own): the whole
    pages of each range through a second descriptor opened with ``O_DIRECT`` on the same file,
    the partial pages at its ends through ``fd`` (see the module's rules). ``buffer``: the
    bounce buffer (shared by the writers of one thread); ``None`` writes everything through
    ``fd``. :meth:`close` closes the second descriptor."""

    def __init__(self, fd: int, buffer: AlignedBuffer | None) -> None:
        self._fd = fd
        self._buffer = buffer
        self._direct_fd: int | None = None if buffer is not None and _O_DIRECT else -1
        self.direct_bytes = 0
        """Bytes written with ``O_DIRECT`` so far."""
        self.in_place_bytes = 0
        """Of those, bytes written from the caller's own memory (it was page-aligned), with no
        copy through the bounce buffer."""

    @property
    def direct(self) -> bool:
        """False once direct writes were found not to work here (or were never asked for)."""
        return self._direct_fd != -1

    def write(self, data: memoryview, offset: int, *, cached: bool = False) -> None:
        """Write ``data`` at byte ``offset``; ``cached``: all of it through the page cache (bytes
        the caller will read back soon). Raises ``OSError`` (``ENOSPC`` when the disk is full;
        what a refused direct write raises is not an error: it falls back)."""
        end = offset + len(data)
        first_page = -(-offset // ALIGN_BYTES) * ALIGN_BYTES
        last_page = end // ALIGN_BYTES * ALIGN_BYTES
        if cached or self._direct_fd == -1 or last_page - first_page < MIN_DIRECT_BYTES:
            pwrite_all(self._fd, data, offset)
            return
        if first_page > offset:
            pwrite_all(self._fd, data[: first_page - offset], offset)
        written = self._write_direct(data[first_page - offset : last_page - offset], first_page)
        rest = first_page + written
        if rest < end:
            pwrite_all(self._fd, data[rest - offset :], rest)

    def _write_direct(self, pages: memoryview, offset: int) -> int:
        """Write whole pages directly; returns how many bytes went (the caller writes the rest
        through the page cache)."""
        direct_fd = self._open_direct()
        buffer = self._buffer
        if direct_fd < 0 or buffer is None:
            return 0
        if is_page_aligned(pages):
            # Already where the disk can read it (a whole-block piece as a lane received it,
            # lattica.net.frame_receiver): no bounce copy.
            wrote = self._pwrite_direct(direct_fd, pages, offset)
            self.in_place_bytes += wrote
            return wrote
        step = len(buffer.view)
        done = 0
        while done < len(pages):
            n = min(step, len(pages) - done)
            buffer.view[:n] = pages[done : done + n]
            # Released on the way out, also by an error: a traceback that kept the slice would
            # keep the buffer from closing.
            with buffer.view[:n] as step_view:
                wrote = self._pwrite_direct(direct_fd, step_view, offset + done)
            done += wrote
            if wrote != n:  # refused, or short (disk nearly full): the page cache says why
                return done
        return done

    def _pwrite_direct(self, direct_fd: int, pages: memoryview, offset: int) -> int:
        """One direct write of page-aligned ``pages``; returns the bytes written (0 where the
        file system refuses direct writes: the writer gives them up)."""
        try:
            wrote = os.pwrite(direct_fd, pages, offset)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self._give_up()
            return 0
        self.direct_bytes += wrote
        return wrote

    def _open_direct(self) -> int:
        if self._direct_fd is None:
            try:
                # The same inode (a /proc fd link is not a path lookup in the output folder),
                # as a new open file description: O_DIRECT set on it leaves ``fd`` buffered.
                direct_fd = os.open(f"/proc/self/fd/{self._fd}", os.O_WRONLY | _O_DIRECT | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._direct_fd = -1
                return -1
            mine, theirs = os.fstat(direct_fd), os.fstat(self._fd)
            if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
                os.close(direct_fd)
                self._direct_fd = -1
                return -1
            self._direct_fd = direct_fd
        return self._direct_fd

    def _give_up(self) -> None:
        if self._direct_fd is not None and self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = -1

    def close(self) -> None:
        """Close the direct descriptor (idempotent; ``fd`` stays open)."""
        self._give_up()

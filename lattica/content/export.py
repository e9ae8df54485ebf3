"""Writing a manifest's files from the block store into a folder: checked, atomic, contained.

For each selected file (``include``/``exclude`` are shell globs on manifest paths, as
``lattica fetch --include/--exclude`` will take them):

* the path is checked again (:func:`~lattica.content.paths.check_relative_path`) and walked
  one component at a time from the output folder with ``O_NOFOLLOW``, relative to the parent's
  directory descriptor: a symlink planted anywhere inside the output folder (``x -> /etc``) is
  refused (:class:`~lattica.content.errors.UnsafePathError`), never followed, so nothing is
  ever written outside the folder;
* the bytes are streamed from the chunks (one chunk in memory), through SHA-256, into a
  temporary file in the final directory; if the whole-file SHA-256 differs from the manifest's
  the file is not written (:class:`~lattica.content.errors.ChunkMismatchError`);
* the temporary file is fsynced, given the manifest's mode, and renamed over the final name:
  never a half-written file under its final name.

Blocking (file system work): call :func:`export_files` on a worker thread, or :func:`export`.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from lattica.content.block_store import BlockStore
from lattica.content.blocking_io import run_blocking
from lattica.content.errors import ChunkMismatchError, UnsafePathError
from lattica.content.manifest import FileEntry, Manifest
from lattica.content.paths import check_relative_path
from lattica.storage import DiskFullError


def select_files(manifest: Manifest, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[FileEntry]:
    """Files whose path matches an ``include`` glob (all when none is given) and no ``exclude``
    glob (:func:`fnmatch.fnmatchcase`: ``*`` also matches ``/``)."""
    return [
        entry
        for entry in manifest.files
        if (not include or any(fnmatch.fnmatchcase(entry.path, p) for p in include))
        and not any(fnmatch.fnmatchcase(entry.path, p) for p in exclude)
    ]


def _open_directory(parent_fd: int, name: str, *, create: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    return os.open(name, flags, dir_fd=parent_fd)


def _write_one(store: BlockStore, entry: FileEntry, root_fd: int, out_dir: Path) -> Path:
    check_relative_path(entry.path)
    *directories, name = entry.path.split("/")
    fds = [root_fd]
    try:
        for directory in directories:
            try:
                fds.append(_open_directory(fds[-1], directory, create=True))
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(
                        f"{out_dir / entry.path}: a parent is a symlink or a file; not followed"
                    ) from None
                raise
        parent = fds[-1]
        temporary = f".{name[:200]}.{secrets.token_hex(6)}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent)
        try:
            whole = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for piece in store.iter_file(entry.chunks):
                    whole.update(piece)
                    out.write(piece)
                out.flush()
                if whole.digest() != entry.sha256:
                    raise ChunkMismatchError(
                        f"{out_dir / entry.path}: SHA-256 differs from the manifest's; not written"
                    )
                os.fchmod(out.fileno(), entry.mode)
                os.fsync(out.fileno())
            os.replace(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
            os.fsync(parent)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=parent)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"{out_dir / entry.path}: disk full ({exc.strerror}); free some space",
                    path=str(out_dir / entry.path),
                    cause=exc.strerror or "ENOSPC",
                ) from exc
            raise
    finally:
        for fd in fds[1:]:
            os.close(fd)
    return out_dir / entry.path


def export_files(store: BlockStore, files: Sequence[FileEntry], out_dir: Path) -> list[Path]:
    """Write ``files`` (entries of a checked manifest) under ``out_dir`` (created if missing);
    returns the paths written. Blocking. Raises :class:`UnsafePathError`,
    :class:`ChunkMismatchError`, :class:`~lattica.content.errors.ChunkNotFoundError` (a chunk
    not stored), :class:`~lattica.storage.DiskFullError` and ``OSError``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [_write_one(store, entry, root_fd, out_dir) for entry in files]
    finally:
        os.close(root_fd)


async def export(
    store: BlockStore, manifest: Manifest, out_dir: Path, *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[Path]:
    """:func:`export_files` for the files :func:`select_files` picks, off the event loop."""
    files = select_files(manifest, include, exclude)
    return await run_blocking(lambda: export_files(store, files, Path(out_dir)))

"""Writing one file under an output folder without ever following a symlink out of it.

:func:`write_contained` is the one writer for everything a fetch or an export puts in a
user's folder (whole files and tensor selections alike): the manifest path is checked again
(:func:`~lattica.content.paths.check_relative_path`) and walked one component at a time from
the folder's directory descriptor with ``O_NOFOLLOW``, so a symlink (or a file) planted where
a parent folder should be is refused (:class:`~lattica.content.errors.UnsafePathError`),
never followed. The bytes go to a temporary file in the final directory, which is fsynced,
given the manifest's mode and renamed over the final name: never a half-written file under
its final name, never anything outside the folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from lattica.content.errors import ChunkMismatchError, UnsafePathError
from lattica.content.paths import check_relative_path
from lattica.storage import DiskFullError


def _open_directory(parent_fd: int, name: str) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    return os.open(name, flags, dir_fd=parent_fd)


def write_contained(
    root_fd: int,
    out_dir: Path,
    path: str,
    pieces: Iterable[bytes | memoryview],
    *,
    mode: int,
    sha256: bytes | None = None,
) -> Path:
    """Write ``pieces`` to ``path`` (a manifest's relative path) under the folder open as
    ``root_fd`` (``out_dir`` names it in messages); returns ``out_dir / path``. Blocking.

    ``mode`` is the file's permission bits (the manifest's). With ``sha256``, the file is
    renamed into place only if its bytes hash to it. Raises :class:`UnsafePathError` (a bad
    path, or a parent that is a symlink or a file), :class:`ChunkMismatchError` (SHA-256
    differs), :class:`~lattica.storage.DiskFullError` and ``OSError``; on any error nothing
    is left under the final name or as a temporary file."""
    check_relative_path(path)
    *directories, name = path.split("/")
    fds = [root_fd]
    try:
        for directory in directories:
            try:
                fds.append(_open_directory(fds[-1], directory))
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"{out_dir / path}: a parent is a symlink or a file; not followed") from None
                raise
        parent = fds[-1]
        temporary = f".{name[:200]}.{secrets.token_hex(6)}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent)
        try:
            whole = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for piece in pieces:
                    if sha256 is not None:
                        whole.update(piece)
                    out.write(piece)
                out.flush()
                if sha256 is not None and whole.digest() != sha256:
                    raise ChunkMismatchError(f"{out_dir / path}: SHA-256 differs from the manifest's; not written")
                os.fchmod(out.fileno(), mode)
                os.fsync(out.fileno())
            os.replace(temporary, name, src_dir_fd=parent, dst_dir_fd=parent)
            os.fsync(parent)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=parent)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"{out_dir / path}: disk full ({exc.strerror}); free some space",
                    path=str(out_dir / path),
                    cause=exc.strerror or "ENOSPC",
                ) from exc
            raise
    finally:
        for fd in fds[1:]:
            os.close(fd)
    return out_dir / path


@contextlib.contextmanager
def open_output_folder(out_dir: Path) -> Iterator[int]:
    """Create ``out_dir`` if missing and yield its directory descriptor (closed after)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield root_fd
    finally:
        os.close(root_fd)

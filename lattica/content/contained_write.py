"""Writing files under an output folder without ever following a symlink out of it.

:class:`ContainedFile` is the one way anything a fetch or an export puts in a user's folder
gets there (whole files written as their chunks arrive, files exported from the store, tensor
selections alike): the manifest path is checked again
(:func:`~lattica.content.paths.check_relative_path`) and walked one component at a time from
the folder's directory descriptor with ``O_NOFOLLOW``, so a symlink (or a file) planted where
a parent folder should be is refused (:class:`~lattica.content.errors.UnsafePathError`),
never followed. The bytes go to a temporary file in the final directory, which is fsynced,
given the manifest's mode and renamed over the final name: never a half-written file under
its final name, never anything outside the folder. :func:`write_contained` writes a stream of
pieces that way in one call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from lattica.content.errors import ChunkMismatchError, OutputBusyError, OutputConflictError, UnsafePathError
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


def _folder_in_the_way(parent_fd: int, name: str, final: Path | None) -> OutputConflictError:
    """The error for a folder at ``name`` in the folder open as ``parent_fd``, the temporary
    name of the file ``final`` (when known)."""
    if final is None:
        folder, of = _folder_path(parent_fd) / name, "a temporary file"
    else:
        folder, of = final.parent / name, f"{final}'s temporary file"
    return OutputConflictError(
        f"{folder} is a folder in the way of {of} (a fetch never removes a folder): move it away and fetch again"
    )


def _is_folder(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _folder_path(fd: int) -> Path:
    # Only for messages: the folder open as `fd`, as the kernel names it (else unnamed).
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return Path()


def remove_unlocked(parent_fd: int, name: str, *, final: Path | None = None) -> bool:
    """Remove the file ``name`` in the folder open as ``parent_fd`` unless another process or
    descriptor holds its ``flock`` (a fetch still writing it); a symlink there is removed, never
    followed. Returns False when it is locked, True otherwise (removed, or not there).

    A folder there (the user's, or planted) is never removed: raises
    :class:`~lattica.content.errors.OutputConflictError` naming it and ``final``, the file whose
    temporary name ``name`` is (for the message). Raises ``OSError`` otherwise."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent_fd)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            if _is_folder(parent_fd, name):  # one we may not read (EACCES) is in the way too
                raise _folder_in_the_way(parent_fd, name, final) from None
            raise
        os.unlink(name, dir_fd=parent_fd)  # a planted symlink: unlink never follows it
        return True
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            # unlink would fail with a bare "[Errno 21] Is a directory" (review finding).
            raise _folder_in_the_way(parent_fd, name, final)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent_fd)
        return True
    finally:
        os.close(fd)


def remove_stale_in(root_fd: int, path: str, name: str) -> None:
    """:func:`remove_unlocked` for ``name`` in the folder of the manifest path ``path`` under
    the folder open as ``root_fd``, walking existing folders only (``O_NOFOLLOW``: a symlinked
    or missing folder means there is nothing of ours to remove). Never raises for a locked
    file; raises :class:`~lattica.content.errors.OutputConflictError` for a folder at ``name``
    (naming it and the file ``path``), ``OSError`` for other failures."""
    *directories, _ = path.split("/")
    fd = root_fd
    try:
        for directory in directories:
            try:
                opened = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                return
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return
                raise
            if fd != root_fd:
                os.close(fd)
            fd = opened
        remove_unlocked(fd, name, final=_folder_path(root_fd) / path)
    finally:
        if fd != root_fd:
            os.close(fd)


def open_existing(root_fd: int, path: str) -> int | None:
    """A read-only descriptor of the regular file at the manifest path ``path`` under the folder
    open as ``root_fd``, or None when there is none that this process may read: walked with
    ``O_NOFOLLOW`` like :class:`ContainedFile` (a symlink anywhere on the way, a FIFO, a device,
    a folder, an unreadable file or nothing gives None, never a followed link). The name is
    first opened ``O_PATH`` (which opens nothing: no FIFO waits, no device acts), and only a
    regular file is then opened for reading, through that very descriptor, so a FIFO or device
    swapped in meanwhile is never opened (review finding: between an ``lstat`` and an ``open``
    it was). Without ``O_PATH`` or ``/proc`` it gives None. Raises ``OSError`` for other
    failures (``EIO``)."""
    check_relative_path(path)
    o_path = getattr(os, "O_PATH", 0)
    if not o_path:
        return None
    *directories, name = path.split("/")
    fd = root_fd
    try:
        for directory in directories:
            try:
                opened = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in _NOT_THERE:
                    return None
                raise
            if fd != root_fd:
                os.close(fd)
            fd = opened
        try:
            handle = os.open(name, o_path | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=fd)
        except OSError as exc:
            if exc.errno in _NOT_THERE:
                return None
            raise
        try:
            if not stat.S_ISREG(os.fstat(handle).st_mode):  # a symlink (O_PATH|O_NOFOLLOW), FIFO, ...
                return None
            try:
                return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                if exc.errno in _NOT_THERE:
                    return None
                raise
        finally:
            os.close(handle)
    finally:
        if fd != root_fd:
            os.close(fd)


# What makes open_existing answer "no file to keep there" rather than fail.
_NOT_THERE = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM}
)


def name_prefix(name: str, max_bytes: int = 96) -> str:
    """The start of ``name`` for a temporary file's name: at most ``max_bytes`` of UTF-8 (a
    file name may hold 255 bytes, and a temporary name adds a dot and a suffix to it), cut
    on a character boundary."""
    return name.encode()[:max_bytes].decode(errors="ignore")


def named_os_error(exc: OSError, where: Path) -> OSError | DiskFullError:
    """``exc`` as the error to raise for a write to ``where``: a
    :class:`~lattica.storage.DiskFullError` naming the path when the disk (or quota) is full,
    else the same kind of ``OSError`` naming ``where`` (not the temporary file's name)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"{where}: disk full ({exc.strerror}); free some space",
            path=str(where),
            cause=exc.strerror or "ENOSPC",
        )
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(where))


class ContainedFile:
    """A temporary file beside ``path``'s final name under the folder open as ``root_fd``,
    renamed into place by :meth:`commit` or removed by :meth:`discard` (blocking calls).

    ``path`` is a manifest's relative path (``out_dir`` names the folder in messages), ``mode``
    the permission bits the final file gets. ``temporary`` names the temporary file (default:
    a random hidden name); such a file is locked (``flock``) while it is written, and one
    found unlocked under that name (left by a killed fetch) is replaced, while a locked one
    raises :class:`~lattica.content.errors.OutputBusyError`.
    Write through :attr:`fd` (``os.pwrite`` / ``os.write``). Raises :class:`UnsafePathError`
    (a bad path, or a parent that is a symlink or a file),
    :class:`~lattica.storage.DiskFullError` and ``OSError``; after an error in the
    constructor nothing is left behind."""

    def __init__(self, root_fd: int, out_dir: Path, path: str, *, mode: int, temporary: str | None = None) -> None:
        check_relative_path(path)
        self.final = out_dir / path
        self.mode = mode
        *directories, self._name = path.split("/")
        self._temporary = temporary or f".{name_prefix(self._name)}.{secrets.token_hex(6)}.tmp"
        self._fds = [root_fd]
        self.fd = -1
        try:
            for directory in directories:
                try:
                    opened = _open_directory(self._fds[-1], directory)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePathError(f"{self.final}: a parent is a symlink or a file; not followed") from None
                    raise
                # Only the parent stays open: a fetch may hold many of these files at once.
                self._close_directories()
                self._fds.append(opened)
            if temporary is not None:
                self._remove_stale()
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            try:
                self.fd = os.open(self._temporary, flags, 0o600, dir_fd=self._parent)
            except FileExistsError:  # another fetch made it between our check and now
                raise OutputBusyError(f"{self.final}: another fetch is writing this file") from None
            if temporary is not None:
                # Held while this file is written: how a later fetch tells a live temporary
                # file from one left by a killed process (the kernel drops the lock on exit).
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._close_directories()
            raise named_os_error(exc, self.final) from exc
        except BaseException:
            self._close_directories()
            raise

    def _remove_stale(self) -> None:
        if not remove_unlocked(self._parent, self._temporary, final=self.final):
            raise OutputBusyError(f"{self.final}: another fetch is writing this file")

    @property
    def _parent(self) -> int:
        return self._fds[-1]

    def commit(self) -> Path:
        """Give the file its mode, fsync it, put it under the final name and fsync the
        directory; returns the final path. Closes the file either way (on an error the
        temporary file is removed). Raises :class:`~lattica.content.errors.OutputBusyError`
        when the temporary name no longer holds this file and it cannot be linked by its
        descriptor, :class:`~lattica.storage.DiskFullError` and ``OSError``.

        What goes under the final name is the file this object wrote, never whatever is under
        the temporary name now: another writer (a second fetch whose manifest names a file
        ``.x.<hex>.part``, say) may have replaced that name meanwhile. The file is linked by its
        descriptor (``/proc/self/fd``) to a fresh random name, which is renamed over the final
        one; without ``/proc`` the temporary name is renamed after checking it is still ours.
        A file whose only name was taken over cannot be linked again (the kernel refuses to link
        a file with no name left): that raises ``OutputBusyError`` and nothing is put in place."""
        try:
            os.fchmod(self.fd, self.mode)
            os.fsync(self.fd)
            source = f".{secrets.token_hex(8)}.lattica-commit.tmp"
            try:
                os.link(f"/proc/self/fd/{self.fd}", source, dst_dir_fd=self._parent, follow_symlinks=True)
            except OSError:
                if not self._holds_this_file(self._temporary):
                    raise OutputBusyError(f"{self.final}: its temporary file was replaced by another writer") from None
                source = self._temporary
            os.replace(source, self._name, src_dir_fd=self._parent, dst_dir_fd=self._parent)
            if source != self._temporary and self._holds_this_file(self._temporary):
                os.unlink(self._temporary, dir_fd=self._parent)
            os.fsync(self._parent)
        except OSError as exc:
            self.discard()
            raise named_os_error(exc, self.final) from exc
        except BaseException:
            self.discard()
            raise
        self._close()
        return self.final

    def discard(self) -> None:
        """Remove the temporary file (if its name still holds this file) and close everything
        (idempotent; never raises ``OSError`` for a file already gone)."""
        if self.fd >= 0 and self._holds_this_file(self._temporary):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temporary, dir_fd=self._parent)
        self._close()

    def _holds_this_file(self, name: str) -> bool:
        try:
            there = os.stat(name, dir_fd=self._parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._close_directories()

    def _close_directories(self) -> None:
        for fd in self._fds[1:]:
            os.close(fd)
        del self._fds[1:]


def write_contained(
    root_fd: int,
    out_dir: Path,
    path: str,
    pieces: Iterable[bytes | memoryview],
    *,
    mode: int,
    sha256: bytes | None = None,
    temporary: str | None = None,
) -> Path:
    """Write ``pieces`` to ``path`` (a manifest's relative path) under the folder open as
    ``root_fd`` (``out_dir`` names it in messages) through a :class:`ContainedFile`; returns
    ``out_dir / path``. Blocking.

    ``mode`` is the file's permission bits (the manifest's). With ``sha256``, the file is
    renamed into place only if its bytes hash to it. ``temporary`` names the temporary file
    as :class:`ContainedFile` says (default: random). Raises :class:`UnsafePathError` (a bad
    path, or a parent that is a symlink or a file), :class:`ChunkMismatchError` (SHA-256
    differs), :class:`~lattica.storage.DiskFullError` and ``OSError``; on any error nothing
    is left under the final name or as a temporary file."""
    target = ContainedFile(root_fd, out_dir, path, mode=mode, temporary=temporary)
    try:
        whole = hashlib.sha256()
        for piece in pieces:
            if sha256 is not None:
                whole.update(piece)
            view = memoryview(piece)
            while view:
                view = view[os.write(target.fd, view) :]
        if sha256 is not None and whole.digest() != sha256:
            raise ChunkMismatchError(f"{out_dir / path}: SHA-256 differs from the manifest's; not written")
    except OSError as exc:
        target.discard()
        raise named_os_error(exc, target.final) from exc
    except BaseException:
        target.discard()
        raise
    return target.commit()


@contextlib.contextmanager
def open_output_folder(out_dir: Path) -> Iterator[int]:
    """Create ``out_dir`` if missing and yield its directory descriptor (closed after)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield root_fd
    finally:
        os.close(root_fd)

"""Storage errors: what went wrong with which database file, in one line a user can act on.

Each error names the file and the cause sqlite gave. They are :class:`LatticaError` subclasses,
so the CLI prints them as one line (exit code 1) and the control API reports them as a failed
call; none of them is a protocol error, and none of them should stop a node: the operation that
hit it fails, the rest goes on.
"""

from __future__ import annotations

import sqlite3

from lattica.errors import LatticaError

# sqlite primary result codes (https://www.sqlite.org/rescode.html); extended codes keep them in
# their low byte.
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


class StorageError(LatticaError):
    """A database operation failed; ``path`` is the database file, ``cause`` sqlite's reason."""

    def __init__(self, message: str, *, path: str, cause: str) -> None:
        super().__init__(message)
        self.path = path
        self.cause = cause


class CorruptDatabaseError(StorageError):
    """The file is not an sqlite database, or its pages are damaged (truncated, overwritten)."""


class DiskFullError(StorageError):
    """A write did not fit: the disk (or the database's page limit) is full.

    The write that hit it is not stored; everything acknowledged before it is kept, and reads
    go on working.
    """


def describe_path(path: str) -> str:
    """How a database path is shown in messages (``:memory:`` is not a file)."""
    return "the in-memory database" if path == ":memory:" else path


def storage_error(path: str, exc: sqlite3.Error) -> StorageError:
    """The :class:`StorageError` that says what ``exc`` (raised for database ``path``) means.

    sqlite reports a full disk (``ENOSPC`` from ``write(2)``) and a full page budget
    (``PRAGMA max_page_count``) alike as ``SQLITE_FULL``, "database or disk is full".
    """
    cause = str(exc) or type(exc).__name__
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    where = describe_path(path)
    if primary == _SQLITE_FULL or "database or disk is full" in cause:
        return DiskFullError(
            f"{where}: disk full ({cause}); this write was not stored, earlier ones are kept: free some space",
            path=path,
            cause=cause,
        )
    if primary == _SQLITE_NOTADB:
        return CorruptDatabaseError(
            f"{where} is not a Lattica database ({cause}); move it aside to start with an empty store",
            path=path,
            cause=cause,
        )
    if primary == _SQLITE_CORRUPT:
        return CorruptDatabaseError(
            f"{where} is damaged ({cause}); move it aside to start with an empty store",
            path=path,
            cause=cause,
        )
    if primary == _SQLITE_IOERR:
        return StorageError(f"{where}: disk I/O error ({cause}); check the disk", path=path, cause=cause)
    if primary in (_SQLITE_READONLY, _SQLITE_CANTOPEN):
        return StorageError(
            f"{where}: cannot write the database ({cause}); check its permissions and directory",
            path=path,
            cause=cause,
        )
    return StorageError(f"{where}: {cause}", path=path, cause=cause)

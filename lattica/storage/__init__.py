"""Embedded storage shared by the services: one sqlite writer per database, typed errors.

    writer = SqliteWriter(path)                    # StorageError / CorruptDatabaseError on open
    value = await writer.write(fn)                 # fn(conn) on the writer thread, group commit;
                                                   #   returns after COMMIT; DiskFullError, ...
    value = writer.read(fn)                        # fn(conn) now, on this thread (WAL reader)
    writer.close()

See :mod:`lattica.storage.sqlite_writer` for the rules (durability, batching, virtual time).
"""

from lattica.storage.errors import CorruptDatabaseError, DiskFullError, StorageError
from lattica.storage.sqlite_writer import SqliteWriter, transaction

__all__ = [
    "CorruptDatabaseError",
    "DiskFullError",
    "SqliteWriter",
    "StorageError",
    "transaction",
]

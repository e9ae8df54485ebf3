"""Byte ranges of a file mapped onto its chunks (chunk lists tile the file, in order)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence

from lattica.content.manifest import ChunkRef
from lattica.errors import LocalProtocolError

ReadChunk = Callable[[bytes, int, int], bytes]
"""``read(digest, offset_in_chunk, length) -> bytes``: exactly ``length`` bytes of a chunk."""


def chunks_covering(chunks: Sequence[ChunkRef], start: int, end: int) -> list[ChunkRef]:
    """The chunks holding bytes ``[start, end)`` of the file (none for an empty range).

    ``chunks`` must tile the file in offset order (a checked manifest's do). Raises
    :class:`~lattica.errors.LocalProtocolError` for a range outside the file."""
    size = chunks[-1].offset + chunks[-1].length if chunks else 0
    if not 0 <= start <= end <= size:
        raise LocalProtocolError(f"byte range [{start}, {end}) is outside the file ({size} bytes)")
    if start == end:
        return []
    first = bisect.bisect_right(chunks, start, key=lambda c: c.offset) - 1
    last = bisect.bisect_left(chunks, end, key=lambda c: c.offset)
    return list(chunks[first:last])


def iter_range(chunks: Sequence[ChunkRef], start: int, end: int, read: ReadChunk) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of the file, one piece per chunk (at most a chunk in memory)."""
    for chunk in chunks_covering(chunks, start, end):
        lo = max(start, chunk.offset) - chunk.offset
        hi = min(end, chunk.offset + chunk.length) - chunk.offset
        yield read(chunk.digest, lo, hi - lo)

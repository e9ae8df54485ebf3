"""Tensor selection: the chunks a set of tensors needs, and a safetensors file of just them.

``select_tensors(entry, ["encoder.layer.0.*"])`` matches tensor names with shell-style globs
(:func:`fnmatch.fnmatchcase`: ``*`` also matches dots) and returns the tensors in file order
plus the chunks that hold them. Because chunk boundaries follow tensor boundaries
(:mod:`lattica.content.chunker`), those are exactly the chunks of the selected tensors (and any
small tensors packed with them). The header chunk is not needed: the manifest's checked tensor
index carries everything the header said (``__metadata__`` included).

:func:`write_selected_safetensors` writes a valid safetensors file holding exactly the
selected tensors: a new header (``__metadata__`` first, then the tensors in their original
order with recomputed, contiguous offsets; padded with spaces to a multiple of 8 bytes as the
reference writer does), then each tensor's bytes copied from the chunks a chunk at a time.
The file appears atomically and contained (:mod:`lattica.content.contained_write`).
"""

from __future__ import annotations

import fnmatch
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lattica.content.chunk_ranges import ReadChunk, chunks_covering, iter_range
from lattica.content.contained_write import open_output_folder, write_contained
from lattica.content.errors import ContentError, NoTensorsSelectedError
from lattica.content.manifest import ChunkRef, FileEntry
from lattica.content.safetensors_header import METADATA_KEY, TensorInfo


@dataclass(frozen=True)
class TensorSelection:
    """Selected ``tensors`` of safetensors file ``file`` (file order) and the ``chunks`` that
    hold them (file order, each once)."""

    file: FileEntry
    tensors: tuple[TensorInfo, ...]
    chunks: tuple[ChunkRef, ...]

    @property
    def chunk_bytes(self) -> int:
        """Bytes to fetch for this selection."""
        return sum(c.length for c in self.chunks)


def select_tensors(entry: FileEntry, patterns: Sequence[str]) -> TensorSelection:
    """The tensors of ``entry`` whose names match any of ``patterns``, and their chunks.

    Raises :class:`ContentError` when the file has no tensor index and
    :class:`NoTensorsSelectedError` when nothing matches."""
    if entry.safetensors is None:
        raise ContentError(f"{entry.path} is not a safetensors file with a tensor index")
    tensors = tuple(t for t in entry.safetensors.tensors if any(fnmatch.fnmatchcase(t.name, p) for p in patterns))
    if not tensors:
        raise NoTensorsSelectedError(f"no tensor of {entry.path} matches {', '.join(patterns)}")
    chunks: dict[int, ChunkRef] = {}
    for tensor in tensors:
        for chunk in chunks_covering(entry.chunks, tensor.begin, tensor.end):
            chunks[chunk.offset] = chunk
    return TensorSelection(entry, tensors, tuple(chunks[o] for o in sorted(chunks)))


def selected_header(selection: TensorSelection) -> bytes:
    """The 8-byte length and JSON header of the file :func:`write_selected_safetensors` writes."""
    assert selection.file.safetensors is not None
    header: dict[str, object] = {}
    if selection.file.safetensors.metadata is not None:
        header[METADATA_KEY] = selection.file.safetensors.metadata
    offset = 0
    for tensor in selection.tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def selected_pieces(selection: TensorSelection, read: ReadChunk) -> Iterator[bytes]:
    """The bytes of the safetensors file of just the selected tensors, a piece at a time.

    ``read(digest, offset, length)`` returns bytes of a chunk (e.g.
    :meth:`~lattica.content.block_store.BlockStore.read_block`); blocking."""
    yield selected_header(selection)
    for tensor in selection.tensors:
        yield from iter_range(selection.file.chunks, tensor.begin, tensor.end, read)


def write_selected_safetensors(selection: TensorSelection, read: ReadChunk, out: Path) -> int:
    """Write the selected tensors as a safetensors file at ``out`` (the manifest's mode),
    through :func:`~lattica.content.contained_write.write_contained` in ``out``'s folder;
    returns its size in bytes. Blocking, so call it on a worker thread. Raises what ``read``
    raises, :class:`~lattica.storage.DiskFullError` and ``OSError``."""
    with open_output_folder(out.parent) as folder_fd:
        write_contained(folder_fd, out.parent, out.name, selected_pieces(selection, read), mode=selection.file.mode)
    return len(selected_header(selection)) + sum(t.nbytes for t in selection.tensors)

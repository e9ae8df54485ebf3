"""Where chunks begin and end: fixed-size for ordinary files, tensor-aligned for safetensors.

Pure functions of (file size, tensor index, chunk size): the same file always gives the same
chunks, on every machine.

Ordinary files: ``[0, c), [c, 2c), ...`` with the last chunk shorter; an empty file has none.

Safetensors files (``index`` given):

1. the header (8-byte length + JSON) is its own chunk(s), cut every ``chunk_bytes``;
2. a *large* tensor (more than ``chunk_bytes``) starts a new chunk and is cut into full-size
   chunks; its remainder is a chunk of its own (nothing else is packed after it);
3. *small* tensors (at most ``chunk_bytes``) are packed in file order into a chunk until the
   next one would not fit; a small tensor is never split;
4. empty tensors take no bytes and no chunk.

Why: a large tensor's chunks then depend on its bytes alone, so two models that share it at
different offsets (a base model and a fine-tune that froze it) produce identical chunk hashes
and store and move it once. Packing of small tensors restarts after every large tensor, so a
difference in one small tensor changes only the chunks up to the next large tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

from lattica.content.safetensors_header import SafetensorsIndex

DEFAULT_CHUNK_BYTES = 1 << 20


def fixed_chunks(size: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each fixed-size chunk of a ``size``-byte file."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be at least 1")
    for offset in range(0, size, chunk_bytes):
        yield offset, min(chunk_bytes, size - offset)


def tensor_aligned_chunks(index: SafetensorsIndex, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each chunk of a safetensors file (rules in the module docstring);
    the chunks tile ``[0, file size)`` exactly."""
    yield from fixed_chunks(index.header_bytes, chunk_bytes)
    start = end = index.header_bytes  # the open chunk of packed small tensors: [start, end)
    for tensor in index.tensors:
        if tensor.nbytes == 0:
            continue
        if tensor.nbytes > chunk_bytes:
            if end > start:
                yield start, end - start
            for offset, length in fixed_chunks(tensor.nbytes, chunk_bytes):
                yield tensor.begin + offset, length
            start = end = tensor.end
        elif tensor.end - start > chunk_bytes:
            yield start, end - start
            start, end = tensor.begin, tensor.end
        else:
            end = tensor.end
    if end > start:
        yield start, end - start


def plan_chunks(size: int, chunk_bytes: int, index: SafetensorsIndex | None = None) -> list[tuple[int, int]]:
    """The chunks of a ``size``-byte file: tensor-aligned when ``index`` is given, else fixed."""
    if index is None:
        return list(fixed_chunks(size, chunk_bytes))
    return list(tensor_aligned_chunks(index, chunk_bytes))

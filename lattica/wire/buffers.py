"""Receive buffers for bulk frames: uninitialised memory placed so that a frame's *end* is
page-aligned, and the address of any buffer.

Why: a bulk lane decrypts each large frame straight into a buffer of its own
(:mod:`lattica.net.frame_receiver`), and the fetch writes a whole-block piece -- the tail of its
frame -- with ``O_DIRECT`` (:mod:`lattica.content.direct_write`), which needs page-aligned
memory. A piece whose length is a multiple of the page (every full 1 MiB chunk) then starts on
a page when its frame ends on one, so the disk reads it where TLS wrote it: no bounce copy.
``bytearray(n)`` would zero ``n`` bytes first (a pass over memory per frame); the memory here
comes from ``malloc`` uninitialised, and is freed when the last view of it goes.

cffi is what pyOpenSSL's bindings are built on; it is used here for its allocator and pointer
casts only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import cffi

if TYPE_CHECKING:  # collections.abc.Buffer from Python 3.12 on
    from typing_extensions import Buffer

PAGE_BYTES: Final = 4096
"""The alignment :func:`end_aligned` gives and :func:`is_page_aligned` checks (the page size,
and at least every disk's logical block)."""

_ffi = cffi.FFI()
_allocate = _ffi.new_allocator(should_clear_after_alloc=False)


def end_aligned(size_bytes: int) -> memoryview:
    """A writable view of ``size_bytes`` uninitialised bytes whose end is page-aligned (its
    start is not, in general). The memory lives as long as any view of it.

    Raises ``ValueError`` for a negative size, ``MemoryError`` when none is to be had."""
    if size_bytes < 0:
        raise ValueError("size_bytes must not be negative")
    memory = _allocate("char[]", size_bytes + PAGE_BYTES)
    start = -(address_of(memory) + size_bytes) % PAGE_BYTES
    return memoryview(_ffi.buffer(memory))[start : start + size_bytes]


def address_of(buffer: Buffer | cffi.FFI.CData) -> int:
    """The memory address of ``buffer``'s first byte (anything with the buffer protocol, read-only
    too, or a cffi pointer). Raises ``TypeError`` for an object without a contiguous buffer."""
    if isinstance(buffer, _ffi.CData):
        return int(_ffi.cast("uintptr_t", buffer))
    # Released at once: a live export would keep an mmap from closing or a bytearray from
    # resizing.
    with _ffi.from_buffer(buffer) as pointer:
        return int(_ffi.cast("uintptr_t", pointer))


def is_page_aligned(buffer: Buffer) -> bool:
    """Whether ``buffer`` starts on a page boundary (see :func:`address_of`)."""
    return address_of(buffer) % PAGE_BYTES == 0

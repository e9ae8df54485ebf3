"""Process-wide tuning a long-running daemon applies once at start.

glibc's allocator returns memory above its *mmap threshold* to the kernel when it is freed, and
trims a heap whose free top exceeds its *trim threshold*; both move with the allocations seen
(the dynamic threshold starts at 128 KiB). A daemon moving model files allocates and frees
buffers of 256 KiB to a few MiB on several threads (a lane's thread, trio's worker threads, the
main thread), so much of that memory went back to the kernel and came back as fresh pages,
each a page fault and a zeroed page: on this machine's VMs each fresh page is also a host
fault. Fixing the thresholds keeps such buffers in the heaps. Measured on a 1 GiB fetch between
two daemons (``docs/decisions.md``): the seeder's minor faults 75,000-86,000 -> ~2,500, the
fetcher's 58,000-77,000 -> ~8,000, both daemons' CPU down 15-20%.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Final

log = logging.getLogger("lattica.process")

MMAP_THRESHOLD_BYTES: Final = 4 << 20
"""Allocations below this come from the heaps, above it from their own mappings: above the
largest buffer of the bulk path (a 1 MiB block, a 2 MiB stream window)."""
TRIM_THRESHOLD_BYTES: Final = 32 << 20
"""Free memory a heap keeps at its top before returning it to the kernel: what the daemon may
hold back per glibc arena after a burst (there are at most 8 per core)."""

_M_TRIM_THRESHOLD: Final = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD: Final = -3
_USER_SETTINGS: Final = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc(
    *, mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES, trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring);
    returns True if both were set. Does nothing (False) where the C library is not glibc or
    has no ``mallopt``, and where the user set either threshold in the environment
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``: their choice wins). Never raises."""
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # only glibc has it (and its mallopt options)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    del version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied: bool = mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
    applied = bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes) == 1) and applied
    if not applied:
        log.debug("glibc refused the malloc thresholds; keeping its defaults")
    return applied

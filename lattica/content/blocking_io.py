"""Running file I/O and hashing off the trio thread, deterministically under virtual time.

With a real clock, ``fn`` runs on a worker thread (``trio.to_thread.run_sync``) so the event
loop keeps serving while a chunk is hashed, written and fsynced. Under
``trio.testing.MockClock`` it runs inline instead: while a worker thread runs, every task
looks blocked, so autojump would move virtual time forward by however long the thread took,
and one seed would no longer give one run (the same rule as :mod:`lattica.storage`'s writer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio
import trio.testing

T = TypeVar("T")


async def run_blocking(fn: Callable[[], T]) -> T:
    """``fn()`` off the event loop (inline under a virtual clock); returns its result or raises
    its exception. Not cancellable while ``fn`` runs (a chunk's worth of work)."""
    if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        await trio.lowlevel.checkpoint()
        return fn()
    # A fixed thread name: trio's default formats the function and task names on every call.
    return await trio.to_thread.run_sync(fn, thread_name="lattica blocking io")

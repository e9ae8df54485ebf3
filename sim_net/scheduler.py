"""A timer heap driven by one trio task: runs callbacks at given moments of trio's clock.

Invariants:

* Callbacks run in order of (time, order of scheduling), so equal times keep FIFO order and a
  run is reproducible.
* A callback never runs before its time; it may run later only if the clock is real and the
  task was slow. Callbacks receive nothing; they capture their own scheduled time.
* The task sleeps with ``trio.move_on_at`` until the earliest deadline and is woken early only
  when something earlier is scheduled, so under ``MockClock(autojump_threshold=0)`` idle
  periods cost no real time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import NoReturn

import trio


class EventScheduler:
    """Runs ``callback()`` at virtual time ``at`` (seconds, trio clock) once :meth:`run` runs."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = 0
        self._wakeup = trio.Event()
        self._armed_deadline = math.inf

    def schedule(self, at: float, callback: Callable[[], None]) -> None:
        """Arrange for ``callback`` to run at time ``at`` (at once if ``at`` has passed)."""
        heapq.heappush(self._heap, (at, self._sequence, callback))
        self._sequence += 1
        if at < self._armed_deadline:
            self._wakeup.set()

    async def run(self) -> NoReturn:
        """Run due callbacks forever; cancel the enclosing scope to stop."""
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, callback = heapq.heappop(heap)
                callback()
            self._wakeup = trio.Event()
            self._armed_deadline = heap[0][0] if heap else math.inf
            with trio.move_on_at(self._armed_deadline):
                await self._wakeup.wait()

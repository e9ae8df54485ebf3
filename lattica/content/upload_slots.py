"""Who holds this node's upload slots, and whose slot a newcomer takes when all are held. Sans-I/O.

An exchange stream a peer opens to fetch from this node holds one upload slot while it is
served. :class:`UploadSlots` counts them under three caps (all peers, one peer, one source
address group) and, when only the first one stands in a newcomer's way, picks a holder to
*preempt* among the streams served for at least ``grace_s`` that moved less than
``min_rate_bytes_per_s`` over the last ``window_s``: one from the source group holding the most
slots, the slowest of those. Its slot passes to the newcomer at once; the caller ends the
preempted stream (its fetcher asks other peers, or this one again later). At most one slot is
preempted per ``interval_s``.

Why: the caps bound what one peer or one host can hold, but four hosts (eight slots each) could
still hold all 32 of the default, reading a few hundred bytes a second to stay "active", and a
seeder so held served nobody else for as long as they liked. BitTorrent's answer is the same in
spirit: a seeder keeps serving the peers that take data fastest and chokes the others (BEP 3,
"choking"; libtorrent's ``seed_choking_algorithm``). Here a slot is taken away only when
someone is waiting for it, and only from a stream below a rate floor, so honest fetchers on
slow links keep theirs on a seeder with room. Holding a slot now costs an attacker bandwidth:
at the default floor, all 32 slots take 2 MiB/s of real downloading.

Why the source group first and the interval: on a seeder whose own uplink is the bottleneck,
every stream is slow through no fault of its peer (32 fetchers sharing 1 MB/s get ~31 KiB/s
each), and a preemption only moves the bandwidth to the newcomer and throws away the victim's
partly received chunk. Taking from the host that holds the most slots moves slots from a host
with many (an attacker's few addresses hold eight each) to one with none, and one preemption
per ``interval_s`` bounds the churn among honest peers (each loses at most a partial chunk,
and a stream lives for many intervals) while still handing a held seeder's slots to those who
ask, one every ``interval_s``.

Times are seconds on the caller's monotonic clock; byte counts are what the stream's connection
has passed on to the peer so far (:attr:`lattica.net.stream.QuicStream.taken_bytes`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

_SAMPLE_SPACING_S = 1.0
"""Rate samples are kept at least this far apart, so a stream's history is bounded."""


@dataclass(eq=False)
class Upload:
    """One held slot: who holds it, since when, and samples of how many bytes it moved."""

    peer: Hashable
    source: str | None
    """The source address group (an IPv4 address, an IPv6 /64), None through a relay."""
    opened_at: float
    preempted: bool = False
    """The slot was handed to a newcomer: the caller ends this stream."""
    released: bool = False
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    _max_samples: int = 16

    def observe(self, now: float, taken_bytes: int) -> None:
        """Record that the stream had moved ``taken_bytes`` (a running total) by ``now``."""
        if self._samples and now - self._samples[-1][0] < _SAMPLE_SPACING_S:
            return
        self._samples.append((now, taken_bytes))
        while len(self._samples) > self._max_samples:
            self._samples.popleft()

    def rate(self, now: float, taken_bytes: int, window_s: float) -> float:
        """Bytes per second moved over at least the last ``window_s`` (over the stream's whole
        life if it is younger, or if no sample is that old)."""
        base_t, base_taken = self.opened_at, 0
        for t, taken in self._samples:  # the latest sample at least window_s old
            if t > now - window_s:
                break
            base_t, base_taken = t, taken
        elapsed = now - base_t
        if elapsed <= 0:
            return math.inf
        return max(0, taken_bytes - base_taken) / elapsed


@dataclass(frozen=True)
class Admission:
    """What :meth:`UploadSlots.admit` decided: the newcomer's slot (None: refuse it ``busy``)
    and the holder it was taken from, if any (the caller ends that stream)."""

    upload: Upload | None
    preempted: Upload | None = None


class UploadSlots:
    """Upload slots under caps; preempts the slowest holder for a newcomer when all are held
    (see the module docstring).

    ``max_uploads``, ``max_per_peer``, ``max_per_source``: the caps (counts). ``grace_s``: a
    stream is never preempted before it has been served this long. ``min_rate_bytes_per_s``
    and ``window_s``: only a stream that moved less than that rate over the last ``window_s``
    may be preempted. ``interval_s``: the shortest time between two preemptions.
    ``math.inf`` for ``grace_s`` turns preemption off. Raises ``ValueError`` for caps below 1
    or times that are not positive.
    """

    def __init__(
        self,
        *,
        max_uploads: int,
        max_per_peer: int,
        max_per_source: int,
        grace_s: float,
        min_rate_bytes_per_s: float,
        window_s: float,
        interval_s: float,
    ) -> None:
        if min(max_uploads, max_per_peer, max_per_source) < 1:
            raise ValueError("upload caps are at least 1")
        if grace_s <= 0 or window_s <= 0 or interval_s <= 0 or min_rate_bytes_per_s < 0:
            raise ValueError("grace_s, window_s and interval_s must be positive, min_rate_bytes_per_s not negative")
        self.max_uploads = max_uploads
        self.max_per_peer = max_per_peer
        self.max_per_source = max_per_source
        self.grace_s = grace_s
        self.min_rate_bytes_per_s = min_rate_bytes_per_s
        self.window_s = window_s
        self.interval_s = interval_s
        self._next_preemption_at = -math.inf
        self._held: list[Upload] = []
        self._by_peer: dict[Hashable, int] = {}
        self._by_source: dict[Hashable, int] = {}
        self.preemptions = 0
        """Slots taken from a slow holder for a newcomer, since start."""

    @property
    def held(self) -> int:
        """Slots held now (preempted ones are not)."""
        return len(self._held)

    def held_by(self, peer: Hashable) -> int:
        """Slots ``peer`` holds now."""
        return self._by_peer.get(peer, 0)

    def holders(self) -> list[Upload]:
        """The slots held now, oldest first."""
        return list(self._held)

    def admit(self, peer: Hashable, source: str | None, now: float, taken_bytes: dict[Upload, int]) -> Admission:
        """A slot for a stream ``peer`` opened from ``source`` at ``now``, or a refusal.

        ``taken_bytes`` gives each holder's bytes moved so far (missing ones count as not
        measured and are never preempted); they are recorded as samples before the choice.
        The per-peer and per-source caps are never lifted by preemption: a host at its share
        waits like anyone over it."""
        if self._by_peer.get(peer, 0) >= self.max_per_peer:
            return Admission(None)
        if source is not None and self._by_source.get(source, 0) >= self.max_per_source:
            return Admission(None)
        victim: Upload | None = None
        if len(self._held) >= self.max_uploads:
            if now < self._next_preemption_at:
                return Admission(None)
            victim = self._victim(now, taken_bytes)
            if victim is None:
                return Admission(None)
            victim.preempted = True
            self.preemptions += 1
            self._next_preemption_at = now + self.interval_s
            self.release(victim)
        upload = Upload(peer, source, now, _max_samples=math.ceil(self.window_s / _SAMPLE_SPACING_S) + 2)
        self._held.append(upload)
        self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        if source is not None:
            self._by_source[source] = self._by_source.get(source, 0) + 1
        return Admission(upload, victim)

    def release(self, upload: Upload) -> None:
        """``upload``'s stream ended (or was preempted): free its slot. Idempotent."""
        if upload.released:
            return
        upload.released = True
        self._held.remove(upload)
        _decrement(self._by_peer, upload.peer)
        if upload.source is not None:
            _decrement(self._by_source, upload.source)

    def _victim(self, now: float, taken_bytes: dict[Upload, int]) -> Upload | None:
        """Of the holders served ``grace_s`` and below the rate floor, one from the source group
        (or, through a relay, the peer) holding the most slots, the slowest of those."""
        best: tuple[int, float, Upload] | None = None
        for upload in self._held:
            taken = taken_bytes.get(upload)
            if taken is None:
                continue
            upload.observe(now, taken)
            if now - upload.opened_at < self.grace_s:
                continue
            rate = upload.rate(now, taken, self.window_s)
            if rate >= self.min_rate_bytes_per_s:
                continue
            share = self._by_source[upload.source] if upload.source is not None else self._by_peer[upload.peer]
            if best is None or (-share, rate) < (-best[0], best[1]):
                best = (share, rate, upload)
        return None if best is None else best[2]


def _decrement(counts: dict[Hashable, int], key: Hashable) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]

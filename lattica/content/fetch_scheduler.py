"""Which chunk to ask which peer for, and when: the multi-peer fetch scheduler, sans-I/O.

One :class:`FetchScheduler` per fetch. The driver tells it what happened (a peer joined or
left, a chunk arrived and verified, a chunk was bad, a peer refused, time passed) and sends the
:class:`RequestChunk` / :class:`CancelChunk` it returns; the scheduler never touches a socket or
a clock. The policy is the one BitTorrent and bitswap clients converged on:

* **Pipelining per peer, sized to the peer.** Each peer gets a window of requests in flight:
  enough to cover its round trip at the rate it serves (``ceil(rtt / service time) + 1``, at
  least ``min_window``, at most ``max_window``), measured from its own completions, so a fast
  peer is kept busy and a slow one is not handed chunks it will sit on.
* **In order, among the chunks a peer has**, so files fill front to back.
* **Endgame.** When every missing chunk is in flight, the requests still queued behind others
  at a peer (seeders serve a stream's requests in order, so those have not started) are moved to
  a peer with a free slot that will deliver them sooner, by the peers' measured rates: the
  request is cancelled where it waited and asked here, which costs neither peer any upload. A
  chunk is moved at most once. A peer with nothing in flight also asks for a copy of the last
  chunk another peer holds, if it would deliver it sooner, and any peer with a free slot asks
  for a copy of a chunk held by a stalled peer (one whose current request is overdue by a whole
  chunk's time); at most ``endgame_copies`` requests per chunk; the first copy to arrive wins
  and the others are cancelled, so one slow or stalled peer cannot hold up the end. A copy is
  never made of a chunk with more queued behind it: cancelling a copy its peer had started
  would cost that peer upload time its other requests need.
* **Bad data ends the peer.** A chunk that fails verification drops the peer that sent it
  (:class:`PeerDropped`) and the chunk is asked of others. A request that times out
  (``request_timeout_s`` with no progress from its peer: :meth:`FetchScheduler.peer_progress`
  moves the clock, so a slow but steady peer keeps a chunk that takes longer than that) is
  asked elsewhere; ``max_timeouts`` of them drop the peer. A peer that says it lacks a chunk is
  not asked for it again.
* **A stall is reported, not waited out.** When chunks are missing and no peer can supply them,
  :class:`FetchStalled` names them; the driver finds more providers and calls :meth:`add_peer`.

Invariants: each chunk is requested at most ``endgame_copies`` times at once and only from a
peer that may have it; requests in flight per peer never exceed its window; every request ends
exactly once (completion, cancel, timeout, refusal or the peer's removal). Chunks are opaque
ids (bytes) with sizes; times are seconds on any monotonic clock.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from lattica.errors import LocalProtocolError

PeerKey = Hashable
"""How the driver names a peer (a ``PeerId`` in the node)."""


@dataclass(frozen=True, slots=True)
class WantedChunk:
    """One chunk to fetch: its id (the hash it is verified against) and its size in bytes."""

    chunk_id: bytes
    size: int


@dataclass(frozen=True, slots=True)
class RequestChunk:
    """Ask ``peer`` for ``chunk_id``."""

    peer: PeerKey
    chunk_id: bytes


@dataclass(frozen=True, slots=True)
class CancelChunk:
    """Tell ``peer`` to stop sending ``chunk_id`` (another copy arrived, or it timed out)."""

    peer: PeerKey
    chunk_id: bytes


Action = RequestChunk | CancelChunk


@dataclass(frozen=True, slots=True)
class PeerDropped:
    """The scheduler stopped using ``peer``; the driver should close its transfer streams."""

    peer: PeerKey
    reason: str


@dataclass(frozen=True, slots=True)
class FetchStalled:
    """Chunks are missing and no current peer can supply them (the driver needs providers)."""

    missing: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class FetchComplete:
    """Every chunk arrived and verified."""


Event = PeerDropped | FetchStalled | FetchComplete


@dataclass
class _Peer:
    has: frozenset[bytes] | None  # None: every chunk
    lacks: set[bytes] = field(default_factory=set)
    in_flight: dict[bytes, float] = field(default_factory=dict)  # chunk -> requested at
    timeouts: int = 0
    min_rtt_s: float | None = None  # shortest request-to-completion seen
    service_s: float | None = None  # smoothed time between completions while busy
    bytes_per_s: float | None = None  # smoothed delivery rate while busy (same samples)
    last_completion_at: float | None = None
    received_bytes: int = 0
    progress_at: float = -math.inf  # the last time the driver saw its bytes arrive

    def deadline_base(self, requested_at: float) -> float:
        """Where a request's timeout counts from: its sending, or the peer's progress since."""
        return max(requested_at, self.progress_at)

    def may_have(self, chunk_id: bytes) -> bool:
        return chunk_id not in self.lacks and (self.has is None or chunk_id in self.has)


@dataclass(frozen=True, slots=True)
class PeerStats:
    """What one peer delivered in this fetch (for progress output)."""

    received_bytes: int
    in_flight: int
    window: int
    bytes_per_s: float | None = None
    """Delivery rate measured while the peer was busy (``None`` until two completions)."""


class FetchScheduler:
    """Schedules the requests of one multi-peer fetch (see the module docstring).

    ``chunks`` are the chunks still needed (already verified ones left out: that is how a
    resumed fetch asks only for what is missing). Raises :class:`LocalProtocolError` for
    settings that cannot work or a duplicate chunk id.
    """

    def __init__(
        self,
        chunks: Sequence[WantedChunk],
        *,
        min_window: int = 2,
        max_window: int = 32,
        request_timeout_s: float = 30.0,
        max_timeouts: int = 3,
        endgame_copies: int = 2,
    ) -> None:
        if not 1 <= min_window <= max_window or request_timeout_s <= 0 or max_timeouts < 1 or endgame_copies < 1:
            raise LocalProtocolError("need 1 <= min_window <= max_window, request_timeout_s > 0, counts >= 1")
        self._order = [c.chunk_id for c in chunks]
        self._sizes = {c.chunk_id: c.size for c in chunks}
        if len(self._sizes) != len(self._order):
            raise LocalProtocolError("a chunk id appears twice")
        self.min_window = min_window
        self.max_window = max_window
        self.request_timeout_s = request_timeout_s
        self.max_timeouts = max_timeouts
        self.endgame_copies = endgame_copies
        self._index = {chunk_id: i for i, chunk_id in enumerate(self._order)}
        self._missing: dict[bytes, None] = dict.fromkeys(self._order)  # ordered set
        # Missing chunks nobody is asked for, and a heap of their indexes (entries of chunks
        # requested since are skipped lazily): the next in-order chunk in O(log n).
        self._unrequested: set[bytes] = set(self._order)
        self._heap: list[int] = list(range(len(self._order)))
        self._requested_from: dict[bytes, set[PeerKey]] = {}
        self._moved: set[bytes] = set()  # chunks the endgame moved once already
        self._peers: dict[PeerKey, _Peer] = {}
        self._dropped: set[PeerKey] = set()
        self._stall_reported = False
        self._complete_reported = False
        self.requests_sent = 0
        """Requests issued so far (endgame duplicates included)."""

    # -- what the driver reads -------------------------------------------------------------

    @property
    def missing(self) -> list[bytes]:
        """Chunks not yet received, in fetch order."""
        return list(self._missing)

    @property
    def done(self) -> bool:
        """True when every chunk arrived."""
        return not self._missing

    def peers(self) -> dict[PeerKey, PeerStats]:
        """Per-peer progress for the peers in use."""
        return {
            key: PeerStats(peer.received_bytes, len(peer.in_flight), self._window(peer), peer.bytes_per_s)
            for key, peer in self._peers.items()
        }

    def next_timer(self) -> float | None:
        """The earliest request deadline (``None``: nothing in flight)."""
        deadlines = [peer.deadline_base(at) for peer in self._peers.values() for at in peer.in_flight.values()]
        return min(deadlines) + self.request_timeout_s if deadlines else None

    # -- inputs ------------------------------------------------------------------------------

    def start(self, now: float) -> list[Action | Event]:
        """First requests to the peers added so far; :class:`FetchComplete` at once when
        nothing is missing, :class:`FetchStalled` when no peer can supply anything."""
        return self._fill(now)

    def add_peer(self, peer: PeerKey, now: float, *, has: Iterable[bytes] | None = None) -> list[Action | Event]:
        """Start using ``peer`` (``has``: the chunks it announced; ``None``: all of them).

        A peer dropped earlier in this fetch is not taken back.
        """
        if peer in self._dropped or peer in self._peers:
            return []
        self._peers[peer] = _Peer(has=None if has is None else frozenset(has))
        self._stall_reported = False
        return self._fill(now)

    def remove_peer(self, peer: PeerKey, now: float) -> list[Action | Event]:
        """``peer`` went away (connection lost): its requests are asked of others."""
        state = self._peers.pop(peer, None)
        if state is None:
            return []
        for chunk_id in state.in_flight:
            self._forget_request(chunk_id, peer)
        return self._fill(now)

    def chunk_received(self, peer: PeerKey, chunk_id: bytes, now: float) -> list[Action | Event]:
        """``peer`` delivered ``chunk_id`` and it verified (and is stored)."""
        state = self._peers.get(peer)
        out: list[Action | Event] = []
        if state is not None and chunk_id in state.in_flight:
            requested_at = state.in_flight.pop(chunk_id)
            self._observe_completion(state, now - requested_at, now, self._sizes.get(chunk_id, 0))
            state.received_bytes += self._sizes.get(chunk_id, 0)
        if chunk_id in self._missing:
            del self._missing[chunk_id]
            # Endgame: the other copies are no longer wanted.
            for other in sorted(self._requested_from.pop(chunk_id, set()) - {peer}, key=repr):
                other_state = self._peers.get(other)
                if other_state is not None:
                    other_state.in_flight.pop(chunk_id, None)
                    out.append(CancelChunk(other, chunk_id))
        else:
            self._forget_request(chunk_id, peer)
        return out + self._fill(now)

    def peer_progress(self, peer: PeerKey, now: float) -> None:
        """Bytes of ``peer``'s answers arrived (part of a chunk, as the driver counts them):
        its requests' timeouts count from ``now``. A peer slower than a chunk per
        ``request_timeout_s`` but steady keeps its requests (review finding: a seeder at
        30 KB/s had every 1 MiB request time out and was dropped, and the fetch failed);
        the driver decides what counts as progress."""
        state = self._peers.get(peer)
        if state is not None:
            state.progress_at = now

    def chunk_bad(self, peer: PeerKey, chunk_id: bytes, now: float) -> list[Action | Event]:
        """``peer`` sent bytes for ``chunk_id`` that do not hash to it: drop the peer."""
        return self._drop(peer, f"sent a chunk that failed verification ({chunk_id.hex()[:16]})", now)

    def chunk_refused(self, peer: PeerKey, chunk_id: bytes, now: float) -> list[Action | Event]:
        """``peer`` answered that it does not have ``chunk_id`` (or will not serve it now)."""
        state = self._peers.get(peer)
        if state is None:
            return []
        state.in_flight.pop(chunk_id, None)
        state.lacks.add(chunk_id)
        self._forget_request(chunk_id, peer)
        return self._fill(now)

    def handle_timer(self, now: float) -> list[Action | Event]:
        """Expire requests older than ``request_timeout_s`` (and their peer's last progress):
        cancel, ask elsewhere, count."""
        out: list[Action | Event] = []
        for key in list(self._peers):
            state = self._peers.get(key)
            if state is None:
                continue
            expired = [
                c for c, at in state.in_flight.items() if now - state.deadline_base(at) >= self.request_timeout_s
            ]
            for chunk_id in expired:
                del state.in_flight[chunk_id]
                self._forget_request(chunk_id, key)
                out.append(CancelChunk(key, chunk_id))
                state.timeouts += 1
            if state.timeouts >= self.max_timeouts:
                out += self._drop(key, f"{state.timeouts} requests timed out", now, fill=False)
        return out + self._fill(now)

    # -- policy ------------------------------------------------------------------------------

    def _drop(self, peer: PeerKey, reason: str, now: float, *, fill: bool = True) -> list[Action | Event]:
        state = self._peers.pop(peer, None)
        if state is None:
            return []
        self._dropped.add(peer)
        out: list[Action | Event] = [PeerDropped(peer, reason)]
        for chunk_id in state.in_flight:
            self._forget_request(chunk_id, peer)
        return out + (self._fill(now) if fill else [])

    def _forget_request(self, chunk_id: bytes, peer: PeerKey) -> None:
        holders = self._requested_from.get(chunk_id)
        if holders is not None:
            holders.discard(peer)
            if not holders:
                del self._requested_from[chunk_id]
        if chunk_id in self._missing and chunk_id not in self._requested_from and chunk_id not in self._unrequested:
            self._unrequested.add(chunk_id)
            heapq.heappush(self._heap, self._index[chunk_id])

    def _observe_completion(self, state: _Peer, elapsed_s: float, now: float, size: int) -> None:
        state.min_rtt_s = elapsed_s if state.min_rtt_s is None else min(state.min_rtt_s, elapsed_s)
        if state.last_completion_at is not None and now - elapsed_s <= state.last_completion_at:
            # This chunk was asked for before the previous one arrived, so the peer went on to
            # it at once: the time between the two is how long it takes per chunk. (Whether more
            # are queued behind it says nothing about that, and would miss the last sample of
            # every busy spell.)
            gap = now - state.last_completion_at
            state.service_s = gap if state.service_s is None else 0.75 * state.service_s + 0.25 * gap
            if gap > 0:
                rate = size / gap
                state.bytes_per_s = rate if state.bytes_per_s is None else 0.75 * state.bytes_per_s + 0.25 * rate
        state.last_completion_at = now

    def _window(self, state: _Peer) -> int:
        if state.min_rtt_s is None or not state.service_s:
            return self.min_window
        wanted = math.ceil(state.min_rtt_s / state.service_s) + 1
        return max(self.min_window, min(self.max_window, wanted))

    def _fill(self, now: float) -> list[Action | Event]:
        out: list[Action | Event] = []
        if not self._missing:
            if not self._complete_reported:
                self._complete_reported = True
                out.append(FetchComplete())
            return out
        # Fastest peers first, so the in-order chunks go where they arrive soonest.
        for key in sorted(self._peers, key=lambda k: (self._peers[k].service_s or math.inf, repr(k))):
            state = self._peers[key]
            free = self._window(state) - len(state.in_flight)
            while free > 0:
                chunk_id = self._next_chunk_for(key, state)
                if chunk_id is None:
                    chunk_id = self._endgame_chunk_for(key, state, now, out)
                if chunk_id is None:
                    break
                state.in_flight[chunk_id] = now
                self._unrequested.discard(chunk_id)
                self._requested_from.setdefault(chunk_id, set()).add(key)
                self.requests_sent += 1
                out.append(RequestChunk(key, chunk_id))
                free -= 1
        if not self._requested_from and not self._stall_reported:
            # Nothing in flight and nothing could be asked: nobody here has what is missing.
            self._stall_reported = True
            out.append(FetchStalled(tuple(self._missing)))
        return out

    def _next_chunk_for(self, key: PeerKey, state: _Peer) -> bytes | None:
        if state.has is None and not state.lacks:
            while self._heap:
                chunk_id = self._order[self._heap[0]]
                if chunk_id in self._unrequested:
                    return chunk_id
                heapq.heappop(self._heap)
        else:
            # A peer with part of the content: the first unrequested chunk it may have.
            for index in sorted(self._index[c] for c in self._unrequested):
                if state.may_have(self._order[index]):
                    return self._order[index]
        return None

    def _endgame_chunk_for(self, key: PeerKey, state: _Peer, now: float, out: list[Action | Event]) -> bytes | None:
        """A chunk in flight elsewhere for ``key``'s free slot, or None. Moving a queued
        request appends its :class:`CancelChunk` to ``out``."""
        # Endgame only once nothing unrequested is left that *anyone* could fetch; by then the
        # missing chunks are the ones in flight, at most the sum of the windows.
        if any(self._anyone_may_have(c) for c in self._unrequested):
            return None
        rates = self._rates()
        own_rate = rates[key]
        own_due = self._due(state, own_rate, now)
        # When this peer is free for one more chunk: after its own queue. A stalled one is not.
        free_in_s = own_due[-1][1] if own_due else 0.0
        if math.isinf(free_in_s):
            return None
        candidates: list[tuple[float, int, PeerKey, bytes, int, int]] = []
        for other_key, other in self._peers.items():
            if other_key == key:
                continue
            for position, (chunk_id, due_s) in enumerate(self._due(other, rates[other_key], now)):
                if chunk_id not in state.in_flight and state.may_have(chunk_id):
                    candidates.append(
                        (due_s, self._index[chunk_id], other_key, chunk_id, position, len(other.in_flight))
                    )
        # The chunk due last first: that is the one that decides when the fetch ends.
        candidates.sort(key=lambda c: (-c[0], c[1]))
        for due_s, _index, other_key, chunk_id, position, queued in candidates:
            size = self._sizes[chunk_id]
            if position > 0 and chunk_id not in self._moved:
                # Queued behind other requests, so not started where it waits: move it when it
                # would arrive sooner from here by half a chunk or more (no churn over ties).
                if free_in_s + 1.5 * size / own_rate < due_s:
                    self._moved.add(chunk_id)
                    del self._peers[other_key].in_flight[chunk_id]
                    self._forget_request(chunk_id, other_key)
                    out.append(CancelChunk(other_key, chunk_id))
                    return chunk_id
            elif (
                (math.isinf(due_s) or (not state.in_flight and position == queued - 1))
                and free_in_s + size / own_rate < due_s
                and len(self._requested_from.get(chunk_id, ())) < self.endgame_copies
            ):
                # A copy: the first to arrive wins. Of a stalled peer's chunks, or of the last
                # chunk a peer holds on an idle peer; never of one with more queued behind it,
                # since cancelling a copy that peer had started would cost it upload time its
                # other requests need.
                return chunk_id
        return None

    def _due(self, peer: _Peer, rate: float, now: float) -> list[tuple[bytes, float]]:
        """When each of ``peer``'s requests should arrive, seconds from ``now``, in the order it
        serves them, at ``rate`` bytes/s; all ``inf`` once the first is overdue by a whole
        chunk's time (a stalled peer)."""
        if not peer.in_flight:
            return []
        chunk_ids = list(peer.in_flight)
        first_time = self._sizes[chunk_ids[0]] / rate
        started = peer.in_flight[chunk_ids[0]]
        if peer.last_completion_at is not None:
            started = max(started, peer.last_completion_at)
        done_at = started + first_time
        if now > done_at + first_time:
            return [(c, math.inf) for c in chunk_ids]
        due = max(done_at, now) - now
        out = [(chunk_ids[0], due)]
        for chunk_id in chunk_ids[1:]:
            due += self._sizes[chunk_id] / rate
            out.append((chunk_id, due))
        return out

    def _rates(self) -> dict[PeerKey, float]:
        """Each peer's delivery rate, bytes/s, measured while it was busy; peers not measured yet
        get the mean of the measured ones (all 1.0 when none is: then only queue lengths in
        bytes compare). Not the first delivery's rate: that one includes the round trip and
        the connection's slow start, and would make a peer look slower than its neighbours."""
        known = {k: p.bytes_per_s for k, p in self._peers.items() if p.bytes_per_s}
        default = sum(known.values()) / len(known) if known else 1.0
        return {k: known.get(k, default) for k in self._peers}

    def _anyone_may_have(self, chunk_id: bytes) -> bool:
        return any(peer.may_have(chunk_id) for peer in self._peers.values())

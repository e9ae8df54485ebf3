"""The iterative Kademlia lookup as a sans-I/O state machine.

The driver asks :meth:`Lookup.next_queries` whom to query, sends the requests however it likes
(in parallel), and reports each outcome with :meth:`Lookup.on_response` or
:meth:`Lookup.on_failure`. The machine never sleeps, reads a clock or touches a socket; the
whole-lookup deadline is checked against the ``now`` the driver passes in. Per-query timeouts
belong to the driver (a timed-out query is reported as a failure).

Rules (Kademlia paper section 2.3; disjoint paths from S/Kademlia section 4.4):

* Each path keeps the ``k`` closest candidates it has heard of (``kademlia.node.NodeHeap``).
  It has at most ``alpha`` queries in flight and always queries its closest uncontacted
  candidates first.
* A path is finished when none of its ``k`` closest non-failed candidates is uncontacted or in
  flight: the ``k`` closest it knows have all answered.
* With ``disjoint_paths = d > 1`` the seeds are dealt round-robin to ``d`` paths, and a peer is
  queried by at most one path: a path ignores peers another path has already claimed. The
  lookup is finished when every path is. ``alpha`` is per path.
* :meth:`Lookup.stop` finishes the lookup early (e.g. enough values were found). A lookup past
  its deadline is finished and ``timed_out`` is set; its partial result stays available.
* Our own id is never a candidate; a peer that failed is never queried again by this lookup.
* Hops: a seed is 1 hop away; a peer first heard of from a peer ``h`` hops away is ``h + 1``
  hops away (the shortest such chain counts). :meth:`Lookup.stats` reports the largest hop
  count among peers that answered: the number of sequential query rounds the lookup needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kademlia.node import Node, NodeHeap

from lattica.dht.keys import key_to_int, xor_distance
from lattica.errors import LocalProtocolError
from lattica.identity import PeerId

V = TypeVar("V")


class _Candidate(Node):  # type: ignore[misc]
    def __init__(self, peer: PeerId) -> None:
        super().__init__(peer.dht_key())
        self.peer = peer


@dataclass(frozen=True)
class LookupStats:
    """What one lookup cost, for diagnostics and benchmarks (see the module docstring for hops)."""

    queries: int
    """Requests sent."""
    responses: int
    """Requests answered."""
    failures: int
    """Requests that failed or timed out."""
    hops: int
    """Largest hop count of a peer that answered (0 when none did)."""
    first_value_hops: int | None
    """Hop count of the first peer that returned a value (None when none did)."""
    timed_out: bool
    """The whole-lookup deadline passed."""


class _Path:
    def __init__(self, target: Node, k: int) -> None:
        self.heap = NodeHeap(target, k)
        self.in_flight: set[bytes] = set()
        self.responded: set[bytes] = set()

    def uncontacted(self) -> list[_Candidate]:
        found: list[_Candidate] = self.heap.get_uncontacted()
        return found

    def finished(self) -> bool:
        return not self.in_flight and not self.uncontacted()


class Lookup(Generic[V]):
    """One iterative lookup for ``target`` (a 32-byte id). See the module docstring.

    ``V`` is whatever the driver reports as a found value (a record, provider records, ...).
    Raises :class:`LocalProtocolError` on misuse (a response for a peer not in flight).
    """

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[PeerId],
        *,
        k: int = 20,
        alpha: int = 3,
        disjoint_paths: int = 1,
        own_id: bytes | None = None,
        deadline: float | None = None,
    ) -> None:
        if k < 1 or alpha < 1 or disjoint_paths < 1:
            raise LocalProtocolError("k, alpha and disjoint_paths must be at least 1")
        key_to_int(target)
        self.target = target
        self.k = k
        self.alpha = alpha
        self.deadline = deadline
        self._target_node = Node(target)
        self._own_id = own_id
        self._paths = [_Path(self._target_node, k) for _ in range(disjoint_paths)]
        self._claimed: dict[bytes, int] = {}
        self._failed: set[bytes] = set()
        self._peers: dict[bytes, PeerId] = {}
        self.values: list[tuple[PeerId, V]] = []
        self.stopped = False
        self.timed_out = False
        self.queries_sent = 0
        self._hops: dict[bytes, int] = {}
        self._responses = 0
        self._max_hops = 0
        self._first_value_hops: int | None = None
        seed_list = [p for p in dict.fromkeys(seeds) if p.dht_key() != own_id]
        for index, peer in enumerate(seed_list):
            self._offer(self._paths[index % len(self._paths)], peer, hops=1)

    # -- driver interface --------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True when the lookup needs no further queries (converged, stopped or timed out)."""
        return self.stopped or self.timed_out or all(p.finished() for p in self._paths)

    @property
    def in_flight(self) -> int:
        """Queries sent and not yet answered or failed."""
        return sum(len(p.in_flight) for p in self._paths)

    def next_queries(self, now: float | None = None) -> list[PeerId]:
        """The peers to query now (possibly none); each is marked in flight.

        Past ``deadline`` (compared with ``now``) the lookup times out and returns nothing.
        """
        if self.deadline is not None and now is not None and now >= self.deadline:
            self.timed_out = True
        if self.stopped or self.timed_out:
            return []
        chosen: list[PeerId] = []
        for index, path in enumerate(self._paths):
            self._drop_claimed_by_others(index, path)
            room = self.alpha - len(path.in_flight)
            for candidate in path.uncontacted()[: max(room, 0)]:
                path.heap.mark_contacted(candidate)
                path.in_flight.add(candidate.id)
                self._claimed[candidate.id] = index
                chosen.append(candidate.peer)
        self.queries_sent += len(chosen)
        return chosen

    def on_response(self, peer: PeerId, closer: Iterable[PeerId], value: V | None = None) -> None:
        """``peer`` answered with ``closer`` peers and optionally a found ``value``."""
        path = self._path_in_flight(peer)
        key = peer.dht_key()
        path.in_flight.discard(key)
        path.responded.add(key)
        hops = self._hops[key]
        self._responses += 1
        self._max_hops = max(self._max_hops, hops)
        if value is not None:
            self.values.append((peer, value))
            if self._first_value_hops is None:
                self._first_value_hops = hops
        for other in closer:
            self._offer(path, other, hops=hops + 1)

    def on_failure(self, peer: PeerId) -> None:
        """The query to ``peer`` failed or timed out; it is dropped from this lookup."""
        path = self._path_in_flight(peer)
        key = peer.dht_key()
        path.in_flight.discard(key)
        self._failed.add(key)
        path.heap.remove([key])

    def stop(self) -> None:
        """Finish early (the driver has what it wanted)."""
        self.stopped = True

    def stats(self) -> LookupStats:
        """Queries, answers, failures and hops so far."""
        return LookupStats(
            queries=self.queries_sent,
            responses=self._responses,
            failures=len(self._failed),
            hops=self._max_hops,
            first_value_hops=self._first_value_hops,
            timed_out=self.timed_out,
        )

    def result(self) -> list[PeerId]:
        """Up to ``k`` peers that answered, closest to the target first (all paths merged)."""
        responded = {key for p in self._paths for key in p.responded}
        ordered = sorted(responded, key=lambda key: xor_distance(key, self.target))
        return [self._peers[key] for key in ordered[: self.k]]

    def path_results(self) -> list[list[PeerId]]:
        """Per path, the peers that answered on it, closest first (for tests and diagnostics)."""
        return [
            [self._peers[key] for key in sorted(p.responded, key=lambda key: xor_distance(key, self.target))]
            for p in self._paths
        ]

    # -- internals ---------------------------------------------------------------------------

    def _offer(self, path: _Path, peer: PeerId, *, hops: int) -> None:
        key = peer.dht_key()
        if key == self._own_id or key in self._failed:
            return
        owner = self._claimed.get(key)
        if owner is not None and self._paths[owner] is not path:
            return
        self._peers.setdefault(key, peer)
        if hops < self._hops.get(key, hops + 1):
            self._hops[key] = hops
        path.heap.push(_Candidate(peer))

    def _drop_claimed_by_others(self, index: int, path: _Path) -> None:
        # Removing entries makes farther ones visible, which may be claimed too: repeat.
        while True:
            taken = [c.id for c in path.uncontacted() if self._claimed.get(c.id, index) != index]
            if not taken:
                return
            path.heap.remove(taken)

    def _path_in_flight(self, peer: PeerId) -> _Path:
        key = peer.dht_key()
        index = self._claimed.get(key)
        if index is None or key not in self._paths[index].in_flight:
            raise LocalProtocolError(f"no query to {peer.short()} is in flight")
        return self._paths[index]

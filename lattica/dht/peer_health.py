"""Which peers failed to answer lately: lookups skip them, and repeated failures evict them.

A sans-I/O memory of request failures (times are passed in; the service uses trio's clock).
It answers three questions:

* **Skip?** A peer whose last request failed is *suspect* for a backoff (``backoff_s``, doubled
  per consecutive failure up to ``max_backoff_s``): lookups neither start from it nor query it
  when another peer names it, and puts are not sent to it. A dead peer then costs one request
  timeout, not one per lookup (issue 8 B7: every put waited a handshake timeout per dead peer,
  because other peers kept naming it even after we had evicted it).
* **Evict?** After ``max_failures`` *counted* failures in a row the peer leaves the routing
  table (the Kademlia paper's staleness counter, section 4.1; libp2p evicts on failed queries).
  A failure counts only when its request was sent after the previous counted failure, so
  requests that overlapped one outage (two lookups in flight while a peer restarts) count once
  (issue 8 B6: two lookups evicted a peer that had only restarted). Together with the backoff,
  the next counted failure is a request sent at least one backoff later.
* **Probe?** Routing-table peers that are suspect and whose backoff has run out are due for a
  liveness ping by maintenance; its answer clears them, its failure counts.

Any answer or request from the peer clears its record; eviction does not (a peer others still
name stays skipped). The memory is bounded (``capacity`` peers, oldest failure forgotten first).

Invariants: a peer is suspect only while ``now < retry_at``; ``failures`` only grows through
:meth:`PeerHealth.on_failure` and is reset by :meth:`PeerHealth.on_success`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from lattica.errors import LocalProtocolError
from lattica.identity import PeerId


@dataclass
class _Failures:
    count: int
    """Counted consecutive failures."""
    last_failed_at: float
    """When the last counted failure was observed."""
    retry_at: float
    """Until when the peer is skipped."""


class PeerHealth:
    """Failure memory of remote peers (see the module docstring). Times are seconds on one
    monotonic clock chosen by the caller. Raises :class:`LocalProtocolError` for bad limits."""

    def __init__(
        self,
        *,
        max_failures: int = 2,
        backoff_s: float = 60.0,
        max_backoff_s: float = 3600.0,
        capacity: int = 4096,
    ) -> None:
        if max_failures < 1 or backoff_s < 0 or max_backoff_s < backoff_s or capacity < 1:
            raise LocalProtocolError("max_failures >= 1, 0 <= backoff_s <= max_backoff_s, capacity >= 1")
        self.max_failures = max_failures
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.capacity = capacity
        self._peers: OrderedDict[PeerId, _Failures] = OrderedDict()

    def on_failure(self, peer: PeerId, *, sent_at: float, now: float) -> bool:
        """A request to ``peer`` sent at ``sent_at`` failed at ``now`` (timeout, dial failure,
        nonsense answer). Returns True when the peer should now be evicted."""
        held = self._peers.get(peer)
        if held is not None and sent_at < held.last_failed_at:
            return False  # overlapped the failure already counted: the same outage
        count = 1 if held is None else held.count + 1
        backoff = min(self.backoff_s * 2 ** (count - 1), self.max_backoff_s)
        self._peers[peer] = _Failures(count, now, now + backoff)
        self._peers.move_to_end(peer)
        while len(self._peers) > self.capacity:
            self._peers.popitem(last=False)
        return count >= self.max_failures

    def on_success(self, peer: PeerId) -> None:
        """``peer`` answered a request or sent us one: it is healthy again."""
        self._peers.pop(peer, None)

    def is_suspect(self, peer: PeerId, now: float) -> bool:
        """True while ``peer`` is in its backoff after a failure: do not query it."""
        held = self._peers.get(peer)
        return held is not None and now < held.retry_at

    def failures(self, peer: PeerId) -> int:
        """Counted consecutive failures of ``peer`` (0 when healthy or forgotten)."""
        held = self._peers.get(peer)
        return 0 if held is None else held.count

    def due_probes(self, candidates: Iterable[PeerId], now: float) -> list[PeerId]:
        """Those of ``candidates`` (routing-table peers) that failed and whose backoff is over."""
        due = []
        for peer in candidates:
            held = self._peers.get(peer)
            if held is not None and now >= held.retry_at:
                due.append(peer)
        return due

    def clear(self) -> None:
        """Forget every failure (we lost all our peers at once: the fault was likely ours)."""
        self._peers.clear()

    def __len__(self) -> int:
        return len(self._peers)

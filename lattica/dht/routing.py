"""The routing table: ``kademlia``'s k-buckets, subclassed for 256-bit ids and sans-I/O liveness.

What changes relative to ``kademlia.routing`` and why:

* The id space is 256 bits (``flush`` starts with one bucket covering ``[0, 2**256 - 1]``) and
  :meth:`RoutingTable.get_bucket_for` treats bucket ranges as inclusive (upstream's ``<`` puts an
  id equal to a bucket's upper bound in the wrong bucket).
* :meth:`RoutingTable.add_contact` never schedules anything. When a bucket is full and cannot
  split it returns :class:`AddResult` with ``outcome="full"`` and the bucket's least recently
  seen peer; the caller pings it (trio, in the service) and reports back with
  :meth:`RoutingTable.mark_alive` (old peer stays, newcomer waits in the replacement cache) or
  :meth:`RoutingTable.remove` (old peer evicted, newest admissible replacement promoted).
  Long-lived peers are thereby preferred, as in the Kademlia paper, section 2.2.
* Only the bucket containing our own id splits (standard Kademlia, as libp2p does), not
  upstream's relaxed "depth % 5" rule, which lets far buckets grow without bound.
* Diversity: at most ``max_peers_per_subnet`` peers of one /24 (IPv4) or /48 (IPv6) per bucket,
  judged on a peer's first IP-literal address. Addresses that are not globally routable are
  exempt unless ``diversity_applies_to_private`` (so LAN and loopback test networks work).
* Times are passed in (``now``, any clock the caller uses consistently); the table never reads
  a clock.

Invariants: our own id is never in the table; a peer is in at most one bucket; a bucket never
holds more than ``k`` peers or more than ``max_peers_per_subnet`` from one subnet.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kademlia.node import Node
from kademlia.routing import KBucket
from kademlia.routing import RoutingTable as _KadRoutingTable

from lattica.dht.keys import MAX_KEY_INT, key_to_int
from lattica.identity import PeerId
from lattica.net.datagram import Address


class DhtNode(Node):  # type: ignore[misc]
    """A routing-table entry: a ``kademlia`` ``Node`` whose id is ``sha256(peer_id)``.

    ``ip``/``port`` mirror the first address (for upstream helpers); ``addresses`` holds them all.
    ``first_seen``/``last_seen`` use the table's clock.
    """

    def __init__(
        self,
        peer_id: PeerId,
        addresses: Iterable[Address] = (),
        *,
        first_seen: float = 0.0,
        last_seen: float = 0.0,
    ) -> None:
        addrs = [(str(h), int(p)) for h, p in addresses]
        host, port = addrs[0] if addrs else (None, None)
        super().__init__(peer_id.dht_key(), host, port)
        self.peer_id = peer_id
        self.addresses: list[Address] = addrs
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.failures = 0

    @property
    def key(self) -> bytes:
        """The 32-byte DHT id."""
        return bytes(self.id)

    def __repr__(self) -> str:
        return f"DhtNode({self.peer_id.short()}, {self.addresses})"


def subnet_of(addresses: Sequence[Address], *, include_private: bool) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) of the first IP-literal address, or None when exempt."""
    for host, _port in addresses:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if not ip.is_global and not include_private:
            return None
        prefix = 24 if ip.version == 4 else 48
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
    return None


class Bucket(KBucket):  # type: ignore[misc]
    """A k-bucket covering the inclusive id range ``[low, high]``."""

    def __init__(
        self,
        low: int,
        high: int,
        ksize: int,
        *,
        now: float,
        admissible: Callable[[Bucket, DhtNode], bool],
    ) -> None:
        super().__init__(low, high, ksize)
        self.last_updated = now
        self._admissible = admissible

    def touch_last_updated(self, now: float | None = None) -> None:
        """Mark the bucket as recently looked up (upstream reads ``time.monotonic``; we don't)."""
        if now is not None:
            self.last_updated = now
        elif not hasattr(self, "last_updated"):
            self.last_updated = 0.0

    def split(self) -> tuple[Bucket, Bucket]:
        """Split into two halves of the same kind, redistributing peers and replacements."""
        low, high = self.range
        midpoint = (low + high) // 2
        one = Bucket(low, midpoint, self.ksize, now=self.last_updated, admissible=self._admissible)
        two = Bucket(midpoint + 1, high, self.ksize, now=self.last_updated, admissible=self._admissible)
        for node in self.nodes.values():
            (one if node.long_id <= midpoint else two).add_node(node)
        for node in self.replacement_nodes.values():
            target = one if node.long_id <= midpoint else two
            if target._admissible(target, node):
                target.add_node(node)
        return one, two

    def remove_node(self, node: Any) -> None:
        """Remove ``node``; promote the newest replacement that passes the diversity rule."""
        self.replacement_nodes.pop(node.id, None)
        if node.id not in self.nodes:
            return
        del self.nodes[node.id]
        for candidate_id in reversed(list(self.replacement_nodes)):
            candidate = self.replacement_nodes[candidate_id]
            if self._admissible(self, candidate):
                del self.replacement_nodes[candidate_id]
                self.nodes[candidate_id] = candidate
                return

    def peers(self) -> list[DhtNode]:
        """Peers from least to most recently seen."""
        return list(self.nodes.values())

    def replacements(self) -> list[DhtNode]:
        """Replacement cache, oldest first."""
        return list(self.replacement_nodes.values())


@dataclass(frozen=True)
class AddResult:
    """What :meth:`RoutingTable.add_contact` did.

    ``outcome``: ``added``; ``updated`` (already present, moved to most recently seen);
    ``full`` (bucket full: ping ``check`` and report back, newcomer kept as replacement);
    ``rejected`` (``reason`` says why: ``self``, ``subnet``).
    """

    outcome: Literal["added", "updated", "full", "rejected"]
    check: DhtNode | None = None
    reason: str = ""


class RoutingTable(_KadRoutingTable):  # type: ignore[misc]
    """Kademlia routing table over 256-bit ids (see the module docstring for the rules)."""

    def __init__(
        self,
        own_id: bytes,
        *,
        k: int = 20,
        max_peers_per_subnet: int = 2,
        diversity_applies_to_private: bool = False,
        now: float = 0.0,
    ) -> None:
        key_to_int(own_id)
        self._now = now
        self.max_peers_per_subnet = max_peers_per_subnet
        self.diversity_applies_to_private = diversity_applies_to_private
        self.own_id = own_id
        super().__init__(None, k, Node(own_id))

    # -- upstream overrides ------------------------------------------------------------------

    def flush(self) -> None:
        """Start over with one bucket covering the whole 256-bit space."""
        self.buckets: list[Bucket] = [Bucket(0, MAX_KEY_INT, self.ksize, now=self._now, admissible=self._admissible)]

    def get_bucket_for(self, node: Any) -> int:
        """Index of the bucket whose inclusive range holds ``node``'s id."""
        long_id = node.long_id
        for index, bucket in enumerate(self.buckets):
            if long_id <= bucket.range[1]:
                return index
        raise AssertionError("bucket ranges cover the whole id space")

    def lonely_buckets(self) -> list[Bucket]:  # pragma: no cover - upstream name, clock-free
        """Not used: upstream reads the wall clock. Use :meth:`stale_buckets`."""
        raise NotImplementedError("use stale_buckets(now, max_age_s)")

    def add_contact(self, node: DhtNode, now: float | None = None) -> AddResult:
        """Insert or refresh a peer that just proved itself alive (it talked to us).

        Never pings anything itself; see :class:`AddResult` for what the caller must do.
        """
        now = self._now if now is None else now
        if node.id == self.node.id:
            return AddResult("rejected", reason="self")
        bucket = self.buckets[self.get_bucket_for(node)]
        existing: DhtNode | None = bucket[node.id]
        if existing is not None:
            if node.addresses:
                existing.addresses = list(node.addresses)
                existing.ip, existing.port = node.addresses[0]
            existing.last_seen = now
            existing.failures = 0
            bucket.add_node(existing)  # moves it to the most-recently-seen end
            return AddResult("updated")
        if not self._admissible(bucket, node):
            return AddResult("rejected", reason="subnet")
        node.first_seen = node.first_seen or now
        node.last_seen = now
        if bucket.add_node(node):
            return AddResult("added")
        if bucket.has_in_range(self.node):
            bucket.replacement_nodes.pop(node.id, None)
            self.split_bucket(self.buckets.index(bucket))
            return self.add_contact(node, now)
        return AddResult("full", check=bucket.head())

    def remove_contact(self, node: Any) -> None:
        """Remove a peer (and promote a replacement), as upstream."""
        self.buckets[self.get_bucket_for(node)].remove_node(node)

    def find_neighbors(self, node: Any, k: int | None = None, exclude: Any = None) -> list[DhtNode]:
        """The ``k`` peers closest to ``node``'s id (exact, unlike upstream's traversal).

        ``exclude`` is a collection of 32-byte ids to leave out.
        """
        return self.closest(bytes(node.id), k or self.ksize, exclude=exclude or ())

    # -- lattica API -------------------------------------------------------------------------

    def _admissible(self, bucket: Bucket, node: DhtNode) -> bool:
        if self.max_peers_per_subnet <= 0:
            return True
        subnet = subnet_of(node.addresses, include_private=self.diversity_applies_to_private)
        if subnet is None:
            return True
        same = sum(
            1
            for other in bucket.nodes.values()
            if other.id != node.id
            and subnet_of(other.addresses, include_private=self.diversity_applies_to_private) == subnet
        )
        return same < self.max_peers_per_subnet

    def get(self, peer: PeerId) -> DhtNode | None:
        """The entry for ``peer`` if it is in the table (not the replacement cache)."""
        probe = Node(peer.dht_key())
        node: DhtNode | None = self.buckets[self.get_bucket_for(probe)][probe.id]
        return node

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, PeerId) and self.get(peer) is not None

    def mark_alive(self, peer: PeerId, now: float) -> None:
        """``peer`` answered (e.g. a liveness check): it becomes most recently seen."""
        node = self.get(peer)
        if node is not None:
            self.add_contact(node, now)

    def remove(self, peer: PeerId) -> None:
        """Evict ``peer``; the newest admissible replacement in its bucket takes its place."""
        self.remove_contact(Node(peer.dht_key()))

    def record_failure(self, peer: PeerId, *, max_failures: int) -> bool:
        """Count a failed request to ``peer``; evict it after ``max_failures`` in a row.

        Returns True when the peer was evicted.
        """
        node = self.get(peer)
        if node is None:
            return False
        node.failures += 1
        if node.failures >= max_failures:
            self.remove(peer)
            return True
        return False

    def closest(self, target: bytes, count: int, *, exclude: Iterable[bytes] = ()) -> list[DhtNode]:
        """The ``count`` peers closest to ``target`` (32-byte id), nearest first."""
        excluded = set(exclude)
        target_int = key_to_int(target)
        return heapq.nsmallest(
            count,
            (n for n in self.peers() if n.id not in excluded),
            key=lambda n: n.long_id ^ target_int,
        )

    def peers(self) -> Iterator[DhtNode]:
        """Every peer in the table (not replacements)."""
        for bucket in self.buckets:
            yield from bucket.nodes.values()

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    def touch_bucket(self, key: bytes, now: float) -> None:
        """Record that a lookup for ``key`` just ran, so its bucket is not stale."""
        self.buckets[self.get_bucket_for(Node(key))].touch_last_updated(now)

    def stale_buckets(self, now: float, max_age_s: float) -> list[tuple[int, int]]:
        """Inclusive id ranges of buckets not looked up for ``max_age_s`` (refresh these)."""
        return [b.range for b in self.buckets if b.last_updated <= now - max_age_s]

    def bucket_population(self, key: bytes) -> int:
        """How many peers the bucket covering ``key`` holds."""
        return len(self.buckets[self.get_bucket_for(Node(key))])

    def empty_far_buckets(self) -> list[tuple[int, int]]:
        """Inclusive id ranges of the empty buckets that hold neither our own id nor ids closer
        to us than our ``k``-th closest peer.

        Lookups rely on the Kademlia invariant that a bucket is empty only when no node exists
        in its range; these are the buckets where that may not hold yet. (A node closer to us
        than our k-th closest peer would have been found by our own self-lookup, so empty buckets
        nearer than that are empty because the network is.)
        """
        own = self.node.long_id
        nearest = self.closest(self.own_id, self.ksize)
        horizon = (nearest[-1].long_id ^ own).bit_length() if len(nearest) == self.ksize else 0
        return [
            b.range
            for b in self.buckets
            if len(b) == 0 and not b.has_in_range(self.node) and (b.range[0] ^ own).bit_length() > horizon
        ]

    def wider_view(self, low: int, high: int, count: int) -> list[DhtNode]:
        """Up to ``count`` peers from the nearest non-empty bucket farther from us than ``[low, high]``.

        Such a peer keeps the range and our own id in one of its buckets, so it is the best
        placed of our peers to know nodes in a range where our table has none. Most recently
        seen first.
        """
        own = self.node.long_id
        span = (low ^ own).bit_length()
        for bucket in sorted(self.buckets, key=lambda b: (b.range[0] ^ own).bit_length()):
            if (bucket.range[0] ^ own).bit_length() > span and len(bucket):
                return list(reversed(bucket.peers()))[:count]
        return []

"""The DHT's periodic upkeep as a plan: what is due now, as a list of actions (sans-I/O).

:meth:`MaintenancePlanner.due` looks at the routing table, the store (reads only), the peers'
failure memory and its own bookkeeping, and returns the actions due at ``now``; the trio
service performs them in order and reports back what happened (:meth:`record_published`,
:meth:`fill_attempted`, :meth:`joined`). The planner never performs I/O or reads a clock.

Rules (see docs/decisions.md, "DHT"):

* Expired entries are purged every round.
* A table that lost every peer is re-bootstrapped (only after we had joined once: the first
  join runs with its own retries in ``Node``); nothing else is planned that round.
* Peers whose failure backoff is over, and peers not heard from for ``stale_peer_ping_s``,
  are pinged (:mod:`~lattica.dht.peer_health`).
* Empty far buckets are filled with retries after 1, 2, 4, ... maintenance intervals, up to
  the bucket refresh interval; other buckets not looked up for the refresh interval are
  refreshed (empty ones among them filled).
* Our own records are republished once per ``record_republish_interval_s``; provider records
  when less than ``provider_ttl_s - provider_republish_interval_s`` of their life is left.
* The routing table is saved at the end of every round.

Times: ``now`` is unix seconds (records, table ages); ``monotonic_now`` is the clock the
:class:`~lattica.dht.peer_health.PeerHealth` uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lattica.dht.keys import provider_key
from lattica.dht.messages import MAX_PROVIDERS
from lattica.dht.peer_health import PeerHealth
from lattica.dht.records import SignedRecord
from lattica.dht.routing import RoutingTable
from lattica.dht.store import DhtStore
from lattica.identity import PeerId


@dataclass(frozen=True)
class PurgeExpired:
    """Delete expired records and provider records."""


@dataclass(frozen=True)
class Rebootstrap:
    """Join again through the configured bootstrap peers and the saved table."""


@dataclass(frozen=True)
class ProbePeers:
    """Ping these routing-table peers (liveness)."""

    peers: tuple[PeerId, ...]


@dataclass(frozen=True)
class FillBucket:
    """Look up a random id in the empty bucket ``[low, high]``, seeded from outside our table."""

    low: int
    high: int


@dataclass(frozen=True)
class RefreshBucket:
    """Look up a random id in the stale bucket ``[low, high]``."""

    low: int
    high: int


@dataclass(frozen=True)
class RepublishRecord:
    """Send our own ``record`` to the closest nodes again."""

    record: SignedRecord


@dataclass(frozen=True)
class Reprovide:
    """Re-sign and re-announce our provider record for ``cid``."""

    cid: bytes


@dataclass(frozen=True)
class SaveRoutingTable:
    """Persist the routing table."""


Action = (
    PurgeExpired
    | Rebootstrap
    | ProbePeers
    | FillBucket
    | RefreshBucket
    | RepublishRecord
    | Reprovide
    | SaveRoutingTable
)


class MaintenancePlanner:
    """Plans the maintenance rounds of one node (see the module docstring). Intervals are
    seconds, taken from the DHT configuration."""

    def __init__(
        self,
        peer_id: PeerId,
        routing_table: RoutingTable,
        store: DhtStore,
        health: PeerHealth,
        *,
        maintenance_interval_s: float,
        bucket_refresh_interval_s: float,
        record_republish_interval_s: float,
        provider_ttl_s: float,
        provider_republish_interval_s: float,
        stale_peer_ping_s: float,
    ) -> None:
        self.peer_id = peer_id
        self._table = routing_table
        self._store = store
        self._health = health
        self.maintenance_interval_s = maintenance_interval_s
        self.bucket_refresh_interval_s = bucket_refresh_interval_s
        self.record_republish_interval_s = record_republish_interval_s
        self.provider_ttl_s = provider_ttl_s
        self.provider_republish_interval_s = provider_republish_interval_s
        self.stale_peer_ping_s = stale_peer_ping_s
        self._published_at: dict[bytes, float] = {}
        self._fill_retry: dict[tuple[int, int], tuple[float, float]] = {}
        """Empty far bucket range -> (next fill attempt, current retry interval), unix s."""
        self.had_peers = len(routing_table) > 0

    # -- the plan ------------------------------------------------------------------------------

    def due(self, now: float, monotonic_now: float) -> list[Action]:
        """The actions of one maintenance round at unix time ``now``, in order."""
        actions: list[Action] = [PurgeExpired()]
        if len(self._table) == 0:
            if self.had_peers:
                actions.append(Rebootstrap())
            return actions
        self.had_peers = True
        probes = self.probes(now, monotonic_now)
        if probes:
            actions.append(ProbePeers(probes))
        fills = self.fills(now, only_due=True)
        actions += [FillBucket(low, high) for low, high in fills]
        # A fill is that bucket's lookup for this round: no second one as a refresh.
        actions += [a for a in self.refreshes(now) if (a.low, a.high) not in fills]
        actions += self.republishing(now)
        actions.append(SaveRoutingTable())
        return actions

    def probes(self, now: float, monotonic_now: float) -> tuple[PeerId, ...]:
        """Table peers to ping: failed ones past their backoff, and long-silent ones."""
        peers = list(self._table.peers())
        due = set(self._health.due_probes((n.peer_id for n in peers), monotonic_now))
        due.update(n.peer_id for n in peers if now - n.last_seen >= self.stale_peer_ping_s)
        return tuple(sorted(due, key=lambda p: p.key))

    def fills(self, now: float, *, only_due: bool) -> list[tuple[int, int]]:
        """Empty far buckets to fill now (``only_due``: those whose retry is due), each
        counted as attempted: retried after one maintenance interval, then twice that, ... up
        to the bucket refresh interval."""
        ranges = self._table.empty_far_buckets()
        self._fill_retry = {r: self._fill_retry[r] for r in ranges if r in self._fill_retry}
        chosen = []
        for bucket in ranges:
            due_at, interval = self._fill_retry.get(bucket, (now, 0.0))
            if only_due and due_at > now:
                continue
            interval = min(max(2 * interval, self.maintenance_interval_s), self.bucket_refresh_interval_s)
            self._fill_retry[bucket] = (now + interval, interval)
            chosen.append(bucket)
        return chosen

    def refreshes(self, now: float, *, all_buckets: bool = False) -> list[FillBucket | RefreshBucket]:
        """Buckets not looked up for the refresh interval (or all): empty far ones are filled."""
        max_age = -math.inf if all_buckets else self.bucket_refresh_interval_s
        empty = set(self._table.empty_far_buckets())
        return [
            FillBucket(low, high) if (low, high) in empty else RefreshBucket(low, high)
            for low, high in self._table.stale_buckets(now, max_age)
        ]

    def republishing(self, now: float) -> list[RepublishRecord | Reprovide]:
        """Own records and provider records due to be sent again."""
        due: list[RepublishRecord | Reprovide] = []
        for record in self._store.own_records(now=now):
            if record.writer != self.peer_id.key:
                continue
            if self._published_at.get(record.dht_key, -math.inf) + self.record_republish_interval_s > now:
                continue
            due.append(RepublishRecord(record))
        keep_above = self.provider_ttl_s - self.provider_republish_interval_s
        for cid in self._store.provided():
            ours = [
                r
                for r in self._store.get_providers(provider_key(cid), now=now, limit=MAX_PROVIDERS)
                if r.provider == self.peer_id.key
            ]
            if ours and max(r.expires_at for r in ours) - now > keep_above:
                continue
            due.append(Reprovide(cid))
        return due

    # -- feedback ------------------------------------------------------------------------------

    def record_published(self, dht_key: bytes, now: float) -> None:
        """Our record at ``dht_key`` reached at least one node at ``now``."""
        self._published_at[dht_key] = now

    def joined(self) -> None:
        """A bootstrap succeeded: from now on an empty table means we lost our peers."""
        self.had_peers = True

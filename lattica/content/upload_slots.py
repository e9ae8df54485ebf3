"""Who holds this node's upload slots, and whose slot a newcomer takes when all are held. Sans-I/O.

An exchange stream a peer opens to fetch from this node holds one upload slot while it is
served. :class:`UploadSlots` counts them under three caps (all peers, one peer, one source
address group) and, when only the first one stands in a newcomer's way, shares the slots out
by *host*: the newcomer takes a slot from the host holding the most, if that host holds at
least two more than the newcomer's own host (so the move makes the shares more even, never
less). Of that host's streams (of all hosts tied for the most), the one that moved the fewest
bytes per second since it opened is preempted; its slot passes to the newcomer at once and
the caller ends that stream (its fetcher asks other peers, or this one again later).

Why by host, and not by rate. The caps bound what one peer or one host can hold, but four hosts
(eight slots each) could still hold all 32 of the default, and a seeder so held served nobody
else. A first version took the slot of any stream below a rate floor after a grace period;
review showed it wrong three ways: an attacker closing and reopening each stream before its
grace ended kept every slot at ~1 KB/s; two honest fetchers on a slow uplink preempted each
other in the middle of 1 MiB chunks until neither finished; and a rate floor cannot tell a peer
that reads slowly from a seeder whose own uplink is shared by 32 streams. Counting holdings per
host has none of those: reopening a stream does not change how many a host holds, equal hosts
never take from each other (no churn among honest fetchers, one stream each per seeder), and it
needs no clock. What it costs an attacker to hold every slot: as many source address groups (an
IPv4 address, an IPv6 /64) as there are slots, 32 by default, where four did before. BitTorrent
seeds by the same idea of sharing upload slots out rather than first come, first served (BEP 3,
"choking"); libp2p's resource manager (go-libp2p ``rcmgr``) counts and refuses per peer and per
IP, but never reclaims.

The caller says what a *host* is: :mod:`lattica.content.exchange_service` passes the stream's
source address group, and for a peer reached through a relay the peer id (every fetcher of a
seeder behind a NAT may come through its relay; the relay bounds the ids that can).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from lattica.key_counts import add_one, remove_one


@dataclass(eq=False)
class Upload:
    """One held slot: who holds it (``peer``, ``host`` for the fair share, ``source`` for the
    per-address cap), since when (seconds on the caller's clock), and whether it was taken."""

    peer: Hashable
    host: Hashable
    source: str | None
    """The source address group for the per-address cap (None through a relay: no such cap)."""
    opened_at: float
    preempted: bool = False
    """The slot was handed to a newcomer: the caller ends this stream."""
    released: bool = False


@dataclass(frozen=True)
class Admission:
    """What :meth:`UploadSlots.admit` decided: the newcomer's slot (None: refuse it ``busy``)
    and the holder it was taken from, if any (the caller ends that stream)."""

    upload: Upload | None
    preempted: Upload | None = None


class UploadSlots:
    """Upload slots under caps, shared out by host when all are held (see the module docstring).

    ``max_uploads``, ``max_per_peer``, ``max_per_source``: the caps (counts, at least 1; raises
    ``ValueError`` otherwise).
    """

    def __init__(self, *, max_uploads: int, max_per_peer: int, max_per_source: int) -> None:
        if min(max_uploads, max_per_peer, max_per_source) < 1:
            raise ValueError("upload caps are at least 1")
        self.max_uploads = max_uploads
        self.max_per_peer = max_per_peer
        self.max_per_source = max_per_source
        self._held: list[Upload] = []
        self._by_peer: dict[Hashable, int] = {}
        self._by_source: dict[Hashable, int] = {}
        self._by_host: dict[Hashable, int] = {}
        self.preemptions = 0
        """Slots taken from a host holding more than its share, for a newcomer, since start."""

    @property
    def held(self) -> int:
        """Slots held now (preempted ones are not)."""
        return len(self._held)

    def held_by(self, peer: Hashable) -> int:
        """Slots ``peer`` holds now."""
        return self._by_peer.get(peer, 0)

    def held_by_host(self, host: Hashable) -> int:
        """Slots ``host`` holds now."""
        return self._by_host.get(host, 0)

    def holders(self) -> list[Upload]:
        """The slots held now, oldest first."""
        return list(self._held)

    def admit(
        self, peer: Hashable, host: Hashable, source: str | None, now: float, taken_bytes: dict[Upload, int]
    ) -> Admission:
        """A slot for a stream ``peer`` opened from ``host`` (``source``: its address group for
        the per-address cap, None for none) at ``now``, or a refusal.

        ``taken_bytes`` gives each holder's bytes moved so far; a preempted stream is the one of
        the chosen host that moved the fewest per second since it opened (a holder missing from
        it counts as having moved nothing). The per-peer and per-source caps are never lifted:
        a host at its share waits like anyone over it."""
        if self._by_peer.get(peer, 0) >= self.max_per_peer:
            return Admission(None)
        if source is not None and self._by_source.get(source, 0) >= self.max_per_source:
            return Admission(None)
        victim: Upload | None = None
        if len(self._held) >= self.max_uploads:
            victim = self._victim(host, now, taken_bytes)
            if victim is None:
                return Admission(None)
            victim.preempted = True
            self.preemptions += 1
            self.release(victim)
        upload = Upload(peer, host, source, now)
        self._held.append(upload)
        add_one(self._by_peer, peer)
        add_one(self._by_host, host)
        if source is not None:
            add_one(self._by_source, source)
        return Admission(upload, victim)

    def release(self, upload: Upload) -> None:
        """``upload``'s stream ended (or was preempted): free its slot. Idempotent."""
        if upload.released:
            return
        upload.released = True
        self._held.remove(upload)
        remove_one(self._by_peer, upload.peer)
        remove_one(self._by_host, upload.host)
        if upload.source is not None:
            remove_one(self._by_source, upload.source)

    def _victim(self, newcomer: Hashable, now: float, taken_bytes: dict[Upload, int]) -> Upload | None:
        """The stream to preempt for a newcomer from host ``newcomer``, or None when no host
        holds at least two more slots than it. Among hosts tied for the most, the slowest
        stream of any of them: which host came first must not decide (review finding: an
        attacker reordered its hosts behind an honest one by taking its slots again)."""
        most = max(self._by_host.values())
        if most < self._by_host.get(newcomer, 0) + 2:
            return None

        def rate(upload: Upload) -> float:
            return taken_bytes.get(upload, 0) / max(now - upload.opened_at, 1e-9)

        return min((u for u in self._held if self._by_host[u.host] == most), key=rate)


"""``ObservedAddressBook``: which reflexive address of ours to believe, by agreement (sans-I/O).

Peers tell us the address our packets come from (identify's observed address, STUN answers from
configured servers). A single peer can lie, and peer ids cost nothing to mint, so an address is
only *believed* when at least ``min_agreeing_observers`` distinct *observer groups* report it
within ``window_s``.

Invariants:

* An observer group is an IPv4 address, or an IPv6 /56 prefix (the usual end-site allocation:
  one host owns many /64s cheaply), or a configured STUN server. Many peer ids behind one IP
  are one group; this follows libp2p's observed-address manager. We did not group IPv4 by /24:
  peers in one cloud subnet or campus are honest distinct observers, and small networks would
  never reach agreement; an attacker who controls N public IPv4 addresses is already costly.
* Each group holds one vote (its latest report): a liar cannot vote for many addresses at once,
  and a report replaces the group's earlier one. Votes older than ``window_s`` are dropped.
* Memory is bounded: at most ``max_groups`` groups (the least recently heard is forgotten).
* The book never reads a clock; every call takes ``now`` (seconds, any monotonic origin).

Mapping behaviour (RFC 4787 section 4.1) is read from the votes: when at least
``min_agreeing_observers`` groups saw one public IP but no port of it is believed, different
peers see different ports for our one socket: an endpoint-dependent ("symmetric") mapping.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Literal

from lattica.net.address import address_group
from lattica.net.datagram import Address

MappingBehaviour = Literal["unknown", "endpoint-independent", "endpoint-dependent"]

_DEFAULT_MAX_GROUPS = 256


def observer_group(reporter_ip: str) -> str:
    """The group one reporter counts in: its IPv4 address, or its IPv6 /56 prefix (text).

    ``reporter_ip`` must be an IP literal (a connection's remote address); anything else is
    its own group by its text (emulated or unusual addresses still count once each)."""
    return address_group(reporter_ip, ipv6_prefix_bits=56)


@dataclass(frozen=True, slots=True)
class BelievedAddress:
    """An address of ours that enough observer groups agree on."""

    address: Address
    observers: int
    """Distinct observer groups reporting it within the window."""


@dataclass(frozen=True, slots=True)
class _Vote:
    address: Address
    at: float


class ObservedAddressBook:
    """Observations of our reflexive address, and what they agree on.

    ``min_agreeing_observers`` (>= 1) groups must report an address before it is believed;
    ``window_s`` (seconds) is how long a report counts; ``max_groups`` bounds memory.
    Raises ``ValueError`` for non-positive settings.
    """

    def __init__(
        self,
        *,
        min_agreeing_observers: int = 3,
        window_s: float = 1800.0,
        max_groups: int = _DEFAULT_MAX_GROUPS,
    ) -> None:
        if min_agreeing_observers < 1 or window_s <= 0 or max_groups < 1:
            raise ValueError("min_agreeing_observers, window_s and max_groups must be positive")
        self.min_agreeing_observers = min_agreeing_observers
        self.window_s = window_s
        self.max_groups = max_groups
        self._votes: OrderedDict[str, _Vote] = OrderedDict()

    def observe(self, group: str, address: Address, now: float) -> bool:
        """Record that observer ``group`` (see :func:`observer_group`) saw us at ``address``
        (already checked with :func:`~lattica.net.address.network_address`).

        Returns whether the set of believed addresses changed."""
        before = self.believed_set(now)
        self._votes.pop(group, None)
        self._votes[group] = _Vote(address, now)
        while len(self._votes) > self.max_groups:
            self._votes.popitem(last=False)
        return self.believed_set(now) != before

    def expire(self, now: float) -> bool:
        """Drop votes older than the window; returns whether the believed set changed."""
        before = self.believed_set(now, expire=False)
        self._expire(now)
        return self.believed_set(now) != before

    def _expire(self, now: float) -> None:
        # Votes are kept in arrival order, so the stale ones are at the front.
        while self._votes:
            group, vote = next(iter(self._votes.items()))
            if now - vote.at < self.window_s:
                break
            del self._votes[group]

    def _tally(self, now: float, *, expire: bool = True) -> Counter[Address]:
        if expire:
            self._expire(now)
        return Counter(vote.address for vote in self._votes.values())

    def believed(self, now: float) -> list[BelievedAddress]:
        """Addresses reported by at least ``min_agreeing_observers`` groups, most agreed first."""
        return [
            BelievedAddress(address, count)
            for address, count in self._tally(now).most_common()
            if count >= self.min_agreeing_observers
        ]

    def believed_set(self, now: float, *, expire: bool = True) -> frozenset[Address]:
        """Just the believed addresses."""
        tally = self._tally(now, expire=expire)
        return frozenset(a for a, n in tally.items() if n >= self.min_agreeing_observers)

    def candidates(self, now: float, *, limit: int = 4) -> list[Address]:
        """Addresses worth testing for reachability: the believed ones, else the most reported
        (at most ``limit``)."""
        believed = [b.address for b in self.believed(now)]
        if believed:
            return believed[:limit]
        return [address for address, _ in self._tally(now).most_common(limit)]

    def observer_count(self, now: float) -> int:
        """Groups with a live vote."""
        return sum(self._tally(now).values())

    def mapping_behaviour(self, now: float) -> MappingBehaviour:
        """How our NAT maps our one socket, as far as the votes show (RFC 4787 section 4.1).

        ``endpoint-independent``: an address is believed. ``endpoint-dependent``: enough groups
        agree on one IP but none on a port of it (each peer sees another port). Else
        ``unknown``."""
        tally = self._tally(now)
        if any(n >= self.min_agreeing_observers for n in tally.values()):
            return "endpoint-independent"
        by_ip: Counter[str] = Counter()
        ports: dict[str, set[int]] = {}
        for (host, port), n in tally.items():
            by_ip[host] += n
            ports.setdefault(host, set()).add(port)
        for host, n in by_ip.items():
            if n >= self.min_agreeing_observers and len(ports[host]) > 1:
                return "endpoint-dependent"
        return "unknown"

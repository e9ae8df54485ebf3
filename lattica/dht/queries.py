"""Lookup queries: what to ask, how to judge each answer, when to stop (sans-I/O).

A :class:`~lattica.dht.lookup.Lookup` decides *whom* to ask; a query decides *what* to ask
(:meth:`Query.request`), what an answer is worth (:meth:`Query.on_reply`: the closer peers it
names and the validated value it carries, if any) and when the lookup may stop early
(:meth:`Query.satisfied`). Each query keeps its own findings, so concurrent calls never share
state. Times passed in are unix seconds (record expiry).

Invariants: nothing reaches a query's findings before it validated (signature, key, expiry);
an invalid record is dropped (and logged), the rest of that answer still counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from lattica.dht.errors import InvalidRecordError
from lattica.dht.keys import provider_key
from lattica.dht.messages import (
    FindNode,
    GetProviders,
    GetValue,
    Nodes,
    PeerInfo,
    Providers,
    Request,
    Response,
    Value,
)
from lattica.dht.records import ProviderRecord, SignedRecord, validate_provider_record, validate_record
from lattica.dht.responder import CLOCK_SKEW_ALLOWANCE_S
from lattica.identity import PeerId
from lattica.net.datagram import Address

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Response)
V = TypeVar("V")


@dataclass
class Outcome(Generic[V]):
    """What one answer contributed: the peers it names and a validated value, if any."""

    closer: list[PeerInfo]
    value: V | None = None


class Query(Generic[R, V]):
    """Base of the lookup queries: ``target`` (32-byte id) and the answer type ``expect``."""

    expect: type[R]

    def __init__(self, target: bytes) -> None:
        self.target = target

    def request(self, me: PeerInfo, client: bool) -> Request:
        """The request to send to each peer."""
        raise NotImplementedError

    def on_reply(self, peer: PeerId, reply: R, now: float) -> Outcome[V]:
        """Judge ``peer``'s answer (``now``: unix seconds)."""
        raise NotImplementedError

    def satisfied(self) -> bool:
        """True when the lookup may stop before it converges."""
        return False


class ClosestQuery(Query[Nodes, None]):
    """FIND_NODE: the k closest peers to ``target`` (put, provide, join, bucket refresh).

    ``stop_when()`` (optional) ends it early; the bucket fill stops once enough peers of the
    range have joined our table.
    """

    expect = Nodes

    def __init__(self, target: bytes, *, stop_when: Callable[[], bool] | None = None) -> None:
        super().__init__(target)
        self._stop_when = stop_when

    def request(self, me: PeerInfo, client: bool) -> Request:
        """A :class:`FindNode` for the target."""
        return FindNode(sender=me, client=client, target=self.target)

    def on_reply(self, peer: PeerId, reply: Nodes, now: float) -> Outcome[None]:
        """Only the closer peers count."""
        return Outcome(reply.closer)

    def satisfied(self) -> bool:
        """``stop_when()``, if given."""
        return self._stop_when is not None and self._stop_when()


class ValueQuery(Query[Value, SignedRecord]):
    """GET_VALUE for the record at ``dht_key``.

    ``found`` holds (peer, record) for every valid record seen (a local copy first, if given).
    :meth:`has_quorum` turns true at ``need`` records (the caller answers then); the lookup
    stops at ``max(need, value_count)`` so holders of older versions are still found and can
    be sent the newest (read repair).
    """

    expect = Value

    def __init__(
        self,
        dht_key: bytes,
        *,
        need: int,
        value_count: int,
        max_record_ttl_s: float,
        local: tuple[PeerId, SignedRecord] | None = None,
    ) -> None:
        super().__init__(dht_key)
        self.need = need
        self.value_count = value_count
        self._max_ttl_s = max_record_ttl_s + CLOCK_SKEW_ALLOWANCE_S
        self.found: list[tuple[PeerId, SignedRecord]] = [local] if local is not None else []

    def request(self, me: PeerInfo, client: bool) -> Request:
        """A :class:`GetValue` for the key."""
        return GetValue(sender=me, client=client, key=self.target)

    def on_reply(self, peer: PeerId, reply: Value, now: float) -> Outcome[SignedRecord]:
        """Keep the record if it validates under the key."""
        record = reply.record
        if record is not None:
            try:
                validate_record(record, now=now, max_ttl_s=self._max_ttl_s, expected_dht_key=self.target)
            except InvalidRecordError as exc:
                log.info("dropping invalid record from %s: %s", peer.short(), exc)
                record = None
            else:
                self.found.append((peer, record))
        return Outcome(reply.closer, record)

    def has_quorum(self) -> bool:
        """``need`` valid records are in."""
        return len(self.found) >= self.need

    def satisfied(self) -> bool:
        """``max(need, value_count)`` valid records are in."""
        return len(self.found) >= max(self.need, self.value_count)

    def newest(self) -> SignedRecord | None:
        """The newest valid record found, or None."""
        best: SignedRecord | None = None
        for _peer, record in self.found:
            if best is None or record.supersedes(best):
                best = record
        return best

    def outdated(self) -> list[PeerId]:
        """Peers that returned an older version than :meth:`newest` (to be sent the newest)."""
        best = self.newest()
        if best is None:
            return []
        return list(dict.fromkeys(p for p, record in self.found if best.supersedes(record)))


class ProvidersQuery(Query[Providers, list[ProviderRecord]]):
    """GET_PROVIDERS for ``cid``: stops at ``count`` distinct providers (``local`` count too)."""

    expect = Providers

    def __init__(
        self, cid: bytes, *, count: int, provider_ttl_s: float, local: list[ProviderRecord] | None = None
    ) -> None:
        super().__init__(provider_key(cid))
        self.cid = cid
        self.count = count
        self._max_ttl_s = provider_ttl_s + CLOCK_SKEW_ALLOWANCE_S
        self.found: dict[bytes, ProviderRecord] = {r.provider: r for r in local or ()}

    def request(self, me: PeerInfo, client: bool) -> Request:
        """A :class:`GetProviders` for the cid's key."""
        return GetProviders(sender=me, client=client, key=self.target)

    def on_reply(self, peer: PeerId, reply: Providers, now: float) -> Outcome[list[ProviderRecord]]:
        """Keep every provider record that validates for this cid (the longest-lived per provider)."""
        valid = []
        for record in reply.providers:
            try:
                validate_provider_record(record, now=now, max_ttl_s=self._max_ttl_s, expected_dht_key=self.target)
            except InvalidRecordError as exc:
                log.info("dropping invalid provider record from %s: %s", peer.short(), exc)
                continue
            if record.cid != self.cid:
                continue
            held = self.found.get(record.provider)
            if held is None or record.expires_at > held.expires_at:
                self.found[record.provider] = record
            valid.append(record)
        return Outcome(reply.closer, valid or None)

    def satisfied(self) -> bool:
        """``count`` providers are known."""
        return len(self.found) >= self.count

    def result(self) -> list[ProviderRecord]:
        """Up to ``count`` provider records, longest-lived first."""
        return sorted(self.found.values(), key=lambda r: r.expires_at, reverse=True)[: self.count]


class PeerQuery(Query[Nodes, None]):
    """FIND_NODE for ``peer_id`` itself: stops as soon as someone (or the peer) says where it is."""

    expect = Nodes

    def __init__(self, peer_id: PeerId) -> None:
        super().__init__(peer_id.dht_key())
        self.peer_id = peer_id
        self.addresses: list[Address] | None = None

    def request(self, me: PeerInfo, client: bool) -> Request:
        """A :class:`FindNode` for the peer's id."""
        return FindNode(sender=me, client=client, target=self.target)

    def on_reply(self, peer: PeerId, reply: Nodes, now: float) -> Outcome[None]:
        """Note the peer's addresses when the answer is from it or names it."""
        if peer == self.peer_id:
            self.addresses = reply.sender.address_list()
        for info in reply.closer:
            if info.peer_id == self.peer_id.key and self.addresses is None:
                self.addresses = info.address_list()
        return Outcome(reply.closer)

    def satisfied(self) -> bool:
        """The addresses are known."""
        return self.addresses is not None

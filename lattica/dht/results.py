"""What each DHT call returns: its own result and the statistics of its own lookup.

Every call gets its own result object, so calls that overlap never read each other's figures
(the service used to publish them through one shared ``last_lookup_stats`` attribute).
``stats`` is None when the call was answered without a lookup (local store, routing table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lattica.dht.errors import InvalidRecordError, QuorumError
from lattica.dht.lookup import LookupStats
from lattica.dht.messages import MAX_CLOSER_PEERS, Ack
from lattica.dht.records import MAX_SEQ, ProviderRecord, SignedRecord, check_record_signature
from lattica.net.datagram import Address


@dataclass(frozen=True)
class PutResult:
    """``put``/``provide``: how many remote nodes stored it, of how many asked."""

    acks: int
    asked: int
    stats: LookupStats | None
    """The lookup for the closest nodes."""


@dataclass(frozen=True)
class GetResult:
    """``get``: the newest valid record of the first ``quorum`` found (None: none found)."""

    record: SignedRecord | None
    stats: LookupStats | None
    """The lookup as of the answer (it may go on in the background), or None when answered
    from the local store."""
    copies: int = 0
    """Valid copies (a local one included) compared when answering; below the ``quorum`` asked
    for when the lookup ended before finding that many."""


@dataclass(frozen=True)
class ProvidersResult:
    """``find_providers``: valid provider records, longest-lived first."""

    providers: list[ProviderRecord]
    stats: LookupStats | None


@dataclass(frozen=True)
class PeerResult:
    """``find_peer``: where the peer can be dialled (None: nobody on the path knew it)."""

    addresses: list[Address] | None
    stats: LookupStats | None


@dataclass
class Replication:
    """What the nodes sent a record (or provider record) answered, as it comes in."""

    asked: int
    acks: int = 0
    stale: int = 0
    refused: int = 0
    unreachable: int = 0
    lookup_failures: int = 0
    """Peers that did not answer the lookup for where to store it."""
    reasons: list[str] = field(default_factory=list)
    held: list[SignedRecord] = field(default_factory=list)
    """Records quoted by stale refusals (unverified)."""

    def count(self, ack: Ack) -> None:
        """Count one answer."""
        if ack.stored:
            self.acks += 1
        elif ack.reason.startswith("stale"):
            self.stale += 1
            if ack.held is not None and len(self.held) < MAX_CLOSER_PEERS:
                self.held.append(ack.held)
        else:
            self.refused += 1
            if len(self.reasons) < 3 and ack.reason[:80] not in self.reasons:
                self.reasons.append(ack.reason[:80])

    def newest_held_seq(self, record: SignedRecord) -> int | None:
        """The highest sequence number among genuine versions of ``record`` (same writer and
        key, validly signed) that refusals quoted, if one is at least ``record.seq``."""
        best: int | None = None
        for held in self.held:
            try:
                check_record_signature(held, expected_dht_key=record.dht_key)
            except InvalidRecordError:
                continue
            if record.seq <= held.seq < MAX_SEQ and (best is None or held.seq > best):
                best = held.seq
        return best

    def error(self, operation: str, quorum: int) -> QuorumError:
        """The :class:`QuorumError` saying why fewer than ``quorum`` acknowledged."""
        return QuorumError(
            operation,
            self.acks,
            quorum,
            asked=self.asked,
            stale=self.stale,
            refused=self.refused,
            unreachable=self.unreachable + self.lookup_failures,
            reasons=tuple(self.reasons),
        )

"""Errors raised by the DHT, each saying whose fault it is (see STYLE.md)."""

from __future__ import annotations

from lattica.errors import LatticaError, LocalProtocolError, RemoteProtocolError


class InvalidRecordError(RemoteProtocolError):
    """A record or provider record is malformed, forged, expired or otherwise not acceptable.

    Raised by validation of anything that came from the network; such a record is never stored
    and never forwarded.
    """


class StaleRecordError(InvalidRecordError):
    """A record is older (lower sequence number, or same sequence and earlier expiry) than the
    one already held for the same key."""


class RecordTooLargeError(LocalProtocolError, ValueError):
    """A value or key given to ``put`` exceeds the protocol limit; nothing was stored or sent."""


class StoreFullError(LatticaError):
    """The local store is at its size cap and nothing farther from our id can be evicted."""


class WriterQuotaError(StoreFullError):
    """One writer's records and provider records here would pass its per-writer byte quota
    (``dht.max_store_bytes_per_writer``); nothing was stored."""


class QuorumError(LatticaError):
    """Fewer nodes than the quorum acknowledged a ``put`` or ``provide``.

    ``acks`` is how many did and ``quorum`` how many were required; ``asked`` how many nodes
    were sent the record (None: not counted), ``stale`` how many refused it as older than the
    version they hold, ``refused`` how many refused it for another reason (``reasons``: a few
    of them) and ``unreachable`` how many did not answer (the record or the lookup that looked
    for where to store it). The message says which it was.
    """

    def __init__(
        self,
        operation: str,
        acks: int,
        quorum: int,
        *,
        asked: int | None = None,
        stale: int = 0,
        refused: int = 0,
        unreachable: int = 0,
        reasons: tuple[str, ...] = (),
    ) -> None:
        head = f"{operation}: only {acks} node(s) acknowledged, {quorum} required"
        if asked is None:
            text = f"{head}; check that the node is bootstrapped (`lattica dht routing`)"
        elif asked == 0 and not unreachable:
            text = (
                f"{head}: no DHT peer was found to send it to; "
                "check that the node is bootstrapped (`lattica dht routing`)"
            )
        else:
            parts = [head]
            if stale:
                parts.append(f"{stale} hold a newer version of this record (check this node's clock)")
            if refused:
                why = f" ({'; '.join(reasons)})" if reasons else ""
                parts.append(f"{refused} refused it{why}")
            if unreachable:
                parts.append(f"{unreachable} did not answer (check connectivity and `lattica dht routing`)")
            text = "; ".join(parts)
        super().__init__(text)
        self.acks = acks
        self.quorum = quorum
        self.asked = asked
        self.stale = stale
        self.refused = refused
        self.unreachable = unreachable


class BootstrapError(LatticaError):
    """No bootstrap peer other than this node itself answered, so the node could not join the DHT."""

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


class QuorumError(LatticaError):
    """Fewer nodes than the quorum acknowledged a ``put`` or ``provide``.

    ``acks`` is how many did and ``quorum`` how many were required.
    """

    def __init__(self, operation: str, acks: int, quorum: int) -> None:
        super().__init__(
            f"{operation}: only {acks} node(s) acknowledged, {quorum} required; "
            "check that the node is bootstrapped (`lattica dht routing`)"
        )
        self.acks = acks
        self.quorum = quorum


class BootstrapError(LatticaError):
    """No bootstrap peer other than this node itself answered, so the node could not join the DHT."""

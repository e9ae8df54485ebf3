"""Errors of the CRDT layer: what the caller did wrong, and why an envelope was refused.

A refusal is not an exception inside the replication path: :class:`Refused` values say why an
envelope from a peer was not applied (and so is never forwarded). The exceptions here are for
callers of the service API (``node.crdt``) and for decoders.
"""

from __future__ import annotations

from lattica.errors import LatticaError, MalformedMessageError


class CrdtError(LatticaError):
    """Base class of the errors :mod:`lattica.crdt` raises on purpose."""


class UnknownSpaceError(CrdtError, KeyError):
    """No space with that id (or local name) is held by this node."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown space"


class InvalidSpaceIdError(CrdtError, ValueError):
    """A space id (text or bytes) could not be parsed."""


class NotOwnerError(CrdtError):
    """Only the space's owner may change its writer list."""


class NotWriterError(CrdtError):
    """This node may not write to the space (never granted, or revoked)."""


class InvalidValueError(CrdtError, ValueError):
    """A value cannot be stored: not JSON-like (see :mod:`lattica.crdt.values`)."""


class UpdateTooLargeError(CrdtError):
    """An update exceeds ``crdt.max_update_bytes``."""


class RateLimitedError(CrdtError):
    """The writer exceeded ``crdt.max_updates_per_s`` for this space; try again shortly."""


class SpaceLimitError(CrdtError):
    """The node already holds ``crdt.max_spaces`` spaces, or a space is at its size limit."""


class JoinError(CrdtError):
    """No replica of the space could be found or reached to join it."""


class MalformedEnvelopeError(MalformedMessageError):
    """Bytes from a peer are not a valid envelope, genesis or sync message (a remote error)."""

"""The error vocabulary shared by every layer.

Errors say whose fault it is (see STYLE.md):

* :class:`LocalProtocolError` -- we were asked to do something the protocol forbids (a bug here).
* :class:`RemoteProtocolError` -- the peer sent something invalid; disconnect it, never crash.
* ``trio.ClosedResourceError`` -- we closed it; ``trio.BrokenResourceError`` -- the peer or the
  network broke it. Those two are trio's own and are raised as they are.
"""

from __future__ import annotations


class LatticaError(Exception):
    """Base class of every error Lattica raises on purpose."""


class LocalProtocolError(LatticaError):
    """We tried to do something the protocol forbids (a bug or misuse on this side)."""


class RemoteProtocolError(LatticaError):
    """The peer sent something the protocol forbids; the peer should be disconnected."""


class FrameTooLargeError(RemoteProtocolError):
    """A frame announced a length above the decoder's limit."""


class UnsupportedVersionError(RemoteProtocolError):
    """A frame carried a wire version this node does not speak."""


class MalformedMessageError(RemoteProtocolError):
    """A frame's body is not a valid message of the expected type and shape."""


class TruncatedFrameError(RemoteProtocolError):
    """The byte stream ended in the middle of a frame."""


class InvalidPeerIdError(LatticaError, ValueError):
    """A peer id (text or bytes) could not be parsed."""


class InsecureKeyFileError(LatticaError):
    """An identity key file is readable by other users; refuse to use it."""


class PeerIdMismatchError(LatticaError):
    """The peer reached at an address proved a different identity than the one dialled."""


class ConnectError(LatticaError):
    """A connection could not be established (timeout, refused handshake, unreachable)."""


class ConnectTimeoutError(ConnectError):
    """A dial (or the name resolution before it) did not complete within its ``timeout_s``."""


class ConnectRefusedError(ConnectError):
    """Nothing accepted the connection at the peer's address (a TCP reset answered our SYN): the
    peer is down, restarting, or does not listen for that transport there."""


class DialSelfError(ConnectError):
    """A dial would reach (or reached) this node itself; it is refused (or closed)."""


class RpcError(LatticaError):
    """A remote procedure call failed; ``code`` says how (``timeout``, ``unknown-protocol``, ...)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


def leaf_exceptions(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside ``group`` and its nested groups that are not groups themselves,
    in order (what a trio nursery's failure is made of)."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves += leaf_exceptions(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return leaves

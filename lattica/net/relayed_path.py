"""Virtual paths: where a connection's datagrams go when they travel inside a relay circuit.

A :class:`~lattica.net.connection_state.ConnectionState` treats its path as an opaque hashable
object; a direct connection's path is a ``(host, port)`` tuple, a relayed connection's is a
:class:`RelayedPath`. The endpoint sends datagrams for a relayed path to the function the
circuit registered (:meth:`~lattica.net.endpoint.Endpoint.open_virtual_path`) and routes the
datagrams the circuit delivers (:meth:`~lattica.net.endpoint.Endpoint.receive_virtual`) by
connection id, exactly like datagrams from the socket.

Invariant: a path send function never blocks and never raises for a full circuit: it queues or
drops, as a UDP socket would. The endpoint's receive loop must not wait for a circuit's stream
(that stream's own acknowledgements arrive through the same receive loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lattica.identity import PeerId
from lattica.net.datagram import Address


@dataclass(frozen=True, slots=True)
class RelayedPath:
    """One relay circuit as a path: the relay that carries it and this node's number for it."""

    relay_peer_id: PeerId
    """The relay forwarding the circuit (it sees only ciphertext)."""
    relay_address: Address
    """The relay's network address (where the circuit's own connection goes)."""
    circuit_id: int
    """This node's local number for the circuit (unique per endpoint while it lives)."""


Path = Address | RelayedPath
"""Where a connection's datagrams go: a network address or a relay circuit."""

VirtualPathSend = Callable[[bytes], None]
"""Hands one datagram to a circuit; never blocks, drops when the circuit is full or gone."""

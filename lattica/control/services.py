"""Which services serve control methods: the one list a new service (content, NAT, CRDT) adds
its registration function to. The daemon builds its registry from here and never names a
service's methods itself."""

from __future__ import annotations

from collections.abc import Callable

from lattica.control.content_methods import register_content_methods
from lattica.control.crdt_methods import register_crdt_methods
from lattica.control.dht_methods import register_dht_methods
from lattica.control.nat_methods import register_nat_methods
from lattica.control.node_methods import register_node_methods
from lattica.control.registry import MethodRegistry
from lattica.control.relay_methods import register_relay_methods
from lattica.node import Node

ServiceRegistration = Callable[[MethodRegistry, Node], None]
"""Registers one service's methods for a running node."""

SERVICE_REGISTRATIONS: tuple[ServiceRegistration, ...] = (
    register_dht_methods,
    register_nat_methods,
    register_content_methods,
    register_crdt_methods,
    register_relay_methods,
)
"""Each service's registration function, besides the node's own methods."""


def build_registry(node: Node, *, warnings: list[str] | None = None) -> MethodRegistry:
    """Every control method ``node`` serves; ``warnings`` are shown by ``status``.

    Raises :class:`~lattica.errors.LocalProtocolError` when two services claim one name.
    """
    registry = MethodRegistry()
    register_node_methods(registry, node, warnings=warnings)
    for register in SERVICE_REGISTRATIONS:
        register(registry, node)
    return registry

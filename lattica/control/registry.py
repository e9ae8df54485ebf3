"""The methods a daemon serves: each service registers its own, with typed params.

A service adds ``registry.add("dht.get", GetParams, handler)``; the server decodes the request's
params into ``GetParams`` (unknown fields and wrong types are ``invalid-params`` errors before the
handler runs) and encodes whatever the handler returns (msgspec Structs, lists, plain data).
Adding a service's methods never needs an edit of the daemon or the server.

A streaming method (``registry.add_stream("state.watch", WatchParams, handler)``) returns a
:class:`Stream`: a first result, sent once the subscription is in place, and the items that
follow, each sent as its own reply line (see :mod:`lattica.control.messages`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lattica.errors import LocalProtocolError

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Stream:
    """What a streaming method's handler returns.

    ``started`` is the first reply (the subscription is in place: nothing after it is missed);
    ``items`` are the later replies, until it ends. The server closes ``items`` (``aclose()``,
    when it has one) when the client goes away, so a subscription never outlives its reader.
    """

    started: object
    items: AsyncIterator[object]


@dataclass(frozen=True, slots=True)
class Method(Generic[P]):
    """One registered method: its name, params type and handler; ``streaming`` handlers return
    a :class:`Stream`."""

    name: str
    params_type: type[P]
    handler: Callable[[P], Awaitable[object]]
    streaming: bool = False


class MethodRegistry:
    """Name -> :class:`Method`; names are unique (``service.verb``, e.g. ``dht.put``)."""

    def __init__(self) -> None:
        self._methods: dict[str, Method[Any]] = {}

    def add(self, name: str, params_type: type[P], handler: Callable[[P], Awaitable[object]]) -> None:
        """Register ``handler`` under ``name``; raises :class:`LocalProtocolError` if taken."""
        if name in self._methods:
            raise LocalProtocolError(f"control method {name!r} is registered twice")
        self._methods[name] = Method(name, params_type, handler)

    def add_stream(self, name: str, params_type: type[P], handler: Callable[[P], Awaitable[Stream]]) -> None:
        """Register a streaming method; raises :class:`LocalProtocolError` if the name is taken."""
        if name in self._methods:
            raise LocalProtocolError(f"control method {name!r} is registered twice")
        self._methods[name] = Method(name, params_type, handler, streaming=True)

    def get(self, name: str) -> Method[Any] | None:
        """The method called ``name``, or None."""
        return self._methods.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._methods))

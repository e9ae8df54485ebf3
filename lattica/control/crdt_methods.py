"""Replicated spaces' control methods (``lattica state ...``): ``state.create``, ``state.grant``,
``state.revoke``, ``state.set``, ``state.get``, ``state.watch`` (streaming), ``state.join``,
``state.ls``.

Registered by the daemon through :func:`register_crdt_methods`; only the public API of
``node.crdt`` (:class:`~lattica.crdt.CrdtService`) is used. ``space`` in every method is the
space id (52 lowercase base32 characters) or the local name of a space held here.

Values cross the socket as JSON and follow :mod:`lattica.crdt.values`: what ``state.set`` stored
comes back from ``state.get`` and ``state.watch`` as it was given (``2`` stays ``2`` although
pycrdt holds it as ``2.0``); bytes written through the Python API come back as base64 text, the
one form JSON has for them. Errors of the CRDT layer map to control codes in one place,
:func:`_control_error`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import msgspec
import trio

from lattica.control.errors import (
    BUSY,
    FAILED,
    FORBIDDEN,
    INVALID_PARAMS,
    NOT_FOUND,
    OVERFLOW,
    TOO_LARGE,
    ControlError,
)
from lattica.control.limits import MAX_SPACE_NAME_CHARS, MAX_SPACE_REF_CHARS, MAX_SPACE_WRITERS, MAX_STATE_KEY_BYTES
from lattica.control.messages import NoParams
from lattica.control.registry import MethodRegistry, Stream
from lattica.crdt import (
    Change,
    InvalidSpaceIdError,
    InvalidValueError,
    JoinError,
    NotOwnerError,
    NotWriterError,
    RateLimitedError,
    SpaceInfo,
    SpaceLimitError,
    UnknownSpaceError,
    UpdateTooLargeError,
)
from lattica.errors import InvalidPeerIdError
from lattica.identity import PeerId
from lattica.node import Node

SpaceRef = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SPACE_REF_CHARS)]
SpaceName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SPACE_NAME_CHARS)]
StateKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STATE_KEY_BYTES)]
PeerIdText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

_LS_HINT = "`lattica state ls` lists the spaces held here; `lattica state join SPACE_ID` replicates one"


class CreateParams(msgspec.Struct, forbid_unknown_fields=True):
    """``state.create``: a space owned by this node, called ``name`` here, with ``writers``
    granted besides the owner."""

    name: SpaceName
    writers: Annotated[list[PeerIdText], msgspec.Meta(max_length=MAX_SPACE_WRITERS)] = []


class AccessParams(msgspec.Struct, forbid_unknown_fields=True):
    """``state.grant`` / ``state.revoke``: let ``peer`` write to ``space``, or stop it."""

    space: SpaceRef
    peer: PeerIdText


class SetParams(msgspec.Struct, forbid_unknown_fields=True):
    """``state.set``: store ``value`` (any JSON) at ``key`` of ``space``."""

    space: SpaceRef
    key: StateKey
    value: Any


class GetParams(msgspec.Struct, forbid_unknown_fields=True):
    """``state.get``: the value at ``key``, or every key when ``key`` is None."""

    space: SpaceRef
    key: StateKey | None = None


class WatchParams(msgspec.Struct, forbid_unknown_fields=True):
    """``state.watch``: stream every later change of ``space``."""

    space: SpaceRef


class JoinParams(msgspec.Struct, forbid_unknown_fields=True):
    """``state.join``: replicate the space ``space_id`` from its replicas (found in the DHT;
    ``peers``, if given, are asked first)."""

    space_id: SpaceRef
    peers: Annotated[list[PeerIdText], msgspec.Meta(max_length=MAX_SPACE_WRITERS)] = []


class SpaceResult(msgspec.Struct):
    """One space as ``state.create``/``join``/``grant``/``revoke``/``ls`` report it."""

    space_id: str
    name: str
    owner: str
    writers: list[str]
    size_bytes: int
    replicas_seen: int
    can_write: bool


class WriteResultOut(msgspec.Struct):
    """``state.set``: the write is durable (in this node's log, COMMIT returned) and applied."""

    space_id: str
    key: str
    author: str
    seq: int
    update_bytes: int
    durable: bool = True


class ValueResult(msgspec.Struct):
    """``state.get`` with a key."""

    space_id: str
    key: str
    value: Any


class ValuesResult(msgspec.Struct):
    """``state.get`` without a key: every key of the space."""

    space_id: str
    values: dict[str, Any]


class WatchStarted(msgspec.Struct):
    """``state.watch``'s first line: every change after it is streamed."""

    space_id: str
    name: str
    watching: bool = True


class ChangeResult(msgspec.Struct):
    """``state.watch``: one key changed. ``author``/``seq`` name the signed update that did it
    (None when a revoke removed a writer's later updates); ``deleted`` keys have value None."""

    space_id: str
    key: str
    value: Any
    author: str | None
    seq: int | None
    deleted: bool


def space_result(info: SpaceInfo) -> SpaceResult:
    """A :class:`~lattica.crdt.SpaceInfo` in the control API's plain form."""
    return SpaceResult(
        space_id=str(info.space_id),
        name=info.name,
        owner=str(info.owner),
        writers=[str(w) for w in info.writers],
        size_bytes=info.size_bytes,
        replicas_seen=info.replicas_seen,
        can_write=info.can_write,
    )


def change_result(space_id: str, change: Change) -> ChangeResult:
    """A :class:`~lattica.crdt.Change` as ``state.watch`` streams it."""
    return ChangeResult(
        space_id=space_id,
        key=change.key,
        value=change.value,
        author=None if change.author is None else str(change.author),
        seq=change.seq,
        deleted=change.deleted,
    )


@contextmanager
def _control_error(space: str | None = None) -> Iterator[None]:
    """Turn the CRDT layer's errors into the control API's codes (the one mapping)."""
    what = f"space {space!r}" if space is not None else "the space"
    try:
        yield
    except ControlError:
        raise
    except UnknownSpaceError as exc:
        raise ControlError(NOT_FOUND, str(exc), hint=_LS_HINT) from None
    except (InvalidSpaceIdError, InvalidPeerIdError, InvalidValueError) as exc:
        raise ControlError(INVALID_PARAMS, str(exc)) from None
    except UpdateTooLargeError as exc:
        raise ControlError(TOO_LARGE, str(exc), hint="split the value over several keys") from None
    except NotOwnerError as exc:
        raise ControlError(
            FORBIDDEN, str(exc), hint="only the node that created the space grants and revokes"
        ) from None
    except NotWriterError as exc:
        raise ControlError(
            FORBIDDEN, str(exc), hint=f"ask the owner of {what} to run `lattica state grant SPACE PEERID`"
        ) from None
    except RateLimitedError as exc:
        raise ControlError(BUSY, str(exc), hint="raise crdt.max_updates_per_s in config.toml") from None
    except SpaceLimitError as exc:
        raise ControlError(
            FAILED, str(exc), hint="raise crdt.max_spaces / crdt.max_space_bytes in config.toml"
        ) from None
    except JoinError as exc:
        raise ControlError(
            FAILED, str(exc), hint="a node holding the space must be running and reachable (give it with --peer)"
        ) from None


def _peer_id(text: str, field: str) -> PeerId:
    try:
        return PeerId.parse(text)
    except InvalidPeerIdError as exc:
        raise ControlError(INVALID_PARAMS, f"{field}: {exc}") from None


def register_crdt_methods(registry: MethodRegistry, node: Node) -> None:
    """Register the ``state.*`` methods for ``node``'s replicated spaces."""
    crdt = node.crdt

    async def create(params: CreateParams) -> SpaceResult:
        writers = [_peer_id(w, "writers") for w in params.writers]
        with _control_error():
            try:
                return space_result(await crdt.create_space(params.name, writers))
            except ValueError as exc:  # a bad name (make_genesis)
                raise ControlError(INVALID_PARAMS, f"name: {exc}") from None

    def access(change: Callable[[str, PeerId], Any]) -> Callable[[AccessParams], Any]:
        async def handler(params: AccessParams) -> SpaceResult:
            peer = _peer_id(params.peer, "peer")
            with _control_error(params.space):
                await change(params.space, peer)
                return space_result(crdt.info(params.space))

        return handler

    async def set_value(params: SetParams) -> WriteResultOut:
        with _control_error(params.space):
            written = await crdt.set(params.space, params.key, params.value)
        return WriteResultOut(
            space_id=str(written.space_id),
            key=written.key,
            author=str(written.author),
            seq=written.seq,
            update_bytes=written.update_bytes,
        )

    async def get(params: GetParams) -> ValueResult | ValuesResult:
        with _control_error(params.space):
            space_id = str(crdt.resolve(params.space))
            if params.key is None:
                return ValuesResult(space_id=space_id, values=crdt.get(params.space))
            try:
                return ValueResult(space_id=space_id, key=params.key, value=crdt.get(params.space, params.key))
            except UnknownSpaceError:
                raise
            except KeyError:
                raise ControlError(NOT_FOUND, f"no key {params.key!r} in space {params.space!r}") from None

    async def watch(params: WatchParams) -> Stream:
        with _control_error(params.space):
            space_id = crdt.resolve(params.space)
            info = crdt.info(space_id)
            channel = crdt.changes(space_id)
        return Stream(WatchStarted(space_id=str(space_id), name=info.name), _changes(str(space_id), channel))

    async def join(params: JoinParams) -> SpaceResult:
        peers = [_peer_id(p, "peers") for p in params.peers]
        with _control_error(params.space_id):
            return space_result(await crdt.join_space(params.space_id, peers=peers))

    async def ls(_: NoParams) -> list[SpaceResult]:
        return [space_result(info) for info in crdt.spaces()]

    registry.add("state.create", CreateParams, create)
    registry.add("state.grant", AccessParams, access(crdt.grant))
    registry.add("state.revoke", AccessParams, access(crdt.revoke))
    registry.add("state.set", SetParams, set_value)
    registry.add("state.get", GetParams, get)
    registry.add_stream("state.watch", WatchParams, watch)
    registry.add("state.join", JoinParams, join)
    registry.add("state.ls", NoParams, ls)


async def _changes(space_id: str, channel: trio.MemoryReceiveChannel[Change]) -> AsyncIterator[object]:
    """The space's changes as ``state.watch`` items; the service's channel is closed with the
    stream (the server closes this generator when the client goes away)."""
    async with channel:
        async for change in channel:
            yield change_result(space_id, change)
    # The service ends a subscriber's channel only when it fell too far behind (or the node
    # is stopping): either way the watcher missed changes and must be told.
    raise ControlError(
        OVERFLOW,
        "the space's change feed ended: this watcher fell behind or the node is stopping",
        hint="watch again (changes in between were missed; `lattica state get SPACE` shows the state)",
    )

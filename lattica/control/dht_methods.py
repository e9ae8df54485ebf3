"""The DHT's control methods (``lattica dht ...``): ``dht.put``, ``dht.get``, ``dht.provide``,
``dht.providers``, ``dht.routing``, ``dht.bootstrap``.

Registered by the daemon through :func:`register_dht_methods`; only :class:`~lattica.dht.Dht`'s
public methods and the node's store are used. Values cross the control socket as UTF-8 text when
they decode as such, else as base64 with ``"encoding": "base64"`` -- the CLI never has to guess.
Limits come from :mod:`lattica.control.limits`, the same module the CLI checks them with.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated, Literal

import msgspec

from lattica.control.errors import FAILED, INVALID_PARAMS, NOT_FOUND, TOO_LARGE, ControlError
from lattica.control.limits import (
    MAX_BOOTSTRAP_PEERS,
    MAX_CID_BYTES,
    MAX_DIAL_STRING_CHARS,
    MAX_KEY_BYTES,
    MAX_PROVIDERS,
    MAX_QUORUM,
    MAX_RECORD_TTL_S,
    MAX_VALUE_BYTES,
    MIN_RECORD_TTL_S,
)
from lattica.control.messages import NoParams
from lattica.control.node_methods import parse_peer_addr
from lattica.control.registry import MethodRegistry
from lattica.dht import BootstrapError, QuorumError, RecordTooLargeError, SignedRecord, record_key
from lattica.errors import InvalidPeerIdError
from lattica.identity import PeerId
from lattica.net.address import format_host_port
from lattica.node import Node

Encoding = Literal["utf-8", "base64"]
# Characters bound the JSON size; UTF-8 byte limits are checked after decoding (one character
# can be four bytes).
KeyText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_BYTES)]
CidText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CID_BYTES)]
ValueText = Annotated[str, msgspec.Meta(max_length=2 * MAX_VALUE_BYTES)]
PeerIdText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
DialString = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DIAL_STRING_CHARS)]


class PutParams(msgspec.Struct, forbid_unknown_fields=True):
    """``dht.put``: a record in this node's namespace."""

    key: KeyText
    value: ValueText
    encoding: Encoding = "utf-8"
    ttl_s: Annotated[float, msgspec.Meta(ge=MIN_RECORD_TTL_S, le=MAX_RECORD_TTL_S)] | None = None


class PutResult(msgspec.Struct):
    """``dht.put``: how many replicas acknowledged, and the record's sequence number."""

    key: str
    acks: int
    seq: int | None


class GetParams(msgspec.Struct, forbid_unknown_fields=True):
    """``dht.get``: the newest record ``peer`` (default: this node) wrote under ``key``."""

    key: KeyText
    peer: PeerIdText | None = None
    local: bool = False
    quorum: Annotated[int, msgspec.Meta(ge=1, le=MAX_QUORUM)] | None = None


class RecordResult(msgspec.Struct):
    """``dht.get``: one record as the CLI shows it.

    ``copies_found`` is how many valid copies the lookup compared (None for ``--local``).
    """

    key: str
    value: str
    encoding: Encoding
    writer: str
    seq: int
    expires_at: int
    copies_found: int | None = None


class CidParams(msgspec.Struct, forbid_unknown_fields=True):
    """``dht.provide``: a content id this node serves."""

    cid: CidText


class ProvideResult(msgspec.Struct):
    """``dht.provide``: how many nodes stored the provider record."""

    cid: str
    acks: int


class ProvidersParams(msgspec.Struct, forbid_unknown_fields=True):
    """``dht.providers``: up to ``count`` providers of ``cid``."""

    cid: CidText
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_PROVIDERS)] = 20


class ProviderRow(msgspec.Struct):
    """``dht.providers``: one provider and where to dial it."""

    peer_id: str
    addrs: list[str]
    expires_at: int


class RoutingPeer(msgspec.Struct):
    """``dht.routing``: one peer of a bucket."""

    peer_id: str
    addrs: list[str]
    last_seen_s_ago: float


class RoutingBucket(msgspec.Struct):
    """``dht.routing``: one non-empty bucket."""

    index: int
    peers: list[RoutingPeer]


class RoutingResult(msgspec.Struct):
    """``dht.routing``: the routing table."""

    buckets: list[RoutingBucket]


class BootstrapParams(msgspec.Struct, forbid_unknown_fields=True):
    """``dht.bootstrap``: peers to join through (empty: the configured ones)."""

    peers: Annotated[list[DialString], msgspec.Meta(max_length=MAX_BOOTSTRAP_PEERS)] = []


class BootstrapResult(msgspec.Struct):
    """``dht.bootstrap``: how many peers answered and how many the routing table now holds."""

    answered: int
    peers: int


def _utf8(text: str, name: str, max_bytes: int) -> bytes:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ControlError(INVALID_PARAMS, f"{name} is not valid UTF-8 text") from None
    if len(data) > max_bytes:
        raise ControlError(TOO_LARGE, f"{name} is {len(data)} bytes; the limit is {max_bytes} bytes")
    return data


def _value_bytes(params: PutParams) -> bytes:
    if params.encoding == "base64":
        try:
            value = base64.b64decode(params.value, validate=True)
        except (binascii.Error, ValueError):
            raise ControlError(INVALID_PARAMS, "value is not valid base64") from None
    else:
        value = _utf8(params.value, "value", MAX_VALUE_BYTES)
    if len(value) > MAX_VALUE_BYTES:
        raise ControlError(
            TOO_LARGE,
            f"value is {len(value)} bytes; the DHT limit is {MAX_VALUE_BYTES} bytes",
            hint="publish large data as content and put its id in the DHT",
        )
    return value


def _writer(text: str | None) -> PeerId | None:
    if text is None:
        return None
    try:
        return PeerId.parse(text)
    except InvalidPeerIdError as exc:
        raise ControlError(INVALID_PARAMS, f"peer: {exc}") from None


def record_result(record: SignedRecord) -> RecordResult:
    """A record as the CLI shows it: UTF-8 text when it decodes as such, else base64."""
    encoding: Encoding
    try:
        value, encoding = record.value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        value, encoding = base64.b64encode(record.value).decode("ascii"), "base64"
    return RecordResult(
        key=record.key.decode("utf-8", errors="replace"),
        value=value,
        encoding=encoding,
        writer=str(record.writer_id),
        seq=record.seq,
        expires_at=record.expires_at,
    )


def register_dht_methods(registry: MethodRegistry, node: Node) -> None:
    """Register the ``dht.*`` methods of ``node``'s DHT on ``registry``."""
    dht = node.dht

    async def put(params: PutParams) -> PutResult:
        key = _utf8(params.key, "key", MAX_KEY_BYTES)
        value = _value_bytes(params)
        try:
            acks = (await dht.put(key, value, params.ttl_s)).acks
        except QuorumError as exc:  # its message already says to check the bootstrap
            raise ControlError(FAILED, str(exc)) from None
        except RecordTooLargeError as exc:
            raise ControlError(TOO_LARGE, str(exc)) from None
        stored = node.dht_store.get_record(record_key(node.peer_id, key), now=time.time())
        return PutResult(key=params.key, acks=acks, seq=stored.seq if stored else None)

    async def get(params: GetParams) -> RecordResult:
        key = _utf8(params.key, "key", MAX_KEY_BYTES)
        writer = _writer(params.peer) or node.peer_id
        copies: int | None = None
        if params.local:
            record = node.dht_store.get_record(record_key(writer, key), now=time.time())
        else:
            found = await dht.get(key, writer, quorum=params.quorum)
            record, copies = found.record, found.copies
        if record is None:
            where = "in this node's store" if params.local else "in the DHT"
            hint = None
            if params.peer is None:
                hint = (
                    "records live in their writer's namespace; this looked for one written by this "
                    "node. To read another node's record add --peer WRITER_PEER_ID"
                )
            raise ControlError(NOT_FOUND, f"not found {where}: {params.key!r}", hint=hint)
        if params.quorum is not None and copies is not None and copies < params.quorum:
            raise ControlError(
                FAILED,
                f"found {copies} cop{'y' if copies == 1 else 'ies'} of {params.key!r}, fewer than the "
                f"{params.quorum} asked for (newest: seq {record.seq})",
                hint="lower --quorum, or check how many nodes hold the record (lattica dht routing)",
            )
        result = record_result(record)
        result.copies_found = copies
        return result

    async def provide(params: CidParams) -> ProvideResult:
        cid = _utf8(params.cid, "cid", MAX_CID_BYTES)
        try:
            acks = (await dht.provide(cid)).acks
        except QuorumError as exc:
            raise ControlError(FAILED, str(exc)) from None
        return ProvideResult(cid=params.cid, acks=acks)

    async def providers(params: ProvidersParams) -> list[ProviderRow]:
        found = (await dht.find_providers(_utf8(params.cid, "cid", MAX_CID_BYTES), params.count)).providers
        if not found:
            raise ControlError(NOT_FOUND, f"no providers found for {params.cid}")
        return [
            ProviderRow(
                peer_id=str(record.provider_id),
                addrs=[f"{record.provider_id}@{format_host_port(a)}" for a in record.address_list()],
                expires_at=record.expires_at,
            )
            for record in found
        ]

    async def routing(_: NoParams) -> RoutingResult:
        now = time.time()
        buckets: dict[int, list[RoutingPeer]] = {}
        for entry in dht.routing_table_snapshot():
            buckets.setdefault(entry.bucket, []).append(
                RoutingPeer(
                    peer_id=str(entry.peer_id),
                    addrs=[format_host_port(a) for a in entry.addresses],
                    last_seen_s_ago=round(max(0.0, now - entry.last_seen), 1),
                )
            )
        return RoutingResult(buckets=[RoutingBucket(index, peers) for index, peers in sorted(buckets.items())])

    async def bootstrap(params: BootstrapParams) -> BootstrapResult:
        addrs = [parse_peer_addr(p, field="peers") for p in params.peers]
        try:
            answered = await dht.bootstrap(addrs or None)
        except BootstrapError as exc:
            raise ControlError(FAILED, str(exc)) from None  # its message already says what to check
        return BootstrapResult(answered=answered, peers=len(dht.routing_table))

    registry.add("dht.put", PutParams, put)
    registry.add("dht.get", GetParams, get)
    registry.add("dht.provide", CidParams, provide)
    registry.add("dht.providers", ProvidersParams, providers)
    registry.add("dht.routing", NoParams, routing)
    registry.add("dht.bootstrap", BootstrapParams, bootstrap)

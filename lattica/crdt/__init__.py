"""Replicated spaces: signed, access-controlled pycrdt documents with delta sync (issue 10).

Service API (``node.crdt``, :class:`CrdtService`)::

    await crdt.create_space(name, writers=()) -> SpaceInfo
    await crdt.join_space(space_id, *, peers=()) -> SpaceInfo     # replicas via DHT, then sync
    await crdt.grant(space, peer_id) / await crdt.revoke(space, peer_id)   # owner only
    await crdt.set(space, key, value) -> WriteResult              # after the log COMMIT
    await crdt.delete(space, key) -> WriteResult
    crdt.get(space, key=None) -> value | dict                      # values rule: lattica.crdt.values
    crdt.spaces() -> list[SpaceInfo];  crdt.info(space) -> SpaceInfo
    crdt.resolve(space_ref) -> SpaceId                             # id text or local name
    crdt.changes(space) -> trio.MemoryReceiveChannel[Change]
    crdt.doc(space) -> pycrdt.Doc;  await crdt.wait_change(space)
    await crdt.sync_now(space) -> int

``space`` everywhere is a :class:`SpaceId` or its text, or the space's local name. Space ids
print as 52 lowercase base32 characters (like peer ids). Layers: :mod:`~lattica.crdt.envelope`
(signed unit), :mod:`~lattica.crdt.space_id` (genesis), :mod:`~lattica.crdt.access` (writers),
:mod:`~lattica.crdt.replica` (sans-I/O state), :mod:`~lattica.crdt.sync` (wire messages),
:mod:`~lattica.crdt.store` (sqlite log), :mod:`~lattica.crdt.service` (trio driver).
"""

from lattica.crdt.access import AccessList, yrs_client_id
from lattica.crdt.config import CrdtConfig
from lattica.crdt.envelope import Envelope, EnvelopeKind, decode_envelope, encode_envelope, sign_envelope
from lattica.crdt.errors import (
    CrdtError,
    InvalidSpaceIdError,
    InvalidValueError,
    JoinError,
    MalformedEnvelopeError,
    NotOwnerError,
    NotWriterError,
    RateLimitedError,
    SpaceLimitError,
    UnknownSpaceError,
    UpdateTooLargeError,
)
from lattica.crdt.replica import REFUSAL_REASONS, ROOT_MAP, Change, Refused, SpaceReplica
from lattica.crdt.service import CrdtService, CrdtStats, SpaceInfo, WriteResult, space_cid
from lattica.crdt.space_id import Genesis, SpaceId, make_genesis
from lattica.crdt.store import SpaceStore
from lattica.crdt.values import check_value, to_plain

__all__ = [
    "REFUSAL_REASONS",
    "ROOT_MAP",
    "AccessList",
    "Change",
    "CrdtConfig",
    "CrdtError",
    "CrdtService",
    "CrdtStats",
    "Envelope",
    "EnvelopeKind",
    "Genesis",
    "InvalidSpaceIdError",
    "InvalidValueError",
    "JoinError",
    "MalformedEnvelopeError",
    "NotOwnerError",
    "NotWriterError",
    "RateLimitedError",
    "Refused",
    "SpaceId",
    "SpaceInfo",
    "SpaceLimitError",
    "SpaceReplica",
    "SpaceStore",
    "UnknownSpaceError",
    "UpdateTooLargeError",
    "WriteResult",
    "check_value",
    "decode_envelope",
    "encode_envelope",
    "make_genesis",
    "sign_envelope",
    "space_cid",
    "to_plain",
    "yrs_client_id",
]

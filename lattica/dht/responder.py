"""Serving DHT requests, synchronously: a request and the time in, a reply (and a write) out.

:class:`Responder` decides what to answer; it reads the store and the routing table but never
writes anything and never touches the network or a clock. A request that offers a record
(``PutValue``, ``AddProvider``) yields the write to perform before the answer may be sent: the
caller (the trio service) performs it, and sends :attr:`Reply.response` once it committed, or
:meth:`Responder.write_failed` if the store refused it. So an acknowledgement always means
"stored".

Invariants:

* A record or provider record is offered for writing only after it validated (signature,
  key, expiry within ``max_ttl + CLOCK_SKEW_ALLOWANCE_S``) and, for a record, only when it is
  not older than the one held; a provider record only when announced by its provider.
* A refusal as stale quotes the record held (:class:`~lattica.dht.messages.Ack` ``held``).
* ``closer`` lists never include the requester.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lattica.dht.errors import InvalidRecordError, StaleRecordError, StoreFullError, WriterQuotaError
from lattica.dht.messages import (
    MAX_PROVIDERS,
    Ack,
    AddProvider,
    Error,
    FindNode,
    GetProviders,
    GetValue,
    Nodes,
    PeerInfo,
    Ping,
    Pong,
    Providers,
    PutValue,
    Request,
    Response,
    Value,
)
from lattica.dht.records import (
    ProviderRecord,
    SignedRecord,
    check_not_stale,
    validate_provider_record,
    validate_record,
)
from lattica.dht.routing import RoutingTable
from lattica.dht.store import DhtStore
from lattica.identity import PeerId
from lattica.net.datagram import Address
from lattica.storage import StorageError

CLOCK_SKEW_ALLOWANCE_S = 300.0
"""Records may expire this much later than the longest lifetime we accept (clocks differ)."""


@dataclass(frozen=True)
class StoreRecord:
    """Write ``record`` to the store (``own``: written by this node, never evicted)."""

    record: SignedRecord
    own: bool


@dataclass(frozen=True)
class StoreProvider:
    """Write provider ``record`` to the store."""

    record: ProviderRecord


Write = StoreRecord | StoreProvider


@dataclass(frozen=True)
class Reply:
    """What to answer: ``response``, sent after ``write`` (if any) was committed."""

    response: Response
    write: Write | None = None


class Responder:
    """Answers DHT requests for the node ``peer_id`` (see the module docstring).

    ``own_addresses()`` gives our dialable addresses for the ``sender`` field; ``client_mode``
    is announced in every answer; ``k`` bounds ``closer`` lists; ``max_record_ttl_s`` and
    ``provider_ttl_s`` are the longest lifetimes accepted.
    """

    def __init__(
        self,
        peer_id: PeerId,
        store: DhtStore,
        routing_table: RoutingTable,
        *,
        own_addresses: Callable[[], list[Address]],
        client_mode: bool,
        k: int,
        max_record_ttl_s: float,
        provider_ttl_s: float,
    ) -> None:
        self.peer_id = peer_id
        self._store = store
        self._table = routing_table
        self._own_addresses = own_addresses
        self._client = client_mode
        self._k = k
        self._max_record_ttl_s = max_record_ttl_s
        self._provider_ttl_s = provider_ttl_s

    def set_client_mode(self, client_mode: bool) -> None:
        """Say ``client`` (do not add us to your routing table) in every message from now on."""
        self._client = client_mode

    def me(self) -> PeerInfo:
        """This node as a message ``sender``."""
        return PeerInfo.of(self.peer_id, self._own_addresses())

    def handle(self, peer: PeerId, request: Request, now: float) -> Reply:
        """The answer to ``request`` from the authenticated ``peer`` at unix time ``now``."""
        me, client = self.me(), self._client
        match request:
            case Ping():
                return Reply(Pong(sender=me, client=client))
            case FindNode(target=target):
                return Reply(Nodes(sender=me, client=client, closer=self.closer(target, peer)))
            case GetValue(key=key):
                record = self._store.get_record(key, now=now)
                return Reply(Value(sender=me, client=client, record=record, closer=self.closer(key, peer)))
            case PutValue(record=record):
                return self._offer_record(record, now)
            case AddProvider(record=provider_record):
                return self._offer_provider(peer, provider_record, now)
            case GetProviders(key=key):
                providers = self._store.get_providers(key, now=now, limit=MAX_PROVIDERS)
                return Reply(Providers(sender=me, client=client, providers=providers, closer=self.closer(key, peer)))
        raise AssertionError(f"unhandled request {type(request).__name__}")  # pragma: no cover

    def error(self, code: str, reason: str) -> Error:
        """An :class:`Error` answer (``code``: ``malformed``, ``bad-sender``)."""
        return Error(sender=self.me(), client=self._client, code=code, reason=reason[:200])

    def write_failed(self, write: Write, error: Exception) -> Ack:
        """The refusal to send when the store refused ``write`` with ``error`` (a newer record
        arrived meanwhile, the store is full, or our storage failed)."""
        if isinstance(error, StaleRecordError) and isinstance(write, StoreRecord):
            return self._refuse_stale(write.record, error)
        if isinstance(error, WriterQuotaError):
            return self._ack(False, "writer over quota")
        if isinstance(error, StoreFullError):
            return self._ack(False, "store full")
        if isinstance(error, StorageError):
            # Our disk's trouble, not the writer's: the path and cause stay in our log.
            return self._ack(False, "storage error")
        return self._ack(False, f"invalid: {error}")

    def check_record(self, record: SignedRecord, now: float) -> Reply:
        """Validate an offered record (also our own read repair): refusal, or the write."""
        return self._offer_record(record, now)

    def closer(self, target: bytes, requester: PeerId) -> list[PeerInfo]:
        """Our ``k`` closest peers to ``target``, without ``requester``."""
        nodes = self._table.closest(target, self._k, exclude=(requester.dht_key(),))
        return [PeerInfo.of(n.peer_id, n.addresses) for n in nodes]

    # -- internals ---------------------------------------------------------------------------

    def _ack(self, stored: bool, reason: str = "", held: SignedRecord | None = None) -> Ack:
        return Ack(sender=self.me(), client=self._client, stored=stored, reason=reason[:200], held=held)

    def _refuse_stale(self, record: SignedRecord, error: StaleRecordError) -> Ack:
        held = self._store.get_record(record.dht_key, now=-math.inf)
        return self._ack(False, f"stale: {error}", held)

    def _offer_record(self, record: SignedRecord, now: float) -> Reply:
        try:
            validate_record(record, now=now, max_ttl_s=self._max_record_ttl_s + CLOCK_SKEW_ALLOWANCE_S)
            own = record.writer == self.peer_id.key
            newer = check_not_stale(record, self._store.get_record(record.dht_key, now=-math.inf))
        except StaleRecordError as exc:
            return Reply(self._refuse_stale(record, exc))
        except InvalidRecordError as exc:
            return Reply(self._ack(False, f"invalid: {exc}"))
        if not newer and not own:
            return Reply(self._ack(True))  # the same version again: already stored
        return Reply(self._ack(True), StoreRecord(record, own))

    def _offer_provider(self, peer: PeerId, record: ProviderRecord, now: float) -> Reply:
        if record.provider != peer.key:
            return Reply(self._ack(False, "invalid: a provider record must be announced by its provider"))
        try:
            validate_provider_record(record, now=now, max_ttl_s=self._provider_ttl_s + CLOCK_SKEW_ALLOWANCE_S)
        except InvalidRecordError as exc:
            return Reply(self._ack(False, f"invalid: {exc}"))
        return Reply(self._ack(True), StoreProvider(record))

"""``ReachabilityService``: identify on every connection, observed-address agreement, STUN
servers from config, and AutoNAT dial-backs (client and server), driven from trio.

The protocol decisions live in sans-I/O classes (:mod:`lattica.nat.identify`,
:mod:`lattica.nat.observed`, :mod:`lattica.nat.autonat`); this module only moves bytes and
time between them and the node's RPC layer and sockets.

* Identify: the dialler of each new authenticated connection sends ``/lattica/identify/1``
  with its :class:`~lattica.nat.identify.IdentifyMessage`; the listener answers with its own.
  Each side feeds the observed address it was told into the :class:`ObservedAddressBook`,
  under the observer group of the connection's remote IP (what the network shows, not a claim).
* A reachability check runs when the believed addresses or the mapping behaviour change, and
  every ``autonat_recheck_interval_s`` (after identifying again over up to 16 live connections,
  so observations from long-lived connections stay within their window): up to
  ``autonat_servers_per_check`` connected peers from distinct observer groups are asked to dial
  back our candidate addresses.
* A server dials back from a fresh socket made by ``dial_back_socket_factory`` (closed after
  each attempt); without one it refuses with ``unavailable``.
* Listeners (:meth:`ReachabilityService.add_listener`) hear every change of reachability: the
  node switches the DHT to client mode when private, and a relay client can reserve a relay.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Final

import trio

from lattica.errors import FrameTooLargeError, MalformedMessageError, RpcError
from lattica.identity import PeerId
from lattica.nat.autonat import (
    DialBackAttempt,
    DialBackInbox,
    DialBackPolicy,
    DialBackRefused,
    NonceMismatchError,
    ReachabilityStatus,
    ReachabilityTracker,
    verdict_of,
)
from lattica.nat.autonat_messages import (
    AUTONAT_PROTOCOL,
    NONCE_BYTES,
    DialBackRequest,
    DialBackResponse,
    decode_dial_back_request,
    decode_dial_back_response,
    encode_autonat,
)
from lattica.nat.config import NatConfig
from lattica.nat.identify import (
    IDENTIFY_PROTOCOL,
    IdentifyMessage,
    build_identify,
    decode_identify,
    encode_identify,
)
from lattica.nat.observed import MappingBehaviour, ObservedAddressBook, observer_group
from lattica.nat.service import NatService, ObservedAddressError
from lattica.net.address import InvalidAddressError, canonical_ip, network_address, parse_host_port
from lattica.net.connection import Connection
from lattica.net.datagram import Address, DatagramSocket
from lattica.net.rpc import Rpc

log = logging.getLogger("lattica.nat.autonat")

DialBackSocketFactory = Callable[[], DatagramSocket]
ReachabilityListener = Callable[[ReachabilityStatus], None]

_IDENTIFY_TIMEOUT_S: Final = 10.0
_STUN_TIMEOUT_S: Final = 5.0
_MAX_KNOWN_PEERS: Final = 4096
_MAX_REIDENTIFY: Final = 16


def stun_server_addresses(config: NatConfig) -> list[Address]:
    """``config.stun_servers`` parsed; raises :class:`InvalidAddressError` naming the entry."""
    servers = []
    for index, text in enumerate(config.stun_servers):
        try:
            servers.append(network_address(*parse_host_port(text)))
        except InvalidAddressError as exc:
            raise InvalidAddressError(f"stun_servers[{index}]: {exc}") from None
    return servers


class ReachabilityService:
    """Observed addresses and reachability of one node (see the module docstring).

    ``own_addresses()`` gives our listen addresses; ``protocols()`` the protocol ids we serve;
    ``random_bytes(n)`` the nonces. Raises :class:`InvalidAddressError` for a bad
    ``config.stun_servers`` entry.
    """

    def __init__(
        self,
        rpc: Rpc,
        nat: NatService,
        config: NatConfig,
        *,
        own_addresses: Callable[[], list[Address]],
        protocols: Callable[[], list[str]],
        agent_version: str,
        dial_back_socket_factory: DialBackSocketFactory | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.rpc = rpc
        self.nat = nat
        self.config = config
        self._own_addresses = own_addresses
        self._protocols = protocols
        self._agent_version = agent_version
        self._socket_factory = dial_back_socket_factory
        self._random_bytes = random_bytes
        self._stun_servers = stun_server_addresses(config)
        self.book = ObservedAddressBook(
            min_agreeing_observers=config.min_agreeing_observers, window_s=config.observation_window_s
        )
        self.tracker = ReachabilityTracker(
            min_agreeing_results=config.autonat_min_agreeing_results, is_own_address=self._is_own_address
        )
        self.policy = DialBackPolicy(
            per_address_per_minute=config.autonat_dial_backs_per_address_per_minute,
            total_per_minute=config.autonat_dial_backs_per_minute,
            can_dial_back=config.autonat_serve and dial_back_socket_factory is not None,
        )
        self.inbox = DialBackInbox()
        self.peer_protocols: dict[PeerId, frozenset[str]] = {}
        """What each identified peer said it serves (bounded; forgotten on disconnect)."""
        self.checks_done = 0
        self.nonce_mismatches = 0
        self.identify_failures = 0
        self._listeners: list[ReachabilityListener] = []
        self._address_listeners: list[Callable[[], None]] = []
        self._identify_listeners: list[Callable[[PeerId], None]] = []
        self._last_reachability = self.reachability()
        self._recheck_wanted = False
        self._recheck_lot = trio.lowlevel.ParkingLot()
        self._last_shape: tuple[frozenset[Address], MappingBehaviour] = (frozenset(), "unknown")
        rpc.add_handler(IDENTIFY_PROTOCOL, self._serve_identify)
        rpc.add_handler(AUTONAT_PROTOCOL, self._serve_autonat)
        rpc.manager.on_connected(self._identify_connection)
        rpc.manager.on_disconnected(self._forget_connection)
        nat.dial_back_handler = self._receive_dial_back

    # -- public state ---------------------------------------------------------------------

    def add_listener(self, listener: ReachabilityListener) -> None:
        """Call ``listener(status)`` (synchronously, must not block) on every change of
        :meth:`reachability`."""
        self._listeners.append(listener)

    def add_address_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (synchronously, must not block) whenever the believed observed
        addresses or the mapping behaviour change (hole punching retries then)."""
        self._address_listeners.append(listener)

    def add_identify_listener(self, listener: Callable[[PeerId], None]) -> None:
        """Call ``listener(peer)`` (synchronously, must not block) after each identify exchange
        that recorded ``peer``'s protocols in :attr:`peer_protocols`."""
        self._identify_listeners.append(listener)

    def status(self) -> ReachabilityStatus:
        """The tracker's status, with the config override applied."""
        status = self.tracker.status()
        forced = self.config.reachability
        if forced != "auto":
            return ReachabilityStatus(
                forced, 0, status.reachable_results, status.unreachable_results, status.translated
            )
        return status

    def reachability(self) -> str:
        """``public``, ``private`` or ``unknown``."""
        return self.status().reachability

    @property
    def relay_reservation_wanted(self) -> bool:
        """True while the node is private: it should hold a relay reservation."""
        return self.reachability() == "private"

    def mapping_behaviour(self) -> MappingBehaviour:
        """How our NAT maps our socket, as far as observations show."""
        return self.book.mapping_behaviour(trio.current_time())

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ask configured STUN servers, then re-check reachability when wanted, until cancelled."""
        async with trio.open_nursery() as nursery:
            if self._stun_servers:
                nursery.start_soon(self._ask_stun_servers)
            task_status.started()
            if not self.config.autonat:
                await trio.sleep_forever()
            while True:
                deadline = trio.current_time() + self.config.autonat_recheck_interval_s
                with trio.move_on_at(deadline):
                    while not self._recheck_wanted:
                        await self._recheck_lot.park()
                if not self._recheck_wanted:  # the periodic round: keep the votes fresh first
                    await self.refresh_observations()
                self._recheck_wanted = False
                await self.check_reachability()

    def _want_recheck(self) -> None:
        self._recheck_wanted = True
        self._recheck_lot.unpark_all()

    def _observed(self, group: str, address: Address) -> None:
        now = trio.current_time()
        self.book.observe(group, address, now)
        shape = (self.book.believed_set(now), self.book.mapping_behaviour(now))
        if shape != self._last_shape:
            self._last_shape = shape
            for address_listener in self._address_listeners:
                address_listener()
            if self.tracker.forget():
                self._notify()
            self._want_recheck()

    async def ask_stun_servers(self) -> int:
        """Ask each configured STUN server for our address once (each is one observer group);
        returns how many answered."""
        answered = 0
        for server in self._stun_servers:
            try:
                mapped = await self.nat.observed_address(server, timeout_s=_STUN_TIMEOUT_S)
            except ObservedAddressError as exc:
                log.info("configured STUN server %s did not answer: %s", server, exc)
                continue
            self._observed(f"stun:{server[0]}", mapped)
            answered += 1
        return answered

    async def _ask_stun_servers(self) -> None:
        while True:
            await self.ask_stun_servers()
            # Twice per window, so their votes never lapse while the servers answer.
            await trio.sleep(self.config.observation_window_s / 2)

    # -- identify -------------------------------------------------------------------------

    def _message_for(self, observed: Address | None) -> IdentifyMessage:
        return build_identify(
            listen_addresses=self._own_addresses(),
            protocols=self._protocols(),
            agent_version=self._agent_version,
            observed_address=observed,
        )

    def _take_identify(self, peer: PeerId, remote: Address, message: IdentifyMessage) -> None:
        if len(self.peer_protocols) < _MAX_KNOWN_PEERS or peer in self.peer_protocols:
            self.peer_protocols[peer] = frozenset(message.protocols)
            for identify_listener in self._identify_listeners:
                identify_listener(peer)
        observed = message.observed()
        if observed is not None:
            self._observed(observer_group(remote[0]), observed)

    async def _identify_connection(self, connection: Connection) -> None:
        # The dialler asks; the listener learns from the request (one exchange per connection).
        if connection.direction == "outbound":
            await self.identify(connection)

    async def refresh_observations(self) -> None:
        """Identify again over live connections (one per observer group, at most
        :data:`_MAX_REIDENTIFY` of them), so votes from long-lived connections do not lapse."""
        picked: dict[str, Connection] = {}
        for connection in reversed(self.rpc.manager.connections()):
            picked.setdefault(observer_group(connection.remote_address[0]), connection)
            if len(picked) >= _MAX_REIDENTIFY:
                break
        async with trio.open_nursery() as nursery:
            for connection in picked.values():
                nursery.start_soon(self.identify, connection)

    async def identify(self, connection: Connection) -> None:
        """Exchange identify messages over ``connection`` and take the peer's observation of us.
        A failure is counted and logged, never raised."""
        remote = connection.remote_address
        try:
            request = encode_identify(self._message_for(_valid_or_none(remote)))
            reply = await self.rpc.request(connection, IDENTIFY_PROTOCOL, request, timeout_s=_IDENTIFY_TIMEOUT_S)
            message = decode_identify(reply)
        except (RpcError, MalformedMessageError, FrameTooLargeError) as exc:
            self.identify_failures += 1
            log.debug("identify with %s failed: %s", connection.peer_id, exc)
            return
        self._take_identify(connection.peer_id, remote, message)

    async def _serve_identify(self, peer: PeerId, payload: bytes) -> bytes:
        try:
            message = decode_identify(payload)
        except (MalformedMessageError, FrameTooLargeError) as exc:
            self.identify_failures += 1
            raise RpcError("protocol-error", str(exc)) from None
        remote = self.rpc.observed_address(peer)
        if remote is not None:
            self._take_identify(peer, remote, message)
        return encode_identify(self._message_for(_valid_or_none(remote)))

    async def _forget_connection(self, connection: Connection) -> None:
        if self.rpc.manager.connection(connection.peer_id) is None:
            self.peer_protocols.pop(connection.peer_id, None)

    # -- AutoNAT client -------------------------------------------------------------------

    def _is_own_address(self, address: Address) -> bool:
        return address in {(canonical_ip(h) or h, p) for h, p in self._own_addresses()}

    def _receive_dial_back(self, data: bytes, source: Address) -> None:
        echo = self.inbox.receive(data, source, trio.current_time())
        if echo is not None:
            self.nat.queue_raw(echo, source)

    async def check_reachability(self) -> ReachabilityStatus:
        """Ask connected peers to dial us back now; returns the resulting status."""
        now = trio.current_time()
        candidates = self.book.candidates(now)
        if not candidates:
            return self.status()
        servers: dict[str, Connection] = {}
        for connection in reversed(self.rpc.manager.connections()):
            group = observer_group(connection.remote_address[0])
            if group not in servers and AUTONAT_PROTOCOL in self.peer_protocols.get(connection.peer_id, ()):
                servers[group] = connection
            if len(servers) >= self.config.autonat_servers_per_check:
                break
        if not servers:
            return self.status()
        timeout_s = self.config.autonat_dial_back_timeout_s + _IDENTIFY_TIMEOUT_S
        self.inbox.expect(now + timeout_s)
        async with trio.open_nursery() as nursery:
            for group, connection in servers.items():
                nursery.start_soon(self._ask_one, group, connection, candidates, timeout_s)
        self.checks_done += 1
        self._notify()
        return self.status()

    async def _ask_one(self, group: str, connection: Connection, requested: list[Address], timeout_s: float) -> None:
        request = encode_autonat(DialBackRequest(addresses=requested))
        try:
            response = decode_dial_back_response(
                await self.rpc.request(connection, AUTONAT_PROTOCOL, request, timeout_s=timeout_s)
            )
            verdict = verdict_of(response, self.inbox, connection.remote_address, requested)
        except NonceMismatchError as exc:
            self.nonce_mismatches += 1
            log.info("ignoring %s's dial-back result: %s", connection.peer_id, exc)
            return
        except (RpcError, MalformedMessageError, FrameTooLargeError) as exc:
            log.debug("dial-back request to %s failed: %s", connection.peer_id, exc)
            return
        if verdict is not None and response.address is not None:
            self.tracker.record(group, verdict, (response.address[0], response.address[1]))

    def _notify(self) -> None:
        reachability = self.reachability()
        if reachability == self._last_reachability:
            return
        self._last_reachability = reachability
        status = self.status()
        log.info("reachability is now %s (confidence %d)", reachability, status.confidence)
        for listener in self._listeners:
            listener(status)

    # -- AutoNAT server -------------------------------------------------------------------

    async def _serve_autonat(self, peer: PeerId, payload: bytes) -> bytes:
        try:
            request = decode_dial_back_request(payload)
        except (MalformedMessageError, FrameTooLargeError) as exc:
            raise RpcError("protocol-error", str(exc)) from None
        observed = self.rpc.observed_address(peer)
        if observed is None:
            return encode_autonat(DialBackResponse(status="refused", refusal="no-address"))
        decision = self.policy.decide(peer.key, observed, request, trio.current_time())
        if isinstance(decision, DialBackRefused):
            return encode_autonat(DialBackResponse(status="refused", refusal=decision.code))
        assert self._socket_factory is not None  # the policy refuses without one
        attempt = DialBackAttempt(
            decision.address, self._random_bytes(NONCE_BYTES), timeout_s=self.config.autonat_dial_back_timeout_s
        )
        try:
            sock = self._socket_factory()
        except OSError as exc:
            log.warning("cannot open a dial-back socket: %s", exc)
            return encode_autonat(DialBackResponse(status="refused", refusal="unavailable"))
        try:
            await _run_attempt(attempt, sock)
        finally:
            sock.close()
        return encode_autonat(attempt.response())


def _valid_or_none(address: Address | None) -> Address | None:
    if address is None:
        return None
    try:
        return network_address(*address)
    except InvalidAddressError:
        return None


async def _run_attempt(attempt: DialBackAttempt, sock: DatagramSocket) -> None:
    """Drive one dial-back on ``sock``: send, retransmit, read echoes until done."""
    try:
        await sock.send_to(attempt.start(trio.current_time()), attempt.target)
        while not attempt.done:
            with trio.move_on_at(attempt.next_timer()):
                for data, source in await sock.receive_batch():
                    if attempt.receive(data, source):
                        return
                continue
            retransmission = attempt.handle_timer(trio.current_time())
            if retransmission is not None:
                await sock.send_to(retransmission, attempt.target)
    except (trio.ClosedResourceError, trio.BrokenResourceError, OSError) as exc:
        log.debug("dial-back to %s failed: %s", attempt.target, exc)

"""Hole punching over a relayed connection (DCUtR-style): the sans-I/O state machine.

Follows libp2p's *Direct Connection Upgrade through Relay* (DCUtR, libp2p specs
``relay/DCUtR.md``), adapted to one UDP socket carrying QUIC and STUN:

* The **initiator** is the peer that *accepted* the relayed connection (it is the one behind a
  NAT that others reach through its relay; DCUtR calls it B). It sends :class:`Connect` with its
  candidate addresses and starts a clock; the **responder** (A) answers with its own
  :class:`Connect`. The initiator now knows the relayed round trip ``rtt``, sends :class:`Sync`,
  and ``rtt / 2`` later -- when the responder receives the Sync -- both act at once:
* the responder dials QUIC to the initiator's addresses (:class:`DialDirect`); its Initial opens
  the responder's own NAT towards the initiator;
* the initiator sends punch packets to the responder's addresses (:class:`SendPunches`): STUN
  Binding requests, the connectivity check ICE uses (RFC 8445 section 7.2.4), a few times
  ``punch_interval_s`` apart. They open the initiator's NAT towards the responder, so the
  responder's Initial (or its retransmission) gets in. A responder node answers them like any
  Binding request; nothing in them is secret.
* Up to ``rounds`` rounds (DCUtR: 3); a round that sees no direct path within
  ``round_timeout_s`` starts the next one. The driver reports a direct path with
  :meth:`HolePunch.direct_path_established`.

Invariants:

* Pure state: no sockets, no clock. Inputs are messages, timers and "a direct path exists",
  each with ``now`` (seconds, any monotonic clock); outputs are :data:`Action`s and
  :data:`Event`s.
* Bounded: at most :data:`MAX_PUNCH_ADDRESSES` addresses per side, each an IP literal that can
  be a unicast destination (checked at decode: names never come from the network), messages at
  most :data:`MAX_MESSAGE_BYTES`, at most ``rounds`` rounds from either side. A peer that sends
  a message out of turn or more rounds than allowed gets :class:`~lattica.errors.RemoteProtocolError`
  and the driver ends the attempt; the relayed connection stays up.
* A finished machine (succeeded or failed) ignores everything further.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated

import msgspec

from lattica.errors import LocalProtocolError, RemoteProtocolError
from lattica.net.address import InvalidAddressError, network_address
from lattica.net.datagram import Address

PROTOCOL_ID = "/lattica/dcutr/1"
"""The stream protocol id the exchange runs on, over the relayed connection."""

MAX_PUNCH_ADDRESSES = 8
"""Most candidate addresses one side may offer (and we punch or dial)."""

MAX_MESSAGE_BYTES = 1024
"""Largest encoded message accepted (8 IPv6 addresses fit with room to spare)."""

DEFAULT_ROUNDS = 3
DEFAULT_ROUND_TIMEOUT_S = 5.0
DEFAULT_PUNCH_INTERVAL_S = 0.05
DEFAULT_PUNCHES_PER_ROUND = 5


class HolePunchDecodeError(RemoteProtocolError):
    """A hole-punching message that is malformed, too large or names a bad address."""


class Connect(msgspec.Struct, frozen=True, tag="connect", forbid_unknown_fields=True):
    """Each side's candidate addresses (observed and listen addresses), sent over the relay."""

    addresses: Annotated[list[tuple[str, int]], msgspec.Meta(max_length=MAX_PUNCH_ADDRESSES)]

    def __post_init__(self) -> None:
        # Runs on decode too (msgspec turns the ValueError into a ValidationError).
        for host, port in self.addresses:
            network_address(host, port)


class Sync(msgspec.Struct, frozen=True, tag="sync", forbid_unknown_fields=True):
    """The initiator's "now": the responder dials on receipt."""


HolePunchMessage = Connect | Sync
_decoder = msgspec.msgpack.Decoder(HolePunchMessage)
_encoder = msgspec.msgpack.Encoder()


def encode_message(message: HolePunchMessage) -> bytes:
    """The msgpack encoding of ``message`` (at most :data:`MAX_MESSAGE_BYTES`)."""
    return _encoder.encode(message)


def decode_message(data: bytes) -> HolePunchMessage:
    """Decode one message; raises :class:`HolePunchDecodeError` for anything else."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise HolePunchDecodeError(f"hole-punching message of {len(data)} bytes (limit {MAX_MESSAGE_BYTES})")
    try:
        return _decoder.decode(data)
    # msgspec errors, the UnicodeDecodeError it leaks, InvalidAddressError from __post_init__,
    # and RecursionError for deep nesting.
    except (ValueError, RecursionError, InvalidAddressError) as exc:
        raise HolePunchDecodeError(f"bad hole-punching message: {exc}") from exc


def _addresses(addresses: list[tuple[str, int]]) -> tuple[Address, ...]:
    # Canonical and without repeats: the same address spelled twice is punched once.
    seen: dict[Address, None] = {}
    for host, port in addresses:
        seen.setdefault(network_address(host, port))
    return tuple(seen)


# -- what the machine asks its driver to do ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Send ``message`` to the peer over the relayed connection's hole-punching stream."""

    message: HolePunchMessage


@dataclass(frozen=True, slots=True)
class SendPunches:
    """Send one punch packet (a STUN Binding request) from the node's UDP socket to each address."""

    addresses: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class DialDirect:
    """Dial the peer over QUIC at these addresses (racing them); report the first that works."""

    addresses: tuple[Address, ...]


Action = SendMessage | SendPunches | DialDirect


@dataclass(frozen=True, slots=True)
class PunchSucceeded:
    """A direct path to the peer exists."""

    address: Address
    """The peer's address on the direct path."""
    rounds: int
    """Rounds it took (1 = the first)."""
    time_to_direct_s: float
    """From first contact (``first_contact_at``) to the direct path, in seconds."""


@dataclass(frozen=True, slots=True)
class PunchFailed:
    """No direct path after every round; the relayed connection stays the path."""

    rounds: int
    reason: str


Event = PunchSucceeded | PunchFailed


class Role(enum.Enum):
    """Which side of the exchange this machine plays (see the module docstring)."""

    INITIATOR = "initiator"
    """Accepted the relayed connection; sends Connect and Sync, then punches."""
    RESPONDER = "responder"
    """Dialled through the relay; answers Connect, then dials directly on Sync."""


class _State(enum.Enum):
    IDLE = enum.auto()
    AWAIT_CONNECT = enum.auto()  # initiator: Connect sent, clock running
    AWAIT_HALF_RTT = enum.auto()  # initiator: Sync sent, punching at the timer
    PUNCHING = enum.auto()  # initiator: punches going out, waiting for the direct path
    AWAIT_SYNC = enum.auto()  # responder: Connect answered
    DIALING = enum.auto()  # responder: dialling, waiting for the direct path
    DONE = enum.auto()


class HolePunch:
    """One hole-punching attempt with one peer. Pure state: no sockets, no clock.

    ``own_addresses`` are this node's candidates (believed observed addresses first; at most
    :data:`MAX_PUNCH_ADDRESSES` are offered). ``first_contact_at`` is when the relayed
    connection came up (for :attr:`PunchSucceeded.time_to_direct_s`; default: the first input's
    ``now``). ``round_timeout_s`` bounds each round, from its Connect to a direct path;
    ``punches_per_round`` packets go to each address ``punch_interval_s`` apart.
    Raises :class:`LocalProtocolError` for settings that cannot work.
    """

    def __init__(
        self,
        role: Role,
        own_addresses: list[Address],
        *,
        rounds: int = DEFAULT_ROUNDS,
        round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S,
        punch_interval_s: float = DEFAULT_PUNCH_INTERVAL_S,
        punches_per_round: int = DEFAULT_PUNCHES_PER_ROUND,
        first_contact_at: float | None = None,
    ) -> None:
        if rounds < 1 or punches_per_round < 1 or round_timeout_s <= 0 or punch_interval_s <= 0:
            raise LocalProtocolError("rounds and punches_per_round must be >= 1, timeouts > 0")
        if punch_interval_s * punches_per_round >= round_timeout_s:
            raise LocalProtocolError("the punches of a round must fit in round_timeout_s")
        self.role = role
        try:
            self.own_addresses = _addresses([(h, p) for h, p in own_addresses][:MAX_PUNCH_ADDRESSES])
        except InvalidAddressError as exc:
            raise LocalProtocolError(f"cannot offer {exc}") from exc
        self.rounds = rounds
        self.round_timeout_s = round_timeout_s
        self.punch_interval_s = punch_interval_s
        self.punches_per_round = punches_per_round
        self.first_contact_at = first_contact_at
        self.round = 0
        self.rtt_s: float | None = None
        """The relayed round trip the initiator measured in the latest round."""
        self.peer_addresses: tuple[Address, ...] = ()
        self._state = _State.IDLE
        self._connect_sent_at = 0.0
        self._punches_sent = 0
        self._timer: float | None = None
        self._round_deadline = 0.0

    @property
    def done(self) -> bool:
        """True once the attempt succeeded or failed."""
        return self._state is _State.DONE

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` wants to run next (``None``: only on input)."""
        return None if self.done else self._timer

    def start(self, now: float) -> list[Action]:
        """Initiator: begin the first round. Raises :class:`LocalProtocolError` for a responder
        or a machine already started."""
        if self.role is not Role.INITIATOR or self._state is not _State.IDLE:
            raise LocalProtocolError("only an idle initiator starts a hole punch")
        if self.first_contact_at is None:
            self.first_contact_at = now
        return self._begin_round(now)

    def receive_message(self, message: HolePunchMessage, now: float) -> list[Action | Event]:
        """Feed a message the peer sent over the relay.

        Raises :class:`RemoteProtocolError` for a message out of turn or a round beyond
        ``rounds`` (the driver ends the attempt; the relayed connection is not to blame).
        """
        if self.done:
            return []
        if self.first_contact_at is None:
            self.first_contact_at = now
        match message, self.role, self._state:
            case Connect(addresses=addresses), Role.INITIATOR, _State.AWAIT_CONNECT:
                self.peer_addresses = _addresses(addresses)
                self.rtt_s = now - self._connect_sent_at
                self._state = _State.AWAIT_HALF_RTT
                self._timer = now + self.rtt_s / 2
                return [SendMessage(Sync())]
            case Connect(addresses=addresses), Role.RESPONDER, _State.IDLE | _State.AWAIT_SYNC | _State.DIALING:
                if self.round >= self.rounds:
                    raise RemoteProtocolError(f"peer started hole-punching round {self.round + 1} of {self.rounds}")
                self.round += 1
                self.peer_addresses = _addresses(addresses)
                self._state = _State.AWAIT_SYNC
                self._wait_for_initiator(now)
                return [SendMessage(Connect(addresses=list(self.own_addresses)))]
            case Sync(), Role.RESPONDER, _State.AWAIT_SYNC:
                self._state = _State.DIALING
                self._wait_for_initiator(now)
                return [DialDirect(self.peer_addresses)] if self.peer_addresses else []
        raise RemoteProtocolError(f"unexpected {type(message).__name__} from the peer while {self._state.name.lower()}")

    def handle_timer(self, now: float) -> list[Action | Event]:
        """Run what is due at ``now``: punches, the next round, or giving up."""
        if self.done or self._timer is None or now < self._timer:
            return []
        if self._state is _State.AWAIT_HALF_RTT:
            self._state = _State.PUNCHING
            self._punches_sent = 0
            self._set_round_deadline(now)
        punches_due = self._punches_sent < self.punches_per_round and now < self._round_deadline
        if self._state is _State.PUNCHING and punches_due:
            self._punches_sent += 1
            nxt = now + self.punch_interval_s
            self._timer = nxt if self._punches_sent < self.punches_per_round else self._round_deadline
            return [SendPunches(self.peer_addresses)] if self.peer_addresses else []
        if now < self._round_deadline:
            self._timer = self._round_deadline
            return []
        # The round is over without a direct path.
        if self.role is Role.INITIATOR and self.round < self.rounds:
            return list(self._begin_round(now))
        self._state = _State.DONE
        self._timer = None
        reason = "no direct path" if self.role is Role.INITIATOR else "no direct path, and the initiator went quiet"
        return [PunchFailed(rounds=self.round, reason=f"{reason} after {self.round} round(s)")]

    def direct_path_established(self, address: Address, now: float) -> list[Event]:
        """The driver has a working direct connection to the peer at ``address``."""
        if self.done:
            return []
        self._state = _State.DONE
        self._timer = None
        began = self.first_contact_at if self.first_contact_at is not None else now
        return [PunchSucceeded(address=address, rounds=max(self.round, 1), time_to_direct_s=now - began)]

    def _begin_round(self, now: float) -> list[Action]:
        self.round += 1
        self._state = _State.AWAIT_CONNECT
        self._connect_sent_at = now
        self._set_round_deadline(now)
        return [SendMessage(Connect(addresses=list(self.own_addresses)))]

    def _wait_for_initiator(self, now: float) -> None:
        # The initiator's round ends round_timeout_s after its punches start, which is after our
        # Sync arrived; its next Connect follows. Two round timeouts of silence mean it gave up.
        self._round_deadline = now + 2 * self.round_timeout_s
        self._timer = self._round_deadline

    def _set_round_deadline(self, now: float) -> None:
        self._round_deadline = now + self.round_timeout_s
        self._timer = self._round_deadline

"""AutoNAT-style reachability, sans-I/O: the server's dial-back policy and attempt, the
client's inbox of dial-backs, and the tracker that turns results into public / private.

Rules (see also :mod:`lattica.nat.autonat_messages`):

* **No amplification toward third parties.** A server dials back only addresses whose IP equals
  the IP its connection from the requester comes from; a request naming any other IP is refused
  as a whole (``third-party-address``) and nothing is sent. A dial-back is at most
  :data:`DIAL_BACK_TRANSMISSIONS` datagrams of 21 bytes.
* **Rate limits.** Per requesting peer and for all peers together (token buckets, burst = one
  minute's worth); the table of peers is bounded (oldest forgotten first). Refusals cost no token.
* **A separate socket.** The dial-back leaves from an ephemeral socket the client never sent to.
  From the server's main socket it would pass any NAT filter that admits the server (the client
  has been sending to it), and every port-restricted NAT would look public.
* **Nonces.** The server picks a random nonce per attempt; the client echoes it to the dial-back's
  source and checks that the nonce the server reports is one it received, from a source other
  than the server's own connection address. A server cannot make up a success, and an off-path
  sender cannot forge one (the nonce travels over the encrypted connection only in the answer).
* **Public means reachable without translation.** The tracker calls a node ``public`` only when
  enough servers' dial-backs reached it at an address that is one of its own (no NAT in the
  path). A NAT mapping (even a full-cone one, where dial-backs do arrive) exists only while our
  traffic keeps it alive; a node behind one is ``private`` and should hold a relay reservation.
  ``nat.reachability`` in the config overrides this for static 1:1 NATs (cloud VMs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from lattica.errors import MalformedMessageError
from lattica.nat.autonat_messages import (
    NONCE_BYTES,
    DialBackPacket,
    DialBackRequest,
    DialBackResponse,
    RefusalCode,
    decode_dial_back_packet,
    encode_dial_back_packet,
)
from lattica.net.address import address_group, canonical_ip
from lattica.net.datagram import Address
from lattica.token_bucket import KeyedRateLimiter, TokenBucket

Reachability = Literal["public", "private", "unknown"]

DIAL_BACK_TRANSMISSIONS: Final = 3
DIAL_BACK_RETRANSMIT_S: Final = 0.5
_MAX_RATE_LIMITED_PEERS = 4096


@dataclass(frozen=True, slots=True)
class DialBackRefused:
    """The server's policy refuses the request; answer with this code and send nothing."""

    code: RefusalCode


@dataclass(frozen=True, slots=True)
class DialBackPlan:
    """The server's policy admits the request: dial back ``address``."""

    address: Address


class DialBackPolicy:
    """Decides whether a server dials a requester back, and where.

    ``per_address_per_minute`` and ``total_per_minute`` (dial-backs) bound the peers at one
    address (the requester's observed IPv4 address or IPv6 /64, where the dial-back goes) and
    all peers together; both burst to a minute's worth. ``can_dial_back`` is False when the server has no
    separate socket to dial from (then every request is refused with ``unavailable``).
    """

    def __init__(self, *, per_address_per_minute: int, total_per_minute: int, can_dial_back: bool = True) -> None:
        self.per_address_per_minute = per_address_per_minute
        self.can_dial_back = can_dial_back
        self._limiter = KeyedRateLimiter(
            per_key_rate_per_s=per_address_per_minute / 60.0,
            per_key_burst=per_address_per_minute,
            total_rate_per_s=total_per_minute / 60.0,
            total_burst=total_per_minute,
            max_keys=_MAX_RATE_LIMITED_PEERS,
        )

    def decide(
        self, peer: bytes, observed: Address, request: DialBackRequest, now: float
    ) -> DialBackRefused | DialBackPlan:
        """``peer`` (its id's bytes) asks over a connection whose remote address is
        ``observed``: refuse, or plan a dial-back to the first requested address (all must
        carry ``observed``'s IP). ``now`` in seconds."""
        if not self.can_dial_back:
            return DialBackRefused("unavailable")
        observed_ip = canonical_ip(observed[0])
        addresses = request.address_list()
        if not addresses or observed_ip is None:
            return DialBackRefused("no-address")
        if any(host != observed_ip for host, _ in addresses):
            return DialBackRefused("third-party-address")
        if not self._limiter.allow(address_group(observed_ip, ipv6_prefix_bits=64), now):
            return DialBackRefused("rate-limited")
        return DialBackPlan(addresses[0])


class DialBackAttempt:
    """One server-side dial-back: send the nonce to ``target`` up to
    :data:`DIAL_BACK_TRANSMISSIONS` times (every 0.5 s) and wait ``timeout_s`` seconds in all
    for the echo. Pure state: the driver sends what it returns and feeds what the socket reads.
    """

    def __init__(self, target: Address, nonce: bytes, *, timeout_s: float) -> None:
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
        self.target = target
        self.nonce = nonce
        self.timeout_s = timeout_s
        self.echoed = False
        self._packet = encode_dial_back_packet(DialBackPacket("dial-back", nonce))
        self._sent = 0
        self._started_at = 0.0

    def start(self, now: float) -> bytes:
        """The first datagram to send to :attr:`target`."""
        self._started_at = now
        self._sent = 1
        return self._packet

    @property
    def done(self) -> bool:
        """True once the echo arrived or :meth:`handle_timer` gave up."""
        return self.echoed or self._sent == 0

    def next_timer(self) -> float:
        """When to call :meth:`handle_timer` next."""
        if self._sent < DIAL_BACK_TRANSMISSIONS:
            return self._started_at + self._sent * DIAL_BACK_RETRANSMIT_S
        return self._started_at + self.timeout_s

    def handle_timer(self, now: float) -> bytes | None:
        """A retransmission to send, or None (after the deadline, the attempt is over)."""
        if self.done:
            return None
        if now >= self._started_at + self.timeout_s:
            self._sent = 0
            return None
        if self._sent < DIAL_BACK_TRANSMISSIONS and now >= self.next_timer():
            self._sent += 1
            return self._packet
        return None

    def receive(self, data: bytes, source: Address) -> bool:
        """Feed a datagram read on the dial-back socket; True if it is the echo (from the
        target's IP, with our nonce). Anything else is ignored."""
        try:
            packet = decode_dial_back_packet(data)
        except MalformedMessageError:
            return False
        if packet.kind == "echo" and packet.nonce == self.nonce and canonical_ip(source[0]) == self.target[0]:
            self.echoed = True
        return self.echoed

    def response(self) -> DialBackResponse:
        """The RPC answer once :attr:`done`."""
        return DialBackResponse(status="ok" if self.echoed else "no-echo", address=self.target, nonce=self.nonce)


class DialBackInbox:
    """The client's side of dial-backs on its node socket.

    Dial-back datagrams are accepted only while a check is running (:meth:`expect`), their
    nonces remembered (bounded, ``max_nonces``) and each answered with an echo, at most
    ``echoes_per_second`` in all (the source could be spoofed: never more than one echo of
    equal size per accepted datagram, and a bounded rate of them).
    """

    def __init__(self, *, max_nonces: int = 64, echoes_per_second: float = 20.0) -> None:
        self._nonces: OrderedDict[bytes, Address] = OrderedDict()
        self._max_nonces = max_nonces
        self._expect_until = float("-inf")
        self._echoes = TokenBucket.full(echoes_per_second, echoes_per_second, 0.0)
        self.dropped = 0

    def expect(self, until: float) -> None:
        """Accept dial-backs until ``until`` (seconds)."""
        self._expect_until = max(self._expect_until, until)

    def receive(self, data: bytes, source: Address, now: float) -> bytes | None:
        """Feed a raw datagram; returns the echo to send back to ``source``, or None."""
        try:
            packet = decode_dial_back_packet(data)
        except MalformedMessageError:
            self.dropped += 1
            return None
        if packet.kind != "dial-back" or now > self._expect_until or not self._echoes.take(now):
            self.dropped += 1
            return None
        self._nonces.pop(packet.nonce, None)
        self._nonces[packet.nonce] = source
        while len(self._nonces) > self._max_nonces:
            self._nonces.popitem(last=False)
        return encode_dial_back_packet(DialBackPacket("echo", packet.nonce))

    def received_from(self, nonce: bytes) -> Address | None:
        """Where the dial-back carrying ``nonce`` came from, if one arrived."""
        return self._nonces.get(nonce)


Verdict = Literal["reachable", "unreachable"]


class NonceMismatchError(MalformedMessageError):
    """A server reported a dial-back we never received (a lie, or a nonce we did not see), or
    one to an address we did not ask for."""


def verdict_of(
    response: DialBackResponse, inbox: DialBackInbox, server_address: Address, requested: list[Address]
) -> Verdict | None:
    """What one server's answer says about us: ``reachable`` (its nonce reached us from a
    source other than ``server_address``, the address our connection to it uses),
    ``unreachable`` (it dialled, nothing reached us) or None (it refused).

    Raises :class:`NonceMismatchError` when the server claims an echo we never sent, or a
    dial-back to an address we did not ask for (``requested``)."""
    if response.status == "refused" or response.nonce is None:
        return None
    if response.address is None or tuple(response.address) not in requested:
        raise NonceMismatchError("the server reports a dial-back to an address we did not ask for")
    source = inbox.received_from(response.nonce)
    if source is not None and source != server_address:
        return "reachable"
    if response.status == "ok":
        raise NonceMismatchError("the server reports an echo of a nonce that never reached us")
    return "unreachable"


@dataclass(frozen=True, slots=True)
class ReachabilityStatus:
    """Where the tracker stands."""

    reachability: Reachability
    confidence: int
    """Agreeing results behind ``reachability`` (0 when unknown)."""
    reachable_results: int
    unreachable_results: int
    translated: bool
    """The address tested is not one of our own: a NAT is in the path."""


class ReachabilityTracker:
    """Turns dial-back verdicts into public / private / unknown.

    One verdict per server group (the latest; at most ``max_results`` groups, oldest forgotten),
    so a single server cannot outvote others. ``min_agreeing_results`` verdicts that agree (and
    outnumber the others) decide. ``is_own_address(address)`` says whether a tested address is
    one of our interface addresses (no translation).
    """

    def __init__(
        self,
        *,
        min_agreeing_results: int = 3,
        max_results: int = 16,
        is_own_address: Callable[[Address], bool],
    ) -> None:
        self.min_agreeing_results = min_agreeing_results
        self.max_results = max_results
        self._is_own_address = is_own_address
        self._verdicts: OrderedDict[str, tuple[Verdict, Address]] = OrderedDict()

    def record(self, server_group: str, verdict: Verdict, tested: Address) -> bool:
        """Record one server's verdict on ``tested``; returns whether the reachability changed."""
        before = self.status().reachability
        self._verdicts.pop(server_group, None)
        self._verdicts[server_group] = (verdict, tested)
        while len(self._verdicts) > self.max_results:
            self._verdicts.popitem(last=False)
        return self.status().reachability != before

    def forget(self) -> bool:
        """Drop every verdict (our addresses changed); returns whether reachability changed."""
        before = self.status().reachability
        self._verdicts.clear()
        return before != "unknown"

    def status(self) -> ReachabilityStatus:
        """The current reachability and the counts behind it."""
        reachable = [tested for verdict, tested in self._verdicts.values() if verdict == "reachable"]
        unreachable = sum(1 for verdict, _ in self._verdicts.values() if verdict == "unreachable")
        translated = any(not self._is_own_address(t) for _, t in self._verdicts.values())
        reachability: Reachability = "unknown"
        confidence = 0
        if len(reachable) >= self.min_agreeing_results and len(reachable) > unreachable:
            # Reached, but through a mapping only our own traffic keeps alive: not public.
            reachability = "private" if translated else "public"
            confidence = len(reachable)
        elif unreachable >= self.min_agreeing_results and unreachable > len(reachable):
            reachability, confidence = "private", unreachable
        return ReachabilityStatus(reachability, confidence, len(reachable), unreachable, translated)

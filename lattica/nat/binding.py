"""``BindingTransaction``: one STUN Binding request to one server, as pure state.

No sockets, no clock: the driver passes ``now`` (seconds) in and sends the bytes it gets back.
Retransmission follows RFC 8489 section 6.2.1 with smaller bounds: the request is sent at
``0, RTO, 3*RTO, 7*RTO, ...`` (the interval doubles) up to ``max_transmissions`` times; after the
last one the transaction waits one more doubled interval and then times out.

Invariants: the transaction ends at most once (:attr:`result` set once, never changed); only a
datagram from the server's address with our transaction id can end it; anything else that
arrives is ignored (a forged or malformed answer cannot fail or finish it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lattica.nat.stun import (
    BINDING_METHOD,
    StunClass,
    StunDecodeError,
    decode_message,
    encode_binding_request,
    error_code,
    new_transaction_id,
    unknown_comprehension_required,
    xor_mapped_address,
)
from lattica.net.address import InvalidAddressError, canonical_ip, network_address
from lattica.net.datagram import Address

INITIAL_RTO_S = 0.5
"""RFC 8489 section 6.2.1's recommended initial retransmission timeout, in seconds."""


@dataclass(frozen=True, slots=True)
class BindingSucceeded:
    """The server saw our request come from ``mapped`` (our server-reflexive address)."""

    mapped: Address


@dataclass(frozen=True, slots=True)
class BindingFailed:
    """The server answered with an error response (``code`` from ERROR-CODE, or ``None``)."""

    code: int | None


@dataclass(frozen=True, slots=True)
class BindingTimedOut:
    """No valid answer after every transmission and the final wait."""


BindingResult = BindingSucceeded | BindingFailed | BindingTimedOut


def _same_address(a: Address, b: Address) -> bool:
    return a[1] == b[1] and (canonical_ip(a[0]) or a[0]) == (canonical_ip(b[0]) or b[0])


class BindingTransaction:
    """One Binding request to ``server`` with retransmissions. Pure state: no sockets, no clock.

    ``random_bytes(n)`` supplies the 96-bit transaction id (``os.urandom`` in production; a seeded
    ``random.Random().randbytes`` in tests). ``initial_rto_s`` is the first retransmission
    timeout in seconds; ``max_transmissions`` bounds the datagrams sent (>= 1).
    """

    def __init__(
        self,
        server: Address,
        random_bytes: Callable[[int], bytes],
        *,
        initial_rto_s: float = INITIAL_RTO_S,
        max_transmissions: int = 4,
    ) -> None:
        if max_transmissions < 1 or initial_rto_s <= 0:
            raise ValueError("max_transmissions must be >= 1 and initial_rto_s > 0")
        self.server = server
        self.transaction_id = new_transaction_id(random_bytes)
        self.result: BindingResult | None = None
        self._request = encode_binding_request(self.transaction_id)
        self._rto_s = initial_rto_s
        self._transmissions_left = max_transmissions
        self._next_timer_at: float | None = None

    def start(self, now: float) -> bytes:
        """The first request datagram (send it to :attr:`server`); arms the timer."""
        if self._next_timer_at is not None or self.result is not None:
            raise RuntimeError("a BindingTransaction starts once")
        return self._transmit(now)

    def _transmit(self, now: float) -> bytes:
        self._transmissions_left -= 1
        self._next_timer_at = now + self._rto_s
        self._rto_s *= 2
        return self._request

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` should be called next (seconds), or ``None`` once ended."""
        return None if self.result is not None else self._next_timer_at

    def handle_timer(self, now: float) -> bytes | None:
        """A retransmission to send, or ``None``; sets :attr:`result` to
        :class:`BindingTimedOut` after the final wait. Early calls do nothing."""
        deadline = self._next_timer_at
        if self.result is not None or deadline is None or now < deadline:
            return None
        if self._transmissions_left > 0:
            return self._transmit(now)
        self.result = BindingTimedOut()
        return None

    def receive(self, data: bytes, source: Address, now: float) -> BindingResult | None:
        """Feed one datagram that arrived from ``source``; returns the result if this datagram
        ended the transaction, else ``None`` (not ours, malformed, forged source, or ended)."""
        if self.result is not None or not _same_address(source, self.server):
            return None
        try:
            message = decode_message(data)
            if message.transaction_id != self.transaction_id or message.method != BINDING_METHOD:
                return None
            if message.message_class == StunClass.ERROR:
                result: BindingResult = BindingFailed(error_code(message))
            elif message.message_class == StunClass.SUCCESS:
                # Section 6.3.3: a success response with attributes we must understand but
                # don't is a failure of the transaction; here it is ignored like garbage.
                if unknown_comprehension_required(message):
                    return None
                mapped = xor_mapped_address(message)
                if mapped is None:
                    return None
                result = BindingSucceeded(network_address(*mapped))
            else:
                return None
        except (StunDecodeError, InvalidAddressError):
            return None
        self.result = result
        return result

"""``NatService``: the node's STUN Binding responder and client, on the endpoint's own socket.

Every node answers Binding requests (RFC 8489) that reach its UDP socket with the address they
came from, and can ask any peer (``observed_address``) for its own server-reflexive address. No
public STUN server is ever contacted: only the addresses a caller passes in.

Rules:

* The raw packet handler never raises on network input: every decode error is caught, counted
  in :attr:`NatService.stats` and dropped.
* No amplification: a response (32 bytes for IPv4, 44 for IPv6) is at most 24 bytes larger than
  the request it answers (at least 20 bytes), and each source address gets at most
  ``responses_per_second`` answers (token bucket, burst ``response_burst``); the table of
  sources is bounded (oldest forgotten first). All sources together get at most
  ``total_responses_per_second`` (burst as many), because source addresses can be spoofed and
  rotated to aim our answers at one victim. Answers wait in a bounded queue; when it is full
  requests are dropped, never buffered without bound.
* Requests carrying comprehension-required attributes we do not understand are dropped
  unanswered rather than answered with 420 (see :mod:`lattica.nat.stun`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from lattica.errors import ConnectError, LatticaError
from lattica.nat.autonat_messages import is_dial_back_packet
from lattica.nat.binding import BindingFailed, BindingSucceeded, BindingTransaction
from lattica.nat.stun import (
    BINDING_METHOD,
    StunClass,
    StunDecodeError,
    decode_message,
    encode_binding_success,
    unknown_comprehension_required,
)
from lattica.net.address import network_address
from lattica.net.datagram import Address
from lattica.net.endpoint import Endpoint
from lattica.token_bucket import KeyedRateLimiter

log = logging.getLogger("lattica.nat")

_ANSWER_QUEUE_DATAGRAMS = 64
_MAX_RATE_LIMITED_SOURCES = 4096


class ObservedAddressError(LatticaError):
    """A peer did not tell us our observed address: no answer within the timeout, an error
    response, or an address we cannot send to."""


class ObservedAddressTimeoutError(ObservedAddressError):
    """No valid STUN answer arrived within the timeout (after every retransmission)."""


@dataclass
class NatStats:
    """Counters of what the responder and client did with raw datagrams."""

    requests_answered: int = 0
    malformed_dropped: int = 0
    """Datagrams that were not valid STUN (or an address we cannot answer)."""
    unexpected_dropped: int = 0
    """Valid STUN that was not a Binding request nor a response to a pending request of ours."""
    rate_limited_dropped: int = 0
    queue_full_dropped: int = 0


class NatService:
    """Answers STUN Binding requests on ``endpoint``'s socket and asks peers for ours.

    ``random_bytes(n)`` supplies transaction ids (default ``os.urandom``). Responses per source
    are limited to ``responses_per_second`` with bursts of ``response_burst``, responses to all
    sources together to ``total_responses_per_second`` with bursts of as many.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        responses_per_second: float = 10.0,
        response_burst: float = 20.0,
        total_responses_per_second: float = 1000.0,
    ) -> None:
        self.endpoint = endpoint
        self.stats = NatStats()
        self._random_bytes = random_bytes
        self._limiter = KeyedRateLimiter(
            per_key_rate_per_s=responses_per_second,
            per_key_burst=response_burst,
            total_rate_per_s=total_responses_per_second,
            total_burst=total_responses_per_second,
            max_keys=_MAX_RATE_LIMITED_SOURCES,
        )
        self._pending: dict[bytes, tuple[BindingTransaction, trio.Event]] = {}
        self._answers_in, self._answers_out = trio.open_memory_channel[tuple[bytes, Address]](_ANSWER_QUEUE_DATAGRAMS)
        self.dial_back_handler: Callable[[bytes, Address], None] | None = None
        """Takes AutoNAT dial-back datagrams (:mod:`lattica.nat.autonat_messages`) that share
        the socket with STUN; it must not block nor raise on network input."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Install the raw packet handler and send answers until cancelled."""
        self.endpoint.set_raw_packet_handler(self.handle_datagram)
        task_status.started()
        async for data, address in self._answers_out:
            try:
                await self.endpoint.send_raw(data, address)
            except ConnectError as exc:
                log.debug("cannot answer STUN from %s: %s", address, exc)

    def handle_datagram(self, data: bytes, source: Address) -> None:
        """The endpoint's raw packet handler: never raises on what arrives."""
        if self.dial_back_handler is not None and is_dial_back_packet(data):
            self.dial_back_handler(data, source)
            return
        try:
            message = decode_message(data)
        except StunDecodeError:
            self.stats.malformed_dropped += 1
            return
        if message.message_class in (StunClass.SUCCESS, StunClass.ERROR):
            pending = self._pending.get(message.transaction_id)
            if pending is None or pending[0].receive(data, source, trio.current_time()) is None:
                self.stats.unexpected_dropped += 1
                return
            pending[1].set()
            return
        if message.message_class != StunClass.REQUEST or message.method != BINDING_METHOD:
            self.stats.unexpected_dropped += 1
            return
        if unknown_comprehension_required(message):
            self.stats.unexpected_dropped += 1
            return
        if not self._limiter.allow(source, trio.current_time()):
            self.stats.rate_limited_dropped += 1
            return
        try:
            answer = encode_binding_success(message.transaction_id, source)
        except ValueError:
            self.stats.malformed_dropped += 1  # a source that is not an IP literal (emulation)
            return
        try:
            self._answers_in.send_nowait((answer, source))
        except trio.WouldBlock:
            self.stats.queue_full_dropped += 1
            return
        self.stats.requests_answered += 1

    def queue_raw(self, data: bytes, address: Address) -> bool:
        """Queue one raw datagram (not QUIC) to send from the node's socket, without blocking;
        returns False (and drops it) when the bounded queue is full."""
        try:
            self._answers_in.send_nowait((data, address))
        except trio.WouldBlock:
            self.stats.queue_full_dropped += 1
            return False
        return True

    async def observed_address(
        self,
        peer_address: Address,
        *,
        timeout_s: float = 10.0,
        max_transmissions: int = 4,
    ) -> Address:
        """Our address as ``peer_address`` (an IP literal and port) sees it: send it a Binding
        request, retransmitting per RFC 8489 section 6.2.1 (0.5 s, doubling, at most
        ``max_transmissions`` datagrams), and return the XOR-MAPPED-ADDRESS of its answer.

        ``timeout_s`` (seconds) bounds the whole exchange. Raises
        :class:`ObservedAddressTimeoutError` on timeout, :class:`ObservedAddressError` on an error
        response or an address that cannot be sent to.
        """
        try:
            server = network_address(*peer_address)
        except ValueError as exc:
            raise ObservedAddressError(f"cannot ask {peer_address!r}: {exc}") from None
        transaction = BindingTransaction(server, self._random_bytes, max_transmissions=max_transmissions)
        answered = trio.Event()
        self._pending[transaction.transaction_id] = (transaction, answered)
        try:
            with trio.move_on_after(timeout_s):
                await self._send_request(transaction.start(trio.current_time()), server)
                while transaction.result is None:
                    deadline = transaction.next_timer()
                    assert deadline is not None
                    with trio.move_on_at(deadline):
                        await answered.wait()
                    retransmission = transaction.handle_timer(trio.current_time())
                    if retransmission is not None:
                        await self._send_request(retransmission, server)
        finally:
            del self._pending[transaction.transaction_id]
        result = transaction.result
        if isinstance(result, BindingSucceeded):
            return result.mapped
        if isinstance(result, BindingFailed):
            raise ObservedAddressError(f"{server} answered with STUN error {result.code}")
        raise ObservedAddressTimeoutError(f"no STUN answer from {server} within {timeout_s:g} s")

    async def _send_request(self, data: bytes, server: Address) -> None:
        try:
            await self.endpoint.send_raw(data, server)
        except ConnectError as exc:
            raise ObservedAddressError(str(exc)) from exc

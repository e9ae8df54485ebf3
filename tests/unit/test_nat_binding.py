"""``BindingTransaction``: the sans-I/O STUN client, fed bytes and times directly."""

from __future__ import annotations

import random

import pytest

from lattica.nat.binding import BindingFailed, BindingSucceeded, BindingTimedOut, BindingTransaction
from lattica.nat.stun import (
    BINDING_METHOD,
    StunClass,
    StunMessage,
    decode_message,
    encode_binding_success,
    encode_message,
)

SERVER = ("198.51.100.1", 3478)
MAPPED = ("203.0.113.7", 50123)


def transaction() -> BindingTransaction:
    return BindingTransaction(SERVER, random.Random(1).randbytes)


def test_request_carries_the_injected_transaction_id() -> None:
    t = transaction()
    request = decode_message(t.start(now=100.0))
    assert request == StunMessage(BINDING_METHOD, StunClass.REQUEST, random.Random(1).randbytes(12))
    assert t.transaction_id == request.transaction_id


def test_retransmits_with_doubling_intervals_then_times_out() -> None:
    t = BindingTransaction(SERVER, random.Random(1).randbytes, initial_rto_s=0.5, max_transmissions=3)
    request = t.start(0.0)
    sent_at = [0.0]
    while (deadline := t.next_timer()) is not None:
        assert t.handle_timer(deadline - 0.001) is None  # early: nothing
        retransmission = t.handle_timer(deadline)
        if retransmission is not None:
            assert retransmission == request
            sent_at.append(deadline)
    # RFC 8489 section 6.2.1 shape: 0, RTO, 3 RTO; then one more doubled wait (4 RTO).
    assert sent_at == [0.0, 0.5, 1.5]
    assert t.result == BindingTimedOut()
    assert t.handle_timer(100.0) is None


def test_success_from_the_server_gives_the_mapped_address() -> None:
    t = transaction()
    t.start(0.0)
    answer = encode_binding_success(t.transaction_id, MAPPED)
    assert t.receive(answer, SERVER, 0.1) == BindingSucceeded(MAPPED)
    assert t.next_timer() is None
    assert t.receive(answer, SERVER, 0.2) is None  # ends once


def test_ipv4_mapped_server_source_counts_as_the_server() -> None:
    t = transaction()
    t.start(0.0)
    answer = encode_binding_success(t.transaction_id, MAPPED)
    assert t.receive(answer, ("::ffff:198.51.100.1", 3478), 0.1) == BindingSucceeded(MAPPED)


@pytest.mark.parametrize(
    "source",
    [("198.51.100.2", 3478), ("198.51.100.1", 3479)],
)
def test_an_answer_from_elsewhere_is_ignored(source: tuple[str, int]) -> None:
    t = transaction()
    t.start(0.0)
    assert t.receive(encode_binding_success(t.transaction_id, MAPPED), source, 0.1) is None
    assert t.result is None


def test_wrong_transaction_id_garbage_and_unusable_addresses_are_ignored() -> None:
    t = transaction()
    t.start(0.0)
    other = bytes(12) if t.transaction_id != bytes(12) else b"\x01" * 12
    ignored = [
        encode_binding_success(other, MAPPED),
        b"\x01\x01garbage",
        encode_binding_success(t.transaction_id, ("203.0.113.7", 0)),  # port 0
        encode_binding_success(t.transaction_id, ("0.0.0.0", 1)),
        encode_message(StunMessage(BINDING_METHOD, StunClass.SUCCESS, t.transaction_id)),  # no address
        encode_message(StunMessage(BINDING_METHOD, StunClass.REQUEST, t.transaction_id)),
        encode_message(StunMessage(BINDING_METHOD, StunClass.SUCCESS, t.transaction_id, ((0x0020, b"\x00\x01"),))),
    ]
    for data in ignored:
        assert t.receive(data, SERVER, 0.1) is None
    assert t.result is None
    assert t.receive(encode_binding_success(t.transaction_id, MAPPED), SERVER, 0.2) == BindingSucceeded(MAPPED)


def test_error_response_fails_the_transaction() -> None:
    t = transaction()
    t.start(0.0)
    error = StunMessage(BINDING_METHOD, StunClass.ERROR, t.transaction_id, ((0x0009, b"\x00\x00\x04\x14"),))
    assert t.receive(encode_message(error), SERVER, 0.1) == BindingFailed(420)


def test_start_twice_is_a_local_bug() -> None:
    t = transaction()
    t.start(0.0)
    with pytest.raises(RuntimeError):
        t.start(1.0)

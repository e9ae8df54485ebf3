"""The hole-punching state machine (DCUtR-style): timing, rounds, refusals, decoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.errors import LocalProtocolError, RemoteProtocolError
from lattica.nat.hole_punch import (
    MAX_MESSAGE_BYTES,
    MAX_PUNCH_ADDRESSES,
    Connect,
    DialDirect,
    HolePunch,
    HolePunchDecodeError,
    PunchFailed,
    PunchSucceeded,
    Role,
    SendMessage,
    SendPunches,
    Sync,
    decode_message,
    encode_message,
)

B_ADDRS = [("203.0.113.7", 40001), ("10.0.0.2", 4001)]  # the initiator: behind a NAT
A_ADDRS = [("198.51.100.9", 50002)]  # the responder
ONE_WAY_S = 0.05


def pair(**settings: float) -> tuple[HolePunch, HolePunch]:
    initiator = HolePunch(Role.INITIATOR, B_ADDRS, **settings)  # type: ignore[arg-type]
    responder = HolePunch(Role.RESPONDER, A_ADDRS, **settings)  # type: ignore[arg-type]
    return initiator, responder


def only_message(outputs: list[object]) -> Connect | Sync:
    [output] = outputs
    assert isinstance(output, SendMessage)
    return output.message


def exchange_until_both_act(initiator: HolePunch, responder: HolePunch, t: float) -> tuple[float, float]:
    """Play one round over a relay with ONE_WAY_S latency each way from ``t``; return when the
    responder dialled and when the initiator first punched."""
    connect_b = only_message(initiator.start(t) if initiator.round == 0 else initiator.handle_timer(t))
    t += ONE_WAY_S
    connect_a = only_message(responder.receive_message(connect_b, t))
    t += ONE_WAY_S
    sync = only_message(initiator.receive_message(connect_a, t))
    assert isinstance(sync, Sync)
    t += ONE_WAY_S
    [dial] = responder.receive_message(sync, t)
    assert dial == DialDirect(tuple(B_ADDRS))
    dialled_at = t
    punch_at = initiator.next_timer()
    assert punch_at is not None
    assert initiator.handle_timer(punch_at) == [SendPunches(tuple(A_ADDRS))]
    return dialled_at, punch_at


def test_both_sides_act_at_the_same_instant_half_a_relayed_rtt_after_sync() -> None:
    initiator, responder = pair()
    dialled_at, punched_at = exchange_until_both_act(initiator, responder, 0.0)
    assert initiator.rtt_s == pytest.approx(2 * ONE_WAY_S)
    assert dialled_at == pytest.approx(3 * ONE_WAY_S)
    assert punched_at == pytest.approx(dialled_at)
    assert initiator.peer_addresses == tuple(A_ADDRS) and responder.peer_addresses == tuple(B_ADDRS)


def test_punches_repeat_a_bounded_number_of_times_then_wait_for_the_round_to_end() -> None:
    initiator, responder = pair(punches_per_round=4, punch_interval_s=0.1, round_timeout_s=2.0)
    _, t = exchange_until_both_act(initiator, responder, 0.0)
    sent = 1
    for _ in range(20):
        nxt = initiator.next_timer()
        assert nxt is not None
        outputs = initiator.handle_timer(nxt)
        if outputs != [SendPunches(tuple(A_ADDRS))]:
            break
        assert nxt == pytest.approx(t + sent * 0.1)
        sent += 1
    assert sent == 4
    # The round ended (2 s after the punches began) and the next one began with a Connect.
    assert isinstance(only_message(outputs), Connect)
    assert nxt == pytest.approx(t + 2.0)
    assert initiator.round == 2


def test_a_direct_path_ends_the_attempt_with_the_time_from_first_contact() -> None:
    initiator = HolePunch(Role.INITIATOR, B_ADDRS, first_contact_at=10.0)
    responder = HolePunch(Role.RESPONDER, A_ADDRS, first_contact_at=10.0)
    dialled_at, _ = exchange_until_both_act(initiator, responder, 10.5)
    established = dialled_at + 2 * ONE_WAY_S
    [event] = responder.direct_path_established(B_ADDRS[0], established)
    assert event == PunchSucceeded(address=B_ADDRS[0], rounds=1, time_to_direct_s=pytest.approx(established - 10.0))
    [event] = initiator.direct_path_established(A_ADDRS[0], established)
    assert isinstance(event, PunchSucceeded) and event.rounds == 1
    assert initiator.done and responder.done
    assert initiator.next_timer() is None
    assert initiator.handle_timer(established + 100) == []
    assert responder.receive_message(Sync(), established + 1) == []


def test_three_rounds_without_a_direct_path_fail() -> None:
    initiator, responder = pair(round_timeout_s=1.0)
    t = 0.0
    for expected_round in (1, 2, 3):
        _, t = exchange_until_both_act(initiator, responder, t)
        assert initiator.round == responder.round == expected_round
        while (nxt := initiator.next_timer()) is not None and nxt < t + 1.0:
            initiator.handle_timer(nxt)  # the rest of this round's punches
        t = t + 1.0
        if expected_round < 3:
            continue
        assert initiator.handle_timer(t) == [PunchFailed(rounds=3, reason="no direct path after 3 round(s)")]
    assert initiator.done


def test_a_direct_path_in_the_second_round_reports_two_rounds() -> None:
    initiator, responder = pair(round_timeout_s=1.0)
    _, t = exchange_until_both_act(initiator, responder, 0.0)
    while (nxt := initiator.next_timer()) is not None and nxt < t + 1.0:
        initiator.handle_timer(nxt)
    dialled_at, _ = exchange_until_both_act(initiator, responder, t + 1.0)
    [event] = initiator.direct_path_established(A_ADDRS[0], dialled_at + ONE_WAY_S)
    assert isinstance(event, PunchSucceeded) and event.rounds == 2
    assert event.time_to_direct_s == pytest.approx(dialled_at + ONE_WAY_S)


def test_the_responder_refuses_a_round_beyond_the_limit_and_messages_out_of_turn() -> None:
    responder = HolePunch(Role.RESPONDER, A_ADDRS, rounds=2)
    responder.receive_message(Connect(addresses=B_ADDRS), 0.0)
    with pytest.raises(RemoteProtocolError):
        HolePunch(Role.RESPONDER, A_ADDRS).receive_message(Sync(), 0.0)  # Sync before any Connect
    responder.receive_message(Connect(addresses=B_ADDRS), 1.0)
    with pytest.raises(RemoteProtocolError, match="round 3 of 2"):
        responder.receive_message(Connect(addresses=B_ADDRS), 2.0)
    initiator = HolePunch(Role.INITIATOR, B_ADDRS)
    initiator.start(0.0)
    with pytest.raises(RemoteProtocolError):
        initiator.receive_message(Sync(), 0.1)
    with pytest.raises(LocalProtocolError):
        HolePunch(Role.RESPONDER, A_ADDRS).start(0.0)


def test_a_responder_whose_initiator_goes_quiet_gives_up_after_two_round_timeouts() -> None:
    responder = HolePunch(Role.RESPONDER, A_ADDRS, round_timeout_s=1.0)
    responder.receive_message(Connect(addresses=B_ADDRS), 0.0)
    responder.receive_message(Sync(), 0.1)
    assert responder.next_timer() == pytest.approx(2.1)
    assert responder.handle_timer(2.0) == []
    [failed] = responder.handle_timer(2.1)
    assert isinstance(failed, PunchFailed) and failed.rounds == 1


def test_an_initiator_whose_connect_is_never_answered_moves_to_the_next_round() -> None:
    initiator = HolePunch(Role.INITIATOR, B_ADDRS, round_timeout_s=1.0, rounds=2)
    initiator.start(0.0)
    assert isinstance(only_message(initiator.handle_timer(1.0)), Connect)
    [failed] = initiator.handle_timer(2.0)
    assert failed == PunchFailed(rounds=2, reason="no direct path after 2 round(s)")


def test_addresses_are_canonical_deduplicated_and_bounded() -> None:
    responder = HolePunch(Role.RESPONDER, A_ADDRS)
    responder.receive_message(Connect(addresses=[("::ffff:203.0.113.7", 40001), ("203.0.113.7", 40001)]), 0.0)
    assert responder.peer_addresses == (("203.0.113.7", 40001),)
    many = [(f"203.0.113.{i}", 4001) for i in range(1, 20)]
    assert len(HolePunch(Role.INITIATOR, many).own_addresses) == MAX_PUNCH_ADDRESSES
    with pytest.raises(LocalProtocolError):
        HolePunch(Role.INITIATOR, [("example.com", 4001)])
    with pytest.raises(LocalProtocolError):
        HolePunch(Role.INITIATOR, B_ADDRS, punches_per_round=100, punch_interval_s=0.1, round_timeout_s=1.0)


def test_messages_round_trip() -> None:
    for message in (Connect(addresses=B_ADDRS), Connect(addresses=[("2001:db8::1", 443)]), Sync()):
        assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "bad",
    [
        Connect(addresses=[("203.0.113.1", 1)] * (MAX_PUNCH_ADDRESSES + 1)),
        {"type": "connect", "addresses": [["example.com", 4001]]},
        {"type": "connect", "addresses": [["0.0.0.0", 4001]]},
        {"type": "connect", "addresses": [["203.0.113.1", 0]]},
        {"type": "connect", "addresses": [["203.0.113.1", 4001]], "extra": 1},
        {"type": "punch-everyone"},
    ],
)
def test_bad_messages_are_typed_errors(bad: object) -> None:
    import msgspec

    with pytest.raises(HolePunchDecodeError):
        decode_message(msgspec.msgpack.encode(bad))


def test_oversized_and_deeply_nested_messages_are_typed_errors() -> None:
    with pytest.raises(HolePunchDecodeError):
        decode_message(b"\x91" * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(HolePunchDecodeError):
        decode_message(b"\x91" * 1000)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_to_a_valid_message_or_a_typed_error(data: bytes) -> None:
    try:
        message = decode_message(data)
    except HolePunchDecodeError:
        return
    assert isinstance(message, Connect | Sync)
    assert decode_message(encode_message(message)) == message

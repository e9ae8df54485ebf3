"""AutoNAT's sans-I/O parts: the server's dial-back policy and attempt, the client's inbox,
verdicts (nonce checks) and the reachability tracker."""

from __future__ import annotations

import pytest

from lattica.nat.autonat import (
    DIAL_BACK_TRANSMISSIONS,
    DialBackAttempt,
    DialBackInbox,
    DialBackPlan,
    DialBackPolicy,
    DialBackRefused,
    NonceMismatchError,
    ReachabilityTracker,
    verdict_of,
)
from lattica.nat.autonat_messages import (
    DialBackPacket,
    DialBackRequest,
    DialBackResponse,
    decode_dial_back_packet,
    encode_dial_back_packet,
)

CLIENT = ("203.0.113.1", 40000)
SERVER = ("198.51.100.1", 4001)
SERVER_EPHEMERAL = ("198.51.100.1", 50123)
NONCE = bytes(range(16))


def policy(**overrides: object) -> DialBackPolicy:
    settings: dict[str, object] = {"per_address_per_minute": 6, "total_per_minute": 120}
    settings.update(overrides)
    return DialBackPolicy(**settings)  # type: ignore[arg-type]


def request(*addresses: tuple[str, int]) -> DialBackRequest:
    return DialBackRequest(addresses=list(addresses))


def test_the_server_dials_back_only_the_ip_the_connection_comes_from() -> None:
    p = policy()
    assert p.decide(b"peer", CLIENT, request(("203.0.113.1", 40001)), now=0) == DialBackPlan(("203.0.113.1", 40001))
    # Any other IP in the request, even next to ours, is a third party: refused as a whole.
    third_party = request(CLIENT, ("192.0.2.99", 53))
    assert p.decide(b"peer", CLIENT, third_party, now=0) == DialBackRefused("third-party-address")
    assert p.decide(b"peer", CLIENT, request(("192.0.2.99", 53)), now=0) == DialBackRefused("third-party-address")


def test_without_a_separate_socket_the_server_refuses() -> None:
    p = policy(can_dial_back=False)
    assert p.decide(b"peer", CLIENT, request(CLIENT), now=0) == DialBackRefused("unavailable")


def test_dial_backs_are_rate_limited_per_address_and_refusals_cost_nothing() -> None:
    p = policy(per_address_per_minute=3)
    for _ in range(10):
        p.decide(b"peer", CLIENT, request(("192.0.2.1", 1)), now=0)  # refusals
    assert [p.decide(b"peer", CLIENT, request(CLIENT), now=0) for _ in range(4)] == [DialBackPlan(CLIENT)] * 3 + [
        DialBackRefused("rate-limited")
    ]
    # Fresh peer ids at the same address get nothing more (review: 20 ids used up the whole
    # budget when this was per peer); another address is not starved; the first address gets
    # one more after 20 s (3 per minute).
    assert p.decide(b"minted", CLIENT, request(CLIENT), now=0) == DialBackRefused("rate-limited")
    assert p.decide(b"other", ("203.0.113.2", 1), request(("203.0.113.2", 1)), now=0) == DialBackPlan(
        ("203.0.113.2", 1)
    )
    assert p.decide(b"peer", CLIENT, request(CLIENT), now=19.9) == DialBackRefused("rate-limited")
    assert p.decide(b"peer", CLIENT, request(CLIENT), now=20.0) == DialBackPlan(CLIENT)


def test_dial_backs_are_rate_limited_for_all_peers_together() -> None:
    p = policy(per_address_per_minute=6, total_per_minute=10)
    hosts = [(f"203.0.113.{i + 1}", 1) for i in range(15)]
    outcomes = [p.decide(b"peer-%d" % i, host, request(host), now=0) for i, host in enumerate(hosts)]
    assert outcomes.count(DialBackRefused("rate-limited")) == 5


def test_an_attempt_retransmits_and_succeeds_only_on_the_right_echo() -> None:
    attempt = DialBackAttempt(CLIENT, NONCE, timeout_s=3.0)
    sent = [attempt.start(0.0)]
    assert decode_dial_back_packet(sent[0]) == DialBackPacket("dial-back", NONCE)
    assert attempt.next_timer() == 0.5
    for now in (0.5, 1.0):
        retransmission = attempt.handle_timer(now)
        assert retransmission is not None
        sent.append(retransmission)
    assert len(sent) == DIAL_BACK_TRANSMISSIONS and attempt.next_timer() == 3.0
    assert attempt.handle_timer(2.0) is None and not attempt.done
    echo = encode_dial_back_packet(DialBackPacket("echo", NONCE))
    wrong_nonce = encode_dial_back_packet(DialBackPacket("echo", bytes(16)))
    assert not attempt.receive(wrong_nonce, CLIENT)
    assert not attempt.receive(echo, ("192.0.2.99", 40000))  # from another IP
    assert not attempt.receive(sent[0], CLIENT)  # our own dial-back reflected
    assert not attempt.receive(b"garbage", CLIENT)
    assert attempt.receive(echo, ("203.0.113.1", 40999))  # a NAT may pick another port
    assert attempt.done
    assert attempt.response() == DialBackResponse(status="ok", address=CLIENT, nonce=NONCE)


def test_an_attempt_without_echo_ends_at_its_timeout() -> None:
    attempt = DialBackAttempt(CLIENT, NONCE, timeout_s=3.0)
    attempt.start(10.0)
    attempt.handle_timer(10.5)
    attempt.handle_timer(11.0)
    assert not attempt.done
    assert attempt.handle_timer(13.0) is None and attempt.done
    assert attempt.response().status == "no-echo"
    with pytest.raises(ValueError):
        DialBackAttempt(CLIENT, b"short", timeout_s=1)


def test_the_inbox_echoes_dial_backs_only_while_a_check_runs() -> None:
    inbox = DialBackInbox()
    packet = encode_dial_back_packet(DialBackPacket("dial-back", NONCE))
    assert inbox.receive(packet, SERVER_EPHEMERAL, now=0) is None  # nobody asked
    inbox.expect(until=10)
    assert inbox.receive(packet, SERVER_EPHEMERAL, now=1) == encode_dial_back_packet(DialBackPacket("echo", NONCE))
    assert inbox.received_from(NONCE) == SERVER_EPHEMERAL
    assert inbox.receive(encode_dial_back_packet(DialBackPacket("echo", NONCE)), SERVER, now=1) is None
    assert inbox.receive(packet, SERVER_EPHEMERAL, now=11) is None


def test_the_inbox_echoes_at_a_bounded_rate_and_remembers_a_bounded_number() -> None:
    inbox = DialBackInbox(max_nonces=4, echoes_per_second=5)
    inbox.expect(until=100)
    echoes = [
        inbox.receive(encode_dial_back_packet(DialBackPacket("dial-back", i.to_bytes(16))), SERVER, now=0)
        for i in range(20)
    ]
    assert sum(e is not None for e in echoes) == 5
    assert inbox.received_from((0).to_bytes(16)) is None  # forgotten (bounded)
    assert inbox.received_from((4).to_bytes(16)) == SERVER


def test_verdicts_need_the_nonce_to_have_arrived_from_another_socket() -> None:
    inbox = DialBackInbox()
    inbox.expect(until=10)
    ok = DialBackResponse(status="ok", address=CLIENT, nonce=NONCE)
    no_echo = DialBackResponse(status="no-echo", address=CLIENT, nonce=NONCE)
    with pytest.raises(NonceMismatchError):  # the server claims an echo we never sent
        verdict_of(ok, inbox, SERVER, [CLIENT])
    assert verdict_of(no_echo, inbox, SERVER, [CLIENT]) == "unreachable"
    assert verdict_of(DialBackResponse(status="refused", refusal="rate-limited"), inbox, SERVER, [CLIENT]) is None
    # A dial-back from the very address our connection to the server uses proves nothing:
    # any NAT filter admits it.
    inbox.receive(encode_dial_back_packet(DialBackPacket("dial-back", NONCE)), SERVER, now=0)
    assert verdict_of(no_echo, inbox, SERVER, [CLIENT]) == "unreachable"
    with pytest.raises(NonceMismatchError):
        verdict_of(ok, inbox, SERVER, [CLIENT])
    inbox.receive(encode_dial_back_packet(DialBackPacket("dial-back", NONCE)), SERVER_EPHEMERAL, now=0)
    assert verdict_of(ok, inbox, SERVER, [CLIENT]) == "reachable"
    assert verdict_of(no_echo, inbox, SERVER, [CLIENT]) == "reachable"  # our echo was lost; we saw it
    with pytest.raises(NonceMismatchError):  # a dial-back we did not ask for proves nothing
        verdict_of(ok, inbox, SERVER, [("203.0.113.1", 1)])


def tracker() -> ReachabilityTracker:
    own = {("198.51.100.9", 4001)}
    return ReachabilityTracker(min_agreeing_results=3, is_own_address=lambda a: a in own)


def test_three_agreeing_reachable_results_on_our_own_address_mean_public() -> None:
    t = tracker()
    assert not t.record("a", "reachable", ("198.51.100.9", 4001))
    assert not t.record("a", "reachable", ("198.51.100.9", 4001))  # one server, one vote
    assert not t.record("b", "reachable", ("198.51.100.9", 4001))
    assert t.status().reachability == "unknown"
    assert t.record("c", "reachable", ("198.51.100.9", 4001))
    status = t.status()
    assert (status.reachability, status.confidence, status.translated) == ("public", 3, False)
    assert t.forget() and t.status().reachability == "unknown"


def test_reachable_through_a_translated_address_is_private() -> None:
    t = tracker()
    for server in "abc":
        t.record(server, "reachable", CLIENT)
    status = t.status()
    assert (status.reachability, status.translated, status.reachable_results) == ("private", True, 3)


def test_unreachable_results_mean_private_and_disagreement_unknown() -> None:
    t = tracker()
    for server in "abc":
        t.record(server, "unreachable", CLIENT)
    assert t.status().reachability == "private"
    for server in "def":
        t.record(server, "reachable", ("198.51.100.9", 4001))
    assert t.status().reachability == "unknown"  # 3 against 3: no verdict

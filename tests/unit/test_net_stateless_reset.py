"""Stateless Reset (RFC 9000 section 10.3): tokens, the reset packet, the limiter, and the tokens
a connection gives out (in memory; the restart itself is in tests/sim/test_node_edges_on_sim_net.py)."""

from __future__ import annotations

import hashlib

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header
from hypothesis import given
from hypothesis import strategies as st

from lattica.identity import Identity
from lattica.net.config import EndpointConfig
from lattica.net.quic_internals import LatticaQuicConnection
from lattica.net.stateless_reset import (
    CID_TAG_BYTES,
    MAX_RESET_BYTES,
    MIN_RESET_BYTES,
    MIN_TRIGGER_BYTES,
    TOKEN_BYTES,
    ResetLimiter,
    build_stateless_reset,
    is_our_connection_id,
    is_stateless_reset,
    reset_key,
    reset_token,
    tagged_connection_id,
)
from lattica.net.tls_identity import quic_configuration

SEED_A = hashlib.sha256(b"reset-a").digest()
SEED_B = hashlib.sha256(b"reset-b").digest()
CID = bytes(range(8))


def test_a_token_depends_on_the_identity_and_the_id_and_survives_a_restart() -> None:
    key = reset_key(SEED_A)
    assert reset_token(key, CID) == reset_token(reset_key(SEED_A), CID)  # the same node, later
    assert reset_token(key, CID) != reset_token(reset_key(SEED_B), CID)
    assert reset_token(key, CID) != reset_token(key, CID[::-1])
    assert len(reset_token(key, CID)) == TOKEN_BYTES
    assert key != SEED_A


@given(trigger=st.integers(min_value=0, max_value=1500), filler=st.binary(min_size=64, max_size=64))
def test_a_reset_is_shorter_than_its_trigger_and_looks_like_a_short_header(trigger: int, filler: bytes) -> None:
    token = reset_token(reset_key(SEED_A), CID)
    size = min(trigger - 1, MAX_RESET_BYTES)
    reset = build_stateless_reset(token, trigger, filler[: max(0, size - TOKEN_BYTES)])
    if trigger < MIN_TRIGGER_BYTES:
        assert reset is None
        return
    assert reset is not None
    assert MIN_RESET_BYTES <= len(reset) < trigger
    assert len(reset) <= MAX_RESET_BYTES
    assert reset[0] & 0xC0 == 0x40  # short header form, fixed bit set
    assert reset.endswith(token)
    assert is_stateless_reset(reset, token)


def test_only_a_short_header_datagram_ending_with_the_token_is_a_reset() -> None:
    token = reset_token(reset_key(SEED_A), CID)
    reset = build_stateless_reset(token, 100)
    assert reset is not None and is_stateless_reset(reset, token)
    assert not is_stateless_reset(reset, reset_token(reset_key(SEED_B), CID))
    assert not is_stateless_reset(bytes([0xC0]) + reset[1:], token)  # a long header
    assert not is_stateless_reset(bytes([0x00]) + reset[1:], token)  # no fixed bit: not QUIC
    assert not is_stateless_reset(bytes([0x40]) + token[-(MIN_RESET_BYTES - 2) :], token)  # too short


def test_a_node_recognises_the_connection_ids_it_issued_and_no_others() -> None:
    key = reset_key(SEED_A)
    ours = tagged_connection_id(key, bytes(range(5)))
    assert len(ours) == 5 + CID_TAG_BYTES and is_our_connection_id(key, ours)
    assert is_our_connection_id(reset_key(SEED_A), ours)  # after a restart too
    assert not is_our_connection_id(reset_key(SEED_B), ours)
    assert not is_our_connection_id(key, ours[:-1] + bytes([ours[-1] ^ 1]))
    assert not is_our_connection_id(key, b"\x99" * 8)
    assert not is_our_connection_id(key, ours[-CID_TAG_BYTES:])  # too short to carry a tag


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        build_stateless_reset(b"short", 100)
    with pytest.raises(ValueError, match="unpredictable"):
        build_stateless_reset(bytes(16), 100, b"\x00")
    with pytest.raises(ValueError):
        ResetLimiter(rate_per_s=0)


def test_the_limiter_allows_a_burst_then_its_rate() -> None:
    limiter = ResetLimiter(rate_per_s=10, burst=3, per_source_interval_s=0)
    assert [limiter.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert not limiter.allow(0.05)  # half a reset earned
    assert limiter.allow(0.1)
    assert not limiter.allow(0.1)
    assert [limiter.allow(100.0) for _ in range(4)] == [True, True, True, False]  # never above the burst
    assert not limiter.allow(50.0)  # a clock that went back earns nothing


def test_one_source_gets_one_reset_per_interval_and_cannot_use_up_the_budget() -> None:
    limiter = ResetLimiter(rate_per_s=10, burst=3, per_source_interval_s=1.0, max_sources=2)
    assert limiter.allow(0.0, "junk")
    assert not any(limiter.allow(0.1 * i, "junk") for i in range(1, 10))  # refused, and not charged
    assert limiter.allow(0.5, "peer-1") and limiter.allow(0.5, "peer-2")  # the budget is still there
    assert limiter.allow(1.0, "junk")  # its interval passed
    # Only max_sources are remembered: the oldest ("peer-1", "peer-2" after "junk") is forgotten.
    assert limiter.allow(1.2, "peer-3")
    assert limiter.allow(1.3, "peer-1")  # forgotten, so not held to its interval
    assert not limiter.allow(1.3, "peer-3")  # remembered


def _quic(identity: Identity, *, is_client: bool, **kwargs: object) -> LatticaQuicConnection:
    config = EndpointConfig()
    return LatticaQuicConnection(
        configuration=quic_configuration(identity, is_client=is_client, config=config),
        max_incoming_streams=config.max_incoming_streams,
        stream_receive_window_bytes=config.stream_receive_window_bytes,
        **kwargs,
    )


def test_every_token_a_connection_gives_out_is_derived_from_the_node_key() -> None:
    client_key, server_key = reset_key(SEED_A), reset_key(SEED_B)
    client = _quic(
        Identity.from_seed(SEED_A),
        is_client=True,
        reset_token_for=lambda c: reset_token(client_key, c),
        connection_id_for=lambda c: tagged_connection_id(client_key, c[:5]),
    )
    first_client_cid = client._host_cids[0]
    assert first_client_cid.stateless_reset_token is None  # a client's first id has none
    now = 1000.0
    client.connect(("127.0.0.1", 2), now=now)
    first = client.datagrams_to_send(now)
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = _quic(
        Identity.from_seed(SEED_B),
        is_client=False,
        original_destination_connection_id=header.destination_cid,
        reset_token_for=lambda c: reset_token(server_key, c),
        connection_id_for=lambda c: tagged_connection_id(server_key, c[:5]),
    )
    in_flight = [(d, server) for d, _ in first]
    for _ in range(20):  # the handshake and the NEW_CONNECTION_ID frames, in memory
        if not in_flight:
            break
        for data, to in in_flight:
            to.receive_datagram(data, ("127.0.0.1", 1 if to is server else 2), now)
        in_flight = [(d, server) for d, _ in client.datagrams_to_send(now)]
        in_flight += [(d, client) for d, _ in server.datagrams_to_send(now)]
    # The server's first id (its transport parameter) and every id either side issued since.
    assert client.peer_reset_token == reset_token(server_key, client._peer_cid.cid)
    assert len(server._host_cids) > 1 and len(client._host_cids) > 1
    assert is_our_connection_id(client_key, client.host_cid)
    assert is_our_connection_id(server_key, server.host_cid)
    for quic, key in ((server, server_key), (client, client_key)):
        for host_cid in quic._host_cids:
            assert is_our_connection_id(key, host_cid.cid)  # every id issued carries the tag
            if host_cid.stateless_reset_token:
                assert host_cid.stateless_reset_token == reset_token(key, host_cid.cid)
    # ... so the server moved to one the client issued since, which has one.
    assert server._peer_cid.cid != first_client_cid.cid
    assert server.peer_reset_token == reset_token(client_key, server._peer_cid.cid)
    for peer_cid in client._peer_cid_available:
        assert peer_cid.stateless_reset_token == reset_token(server_key, peer_cid.cid)

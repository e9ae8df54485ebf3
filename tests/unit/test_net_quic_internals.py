"""Each override in ``quic_internals`` still does its job on the installed aioquic (in memory).

The pacer clamp is specified in ``test_net_pacer.py`` and the client-certificate request and
peer certificate in ``test_net_tls_identity.py``; the rest is here.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest

from lattica.net import quic_internals
from lattica.net.config import EndpointConfig
from lattica.net.connection_state import ConnectionClosed, ConnectionTerminated, StreamDataReceived

from .test_net_connection_state import pair


class _ContextWithoutPeerCertificate:
    """A TLS context as a future aioquic might have it: the private attribute renamed."""

    def __init__(self, is_client: bool) -> None:
        self._request_client_certificate = False


def test_a_missing_private_name_fails_the_import_naming_the_aioquic_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quic_internals._check_private_names()  # the installed aioquic passes
    monkeypatch.setattr(quic_internals.tls, "Context", _ContextWithoutPeerCertificate)
    with pytest.raises(ImportError) as info:
        quic_internals._check_private_names()
    message = str(info.value)
    assert "tls.Context._peer_certificate" in message
    assert f"aioquic {version('aioquic')}" in message
    assert f"{quic_internals.TESTED_AIOQUIC_SERIES}.x" in message


def test_installed_aioquic_is_the_tested_series() -> None:
    assert version("aioquic").startswith(quic_internals.TESTED_AIOQUIC_SERIES + ".")


def test_peer_gets_the_bidirectional_stream_limit_we_chose() -> None:
    p = pair(EndpointConfig(max_incoming_streams=3))
    for _ in range(3):
        assert p.client.can_open_stream()
        p.client.open_stream(p.now)
    assert not p.client.can_open_stream()


def test_peer_may_open_no_unidirectional_streams() -> None:
    p = pair()
    quic = p.client._quic
    uni_id = quic.get_next_available_stream_id(is_unidirectional=True)
    # The server granted none, so aioquic holds the data back (STREAMS_BLOCKED); with aioquic's
    # default grant of 128 it would reach the server.
    quic.send_stream_data(uni_id, b"x")
    p.advance(1)
    assert not any(getattr(e, "stream_id", None) == uni_id for e in p.server_events)


def _received(events: list[object], stream_id: int) -> int:
    return sum(len(e.data) for e in events if isinstance(e, StreamDataReceived) and e.stream_id == stream_id)


def test_receive_window_grows_only_as_the_reader_consumes() -> None:
    window = 64 * 1024
    p = pair(EndpointConfig(stream_receive_window_bytes=window, connection_receive_window_bytes=16 << 20))
    stream_id = p.client.open_stream(p.now)
    p.client.send_stream_data(stream_id, b"x" * (1 << 20))
    p.advance(5)
    arrived = _received(p.server_events, stream_id)
    # Nothing read: the peer is held to one window (aioquic alone would double it as data arrives).
    assert arrived == window
    assert p.server.stream_consumed(stream_id, arrived)
    p.pump()  # what the driver does when stream_consumed asks for a flush
    p.advance(5)
    assert _received(p.server_events, stream_id) == 2 * window


def test_send_buffer_counts_unacknowledged_bytes_until_acked() -> None:
    p = pair()
    stream_id = p.client.open_stream(p.now)
    p.client.send_stream_data(stream_id, b"y" * 10_000)
    assert p.client.stream_send_buffered(stream_id) == 10_000
    p.advance(1)
    assert p.client.stream_send_buffered(stream_id) == 0


def test_stream_state_is_discarded_once_both_directions_finished() -> None:
    p = pair()
    stream_id = p.client.open_stream(p.now)
    p.client.send_stream_data(stream_id, b"q", end_stream=True)
    p.pump()
    assert p.client._quic.has_stream(stream_id) and p.server._quic.has_stream(stream_id)
    p.server.send_stream_data(stream_id, b"a", end_stream=True)
    p.advance(1)
    assert any(isinstance(e, StreamDataReceived) and e.end_stream for e in p.client_events)
    assert not p.client._quic.has_stream(stream_id)
    assert not p.server._quic.has_stream(stream_id)


def test_close_is_reported_at_once_not_after_draining() -> None:
    p = pair()
    p.client.close("bye")
    assert p.client._quic.close_event is not None
    p.pump()
    # The peer hears it at once too; termination comes only after the draining period.
    assert ConnectionClosed("bye", "peer") in p.server_events
    assert ConnectionTerminated() not in p.server_events
    p.advance(10)
    assert p.server_events[-1] == ConnectionTerminated()


def test_rtt_is_unknown_before_the_first_sample() -> None:
    p = pair()
    assert p.client.rtt_s is not None
    from lattica.identity import Identity

    from .test_net_connection_state import START, _client

    fresh = _client(Identity.generate(), EndpointConfig())
    fresh.connect(START)
    assert fresh.rtt_s is None


def test_amplification_budget_counts_down_from_three_times_received() -> None:
    from lattica.identity import Identity

    from .test_net_connection_state import CLIENT_PATH, START, _client, _server_for

    config = EndpointConfig()
    client = _client(Identity.generate(), config)
    client.connect(START)
    (first,) = client.datagrams_to_send(START)
    server = _server_for(first[0], Identity.generate(), config, START)
    server.receive_datagram(first[0], CLIENT_PATH, START)
    assert server._quic.amplification_budget_bytes == 3 * 1200
    sent = sum(len(d) for d, _ in server.datagrams_to_send(START))
    assert server._quic.amplification_budget_bytes == 3 * 1200 - sent

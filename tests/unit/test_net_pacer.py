"""The pacer clamp: at loopback rates aioquic's bucket holds less than one packet."""

from __future__ import annotations

from aioquic.quic.recovery import QuicPacketPacer

from lattica.identity import Identity
from lattica.net.config import EndpointConfig
from lattica.net.quic_internals import ClampedPacer, LatticaQuicConnection
from lattica.net.tls_identity import quic_configuration

MSS = 1200
# cwnd / srtt = 2 MB / 50 us = 40 GB/s: what a loss-free loopback reaches.
HUGE_CWND = 2_000_000
TINY_SRTT = 50e-6


def _burst_after_idle(pacer: QuicPacketPacer) -> int:
    """How many datagrams leave back to back after a long idle period."""
    pacer.update_rate(congestion_window=HUGE_CWND, smoothed_rtt=TINY_SRTT)
    now = 10.0
    pacer.update_bucket(now=now)
    sent = 0
    while pacer.next_send_time(now) is None and sent < 1000:
        pacer.update_after_send(now)
        sent += 1
    return sent


def test_unclamped_pacer_has_the_bug_this_clamp_fixes() -> None:
    pacer = QuicPacketPacer(max_datagram_size=MSS)
    pacer.update_rate(congestion_window=HUGE_CWND, smoothed_rtt=TINY_SRTT)
    assert pacer.packet_time is not None
    assert pacer.bucket_max < pacer.packet_time
    assert _burst_after_idle(QuicPacketPacer(max_datagram_size=MSS)) <= 1


def test_clamped_pacer_keeps_a_bucket_of_sixteen_packets() -> None:
    pacer = ClampedPacer(max_datagram_size=MSS)
    pacer.update_rate(congestion_window=HUGE_CWND, smoothed_rtt=TINY_SRTT)
    assert pacer.packet_time is not None
    assert pacer.bucket_max >= 16 * pacer.packet_time
    assert _burst_after_idle(ClampedPacer(max_datagram_size=MSS)) >= 16


def test_clamp_leaves_ordinary_rates_alone() -> None:
    plain, clamped = QuicPacketPacer(max_datagram_size=MSS), ClampedPacer(max_datagram_size=MSS)
    for pacer in (plain, clamped):
        pacer.update_rate(congestion_window=120_000, smoothed_rtt=0.05)
    assert clamped.bucket_max == plain.bucket_max


def test_every_connection_gets_the_clamped_pacer() -> None:
    quic = LatticaQuicConnection(
        configuration=quic_configuration(Identity.generate(), is_client=True, config=EndpointConfig()),
        max_incoming_streams=8,
        stream_receive_window_bytes=1 << 16,
    )
    assert isinstance(quic.pacer, ClampedPacer)


def test_fast_paths_may_burst_sixty_four_datagrams() -> None:
    # 80 MB/s (a fast LAN, or loopback once RTT includes processing): 64 datagrams are ~1 ms.
    pacer = ClampedPacer(max_datagram_size=MSS)
    pacer.update_rate(congestion_window=800_000, smoothed_rtt=0.01)
    assert pacer.packet_time is not None
    assert pacer.bucket_max >= 64 * pacer.packet_time
    assert _burst_after_idle(ClampedPacer(max_datagram_size=MSS)) >= 64


def test_bursts_stay_within_a_millisecond_of_the_pacing_rate() -> None:
    # 24 MB/s: 64 datagrams would take 3.2 ms, so the burst is capped at 1 ms (20 datagrams).
    plain, clamped = QuicPacketPacer(max_datagram_size=MSS), ClampedPacer(max_datagram_size=MSS)
    for pacer in (plain, clamped):
        pacer.update_rate(congestion_window=240_000, smoothed_rtt=0.01)
    assert plain.packet_time is not None
    assert clamped.bucket_max == max(plain.bucket_max, 1e-3)
    assert clamped.bucket_max < 64 * plain.packet_time

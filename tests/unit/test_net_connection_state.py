"""The sans-I/O connection core: two states pumped in memory, virtual ``now``, no sockets."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header

from lattica.errors import LocalProtocolError
from lattica.identity import Identity, PeerId
from lattica.net.config import EndpointConfig
from lattica.net.connection_state import (
    Authenticated,
    ConnectionClosed,
    ConnectionEvent,
    ConnectionState,
    ConnectionTerminated,
    HandshakeFailed,
    StreamDataReceived,
    StreamOpened,
)
from lattica.net.quic_internals import LatticaQuicConnection
from lattica.net.tls_identity import CONNECTION_ID_LENGTH, quic_configuration

Path = tuple[str, int]
CLIENT_PATH = ("127.0.0.1", 1111)
SERVER_PATH = ("127.0.0.1", 2222)
START = 1000.0


def _quic(identity: Identity, *, is_client: bool, config: EndpointConfig, **kwargs: object) -> LatticaQuicConnection:
    return LatticaQuicConnection(
        configuration=quic_configuration(identity, is_client=is_client, config=config),
        max_incoming_streams=config.max_incoming_streams,
        stream_receive_window_bytes=config.stream_receive_window_bytes,
        **kwargs,
    )


def _client(
    identity: Identity, config: EndpointConfig, *, expected_peer: PeerId | None = None
) -> ConnectionState[Path]:
    return ConnectionState(
        _quic(identity, is_client=True, config=config),
        direction="outbound",
        path=SERVER_PATH,
        now=START,
        config=config,
        expected_peer=expected_peer,
    )


def _server_for(first: bytes, identity: Identity, config: EndpointConfig, now: float) -> ConnectionState[Path]:
    header = pull_quic_header(Buffer(data=first), host_cid_length=CONNECTION_ID_LENGTH)
    quic = _quic(identity, is_client=False, config=config, original_destination_connection_id=header.destination_cid)
    return ConnectionState(quic, direction="inbound", path=CLIENT_PATH, now=now, config=config)


def _drain(state: ConnectionState[Path]) -> list[ConnectionEvent]:
    out = []
    while (event := state.next_event()) is not None:
        out.append(event)
    return out


@dataclass
class Pair:
    """A client and a server state and the events each emitted so far."""

    client: ConnectionState[Path]
    server: ConnectionState[Path]
    now: float = START
    client_events: list[ConnectionEvent] = field(default_factory=list)
    server_events: list[ConnectionEvent] = field(default_factory=list)

    def pump(self, rounds: int = 20) -> None:
        """Move datagrams both ways at a fixed ``now`` until nothing moves."""
        for _ in range(rounds):
            moved = False
            for data, path in self.client.datagrams_to_send(self.now):
                assert path == SERVER_PATH
                self.server.receive_datagram(data, CLIENT_PATH, self.now)
                moved = True
            for data, path in self.server.datagrams_to_send(self.now):
                assert path == CLIENT_PATH
                self.client.receive_datagram(data, SERVER_PATH, self.now)
                moved = True
            self.client_events += _drain(self.client)
            self.server_events += _drain(self.server)
            if not moved:
                return

    def advance(self, seconds: float) -> None:
        """Let virtual time pass, running both timers as they fall due, then pump."""
        end = self.now + seconds
        while True:
            timers = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None]
            if not timers or min(timers) > end:
                break
            due = min(timers)
            self.now = max(self.now, due)
            for state in (self.client, self.server):
                timer = state.get_timer()
                if timer is not None and timer <= self.now:
                    state.handle_timer(self.now)
            self.pump()
        self.now = end


def pair(
    config: EndpointConfig = EndpointConfig(),  # noqa: B008 -- frozen
    *,
    server_identity: Identity | None = None,
    expected_peer: PeerId | None = None,
) -> Pair:
    """A client that dialled and a server created from its first datagram, handshake pumped."""
    client_identity = Identity.from_seed(b"\x01" * 32)
    server_identity = server_identity or Identity.from_seed(b"\x02" * 32)
    client = _client(client_identity, config, expected_peer=expected_peer)
    client.connect(START)
    first = client.datagrams_to_send(START)
    server = _server_for(first[0][0], server_identity, config, START)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_PATH, START)
    p = Pair(client, server)
    p.client_events += _drain(client)
    p.pump()
    return p


def test_both_sides_authenticate_the_other() -> None:
    p = pair()
    assert Authenticated(Identity.from_seed(b"\x02" * 32).peer_id) in p.client_events
    assert Authenticated(Identity.from_seed(b"\x01" * 32).peer_id) in p.server_events
    assert p.client.is_authenticated and p.server.is_authenticated
    assert p.client.rtt_s is not None


def test_stream_data_reaches_the_peer_as_events() -> None:
    p = pair()
    stream_id = p.client.open_stream(p.now)
    p.client.send_stream_data(stream_id, b"hello", end_stream=True)
    p.pump()
    assert StreamOpened(stream_id) in p.server_events
    data = b"".join(e.data for e in p.server_events if isinstance(e, StreamDataReceived))
    assert data == b"hello"
    assert any(isinstance(e, StreamDataReceived) and e.end_stream for e in p.server_events)
    assert p.server.open_stream_count == 1


def test_dialling_the_wrong_peer_fails_the_handshake_as_a_mismatch() -> None:
    impostor = Identity.generate().peer_id
    p = pair(expected_peer=impostor)
    (failed,) = [e for e in p.client_events if isinstance(e, HandshakeFailed)]
    assert failed.failure == "peer-mismatch"
    assert failed.expected == impostor and failed.actual == Identity.from_seed(b"\x02" * 32).peer_id
    assert not any(isinstance(e, Authenticated) for e in p.client_events)
    assert ConnectionClosed("peer id mismatch", "local") in p.client_events
    # The server learns of it as the peer's doing.
    assert any(isinstance(e, ConnectionClosed) and e.initiator == "peer" for e in p.server_events)


def test_application_close_is_local_here_and_peer_there() -> None:
    p = pair()
    p.client.close("done")
    p.pump()
    assert ConnectionClosed("done", "local") in p.client_events
    assert ConnectionClosed("done", "peer") in p.server_events
    with pytest.raises(LocalProtocolError):
        p.client.open_stream(p.now)


def test_idle_timeout_is_the_network_s_fault() -> None:
    config = EndpointConfig(idle_timeout_s=5.0, keepalive_interval_s=1000.0)
    p = pair(config)
    # Only the client's timers run: the server is gone.
    end = p.now + 10
    while (timer := p.client.get_timer()) is not None and timer <= end:
        p.now = timer
        p.client.handle_timer(p.now)
        p.client.datagrams_to_send(p.now)
        p.client_events += _drain(p.client)
    closed = [e for e in p.client_events if isinstance(e, ConnectionClosed)]
    assert [c.initiator for c in closed] == ["network"]
    assert p.client_events[-1] == ConnectionTerminated()


def test_keepalive_holds_an_idle_connection_open() -> None:
    config = EndpointConfig(idle_timeout_s=5.0, keepalive_interval_s=2.0)
    p = pair(config)
    p.advance(60)
    assert not p.client.is_closed and not p.server.is_closed


def test_a_handshake_past_its_deadline_fails_and_terminates() -> None:
    config = EndpointConfig(handshake_timeout_s=5.0)
    client = _client(Identity.generate(), config)
    client.connect(START)
    client.datagrams_to_send(START)  # lost: nobody answers
    now = START
    while (timer := client.get_timer()) is not None:
        now = timer
        client.handle_timer(now)
        client.datagrams_to_send(now)
    events = _drain(client)
    failed = [e for e in events if isinstance(e, HandshakeFailed)]
    assert [f.failure for f in failed] == ["timeout"]
    assert now == pytest.approx(START + 5.0)
    assert events[-1] == ConnectionTerminated()
    assert client.is_terminated and client.datagrams_to_send(now + 1) == []


def test_a_path_that_refuses_datagrams_ends_the_connection_as_the_network_s_fault() -> None:
    p = pair()
    p.client.path_failed("no route")
    events = _drain(p.client)
    assert events == [ConnectionClosed("no route", "network"), ConnectionTerminated()]
    assert p.client.datagrams_to_send(p.now) == []


def test_path_failure_during_the_handshake_fails_it() -> None:
    client = _client(Identity.generate(), EndpointConfig())
    client.connect(START)
    client.path_failed("bad address")
    events = _drain(client)
    assert isinstance(events[0], HandshakeFailed) and events[0].failure == "closed"
    assert ConnectionClosed("bad address", "network") in events


def test_the_path_is_an_opaque_object() -> None:
    # A relay circuit or punched path later: anything hashable, handed back untouched.
    @dataclass(frozen=True)
    class Circuit:
        relay: str
        circuit_id: int

    circuit = Circuit("relay-1", 7)
    config = EndpointConfig()
    state: ConnectionState[Circuit] = ConnectionState(
        _quic(Identity.generate(), is_client=True, config=config),
        direction="outbound",
        path=circuit,
        now=START,
        config=config,
    )
    state.connect(START)
    datagrams = state.datagrams_to_send(START)
    assert datagrams and all(path is circuit for _, path in datagrams)


# -- RFC 9000 section 8.1: anti-amplification --------------------------------------------------


def test_a_silent_client_never_gets_more_than_three_times_what_it_sent() -> None:
    # One Initial from an address that never answers, then the server's timers run to the end
    # (retransmissions, the handshake timeout and its courtesy CONNECTION_CLOSE).
    config = EndpointConfig(handshake_timeout_s=10.0)
    client = _client(Identity.generate(), config)
    client.connect(START)
    (first,) = client.datagrams_to_send(START)
    received = len(first[0])
    server = _server_for(first[0], Identity.generate(), config, START)
    server.receive_datagram(first[0], CLIENT_PATH, START)
    sent = sum(len(d) for d, _ in server.datagrams_to_send(START))
    now = START
    while (timer := server.get_timer()) is not None and timer < START + 60:
        now = timer
        server.handle_timer(now)
        sent += sum(len(d) for d, _ in server.datagrams_to_send(now))
    assert server.is_terminated
    assert any(isinstance(e, HandshakeFailed) and e.failure == "timeout" for e in _drain(server))
    assert received == 1200
    assert 0 < sent <= 3 * received


def test_amplification_budget_is_lifted_once_the_client_proves_its_address() -> None:
    p = pair()
    assert p.server._quic.amplification_budget_bytes is None
    stream_id = p.server.open_stream(p.now)
    p.server.send_stream_data(stream_id, b"x" * 20_000)
    sent = sum(len(d) for d, _ in p.server.datagrams_to_send(p.now))
    assert sent > 3 * 1200 * 2

"""Certificates from identities and the mutual-auth adapter, driven in memory (no sockets, no clock)."""

from __future__ import annotations

import datetime
import ssl

import pytest
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lattica.errors import RemoteProtocolError
from lattica.identity import Identity
from lattica.net.config import ALPN_PROTOCOL, EndpointConfig
from lattica.net.quic_internals import LatticaQuicConnection, peer_certificate
from lattica.net.tls_identity import (
    certificate_for,
    peer_id_from_certificate,
    quic_configuration,
)

CLIENT_ADDR = ("127.0.0.1", 1111)
SERVER_ADDR = ("127.0.0.1", 2222)


def _server_for(first_datagram: bytes, server: Identity) -> LatticaQuicConnection:
    header = pull_quic_header(Buffer(data=first_datagram), host_cid_length=8)
    return LatticaQuicConnection(
        configuration=quic_configuration(server, is_client=False, config=EndpointConfig()),
        original_destination_connection_id=header.destination_cid,
        max_incoming_streams=8,
        stream_receive_window_bytes=1 << 16,
    )


def _handshake(client: QuicConnection, server_identity: Identity) -> LatticaQuicConnection:
    """Pump datagrams between the two machines in memory at a fixed fake time."""
    now = 1000.0
    client.connect(SERVER_ADDR, now=now)
    first = client.datagrams_to_send(now)
    server = _server_for(first[0][0], server_identity)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now)
    for _ in range(20):
        moved = False
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, SERVER_ADDR, now)
            moved = True
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, CLIENT_ADDR, now)
            moved = True
        if not moved:
            break
    return server


def _events(quic: QuicConnection) -> list[events.QuicEvent]:
    out = []
    while (event := quic.next_event()) is not None:
        out.append(event)
    return out


def test_certificate_carries_the_identity_key_and_is_deterministic() -> None:
    identity = Identity.from_seed(b"\x01" * 32)
    certificate = certificate_for(identity)
    assert peer_id_from_certificate(certificate) == identity.peer_id
    assert certificate_for(identity) == certificate


def test_certificate_is_valid_from_far_past_to_far_future() -> None:
    certificate = certificate_for(Identity.generate())
    assert certificate.not_valid_before_utc.year <= 2000
    assert certificate.not_valid_after_utc.year >= 9999


def test_missing_certificate_is_a_remote_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="no certificate"):
        peer_id_from_certificate(None)


def test_non_ed25519_certificate_is_a_remote_protocol_error() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(RemoteProtocolError, match="not an Ed25519 key"):
        peer_id_from_certificate(certificate)


def test_mutual_auth_each_side_sees_the_other_identity() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    client = LatticaQuicConnection(
        configuration=quic_configuration(alice, is_client=True, config=EndpointConfig()),
        max_incoming_streams=8,
        stream_receive_window_bytes=1 << 16,
    )
    server = _handshake(client, bob)
    assert any(isinstance(e, events.HandshakeCompleted) for e in _events(server))
    assert peer_id_from_certificate(peer_certificate(server)) == alice.peer_id
    assert peer_id_from_certificate(peer_certificate(client)) == bob.peer_id
    assert client.handshake_confirmed


def test_client_without_certificate_completes_tls_with_no_peer_certificate() -> None:
    # The adapter's contract: the server asked, the client sent nothing, and the server side
    # reports None -- which the connection layer must reject.
    client = QuicConnection(
        configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN_PROTOCOL], verify_mode=ssl.CERT_NONE)
    )
    server = _handshake(client, Identity.generate())
    assert any(isinstance(e, events.HandshakeCompleted) for e in _events(server))
    assert peer_certificate(server) is None
    with pytest.raises(RemoteProtocolError):
        peer_id_from_certificate(peer_certificate(server))


def test_server_without_the_adapter_would_not_ask_for_a_client_certificate() -> None:
    # Guards the adapter against aioquic changes: plain aioquic servers do not request one.
    alice, bob = Identity.generate(), Identity.generate()
    client = LatticaQuicConnection(
        configuration=quic_configuration(alice, is_client=True, config=EndpointConfig()),
        max_incoming_streams=8,
        stream_receive_window_bytes=1 << 16,
    )
    now = 1.0
    client.connect(SERVER_ADDR, now=now)
    first = client.datagrams_to_send(now)
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = QuicConnection(
        configuration=quic_configuration(bob, is_client=False, config=EndpointConfig()),
        original_destination_connection_id=header.destination_cid,
    )
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now)
    for _ in range(20):
        moved = False
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, SERVER_ADDR, now)
            moved = True
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, CLIENT_ADDR, now)
            moved = True
        if not moved:
            break
    assert peer_certificate(server) is None

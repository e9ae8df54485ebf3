"""Peer authentication in the QUIC handshake: certificates from Ed25519 identities.

Invariants:

* A node's certificate is self-signed by its Ed25519 identity key and carries that key; the peer
  id of whoever presents it *is* the certificate's public key. TLS 1.3 CertificateVerify proves
  possession of the key, so nothing else in the certificate (names, dates, issuer) is trusted or
  checked; certificate chains are never validated (``verify_mode=CERT_NONE``).
* Certificates are valid from 2000 to 9999 so that validity never depends on the clock: the whole
  stack must also run under trio's ``MockClock``.
* Both sides present a certificate. aioquic only requests a client certificate when a private
  flag is set on its TLS context, and only exposes the peer certificate through a private
  attribute: both are done in :mod:`lattica.net.quic_internals`, the one module that touches
  aioquic internals. Nothing here does.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from lattica.errors import RemoteProtocolError
from lattica.identity import Identity, PeerId
from lattica.net.config import ALPN_PROTOCOL, EndpointConfig

# 16-byte random connection ids would be the RFC's suggestion; 8 is aioquic's default and what
# the endpoint's demultiplexer expects for short-header packets.
CONNECTION_ID_LENGTH = 8

# CUBIC (RFC 9438, aioquic's own implementation) instead of aioquic's default NewReno: after a
# loss Reno halves its window, CUBIC keeps 70% of it. On a path whose bottleneck buffer is
# below its bandwidth-delay product (common on home uplinks, and on sim_net's 256 KiB queues at
# 10 MB/s x 40 ms) half a window no longer fills the link, and Reno takes one datagram per
# round trip to grow back: a 256 MiB four-seeder fetch on sim_net took 7.63 s with Reno, 7.40 s
# with CUBIC (ideal 6.71 s; docs/decisions.md has the trade-off). The initial window stays the
# standard 10 datagrams (RFC 9002 7.2).
CONGESTION_CONTROL = "cubic"

_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def private_key_for(identity: Identity) -> Ed25519PrivateKey:
    """The identity's Ed25519 key in the form ``cryptography`` (and so aioquic's TLS) signs with."""
    return Ed25519PrivateKey.from_private_bytes(identity.seed)


def certificate_for(identity: Identity) -> x509.Certificate:
    """A self-signed certificate for ``identity`` (deterministic: same identity, same bytes)."""
    key = private_key_for(identity)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity.peer_id))])
    serial = int.from_bytes(hashlib.sha256(identity.peer_id.key).digest()[:16], "big") >> 1
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial or 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .sign(key, None)
    )


def peer_id_from_certificate(certificate: x509.Certificate | None) -> PeerId:
    """The peer id a certificate proves, i.e. its Ed25519 public key.

    Raises :class:`RemoteProtocolError` when there is no certificate or its key is not Ed25519.
    """
    if certificate is None:
        raise RemoteProtocolError("the peer presented no certificate")
    public_key = certificate.public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise RemoteProtocolError(
            f"the peer's certificate has a {type(public_key).__name__}, not an Ed25519 key"
        )
    return PeerId(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def quic_configuration(
    identity: Identity, *, is_client: bool, config: EndpointConfig
) -> QuicConfiguration:
    """The aioquic configuration for one role of an endpoint owned by ``identity``."""
    return QuicConfiguration(
        alpn_protocols=[ALPN_PROTOCOL],
        is_client=is_client,
        certificate=certificate_for(identity),
        private_key=private_key_for(identity),
        # Authentication is "peer id = certificate key", checked by us after the handshake;
        # there is no CA to validate against.
        verify_mode=ssl.CERT_NONE,
        connection_id_length=CONNECTION_ID_LENGTH,
        idle_timeout=config.idle_timeout_s,
        congestion_control_algorithm=CONGESTION_CONTROL,
        max_data=config.connection_receive_window_bytes,
        max_stream_data=config.stream_receive_window_bytes,
    )

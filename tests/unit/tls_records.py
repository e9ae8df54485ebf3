"""TLS 1.3 records crafted by hand for tests that play a hostile peer: what OpenSSL's own
``SSL_write`` never sends (a flood of KeyUpdate requests), encrypted with the client's traffic
secret taken from the keylog callback (RFC 8446 sections 5.2, 7.1 and 7.2)."""

from __future__ import annotations

import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL import SSL

from lattica.identity import Identity
from lattica.net import tls_channel
from lattica.net.tls_channel import TlsChannel


def _expand_label(secret: bytes, label: bytes, length: int, algorithm: hashes.HashAlgorithm) -> bytes:
    full = b"tls13 " + label
    info = struct.pack(">H", length) + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


class RecordCrafter:
    """Encrypts client-to-server records for ``client``, a :class:`TlsChannel` made with
    :func:`client_recording_secrets` and handshaken since."""

    def __init__(self, client: TlsChannel, secrets: dict[str, bytes]) -> None:
        name = client._tls.get_cipher_name() or ""
        self._algorithm: hashes.HashAlgorithm = hashes.SHA384() if "SHA384" in name else hashes.SHA256()
        self._key_bytes = 32 if ("256" in name or "CHACHA" in name) else 16
        self._aead_type = ChaCha20Poly1305 if "CHACHA" in name else AESGCM
        self._secret = secrets["CLIENT_TRAFFIC_SECRET_0"]
        self._set_keys()

    def _set_keys(self) -> None:
        self._aead = self._aead_type(_expand_label(self._secret, b"key", self._key_bytes, self._algorithm))
        self._iv = _expand_label(self._secret, b"iv", 12, self._algorithm)
        self._sequence = 0

    def record(self, content: bytes, content_type: int = 23) -> bytes:
        """One protected record of ``content`` (application data unless ``content_type`` says)."""
        inner = content + bytes([content_type])
        header = b"\x17\x03\x03" + struct.pack(">H", len(inner) + 16)
        nonce = bytes(a ^ b for a, b in zip(self._iv, self._sequence.to_bytes(12, "big"), strict=True))
        self._sequence += 1
        return header + self._aead.encrypt(nonce, inner, header)

    def key_update(self, *, requested: bool) -> bytes:
        """A KeyUpdate handshake message; later records use the next traffic secret."""
        record = self.record(b"\x18\x00\x00\x01" + bytes([int(requested)]), content_type=22)
        self._secret = _expand_label(self._secret, b"traffic upd", self._algorithm.digest_size, self._algorithm)
        self._set_keys()
        return record


def client_recording_secrets(identity: Identity) -> tuple[TlsChannel, dict[str, bytes]]:
    """A client :class:`TlsChannel` whose traffic secrets are recorded into the returned dict
    as OpenSSL derives them (a keylog callback on its context, set before first use)."""
    secrets: dict[str, bytes] = {}

    def log(_connection: object, line: bytes) -> None:
        label, _random, secret = line.split()
        secrets[label.decode()] = bytes.fromhex(secret.decode())

    make_context = tls_channel._context

    def context_with_keylog(identity: Identity, **options: Any) -> SSL.Context:
        context = make_context(identity, **options)
        context.set_keylog_callback(log)
        return context

    tls_channel._context = context_with_keylog  # type: ignore[assignment]
    try:
        return TlsChannel(identity, is_client=True), secrets
    finally:
        tls_channel._context = make_context  # type: ignore[assignment]

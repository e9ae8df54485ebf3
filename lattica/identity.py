"""Node identity: an Ed25519 key pair and the :class:`PeerId` derived from it.

Invariants:

* A peer id *is* the 32-byte Ed25519 public key; its text form is lowercase RFC 4648 base32
  without padding (52 characters), so ``PeerId.parse(str(p)) == p`` for every ``p``.
* A key file holds exactly one seed, is created with mode 0600, and is refused if any
  group/other permission bit is set.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from lattica.errors import InsecureKeyFileError, InvalidPeerIdError

PEER_ID_BYTES = 32
_KEY_FILE_HEADER = b"lattica-ed25519-seed-v1\n"
_TEXT_LENGTH = 52


@functools.lru_cache(maxsize=4096)
def _peer_id_text(key: bytes) -> str:
    # Cached: a fetch keys its per-peer counters and orders its peers by this text for every
    # chunk, and base32 in Python cost ~5% of a fetching daemon's main thread.
    return base64.b32encode(key).decode("ascii").rstrip("=").lower()


@dataclass(frozen=True, order=True, slots=True)
class PeerId:
    """The identity of a node: its Ed25519 public key, comparable and hashable."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != PEER_ID_BYTES:
            raise InvalidPeerIdError(f"a peer id is {PEER_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """Parse the text form; raises :class:`InvalidPeerIdError` on anything else."""
        if not isinstance(text, str) or len(text) != _TEXT_LENGTH:
            raise InvalidPeerIdError(f"a peer id is {_TEXT_LENGTH} base32 characters")
        if text != text.lower():
            raise InvalidPeerIdError("a peer id is lowercase base32")
        try:
            raw = base64.b32decode(text.upper() + "====")
        except (binascii.Error, ValueError) as exc:
            raise InvalidPeerIdError(f"not a peer id: {text!r}") from exc
        peer = cls(raw)
        if str(peer) != text:  # rejects non-canonical trailing bits
            raise InvalidPeerIdError(f"not a canonical peer id: {text!r}")
        return peer

    def __str__(self) -> str:
        return _peer_id_text(self.key)

    def __repr__(self) -> str:
        return f"PeerId({str(self)[:12]}…)"

    def short(self) -> str:
        """A short prefix for logs and tables (not unique; never parse it)."""
        return str(self)[:12]

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is this peer's Ed25519 signature of ``message``."""
        try:
            nacl.signing.VerifyKey(self.key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
            return False
        return True

    def dht_key(self) -> bytes:
        """The 256-bit Kademlia id of this peer (sha256 of the public key)."""
        return hashlib.sha256(self.key).digest()


class Identity:
    """A node's private key; signs records and proves the node's :class:`PeerId`."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self.peer_id = PeerId(bytes(signing_key.verify_key))

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (tests and simulations)."""
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed. Never log it."""
        return bytes(self._signing_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return bytes(self._signing_key.sign(message).signature)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id!r})"


def save_identity(identity: Identity, path: Path) -> None:
    """Write ``identity`` to ``path`` with mode 0600, atomically; refuse to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, _KEY_FILE_HEADER + identity.seed.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if path.exists():
        tmp.unlink()
        raise FileExistsError(f"{path} already exists; not overwriting an identity")
    os.rename(tmp, path)


def load_identity(path: Path) -> Identity:
    """Read an identity key file.

    Raises :class:`InsecureKeyFileError` when group or others may read or write it,
    ``FileNotFoundError`` when it is missing, ``ValueError`` when it is not a key file.
    """
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFileError(
            f"{path} has mode {stat.S_IMODE(mode):04o}; run `chmod 600 {path}` (it is a private key)"
        )
    data = path.read_bytes()
    if not data.startswith(_KEY_FILE_HEADER):
        raise ValueError(f"{path} is not a Lattica identity key file")
    try:
        seed = bytes.fromhex(data[len(_KEY_FILE_HEADER) :].strip().decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is a damaged Lattica identity key file") from exc
    if len(seed) != 32:
        raise ValueError(f"{path} is a damaged Lattica identity key file")
    return Identity.from_seed(seed)


def load_or_create_identity(path: Path) -> tuple[Identity, bool]:
    """Load the identity at ``path``, creating one if absent; returns (identity, created)."""
    try:
        return load_identity(path), False
    except FileNotFoundError:
        identity = Identity.generate()
        save_identity(identity, path)
        return identity, True

"""Space ids and the owner's signed genesis that the id commits to.

Invariants:

* A space id is ``sha256(GENESIS_DOMAIN || msgpack([version, owner, name, nonce]))``: 32 bytes.
  Whoever holds the genesis can recompute the id, so the owner is provable from the id alone
  (nobody can present a different owner key for the same id without a sha256 collision).
* The genesis also carries the owner's Ed25519 signature over the same preimage, so a space
  cannot be created in someone else's name.
* Text form: lowercase RFC 4648 base32 without padding (52 characters), the same alphabet as
  :class:`~lattica.identity.PeerId`; ``SpaceId.parse(str(s)) == s``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Annotated

import msgspec

from lattica.crdt.errors import InvalidSpaceIdError, MalformedEnvelopeError
from lattica.identity import PEER_ID_BYTES, Identity, PeerId

SPACE_ID_BYTES = 32
GENESIS_VERSION = 1
GENESIS_DOMAIN = b"lattica/crdt/genesis/v1\x00"
MAX_NAME_CHARS = 128
NONCE_BYTES = 16
_TEXT_LENGTH = 52
_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True, order=True, slots=True)
class SpaceId:
    """The identity of a replicated space (32 bytes; comparable and hashable)."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != SPACE_ID_BYTES:
            raise InvalidSpaceIdError(f"a space id is {SPACE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpaceId:
        """Parse the 52-character base32 text form; raises :class:`InvalidSpaceIdError`."""
        if not isinstance(text, str) or len(text) != _TEXT_LENGTH or text != text.lower():
            raise InvalidSpaceIdError(f"a space id is {_TEXT_LENGTH} lowercase base32 characters")
        try:
            raw = base64.b32decode(text.upper() + "====")
        except (binascii.Error, ValueError) as exc:
            raise InvalidSpaceIdError(f"not a space id: {text!r}") from exc
        space = cls(raw)
        if str(space) != text:  # non-canonical trailing bits
            raise InvalidSpaceIdError(f"not a canonical space id: {text!r}")
        return space

    def __str__(self) -> str:
        return base64.b32encode(self.key).decode("ascii").rstrip("=").lower()

    def __repr__(self) -> str:
        return f"SpaceId({str(self)[:12]}…)"

    def short(self) -> str:
        """A short prefix for logs and tables (not unique; never parse it)."""
        return str(self)[:12]


class Genesis(msgspec.Struct, frozen=True, array_like=True):
    """The owner's signed statement that creates a space; the space id is its hash."""

    version: int
    owner: Annotated[bytes, msgspec.Meta(min_length=PEER_ID_BYTES, max_length=PEER_ID_BYTES)]
    name: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
    nonce: Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]

    def preimage(self) -> bytes:
        """The domain-separated bytes that are both hashed (id) and signed."""
        return GENESIS_DOMAIN + _encoder.encode((self.version, self.owner, self.name, self.nonce))

    @property
    def space_id(self) -> SpaceId:
        """``sha256`` of :meth:`preimage`."""
        return SpaceId(hashlib.sha256(self.preimage()).digest())

    @property
    def owner_id(self) -> PeerId:
        """The owner's peer id."""
        return PeerId(self.owner)


def make_genesis(owner: Identity, name: str, nonce: bytes) -> Genesis:
    """Sign a new genesis for a space called ``name`` (local label, <= 128 characters).

    ``nonce`` (16 bytes, random) makes two spaces with the same owner and name distinct.
    Raises :class:`ValueError` for a bad name or nonce.
    """
    if not name or len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a space name is 1..{MAX_NAME_CHARS} characters")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a genesis nonce is {NONCE_BYTES} bytes")
    unsigned = Genesis(GENESIS_VERSION, owner.peer_id.key, name, nonce, bytes(64))
    return Genesis(GENESIS_VERSION, owner.peer_id.key, name, nonce, owner.sign(unsigned.preimage()))


def verify_genesis(genesis: Genesis, expected: SpaceId | None = None) -> None:
    """Check the version, the owner's signature and (if given) that it hashes to ``expected``.

    Raises :class:`MalformedEnvelopeError` (a remote protocol error) on any failure.
    """
    if genesis.version != GENESIS_VERSION:
        raise MalformedEnvelopeError(f"genesis version {genesis.version} (this node speaks {GENESIS_VERSION})")
    if not PeerId(genesis.owner).verify(genesis.preimage(), genesis.signature):
        raise MalformedEnvelopeError("genesis signature does not verify")
    if expected is not None and genesis.space_id != expected:
        raise MalformedEnvelopeError("genesis does not hash to the requested space id")


def decode_genesis(data: bytes) -> Genesis:
    """Decode and verify a genesis from untrusted bytes; raises :class:`MalformedEnvelopeError`."""
    try:
        genesis = msgspec.msgpack.decode(data, type=Genesis)
    except (msgspec.DecodeError, ValueError) as exc:
        raise MalformedEnvelopeError(f"not a genesis: {exc}") from exc
    except RecursionError:
        raise MalformedEnvelopeError("genesis nested too deeply") from None
    verify_genesis(genesis)
    return genesis


def encode_genesis(genesis: Genesis) -> bytes:
    """The msgpack bytes of ``genesis`` (stored and sent as is)."""
    return _encoder.encode(genesis)

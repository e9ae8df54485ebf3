"""Content ids: CIDv1 with a BLAKE3-256 multihash, text form multibase base32 (``b...``).

Binary form (https://github.com/multiformats/cid, "CIDv1"):
``varint(1) || varint(codec) || varint(0x1e blake3) || varint(32) || digest``; each varint is
an unsigned LEB128 (https://github.com/multiformats/unsigned-varint), minimally encoded.
Text form: ``"b"`` + RFC 4648 base32, lowercase, no padding (multibase ``base32``).

Codecs used here:

* ``raw`` (0x55): a chunk's bytes. Such a CID is what IPFS gives the same bytes stored as a
  raw BLAKE3 block, so other tools can name and check a chunk.
* :data:`MANIFEST_CODEC` (0x300001, in the multicodec table's private-use range): a Lattica
  manifest (canonical msgpack, see :mod:`lattica.content.manifest`). Other tools cannot read
  it, but can still check the bytes against the multihash.

Why BLAKE3: measured on this machine (``bench/chunk_hash.py``), 2.3x the speed of hashlib's
SHA-256 on 1 MiB chunks, and fetching is CPU-bound (docs/decisions.md).

Parsing is strict: one spelling per id (lowercase, canonical trailing bits, minimal varints),
version 1 only, known codecs and hash only, exact digest length, nothing after the digest.
Every failure is :class:`~lattica.content.errors.InvalidCidError`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import blake3

from lattica.content.errors import InvalidCidError

CID_VERSION = 1
RAW_CODEC = 0x55
"""Multicodec ``raw``: the bytes themselves (a chunk)."""
MANIFEST_CODEC = 0x300001
"""Multicodec private-use code for a Lattica manifest (canonical msgpack)."""
BLAKE3_CODE = 0x1E
"""Multihash code of BLAKE3 (256-bit output by default)."""
DIGEST_BYTES = 32
MAX_CID_TEXT = 128
"""Longest text form accepted before decoding (ours are 61 characters)."""

_CODECS = {RAW_CODEC: "raw", MANIFEST_CODEC: "lattica-manifest"}
_MAX_VARINT_BYTES = 9


def blake3_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte BLAKE3 digest of ``data`` (releases the GIL for large inputs)."""
    return blake3.blake3(data).digest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for index in range(_MAX_VARINT_BYTES):
        if pos + index >= len(data):
            raise InvalidCidError("content id ends inside a varint")
        byte = data[pos + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if byte == 0 and index > 0:
                raise InvalidCidError("content id has a non-minimal varint")
            return value, pos + index + 1
    raise InvalidCidError("content id has a varint longer than 9 bytes")


@dataclass(frozen=True, order=True)
class Cid:
    """A CIDv1: ``codec`` (:data:`RAW_CODEC` or :data:`MANIFEST_CODEC`) and a BLAKE3 digest.

    ``str(cid)`` is the text form; :meth:`parse` / :meth:`from_bytes` are the strict decoders.
    Raises :class:`InvalidCidError` for an unknown codec or a digest that is not 32 bytes.
    """

    codec: int
    digest: bytes

    def __post_init__(self) -> None:
        if self.codec not in _CODECS:
            raise InvalidCidError(f"unknown content codec 0x{self.codec:x}")
        if len(self.digest) != DIGEST_BYTES:
            raise InvalidCidError(f"digest must be {DIGEST_BYTES} bytes, got {len(self.digest)}")

    @classmethod
    def for_chunk(cls, data: bytes | bytearray | memoryview) -> Cid:
        """The ``raw`` CID of chunk bytes."""
        return cls(RAW_CODEC, blake3_digest(data))

    @classmethod
    def for_manifest(cls, encoded: bytes) -> Cid:
        """The CID of a canonical manifest encoding (:func:`~lattica.content.manifest.encode_manifest`)."""
        return cls(MANIFEST_CODEC, blake3_digest(encoded))

    @property
    def is_manifest(self) -> bool:
        """Whether this id names a manifest (else a raw chunk)."""
        return self.codec == MANIFEST_CODEC

    def to_bytes(self) -> bytes:
        """The binary CID (what a multihash-aware tool reads)."""
        return _varint(CID_VERSION) + _varint(self.codec) + _varint(BLAKE3_CODE) + _varint(DIGEST_BYTES) + self.digest

    def __str__(self) -> str:
        return "b" + base64.b32encode(self.to_bytes()).decode("ascii").rstrip("=").lower()

    @classmethod
    def from_bytes(cls, data: bytes) -> Cid:
        """Decode a binary CID; raises :class:`InvalidCidError`."""
        if not isinstance(data, bytes):
            raise InvalidCidError("content id must be bytes")
        version, pos = _read_varint(data, 0)
        if version != CID_VERSION:
            raise InvalidCidError(f"content id version {version} is not supported (only CIDv1)")
        codec, pos = _read_varint(data, pos)
        if codec not in _CODECS:
            raise InvalidCidError(f"unknown content codec 0x{codec:x}")
        hash_code, pos = _read_varint(data, pos)
        if hash_code != BLAKE3_CODE:
            raise InvalidCidError(f"unsupported multihash 0x{hash_code:x} (only blake3, 0x1e)")
        length, pos = _read_varint(data, pos)
        if length != DIGEST_BYTES:
            raise InvalidCidError(f"blake3 digest length must be {DIGEST_BYTES}, got {length}")
        digest = data[pos:]
        if len(digest) != DIGEST_BYTES:
            raise InvalidCidError(f"content id holds {len(digest)} digest bytes, expected {DIGEST_BYTES}")
        return cls(codec, digest)

    @classmethod
    def parse(cls, text: str) -> Cid:
        """Decode the text form ``b<base32>``; raises :class:`InvalidCidError`.

        Only lowercase base32 without padding is accepted, with canonical trailing bits, so
        every id has exactly one spelling (it is used as a key and a file name)."""
        if not isinstance(text, str):
            raise InvalidCidError("content id must be text")
        if len(text) > MAX_CID_TEXT:
            raise InvalidCidError(f"content id longer than {MAX_CID_TEXT} characters")
        if not text.startswith("b"):
            raise InvalidCidError("content id must be multibase base32 (start with 'b')")
        body = text[1:]
        if not body or body != body.lower() or not body.isascii() or "=" in body:
            raise InvalidCidError("content id must be lowercase base32 without padding")
        try:
            raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        except (binascii.Error, ValueError):
            raise InvalidCidError("content id is not valid base32") from None
        cid = cls.from_bytes(raw)
        if str(cid) != text:
            raise InvalidCidError("content id is not in canonical base32 form")
        return cid

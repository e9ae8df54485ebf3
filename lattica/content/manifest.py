"""Manifests: what a content id names -- files, sizes, modes, whole-file SHA-256, chunk lists,
the tensor index of each safetensors file, a name and tags.

Encoding: msgpack via msgspec, structs in fixed field order, maps with sorted keys
(``order="deterministic"``), files sorted by path, tags sorted and unique. The content id is
``Cid.for_manifest(encoding)``. Decoding is strict and *canonical*: the bytes must be exactly
what :func:`encode_manifest` gives for the decoded value, so one manifest has one id.

Invariants :func:`decode_manifest` checks (a manifest from a peer is hostile input), each a
:class:`~lattica.content.errors.MalformedContentError` subclass:

* size at most ``max_manifest_bytes`` (checked before decoding), version
  :data:`MANIFEST_VERSION`, no unknown fields, nesting bounded (``RecursionError`` caught);
* paths safe as a set (:mod:`lattica.content.paths`), at most ``max_files`` files, at most
  ``max_chunks`` chunks in all;
* each file's chunks are exactly what :mod:`lattica.content.chunker` plans for its size, the
  manifest's ``chunk_bytes`` and its tensor index (so they tile the file, with no overlap);
* each tensor index passes :func:`~lattica.content.safetensors_header.check_index` for the
  file's size; only ``*.safetensors`` files carry one;
* modes are 0o644 or 0o755 (only the executable bit is kept), digests are 32 bytes.

Whole-file SHA-256 is what a Hugging Face LFS pointer (``oid sha256:...``) carries, so a
fetched file can be checked against the hub's metadata without Lattica.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from lattica.content.chunker import plan_chunks
from lattica.content.cid import DIGEST_BYTES, RAW_CODEC, Cid
from lattica.content.errors import ContentTooLargeError, MalformedManifestError
from lattica.content.paths import DEFAULT_MAX_PATH_BYTES, check_path_set
from lattica.content.safetensors_header import DEFAULT_MAX_HEADER_BYTES, SafetensorsIndex, check_index

MANIFEST_VERSION = 1
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_MAX_MANIFEST_BYTES = 64 << 20
DEFAULT_MAX_FILES = 100_000
DEFAULT_MAX_CHUNKS = 4_000_000
MAX_NAME_BYTES = 256
MAX_TAGS = 64
MAX_TAG_BYTES = 64
MAX_FILE_BYTES = 1 << 50
FILE_MODES = (0o644, 0o755)
SAFETENSORS_SUFFIX = ".safetensors"

Digest = Annotated[bytes, msgspec.Meta(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)]


class ChunkRef(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One chunk of a file: its BLAKE3 ``digest`` and where it sits (``offset``, ``length``,
    bytes)."""

    digest: Digest
    offset: int
    length: int

    @property
    def cid(self) -> Cid:
        """The chunk's ``raw`` CID."""
        return Cid(RAW_CODEC, self.digest)


class FileEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One file: relative ``path``, ``size`` in bytes, ``mode`` (0o644 or 0o755), whole-file
    ``sha256``, ``chunks`` in file order, and the ``safetensors`` index when it is one."""

    path: str
    size: int
    mode: int
    sha256: Digest
    chunks: tuple[ChunkRef, ...]
    safetensors: SafetensorsIndex | None = None


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A published file or folder. ``chunk_bytes`` is the chunk size it was cut with."""

    version: int
    name: str
    tags: tuple[str, ...]
    chunk_bytes: int
    files: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes."""
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; raises ``KeyError``."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def unique_chunks(self) -> dict[bytes, int]:
        """Every distinct chunk digest and its length (a chunk shared by two files counts once)."""
        return {chunk.digest: chunk.length for entry in self.files for chunk in entry.chunks}


_encoder = msgspec.msgpack.Encoder(order="deterministic")
_decoder = msgspec.msgpack.Decoder(Manifest)


def encode_manifest(manifest: Manifest) -> bytes:
    """The canonical encoding (what the content id hashes)."""
    return _encoder.encode(manifest)


def manifest_cid(manifest: Manifest) -> Cid:
    """The content id of ``manifest``."""
    return Cid.for_manifest(encode_manifest(manifest))


def _check_label(text: str, what: str, max_bytes: int, *, allow_empty: bool) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise MalformedManifestError(f"{what} is not valid UTF-8") from None
    if size > max_bytes or (size == 0 and not allow_empty):
        raise MalformedManifestError(f"{what} must be {'0' if allow_empty else '1'}..{max_bytes} bytes")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise MalformedManifestError(f"{what} contains a control character")


def check_manifest(
    manifest: Manifest,
    *,
    max_files: int = DEFAULT_MAX_FILES,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    max_path_bytes: int = DEFAULT_MAX_PATH_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Manifest:
    """Check the invariants in the module docstring (except size and canonical bytes, which
    :func:`decode_manifest` checks). Returns ``manifest``; raises
    :class:`MalformedManifestError`, :class:`~lattica.content.errors.UnsafePathError`,
    :class:`~lattica.content.errors.MalformedSafetensorsError` or
    :class:`~lattica.content.errors.ContentTooLargeError`."""
    if manifest.version != MANIFEST_VERSION:
        raise MalformedManifestError(f"manifest version {manifest.version} is not supported (only {MANIFEST_VERSION})")
    _check_label(manifest.name, "manifest name", MAX_NAME_BYTES, allow_empty=True)
    if len(manifest.tags) > MAX_TAGS:
        raise ContentTooLargeError(f"more than {MAX_TAGS} tags")
    for tag in manifest.tags:
        _check_label(tag, "tag", MAX_TAG_BYTES, allow_empty=False)
    if list(manifest.tags) != sorted(set(manifest.tags)):
        raise MalformedManifestError("tags must be sorted and unique")
    if not MIN_CHUNK_BYTES <= manifest.chunk_bytes <= MAX_CHUNK_BYTES:
        raise MalformedManifestError(
            f"chunk size {manifest.chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"
        )
    check_path_set((f.path for f in manifest.files), max_files=max_files, max_path_bytes=max_path_bytes)
    paths = [f.path for f in manifest.files]
    if paths != sorted(paths):
        raise MalformedManifestError("files must be sorted by path")
    chunk_count = 0
    for entry in manifest.files:
        shown = entry.path[:200]
        if not 0 <= entry.size <= MAX_FILE_BYTES:
            raise MalformedManifestError(f"{shown!r}: size {entry.size} is out of range")
        if entry.mode not in FILE_MODES:
            raise MalformedManifestError(f"{shown!r}: mode {entry.mode:o} is not 644 or 755")
        chunk_count += len(entry.chunks)
        if chunk_count > max_chunks:
            raise ContentTooLargeError(f"more than {max_chunks} chunks")
        if entry.safetensors is not None:
            if not entry.path.endswith(SAFETENSORS_SUFFIX):
                raise MalformedManifestError(f"{shown!r}: a tensor index on a file not named *{SAFETENSORS_SUFFIX}")
            check_index(entry.safetensors, file_size=entry.size, max_header_bytes=max_header_bytes)
        # Cheap compared with the list itself (one tuple per chunk); a plan longer than the
        # listed chunks means the list is wrong, so stop early rather than build it all.
        if entry.size > len(entry.chunks) * manifest.chunk_bytes:
            raise MalformedManifestError(f"{shown!r}: chunks do not cover the file")
        planned = plan_chunks(entry.size, manifest.chunk_bytes, entry.safetensors)
        if [(c.offset, c.length) for c in entry.chunks] != planned:
            raise MalformedManifestError(f"{shown!r}: chunk boundaries are not the canonical ones")
    return manifest


def decode_manifest(
    data: bytes,
    *,
    expected: Cid | None = None,
    max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    max_path_bytes: int = DEFAULT_MAX_PATH_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Manifest:
    """Decode and fully check a manifest encoding; with ``expected``, the bytes must also hash to
    that id. Raises :class:`~lattica.content.errors.MalformedContentError` subclasses only."""
    if len(data) > max_manifest_bytes:
        raise ContentTooLargeError(f"manifest of {len(data)} bytes exceeds the cap of {max_manifest_bytes}")
    if expected is not None and Cid.for_manifest(data) != expected:
        raise MalformedManifestError(f"manifest bytes do not hash to {expected}")
    try:
        manifest = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedManifestError(f"not a valid manifest: {exc}") from None
    except RecursionError:
        raise MalformedManifestError("manifest is nested too deeply") from None
    check_manifest(
        manifest,
        max_files=max_files,
        max_chunks=max_chunks,
        max_path_bytes=max_path_bytes,
        max_header_bytes=max_header_bytes,
    )
    if encode_manifest(manifest) != data:
        raise MalformedManifestError("manifest encoding is not canonical")
    return manifest

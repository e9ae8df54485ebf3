"""Errors of the content layer: what is wrong with which id, path, file or chunk, in one line.

Decoders of bytes that may come from a peer (CIDs, manifests, safetensors headers) raise
:class:`MalformedContentError` subclasses and nothing else; the exchange protocol turns those
into :class:`~lattica.errors.RemoteProtocolError` for the peer that sent them. A full disk is
:class:`lattica.storage.DiskFullError` (it names the path), the same error the sqlite index raises.
"""

from __future__ import annotations

from lattica.errors import LatticaError


class ContentError(LatticaError):
    """Base class of the content layer's errors."""


class MalformedContentError(ContentError, ValueError):
    """Bytes or text that should encode a content object do not (a typed decode error)."""


class InvalidCidError(MalformedContentError):
    """A content id (text or bytes) is not a CIDv1 this node understands."""


class MalformedSafetensorsError(MalformedContentError):
    """A safetensors file's header is invalid or hostile (the message says which rule)."""


class MalformedManifestError(MalformedContentError):
    """A manifest encoding is not a valid, canonical manifest."""


class UnsafePathError(MalformedContentError):
    """A path in a folder or manifest could escape or clash on the target (``..``, absolute,
    control characters, case-only duplicates, symlinks out of the tree, ...)."""


class ContentTooLargeError(MalformedContentError):
    """A count or size is above its configured bound (files, chunks, header, manifest)."""


class ChunkMismatchError(ContentError):
    """Chunk bytes do not hash to the id they were offered under; nothing was stored."""


class ChunkNotFoundError(ContentError, KeyError):
    """A chunk or manifest is not in the block store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class HeldChunkLostError(ChunkNotFoundError):
    """A chunk the store held could not be read back while a fetch copied it into a file (its
    range of a fetched file was edited, or its file went): the store dropped it, so fetching
    again gets it from peers (:func:`~lattica.content.exchange_fetch.fetch_content` does, once)."""


class NoTensorsSelectedError(ContentError):
    """Tensor patterns matched no tensor of the file."""


class NoFilesSelectedError(ContentError):
    """``include``/``exclude`` globs left no file of the manifest to fetch."""


class OutputBusyError(ContentError):
    """Another fetch (in this node or another process) is writing the same file into the same
    folder right now; this one does not touch it."""


class OutputConflictError(ContentError):
    """A file of the content cannot be written where it belongs in the output folder (a folder
    holds its name); nothing was fetched."""

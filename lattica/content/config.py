"""``ContentConfig``: the tunables of the content layer (the ``[content]`` table of ``config.toml``).

Field types carry their bounds (checked when a file is loaded). The caps bound what a peer's
manifest may make this node hold in memory or walk: they apply on decode as well as on publish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from lattica.content.manifest import (
    DEFAULT_MAX_CHUNKS,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_MANIFEST_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
)
from lattica.content.paths import DEFAULT_MAX_PATH_BYTES
from lattica.content.safetensors_header import DEFAULT_MAX_HEADER_BYTES
from lattica.setting_types import ByteSize, Count, Seconds


@dataclass(frozen=True, kw_only=True)
class ContentConfig:
    """Chunking, the bounds on manifests (sizes in bytes) and the exchange protocol's limits."""

    chunk_bytes: Annotated[int, msgspec.Meta(ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES)] = 1 << 20
    """Chunk size for new content (tensors of a safetensors file are packed up to it)."""
    max_manifest_bytes: Annotated[int, msgspec.Meta(ge=1 << 16, le=1 << 30)] = DEFAULT_MAX_MANIFEST_BYTES
    """Largest manifest encoding accepted or produced."""
    max_files: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = DEFAULT_MAX_FILES
    """Most files one manifest may list."""
    max_chunks: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = DEFAULT_MAX_CHUNKS
    """Most chunks one manifest may list (all files together)."""
    max_path_bytes: Annotated[int, msgspec.Meta(ge=16, le=DEFAULT_MAX_PATH_BYTES)] = DEFAULT_MAX_PATH_BYTES
    """Longest relative path in a manifest, UTF-8 bytes."""
    max_safetensors_header_bytes: Annotated[int, msgspec.Meta(ge=1 << 10, le=100_000_000)] = DEFAULT_MAX_HEADER_BYTES
    """Largest safetensors JSON header parsed (real models: well under 1 MiB)."""
    publish_link: bool = True
    """Hold a published file's chunks as ranges of the file itself (a hard link under the
    node's home, as a fetch does with the files it writes) instead of a copy: a publish
    writes nothing and the disk holds the bytes once. Every read of such a chunk is checked,
    so a file edited in place afterwards loses its changed chunks, never serves them. Falls
    back to a copy where the file cannot be linked (another file system, another owner).
    ``false``: always keep a private copy."""
    max_uploads: Count = 32
    """Exchange streams this node serves at once (all peers). When all are held, a newcomer
    takes one from the host holding the most, if that host holds at least two more than the
    newcomer's own (:mod:`lattica.content.upload_slots`); otherwise it is refused ``busy``."""
    max_uploads_per_peer: Count = 4
    """Exchange streams this node serves at once to one peer; more are refused ``busy``, so
    one peer cannot hold every upload slot (a fetch uses one stream per peer)."""
    max_uploads_per_address: Count = 8
    """Exchange streams this node serves at once to one source address (an IPv4 address or an
    IPv6 /64; a peer reached through a relay counts by its peer id alone): peer ids cost
    nothing to mint, so the per-peer cap alone let one host hold every slot."""
    max_requests_per_stream: Count = 64
    """Block requests one exchange stream may have in flight; more end that stream."""
    upload_timeout_s: Seconds = 30.0
    """An upload stream that had no request outstanding and sent no block data for this long
    (cancels, has-requests, requests refused do not count), or whose peer takes none of a
    piece for this long, is closed (it would hold an upload slot)."""
    fetch_max_window: Annotated[int, msgspec.Meta(ge=1, le=48)] = 16
    """Most chunk requests in flight to one peer (below ``max_requests_per_stream`` of peers
    running the defaults); the window grows to it with the peer's rate."""
    fetch_request_timeout_s: Seconds = 30.0
    """A chunk asked for is asked elsewhere once its peer delivered less than 16 KiB of
    anything for this long (a slow but steady peer keeps its requests)."""
    fetch_stall_timeout_s: Seconds = 60.0
    """A fetch fails (keeping what it stored) after this long without any peer able to supply
    the missing chunks."""
    fetch_batch_bytes: ByteSize = 8 << 20
    """Verified chunks are written to disk in batches of up to this many bytes (the most a
    fetch holds in memory besides the peers' windows is two batches)."""
    fetch_direct_io: bool = True
    """Write the whole pages of fetched files with ``O_DIRECT``: from a reused buffer to the
    disk, without filling the page cache (on a VM, fresh page-cache pages were the largest
    cost of a fetch). Falls back to ordinary writes where the file system refuses it (some
    FUSE file systems).
    ``false``: ordinary writes, which leave the fetched files in the page cache; better on a
    disk slower than the network when the files fit in memory."""
    fetch_sync_bytes: ByteSize = 64 << 20
    """Written chunks are flushed to disk and indexed (acknowledged) every this many bytes:
    one file-system sync per step, not per batch. A fetch killed before a step completes
    fetches at most this much again."""
    fetch_sync_interval_s: Seconds = 2.0
    """... and at least this often while chunks arrive (a slow fetch acknowledges its progress
    in time too, not only every ``fetch_sync_bytes``)."""

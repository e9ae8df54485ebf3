"""Content addressing: content ids, chunking, manifests, safetensors indexes, tensor selection.

The pure parts (no trio, no disk beyond reading a header) are re-exported here::

    cid = Cid.parse("bafkr4i...")                    # strict; InvalidCidError
    index = read_safetensors_index(path)               # MalformedSafetensorsError
    plan = plan_chunks(size, chunk_bytes, index)       # [(offset, length), ...]
    manifest = decode_manifest(data, expected=cid)     # MalformedContentError subclasses
    selection = select_tensors(manifest.file("model.safetensors"), ["encoder.layer.0.*"])

The block store and publishing use trio and sqlite and are imported from their modules, so
that importing this package (e.g. for the configuration) stays cheap::

    from lattica.content.block_store import BlockStore
    from lattica.content.publish import publish
    store = BlockStore(home / "blocks", SqliteWriter(home / "lattica.db"))
    result = await publish(store, Path("my-model"), name="my-model", tags=("bert",))
    str(result.cid)                                    # "bagaybqabdyq..." (chunks: "bafkr4i...")
"""

from lattica.content.chunker import DEFAULT_CHUNK_BYTES, fixed_chunks, plan_chunks, tensor_aligned_chunks
from lattica.content.cid import MANIFEST_CODEC, RAW_CODEC, Cid, blake3_digest
from lattica.content.config import ContentConfig
from lattica.content.errors import (
    ChunkMismatchError,
    ChunkNotFoundError,
    ContentError,
    ContentTooLargeError,
    InvalidCidError,
    MalformedContentError,
    MalformedManifestError,
    MalformedSafetensorsError,
    NoFilesSelectedError,
    NoTensorsSelectedError,
    OutputBusyError,
    OutputConflictError,
    UnsafePathError,
)
from lattica.content.manifest import (
    MANIFEST_VERSION,
    ChunkRef,
    FileEntry,
    Manifest,
    check_manifest,
    decode_manifest,
    encode_manifest,
    manifest_cid,
)
from lattica.content.paths import check_path_set, check_relative_path
from lattica.content.safetensors_header import (
    SafetensorsIndex,
    TensorInfo,
    check_index,
    parse_header,
    parse_safetensors,
    read_safetensors_index,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MANIFEST_CODEC",
    "MANIFEST_VERSION",
    "RAW_CODEC",
    "ChunkMismatchError",
    "ChunkNotFoundError",
    "ChunkRef",
    "Cid",
    "ContentConfig",
    "ContentError",
    "ContentTooLargeError",
    "FileEntry",
    "InvalidCidError",
    "MalformedContentError",
    "MalformedManifestError",
    "MalformedSafetensorsError",
    "Manifest",
    "NoFilesSelectedError",
    "NoTensorsSelectedError",
    "OutputBusyError",
    "OutputConflictError",
    "SafetensorsIndex",
    "TensorInfo",
    "UnsafePathError",
    "blake3_digest",
    "check_index",
    "check_manifest",
    "check_path_set",
    "check_relative_path",
    "decode_manifest",
    "encode_manifest",
    "fixed_chunks",
    "manifest_cid",
    "parse_header",
    "parse_safetensors",
    "plan_chunks",
    "read_safetensors_index",
    "tensor_aligned_chunks",
]

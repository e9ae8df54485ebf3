"""Small generated safetensors models and a block store on a temporary directory, for the
content tests. Seeded: the same call gives the same bytes."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import numpy as np
from hypothesis import settings
from safetensors.numpy import save

from lattica.content.block_store import BlockStore
from lattica.content.cid import Cid
from lattica.content.manifest import encode_manifest
from lattica.content.publish import publish
from lattica.storage import SqliteWriter

KIB = 1 << 10
MIB = 1 << 20

fuzz = settings(derandomize=True, deadline=None, database=None)
"""Hypothesis settings of the content tests: the same examples on every run (seeded), no
per-example deadline (the machine is shared)."""


def random_bytes(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes, the same for the same seed."""
    return random.Random(seed).randbytes(size)


def tensors(seed: int, spec: dict[str, tuple[int, ...]], dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Random tensors of the given shapes (seeded)."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in spec.items()}


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file written by the reference implementation."""
    return save(arrays, metadata=metadata)


def raw_safetensors(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A hand-made (possibly hostile) file: length prefix, JSON header, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@contextmanager
def open_store(directory: Path) -> Iterator[BlockStore]:
    """A block store in ``directory`` (``blocks/`` and ``lattica.db``)."""
    directory.mkdir(parents=True, exist_ok=True)
    writer = SqliteWriter(directory / "lattica.db")
    try:
        yield BlockStore(directory / "blocks", writer)
    finally:
        writer.close()


async def lying_manifest(tmp_path: Path, store: BlockStore) -> tuple[Cid, bytes]:
    """A manifest listing the chunks of a tampered copy while claiming the genuine file's
    SHA-256 (the review's lying manifest); only its manifest block is stored, as after a
    peer sent it. Returns its id and the genuine file's SHA-256."""
    folder = tmp_path / "pub"
    folder.mkdir()
    genuine = safetensors_bytes(tensors(4, {"encoder.layer.0.w": (64, 64), "head": (16,)}))
    tampered = genuine[:-64] + b"\0" * 64
    (folder / "model.safetensors").write_bytes(tampered)
    real = hashlib.sha256(genuine).digest()
    manifest = (await publish(store, folder, pinned=False)).manifest
    files = tuple(msgspec.structs.replace(f, sha256=real) for f in manifest.files)
    lie = msgspec.structs.replace(manifest, files=files)
    encoded = encode_manifest(lie)
    await store.put(encoded)
    return Cid.for_manifest(encoded), real

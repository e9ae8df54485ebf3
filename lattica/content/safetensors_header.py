"""Safetensors header parser: the tensor index (name, dtype, shape, byte range) of a file.

Format (https://huggingface.co/docs/safetensors, "Format"): an 8-byte little-endian unsigned
header length ``N``; ``N`` bytes of UTF-8 JSON, an object mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional ``"__metadata__"`` object
of string to string; the JSON may be padded at the end with spaces; then the byte buffer, with
offsets relative to its start.

Rules enforced here (the reference implementation's, plus bounds), each a
:class:`~lattica.content.errors.MalformedSafetensorsError` naming the rule:

* ``N`` is at most ``max_header_bytes`` (a hostile length must not make us allocate), and the
  file is long enough to hold the header;
* the header is UTF-8, a JSON object starting with ``{``, no duplicate keys, no ``NaN``, not
  nested deeper than the format allows (``RecursionError`` is caught too);
* each tensor has exactly the three keys; a known dtype; a shape of non-negative integers (rank
  at most :data:`MAX_RANK`); ``end - begin`` equals the element count times the dtype size;
* sorted by offset, tensors tile the buffer exactly: no overlap, no gap, the last ends at the
  end of the file (the reference refuses holes, which would allow polyglot files);
* names are non-empty, at most :data:`MAX_NAME_BYTES` UTF-8 bytes, without lone surrogates;
* ``__metadata__`` holds strings only.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, BinaryIO

import msgspec

from lattica.content.errors import MalformedSafetensorsError

HEADER_LENGTH_BYTES = 8
DEFAULT_MAX_HEADER_BYTES = 16 << 20
"""Default cap on the JSON header (real models: tens to hundreds of KB)."""
MAX_RANK = 64
"""Most dimensions a tensor may have (numpy's limit)."""
MAX_NAME_BYTES = 1024
"""Longest tensor name, UTF-8 bytes."""
METADATA_KEY = "__metadata__"

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
"""Bits per element of each safetensors dtype (sub-byte types must fill whole bytes)."""


class TensorInfo(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One tensor: ``begin``/``end`` are byte offsets *in the file* (header included).

    A msgspec Struct because manifests carry it (as a compact array)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


class SafetensorsIndex(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The parsed header: ``header_bytes`` = 8 + N (where the data starts), tensors sorted by
    offset, ``metadata`` the ``__metadata__`` object (``None`` when absent).

    Manifests carry it; :func:`check_index` validates one that came from a peer."""

    header_bytes: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None

    @property
    def data_bytes(self) -> int:
        """Size of the byte buffer after the header."""
        return self.tensors[-1].end - self.header_bytes if self.tensors else 0


def read_header_length(prefix: bytes, *, file_size: int, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> int:
    """``N`` from the first 8 bytes of a file of ``file_size`` bytes, checked against the cap
    and the file size. Raises :class:`MalformedSafetensorsError`."""
    if len(prefix) < HEADER_LENGTH_BYTES or file_size < HEADER_LENGTH_BYTES:
        raise MalformedSafetensorsError("safetensors file shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:HEADER_LENGTH_BYTES])
    if length > max_header_bytes:
        raise MalformedSafetensorsError(
            f"safetensors header length {length} exceeds the cap of {max_header_bytes} bytes"
        )
    if length < 2:
        raise MalformedSafetensorsError("safetensors header too short to be a JSON object")
    if HEADER_LENGTH_BYTES + length > file_size:
        raise MalformedSafetensorsError(
            f"safetensors header length {length} runs past the end of the file ({file_size} bytes)"
        )
    return int(length)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedSafetensorsError(f"safetensors header has duplicate key {key[:80]!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise MalformedSafetensorsError(f"safetensors header holds {name}, which JSON does not allow")


def _valid_name(name: str) -> None:
    if not name:
        raise MalformedSafetensorsError("safetensors tensor with an empty name")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedSafetensorsError("safetensors tensor name is not valid UTF-8 (lone surrogate)") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise MalformedSafetensorsError(f"safetensors tensor name longer than {MAX_NAME_BYTES} bytes")


def _check_tensor_fields(name: str, dtype: Any, shape: Any, length: int) -> None:
    _valid_name(name)
    shown = name[:80]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise MalformedSafetensorsError(f"tensor {shown!r}: unknown dtype {str(dtype)[:20]!r}")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise MalformedSafetensorsError(
            f"tensor {shown!r}: shape must be a list of at most {MAX_RANK} non-negative integers"
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != length:
        raise MalformedSafetensorsError(
            f"tensor {shown!r}: {length} bytes do not match dtype {dtype} x shape {list(shape)}"
        )


def _tensor(name: str, entry: Any, header_bytes: int) -> TensorInfo:
    shown = name[:80]
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        _valid_name(name)
        raise MalformedSafetensorsError(f"tensor {shown!r}: expected exactly dtype, shape and data_offsets")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        _valid_name(name)
        raise MalformedSafetensorsError(f"tensor {shown!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
    _check_tensor_fields(name, entry["dtype"], entry["shape"], offsets[1] - offsets[0])
    return TensorInfo(name, entry["dtype"], tuple(entry["shape"]), header_bytes + offsets[0], header_bytes + offsets[1])


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MalformedSafetensorsError("safetensors __metadata__ must map strings to strings")
    for key, value in metadata.items():
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedSafetensorsError("safetensors __metadata__ is not valid UTF-8") from None


def _check_tiling(tensors: tuple[TensorInfo, ...], header_bytes: int, file_size: int) -> None:
    position = header_bytes
    for tensor in tensors:
        if tensor.begin < position:
            raise MalformedSafetensorsError(f"tensor {tensor.name[:80]!r} overlaps the tensor before it")
        if tensor.begin > position:
            raise MalformedSafetensorsError(
                f"gap of {tensor.begin - position} bytes before tensor {tensor.name[:80]!r}"
            )
        position = tensor.end
    if position > file_size:
        raise MalformedSafetensorsError(
            f"tensor data runs to offset {position}, past the end of the file ({file_size})"
        )
    if position < file_size:
        raise MalformedSafetensorsError(f"{file_size - position} bytes after the last tensor are not indexed")


def _sorted_by_offset(tensors: Any) -> tuple[TensorInfo, ...]:
    return tuple(sorted(tensors, key=lambda t: (t.begin, t.end)))


def check_index(
    index: SafetensorsIndex, *, file_size: int, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsIndex:
    """Validate an index that did not come from :func:`parse_header` (e.g. a peer's manifest)
    against the same rules, for a file of ``file_size`` bytes; tensors must be listed in offset
    order and names must be unique. Returns ``index``; raises :class:`MalformedSafetensorsError`."""
    if not HEADER_LENGTH_BYTES + 2 <= index.header_bytes <= HEADER_LENGTH_BYTES + max_header_bytes:
        raise MalformedSafetensorsError(f"safetensors header size {index.header_bytes} is out of range")
    _check_metadata(index.metadata)
    names: set[str] = set()
    for tensor in index.tensors:
        if tensor.name in names or tensor.name == METADATA_KEY:
            raise MalformedSafetensorsError(f"safetensors index has duplicate tensor {tensor.name[:80]!r}")
        names.add(tensor.name)
        if not 0 <= tensor.begin <= tensor.end:
            raise MalformedSafetensorsError(f"tensor {tensor.name[:80]!r}: byte range is reversed")
        _check_tensor_fields(tensor.name, tensor.dtype, tensor.shape, tensor.nbytes)
    if _sorted_by_offset(index.tensors) != index.tensors:
        raise MalformedSafetensorsError("safetensors index is not in offset order")
    _check_tiling(index.tensors, index.header_bytes, file_size)
    return index


def parse_header(header: bytes, *, file_size: int) -> SafetensorsIndex:
    """Parse the JSON header ``header`` (the N bytes after the length) of a file of
    ``file_size`` bytes into a :class:`SafetensorsIndex`.

    Raises :class:`MalformedSafetensorsError` for any rule in the module docstring.
    """
    header_bytes = HEADER_LENGTH_BYTES + len(header)
    if not header.startswith(b"{"):
        raise MalformedSafetensorsError("safetensors header does not start with '{'")
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedSafetensorsError("safetensors header is not valid UTF-8") from None
    try:
        parsed = json.loads(text.rstrip(" "), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except RecursionError:
        raise MalformedSafetensorsError("safetensors header is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer too long to convert
        if isinstance(exc, MalformedSafetensorsError):
            raise
        raise MalformedSafetensorsError(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise MalformedSafetensorsError("safetensors header is not a JSON object")
    metadata = parsed.pop(METADATA_KEY, None)
    _check_metadata(metadata)
    tensors = _sorted_by_offset(_tensor(name, entry, header_bytes) for name, entry in parsed.items())
    _check_tiling(tensors, header_bytes, file_size)
    return SafetensorsIndex(header_bytes, tensors, metadata)


def parse_safetensors(data: bytes, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> SafetensorsIndex:
    """Parse the header of a whole safetensors file held in ``data`` (tests, small files).

    Raises :class:`MalformedSafetensorsError`."""
    length = read_header_length(data[:HEADER_LENGTH_BYTES], file_size=len(data), max_header_bytes=max_header_bytes)
    return parse_header(data[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + length], file_size=len(data))


def read_header_bytes(file: BinaryIO, *, file_size: int, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> bytes:
    """The 8-byte length and the JSON header of an open safetensors file, read from its start
    (reads only the header). Raises :class:`MalformedSafetensorsError` and ``OSError``."""
    file.seek(0)
    prefix = file.read(HEADER_LENGTH_BYTES)
    length = read_header_length(prefix, file_size=file_size, max_header_bytes=max_header_bytes)
    header = file.read(length)
    if len(header) != length:
        raise MalformedSafetensorsError("safetensors file shrank while its header was read")
    return prefix + header


def read_safetensors_index(path: str, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> SafetensorsIndex:
    """Read and parse the header of the file at ``path`` (reads only the header).

    Raises :class:`MalformedSafetensorsError` and ``OSError``."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        raw = read_header_bytes(file, file_size=size, max_header_bytes=max_header_bytes)
        return parse_header(raw[HEADER_LENGTH_BYTES:], file_size=size)

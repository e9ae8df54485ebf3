"""Sans-I/O wire codecs: length-prefixed msgpack frames of msgspec ``Struct`` messages."""

from lattica.wire.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    WIRE_VERSION,
    FrameDecoder,
    decode_frame,
    encode_frame,
    encode_frame_parts,
    encode_frame_with_payload,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "WIRE_VERSION",
    "FrameDecoder",
    "decode_frame",
    "encode_frame",
    "encode_frame_parts",
    "encode_frame_with_payload",
]

"""Sans-I/O codec of the control protocol: JSON lines, bounded in length and nesting depth.

No sockets and no clock here: :class:`LineBuffer` takes bytes and returns complete lines; the
``encode_*``/``decode_*`` functions turn lines into envelopes and back. Every decode failure is a
:class:`~lattica.control.errors.ControlDecodeError` (or :class:`ControlError` with
``invalid-params`` for a method's params), never ``RecursionError`` or a half-built object.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from lattica.control.errors import (
    BAD_REPLY,
    BAD_REQUEST,
    INVALID_PARAMS,
    TOO_LARGE,
    ControlDecodeError,
    ControlError,
)
from lattica.control.limits import MAX_JSON_DEPTH, MAX_LINE_BYTES
from lattica.control.messages import ErrorBody, Reply, Request

T = TypeVar("T")

# A JSON string, unrolled so long strings cost one regex step per run of plain characters.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


class LineBuffer:
    """Splits a byte stream into lines of at most ``max_line_bytes`` (newline excluded)."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def pending_bytes(self) -> int:
        """Bytes received after the last complete line returned."""
        return len(self._buffer)

    def next_line(self) -> bytes | None:
        """The next complete line without its newline, or None until one has arrived.

        Raises :class:`ControlDecodeError` (``too-large``) once a line exceeds the limit; the
        stream cannot be resynchronised after that, so the caller closes it.
        """
        newline = self._buffer.find(b"\n", 0, self.max_line_bytes + 1)
        if newline < 0:
            if len(self._buffer) > self.max_line_bytes:
                raise ControlDecodeError(TOO_LARGE, f"control line longer than {self.max_line_bytes} bytes")
            return None
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return line


def check_depth(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`ControlDecodeError` when ``data`` nests arrays/objects deeper than ``max_depth``.

    Brackets inside strings do not count. Unterminated strings are treated conservatively (their
    brackets count), which can only reject input that is invalid anyway.
    """
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= max_depth:
        return
    depth = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > max_depth:
                raise ControlDecodeError(BAD_REQUEST, f"JSON nested deeper than {max_depth} levels")
        else:
            depth -= 1


# A high-surrogate escape (\uD800-\uDBFF) with no low one after it: text no UTF-8 can carry.
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])")


def _decode(decoder: msgspec.json.Decoder[T], line: bytes, code: str, what: str) -> T:
    check_depth(line)
    try:
        return decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        detail = str(exc)
        if "truncated" in detail and _LONE_SURROGATE.search(line):
            # msgspec reports a lone surrogate escape as truncated input, which misleads.
            detail = "a \\u escape is an unpaired UTF-16 surrogate, which is not text"
        raise ControlDecodeError(code, f"malformed {what}: {detail}") from None
    except RecursionError:  # unreachable after check_depth; kept so no input can escape untyped
        raise ControlDecodeError(code, f"{what} nested too deeply") from None


def encode_request(method: str, params: object = None) -> bytes:
    """A request line, newline included. Raises :class:`ControlError` (``invalid-params``) for
    params JSON cannot carry (e.g. text with lone surrogates from undecodable command-line bytes)."""
    try:
        body = _encoder.encode({"method": method, "params": {} if params is None else params})
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ControlError(INVALID_PARAMS, f"cannot encode the request: {exc}") from None
    return body + b"\n"


def decode_request(line: bytes) -> Request:
    """The envelope of a request line; raises :class:`ControlDecodeError` (``bad-request``)."""
    return _decode(_request_decoder, line, BAD_REQUEST, "control request")


def decode_params(request: Request, params_type: type[T]) -> T:
    """The request's params as ``params_type``; raises :class:`ControlError` (``invalid-params``)."""
    raw = bytes(request.params)
    try:
        return msgspec.json.decode(raw, type=params_type)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ControlError(INVALID_PARAMS, f"{request.method}: {exc}") from None
    except RecursionError:
        raise ControlError(INVALID_PARAMS, f"{request.method}: params nested too deeply") from None


def encode_result(result: object, *, more: bool = False) -> bytes:
    """A success reply line, newline included (``result`` may hold msgspec Structs); ``more``
    marks a line of a stream that is not its last. Raises ``TypeError`` for results JSON cannot
    carry."""
    if more:
        return _encoder.encode(Reply(ok=True, result=result, more=True)) + b"\n"
    # The same bytes as before streams existed: older CLIs read these lines unchanged.
    return _encoder.encode({"ok": True, "result": result, "error": None}) + b"\n"


def encode_error(error: ControlError) -> bytes:
    """An error reply line, newline included."""
    body = ErrorBody(code=error.code, message=error.message, hint=error.hint)
    return _encoder.encode({"ok": False, "error": body}) + b"\n"


def decode_reply(line: bytes) -> Any:
    """The result of a reply line; raises :class:`ControlError` carrying the daemon's error, or
    :class:`ControlDecodeError` (``bad-reply``) when the line is not a reply."""
    return decode_stream_reply(line)[0]


def decode_stream_reply(line: bytes) -> tuple[Any, bool]:
    """``(result, more)`` of one line of a stream (``more`` is False on its last line); raises
    like :func:`decode_reply`."""
    reply = _decode(_reply_decoder, line, BAD_REPLY, "reply from the daemon")
    if reply.ok:
        return reply.result, reply.more
    if reply.error is None:
        raise ControlDecodeError(BAD_REPLY, "the daemon reported a failure without saying which")
    raise ControlError(reply.error.code, reply.error.message, reply.error.hint)

"""Messages on RPC streams (msgspec Structs, one tagged union, framed by ``lattica.wire``).

A stream starts with one :class:`StreamHeader` naming the protocol. For request/response
protocols the caller then sends one :class:`Request` and EOF, and the callee answers with one
:class:`Response` or :class:`Error` and EOF. Stream protocols own the stream after the header.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_PROTOCOL_ID_CHARS = 256
MAX_ERROR_CODE_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 1024

ProtocolId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PROTOCOL_ID_CHARS)]


class StreamHeader(msgspec.Struct, frozen=True, tag="header"):
    """First frame of every RPC stream: which protocol the stream speaks."""

    protocol: ProtocolId


class Request(msgspec.Struct, frozen=True, tag="request"):
    """The caller's request payload (request/response protocols only)."""

    payload: bytes


class Response(msgspec.Struct, frozen=True, tag="response"):
    """The callee's answer."""

    payload: bytes


class Error(msgspec.Struct, frozen=True, tag="error"):
    """The callee's refusal or failure; ``code`` becomes :attr:`RpcError.code` at the caller."""

    code: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CODE_CHARS)]
    message: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_MESSAGE_CHARS)] = ""


RpcMessage = StreamHeader | Request | Response | Error

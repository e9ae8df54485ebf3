"""The envelope every control line uses; each method's own params/result types live with the
service that registers it (``lattica/control/node_methods.py``, ``lattica/control/dht_methods.py``).

Request line: ``{"method": "dht.get", "params": {...}}``.
Reply line: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"code": "...", "message": "...", "hint": "..." | null}}``.

A streaming method (``state.watch``) answers with many reply lines on one connection: every line
but the last carries ``"more": true`` (the first says the subscription is in place, each later
one is an item); the last is a plain reply, ``{"ok": true, "result": null}`` when the stream
ended normally or an error reply (``overflow``, ``timeout``, ...).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

MethodName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.-]*$")]


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """One call: the method's name and its params, left raw until the method's type is known."""

    method: MethodName
    params: msgspec.Raw = msgspec.Raw(b"{}")
    """Decoded later into the method's own params type; absent means no params."""


class ErrorBody(msgspec.Struct, omit_defaults=False):
    """The one error shape: ``code`` for programs, ``message`` and ``hint`` for people."""

    code: str
    message: str
    hint: str | None = None


class Reply(msgspec.Struct):
    """One answer: ``ok`` with a ``result``, or not ``ok`` with an ``error``."""

    ok: bool
    result: Any = None
    error: ErrorBody | None = None
    more: bool = False
    """True on every line of a stream but its last."""


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    """Params of a method that takes none."""

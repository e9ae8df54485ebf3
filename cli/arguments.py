"""Parse-time checks of command-line arguments, so a bad argument is a usage error (exit 2)
before any socket is opened, with or without a running daemon.

The daemon checks everything again with the real parsers (``PeerAddr.parse``, ``PeerId.parse``)
and answers ``invalid-params``, which is also exit 2. The checks here are syntactic on purpose:
the real parsers live in ``lattica.net``/``lattica.identity``, whose imports (aioquic, trio,
pynacl) would cost every client command ~200 ms of start-up.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from pathlib import Path

import typer

from lattica.control.limits import (
    MAX_CID_BYTES,
    MAX_DIAL_STRING_CHARS,
    MAX_JSON_DEPTH,
    MAX_KEY_BYTES,
    MAX_RECORD_TTL_S,
    MAX_SPACE_REF_CHARS,
    MAX_STATE_KEY_BYTES,
    MAX_VALUE_BYTES,
    MIN_RECORD_TTL_S,
)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_PEER_ID = re.compile(r"^[a-z2-7]{52}$")
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$")


def parse_duration_s(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``24h``, ``2d`` or plain seconds; raises ``ValueError``."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. 90s, 30m, 24h, 2d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def record_ttl_s(text: str) -> float:
    """A record TTL within the DHT's limits; raises ``typer.BadParameter``."""
    try:
        ttl_s = parse_duration_s(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ttl") from None
    if not MIN_RECORD_TTL_S <= ttl_s <= MAX_RECORD_TTL_S:
        raise typer.BadParameter(
            f"{text!r} is outside {MIN_RECORD_TTL_S:g}s..{MAX_RECORD_TTL_S / 86400:g}d "
            "(replicas refuse records that live longer, and shorter ones expire in transit)",
            param_hint="--ttl",
        )
    return ttl_s


def check_key(text: str) -> str:
    """A DHT record key within the limit (UTF-8 bytes, as the DHT counts them)."""
    if not text or len(text.encode("utf-8", errors="surrogateescape")) > MAX_KEY_BYTES:
        raise typer.BadParameter(f"a key is 1 to {MAX_KEY_BYTES} bytes of UTF-8")
    return text


def check_cid(text: str) -> str:
    """A content id within the limit (UTF-8 bytes)."""
    if not text or len(text.encode("utf-8", errors="surrogateescape")) > MAX_CID_BYTES:
        raise typer.BadParameter(f"a content id is 1 to {MAX_CID_BYTES} bytes of UTF-8")
    return text


def check_peer_id(text: str) -> str:
    """``text`` if it looks like a peer id (52 lowercase base32 characters, canonical)."""
    return _check_base32_id(text, "peer id")


def check_space_id(text: str) -> str:
    """``text`` if it looks like a space id (the same form as a peer id)."""
    return _check_base32_id(text, "space id")


def _check_base32_id(text: str, what: str) -> str:
    if not _PEER_ID.fullmatch(text):
        raise typer.BadParameter(f"{text!r} is not a {what} (52 lowercase base32 characters)")
    try:
        canonical = base64.b32encode(base64.b32decode(text.upper() + "====")).decode().rstrip("=").lower()
    except (binascii.Error, ValueError):
        canonical = ""
    if canonical != text:
        raise typer.BadParameter(f"{text!r} is not a canonical {what}")
    return text


def check_space_ref(text: str) -> str:
    """A SPACE argument: a space id or a local name, within the length limit."""
    if not text or len(text) > MAX_SPACE_REF_CHARS:
        raise typer.BadParameter(f"a space is its id or its local name (1 to {MAX_SPACE_REF_CHARS} characters)")
    return text


def check_state_key(text: str) -> str:
    """A key of a replicated space within the limit (UTF-8 bytes)."""
    if not text or len(text.encode("utf-8", errors="surrogateescape")) > MAX_STATE_KEY_BYTES:
        raise typer.BadParameter(f"a key is 1 to {MAX_STATE_KEY_BYTES} bytes of UTF-8")
    return text


def parse_json_value(text: str) -> object:
    """``state set --json-value``: the JSON document ``text``; raises ``typer.BadParameter`` for
    invalid JSON, NaN/Infinity (JSON has none) or nesting deeper than the control API carries."""

    def refuse_constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise typer.BadParameter("the JSON value is nested too deeply", param_hint="VALUE") from None
    except ValueError as exc:
        hint = f"not JSON ({exc}); drop --json-value to store it as text"
        raise typer.BadParameter(hint, param_hint="VALUE") from None
    # The request wraps the value in two levels ({"params": {"value": ...}}).
    if _json_depth(value) > MAX_JSON_DEPTH - 2:
        too_deep = f"the JSON value is nested deeper than {MAX_JSON_DEPTH - 2} levels"
        raise typer.BadParameter(too_deep, param_hint="VALUE")
    return value


def _json_depth(value: object) -> int:
    """Levels of nested arrays/objects, counted as the control codec counts them."""
    depth, level = 0, [value]
    while True:
        containers = [item for item in level if isinstance(item, dict | list)]
        if not containers:
            return depth
        depth += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]


def check_dial_string(text: str) -> str:
    """``text`` if it has the shape ``PEERID@HOST:PORT`` or ``HOST:PORT``."""
    if len(text) > MAX_DIAL_STRING_CHARS:
        raise typer.BadParameter(f"longer than {MAX_DIAL_STRING_CHARS} characters")
    peer, at, host_port = text.rpartition("@")
    if at:
        check_peer_id(peer)
    if not _HOST_PORT.fullmatch(host_port) or int(host_port.rpartition(":")[2]) > 65535:
        raise typer.BadParameter(f"{text!r} is not PEERID@HOST:PORT or HOST:PORT (e.g. 127.0.0.1:4001)")
    return text


def check_ping_target(text: str) -> str:
    """``text`` if it is a dial string, a relayed address ``RELAYPEERID@HOST:PORT/relay/PEERID``
    or a bare peer id."""
    if "@" not in text and ":" not in text and "/" not in text:
        check_peer_id(text)
        return text
    relay, separator, target = text.partition("/relay/")
    if not separator:
        return check_dial_string(text)
    if "@" not in relay:
        raise typer.BadParameter(f"the relay in {text!r} needs its peer id (RELAYPEERID@HOST:PORT/relay/PEERID)")
    check_dial_string(relay)
    check_peer_id(target)
    return text


def check_dial_strings(texts: list[str] | None) -> list[str] | None:
    """Every element through :func:`check_dial_string`."""
    return None if texts is None else [check_dial_string(t) for t in texts]


def read_value(value: str | None, file: Path | None) -> bytes:
    """The value of ``dht put``: the VALUE argument, or the bytes of ``--file`` (``-`` or a VALUE
    of ``-`` reads stdin). Raises ``typer.BadParameter`` when absent, doubled or too large."""
    if value is not None and file is not None:
        raise typer.BadParameter("give VALUE or --file, not both")
    if value is None and file is None:
        raise typer.BadParameter("give VALUE, or --file PATH, or - to read stdin")
    if file is None and value != "-":
        assert value is not None
        data = value.encode("utf-8", errors="surrogateescape")
    elif file is None or str(file) == "-":
        data = sys.stdin.buffer.read(MAX_VALUE_BYTES + 1)
    else:
        try:
            with file.open("rb") as f:
                data = f.read(MAX_VALUE_BYTES + 1)
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {file}: {exc.strerror or exc}") from None
    if len(data) > MAX_VALUE_BYTES:
        raise typer.BadParameter(
            f"the value is over {MAX_VALUE_BYTES} bytes, the DHT's limit; publish large data as "
            "content and put its id in the DHT"
        )
    return data

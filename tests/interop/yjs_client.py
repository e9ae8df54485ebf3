"""A real Yjs client for interop tests: drives ``yjs/yjs_bridge.mjs`` under ``node``.

The bridge and this module speak one small vocabulary for document contents (see the bridge's
header): plain JSON values, and ``{"$map": {...}}``, ``{"$array": [...]}``, ``{"$text": "..."}``
for nested shared types. :func:`pycrdt_value` builds the same contents on the pycrdt side, so one
description makes the same document in both implementations.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pycrdt import Array, Doc, Map, Text

YJS_DIR = Path(__file__).parent / "yjs"
BRIDGE = YJS_DIR / "yjs_bridge.mjs"
ROOT_TYPES: dict[str, type[Map[Any] | Array[Any] | Text]] = {"map": Map, "array": Array, "text": Text}

Roots = Mapping[str, str]
"""Top-level type name -> kind (``map``, ``array``, ``text``): a Yjs reader must know the kinds."""


class YjsBridgeError(Exception):
    """The Yjs bridge failed (its stderr is the message)."""


class YjsClient:
    """Decodes updates with Yjs and makes updates with Yjs, one ``node`` process per call."""

    def __init__(self, node: str = "node", timeout_s: float = 60.0) -> None:
        self.node = node
        self.timeout_s = timeout_s

    def _run(self, request: dict[str, Any]) -> dict[str, Any]:
        done = subprocess.run(
            [self.node, str(BRIDGE)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=self.timeout_s,
            cwd=YJS_DIR,
        )
        if done.returncode != 0:
            raise YjsBridgeError(done.stderr.strip())
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def decode(self, updates: Iterable[bytes], roots: Roots) -> dict[str, Any]:
        """The JSON of a Yjs document after applying ``updates`` in order."""
        request = {"op": "decode", "roots": dict(roots), "updates": [_b64(u) for u in updates]}
        result: dict[str, Any] = self._run(request)["json"]
        return result

    def encode(
        self,
        roots: Roots,
        edits: Sequence[Mapping[str, Any]],
        base: Iterable[bytes] = (),
        *,
        client_id: int | None = None,
    ) -> tuple[bytes, dict[str, Any]]:
        """A Yjs update holding ``edits`` made on top of ``base`` (only what the edits added), and
        the JSON of Yjs's document afterwards; ``client_id`` sets the Yjs client that writes."""
        request: dict[str, Any] = {
            "op": "encode",
            "roots": dict(roots),
            "edits": list(edits),
            "base": [_b64(u) for u in base],
        }
        if client_id is not None:
            request["client_id"] = client_id
        answer = self._run(request)
        return base64.b64decode(answer["update"]), answer["json"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pycrdt_value(value: Any) -> Any:
    """The pycrdt form of a bridge value: a prelim Map/Array/Text for marked values, else itself."""
    if isinstance(value, dict) and len(value) == 1:
        ((marker, inner),) = value.items()
        if marker == "$map":
            return Map({k: pycrdt_value(v) for k, v in inner.items()})
        if marker == "$array":
            return Array([pycrdt_value(v) for v in inner])
        if marker == "$text":
            return Text(inner)
    return value


def apply_edits(doc: Doc, roots: Roots, edits: Sequence[Mapping[str, Any]]) -> None:
    """Make the bridge's ``edits`` on a pycrdt document, in one transaction."""
    with doc.transaction():
        for change in edits:
            target = doc.get(change["root"], type=ROOT_TYPES[roots[change["root"]]])
            if "set" in change:
                for key, value in change["set"].items():
                    target[key] = pycrdt_value(value)
            elif "delete" in change:
                for key in change["delete"]:
                    del target[key]
            elif "push" in change:
                target.extend([pycrdt_value(v) for v in change["push"]])
            elif "insert" in change:
                index, text = change["insert"]
                target.insert(index, text)
            else:
                raise ValueError(f"unknown edit {change!r}")


def pycrdt_json(doc: Doc, roots: Roots) -> dict[str, Any]:
    """The document's contents as JSON-like Python data, one entry per root."""
    out: dict[str, Any] = {}
    for name, kind in roots.items():
        root = doc.get(name, type=ROOT_TYPES[kind])
        out[name] = str(root) if kind == "text" else root.to_py()
    return out


def canonical(value: Any) -> Any:
    """``value`` with every number as a float and every other type kept, for strict comparison.

    pycrdt hands integers back as floats and Yjs prints ``1.0`` as ``1``; that difference is the
    documented value rule, not an interop failure. Everything else must match exactly: ``True``
    is not ``1`` here (plain ``==`` would say it is).
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, int | float):
        return ("number", float(value))
    if isinstance(value, list):
        return ("list", [canonical(v) for v in value])
    if isinstance(value, dict):
        return ("dict", {k: canonical(v) for k, v in value.items()})
    raise TypeError(f"not JSON-like: {value!r}")

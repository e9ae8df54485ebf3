"""pycrdt (Yrs) and a real Yjs client read each other's updates to the same document.

Lattica's CRDT updates are pycrdt updates; they are only Yjs-compatible if a Yjs client decodes
them to the same contents and its own updates apply in pycrdt. These tests check both directions
on maps, arrays, text, nested shared types and every JSON scalar, one transaction and many, and
concurrent edits from both sides.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc

from .yjs_client import YjsClient, apply_edits, canonical, pycrdt_json

ALL_ROOTS = {"m": "map", "a": "array", "t": "text"}

# name -> transactions, each a list of bridge edits (see yjs/yjs_bridge.mjs).
DOCUMENTS: dict[str, list[list[dict[str, Any]]]] = {
    "scalars": [
        [
            {
                "root": "m",
                "set": {
                    "int": 7,
                    "negative": -42,
                    "zero": 0,
                    "large_int": 2**40,
                    "float": 1.5,
                    "tiny": -2.5e-300,
                    "string": "hello",
                    "unicode": "héllo ✓ 🌍",
                    "empty": "",
                    "true": True,
                    "false": False,
                    "null": None,
                },
            }
        ]
    ],
    "array_and_text": [
        [{"root": "a", "push": [1, 2.25, "three", False, None]}, {"root": "t", "insert": [0, "hello world"]}]
    ],
    "plain_json_values": [
        [{"root": "m", "set": {"obj": {"k": [1, {"deep": [True, None, "x"]}], "n": 0.5}, "list": [[], {}, [[1]]]}}]
    ],
    "nested_shared_types": [
        [
            {
                "root": "m",
                "set": {
                    "shards": {"$map": {"s1": {"$array": [1, 2]}, "owner": "peer-a", "note": {"$text": "draft"}}},
                    "log": {"$array": [{"$map": {"step": 1}}, {"$text": "t"}, {"$array": []}]},
                },
            },
            {"root": "a", "push": [{"$map": {"x": {"$map": {"y": {"$map": {"z": 3}}}}}}]},
        ]
    ],
    "many_transactions_overwrite_and_delete": [
        [{"root": "m", "set": {"k": 1, "gone": "soon"}}, {"root": "t", "insert": [0, "ab"]}],
        [{"root": "m", "set": {"k": "two"}}, {"root": "t", "insert": [1, "XY"]}],
        [{"root": "m", "delete": ["gone"]}, {"root": "a", "push": ["end"]}],
        [{"root": "t", "insert": [4, " 🌍 emoji"]}, {"root": "t", "insert": [0, ">"]}],
    ],
}


def _updates_from_pycrdt(transactions: list[list[dict[str, Any]]]) -> tuple[list[bytes], dict[str, Any]]:
    """One incremental update per transaction, and the document's final JSON."""
    doc: Doc = Doc()
    updates = []
    for edits in transactions:
        before = doc.get_state()
        apply_edits(doc, ALL_ROOTS, edits)
        updates.append(doc.get_update(before))
    return updates, pycrdt_json(doc, ALL_ROOTS)


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_pycrdt_updates_decode_in_yjs_to_the_same_json(yjs: YjsClient, name: str) -> None:
    updates, expected = _updates_from_pycrdt(DOCUMENTS[name])
    assert canonical(yjs.decode(updates, ALL_ROOTS)) == canonical(expected)


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_yjs_updates_apply_in_pycrdt_to_the_same_json(yjs: YjsClient, name: str) -> None:
    made: list[bytes] = []
    for edits in DOCUMENTS[name]:
        update, yjs_json = yjs.encode(ALL_ROOTS, edits, base=made)
        made.append(update)
    doc: Doc = Doc()
    for update in made:
        doc.apply_update(update)
    assert canonical(pycrdt_json(doc, ALL_ROOTS)) == canonical(yjs_json)


def _concurrent_edits(
    yjs: YjsClient, base_text: str, yjs_index: int, py_index: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A shared starting point made by pycrdt; then Yjs and pycrdt edit the same key and the same
    text position without seeing each other; each side applies the other's delta. Returns the
    JSON in Yjs and in pycrdt. Text indexes are each language's own: UTF-16 units in Yjs (what
    JavaScript strings count), characters in Python."""
    base_updates, _ = _updates_from_pycrdt(
        [[{"root": "m", "set": {"k": "base"}}, {"root": "t", "insert": [0, base_text]}]]
    )
    py_doc: Doc = Doc()
    for update in base_updates:
        py_doc.apply_update(update)
    yjs_edits = [{"root": "m", "set": {"k": "from-yjs", "y": 1}}, {"root": "t", "insert": [yjs_index, "Y"]}]
    yjs_delta, _ = yjs.encode(ALL_ROOTS, yjs_edits, base=base_updates)

    before = py_doc.get_state()
    apply_edits(
        py_doc, ALL_ROOTS, [{"root": "m", "set": {"k": "from-py", "p": 2}}, {"root": "t", "insert": [py_index, "P"]}]
    )
    py_delta = py_doc.get_update(before)

    py_doc.apply_update(yjs_delta)
    return yjs.decode([*base_updates, yjs_delta, py_delta], ALL_ROOTS), pycrdt_json(py_doc, ALL_ROOTS)


def test_both_sides_edit_concurrently_and_converge(yjs: YjsClient) -> None:
    in_yjs, in_pycrdt = _concurrent_edits(yjs, "abcd", 2, 2)
    assert canonical(in_yjs) == canonical(in_pycrdt)
    # Both edits survive, at the position both sides asked for; one writer wins the key.
    assert in_pycrdt["m"]["k"] in ("from-yjs", "from-py") and in_pycrdt["m"]["y"] == 1 and in_pycrdt["m"]["p"] == 2
    assert in_pycrdt["t"] in ("abYPcd", "abPYcd")


@pytest.mark.xfail(
    strict=True,
    reason="pycrdt 0.14 counts Text indexes in UTF-8 bytes (Yjs: UTF-16 units); an insert after an "
    "emoji lands elsewhere and its update makes Yjs throw (upstream y-crdt/pycrdt#379, open)",
)
def test_concurrent_text_edits_after_an_emoji_converge(yjs: YjsClient) -> None:
    # Strict: when a pycrdt release fixes the offsets, this passes and the marker must go.
    # After the "a" in both: UTF-16 offset 3 in Yjs, character 2 in Python.
    in_yjs, in_pycrdt = _concurrent_edits(yjs, "🌍ab", 3, 2)
    assert canonical(in_yjs) == canonical(in_pycrdt)
    assert in_pycrdt["t"] in ("🌍aYPb", "🌍aPYb")


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(
    derandomize=True,
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(contents=st.dictionaries(st.text(min_size=1, max_size=10), json_values, min_size=1, max_size=6))
def test_any_json_map_written_by_pycrdt_reads_the_same_in_yjs(yjs: YjsClient, contents: dict[str, Any]) -> None:
    updates, expected = _updates_from_pycrdt([[{"root": "m", "set": contents}]])
    assert canonical(yjs.decode(updates, {"m": "map"})) == canonical({"m": expected["m"]})
    assert canonical(expected["m"]) == canonical(contents)

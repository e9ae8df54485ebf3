"""The values rule: ``get`` hands back what ``set`` stored (integral floats as ints, tuples as lists)."""

from __future__ import annotations

import math
from typing import Any

import pycrdt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.crdt import ROOT_MAP, check_value, to_plain
from lattica.crdt.errors import InvalidValueError

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 2)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def round_trip(value: Any) -> Any:
    writer: pycrdt.Doc[Any] = pycrdt.Doc()
    writer.get(ROOT_MAP, type=pycrdt.Map)["k"] = check_value(value)
    reader: pycrdt.Doc[Any] = pycrdt.Doc()
    reader.apply_update(writer.get_update())
    return to_plain(reader.get(ROOT_MAP, type=pycrdt.Map)["k"])


def test_pycrdt_itself_changes_types_which_is_why_the_rule_exists() -> None:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    root = doc.get(ROOT_MAP, type=pycrdt.Map)
    root["n"], root["b"] = 1, b"x"
    assert isinstance(root["n"], float) and isinstance(root["b"], bytearray)


@pytest.mark.parametrize(
    "stored, returned",
    [
        (1, 1),
        (-7, -7),
        (2**53, 2**53),
        (2**62, 2**62),  # Yrs holds it as a float64: exact, and an int again on the way out
        (2**62 + 1, 2**62 + 1),  # a BigInt in Yrs
        (2**63 - 2, 2**63 - 2),
        (-(2**63), -(2**63)),
        (1.5, 1.5),
        (2.0, 2),  # the one documented change: an integral float comes back as an int
        (b"\x00\xff", b"\x00\xff"),
        ((1, "a"), [1, "a"]),
        ({"n": [1, 2.5, {"x": b"y"}]}, {"n": [1, 2.5, {"x": b"y"}]}),
        (None, None),
        (True, True),
    ],
)
def test_values_come_back_as_stored(stored: Any, returned: Any) -> None:
    got = round_trip(stored)
    assert got == returned and type(got) is type(returned)


@given(json_like)
def test_any_json_like_value_round_trips(value: Any) -> None:
    assert round_trip(value) == value


@pytest.mark.parametrize("bad", [math.nan, math.inf, 2**63, 2**63 - 1, object(), {1: "x"}, {"a": {1, 2}}])
def test_unstorable_values_are_refused(bad: Any) -> None:
    with pytest.raises(InvalidValueError):
        check_value(bad)


def test_nesting_is_bounded() -> None:
    deep: Any = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(InvalidValueError):
        check_value(deep)

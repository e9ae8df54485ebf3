"""The values rule: what ``set`` accepts, and how ``get`` hands it back.

pycrdt (Yrs) stores an ``int`` that a float64 holds exactly as a JavaScript number (so ``1``
comes back as ``1.0`` and ``2**62`` as ``4.611686018427388e+18``), any other int as a BigInt;
bytes come back as ``bytearray``. (Yrs' test is ``v as f64 as i64 == v`` with a saturating
cast, so ``2**63 - 1`` alone would be stored, lossily, as the float ``2**63``.)
The rule, applied by :func:`check_value` on the way in and :func:`to_plain` on the way out
(both the Python API and the CLI use it):

* Accepted: ``None``, ``bool``, ``int`` in ``[-2**63, 2**63 - 2]``, finite ``float``, ``str``,
  ``bytes``, and lists/tuples and dicts with ``str`` keys of those, nested at most
  :data:`MAX_DEPTH` levels. Anything else raises :class:`InvalidValueError` (a Python int
  outside int64 even panics inside Yrs).
* Returned: a float with an integral value (``2.0``) comes back as ``int`` (``2``) -- JSON and
  JavaScript have one number type, so ``1`` and ``1.0`` are the same stored value and the int
  is what a caller almost always stored. A float with a fraction stays a float. ``bytearray``
  comes back as ``bytes``; tuples come back as lists; pycrdt ``Map``/``Array``/``Text`` values
  written by programs come back as dict/list/str.

So ``get`` returns exactly what was ``set`` except: integral floats become ints and tuples
become lists.
"""

from __future__ import annotations

import math
from typing import Any

import pycrdt

from lattica.crdt.errors import InvalidValueError

MAX_DEPTH = 32
_INT64_MIN = -(1 << 63)
_INT_MAX = (1 << 63) - 2  # 2**63 - 1 is stored as the float 2**63 (see the module docstring)


def check_value(value: Any, *, _depth: int = 0) -> Any:
    """Return ``value`` ready for pycrdt (tuples as lists) or raise :class:`InvalidValueError`."""
    if _depth > MAX_DEPTH:
        raise InvalidValueError(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT_MAX:
            raise InvalidValueError("integers are limited to -2**63 .. 2**63-2")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValueError("NaN and infinities cannot be stored")
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [check_value(item, _depth=_depth + 1) for item in value]
    if isinstance(value, dict):
        checked = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidValueError(f"map keys are strings, got {type(key).__name__}")
            checked[key] = check_value(item, _depth=_depth + 1)
        return checked
    raise InvalidValueError(f"cannot store a {type(value).__name__} (JSON-like values and bytes only)")


def to_plain(value: Any) -> Any:
    """A value read from pycrdt as what the caller stored (see the module rule)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= 2**63:
            return int(value)
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, pycrdt.Map):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, pycrdt.Array):
        return [to_plain(v) for v in value]
    if isinstance(value, pycrdt.Text):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value

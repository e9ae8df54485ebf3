"""Manifest paths: relative, no traversal, no control characters, no case-only clashes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lattica.content import ContentTooLargeError, UnsafePathError, check_path_set, check_relative_path
from tests.unit.content_samples import fuzz


@pytest.mark.parametrize(
    "path",
    ["config.json", "1_Pooling/config.json", "a/b/c.safetensors", "名前/ファイル.txt", "with space", "x" * 255],
)
def test_safe_paths_pass(path: str) -> None:
    assert check_relative_path(path) == path


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../x", r"'\.\.'"),
        ("a/../../x", r"'\.\.'"),
        ("a/./b", r"'\.'"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("a\\..\\b", "backslash"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("a\x1b[31m", "control"),
        ("a\x85b", "control"),
        ("a\ud800", "UTF-8"),
        ("x" * 256, "component longer"),
        ("a/" * 2100 + "b", "longer than 4096"),
    ],
)
def test_unsafe_paths_are_refused(path: str, reason: str) -> None:
    with pytest.raises(UnsafePathError, match=reason):
        check_relative_path(path)


@pytest.mark.parametrize(
    ("paths", "reason"),
    [
        (["a", "a"], "duplicate"),
        (["Model.bin", "model.bin"], "differ only by case"),
        (["caf\u00e9", "cafe\u0301"], "differ only by case"),  # NFC and NFD spell one name on macOS
        (["a", "a/b"], "also a directory"),
        (["A", "a/b"], "also a directory"),
    ],
)
def test_clashing_sets_are_refused(paths: list[str], reason: str) -> None:
    with pytest.raises(UnsafePathError, match=reason):
        check_path_set(paths, max_files=10)


def test_too_many_files() -> None:
    check_path_set([f"f{i}" for i in range(3)], max_files=3)
    with pytest.raises(ContentTooLargeError):
        check_path_set([f"f{i}" for i in range(4)], max_files=3)


@fuzz
@given(st.text(max_size=40))
def test_any_text_is_refused_typed_or_is_a_safe_relative_path(path: str) -> None:
    try:
        check_relative_path(path)
    except UnsafePathError:
        return
    parts = path.split("/")
    assert not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)
    assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) < 0xA0 for c in path)

"""Path safety for folder manifests: relative paths that cannot escape or clash on any target.

A manifest path is relative, ``/``-separated, and checked the same way on publish and on
decode (a manifest from a peer is hostile input). Refused, with
:class:`~lattica.content.errors.UnsafePathError`:

* empty paths, absolute paths (``/x``), empty components (``a//b``, trailing ``/``), ``.`` and
  ``..`` components, backslashes (a separator on Windows);
* NUL and other control characters (C0, DEL, C1), lone surrogates;
* a path longer than ``max_path_bytes`` or a component longer than :data:`MAX_COMPONENT_BYTES`
  UTF-8 bytes (what common file systems accept);
* in a set of paths (:func:`check_path_set`): duplicates, two paths that differ only by case or
  Unicode normalisation (they collide on a case-insensitive or normalising target such as
  macOS or Windows), and a file whose path is also a directory of another file (``a`` and
  ``a/b``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from lattica.content.errors import ContentTooLargeError, UnsafePathError

DEFAULT_MAX_PATH_BYTES = 4096
"""Longest relative path, UTF-8 bytes (Linux PATH_MAX)."""
MAX_COMPONENT_BYTES = 255
"""Longest path component, UTF-8 bytes (NAME_MAX)."""


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0


def check_relative_path(path: str, *, max_path_bytes: int = DEFAULT_MAX_PATH_BYTES) -> str:
    """Return ``path`` if it is a safe relative path (rules in the module docstring).

    Raises :class:`UnsafePathError`."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError("empty path")
    shown = repr(path[:200])
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"path {shown} is not valid UTF-8") from None
    if len(encoded) > max_path_bytes:
        raise UnsafePathError(f"path {shown} is longer than {max_path_bytes} bytes")
    if any(_is_control(c) for c in path):
        raise UnsafePathError(f"path {shown} contains a control character")
    if "\\" in path:
        raise UnsafePathError(f"path {shown} contains a backslash")
    if path.startswith("/"):
        raise UnsafePathError(f"path {shown} is absolute")
    for component in path.split("/"):
        if component in ("", ".", ".."):
            raise UnsafePathError(f"path {shown} has an empty, '.' or '..' component")
        if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(f"path {shown} has a component longer than {MAX_COMPONENT_BYTES} bytes")
    return path


def collision_key(path: str) -> str:
    """The form under which two paths land on the same file of a case-insensitive, normalising
    file system."""
    return unicodedata.normalize("NFC", path).casefold()


def check_path_set(paths: Iterable[str], *, max_files: int, max_path_bytes: int = DEFAULT_MAX_PATH_BYTES) -> None:
    """Check every path and the set as a whole (duplicates, case-only differences, a file that
    is also a directory). Raises :class:`UnsafePathError`, or :class:`ContentTooLargeError`
    beyond ``max_files`` paths."""
    files: dict[str, str] = {}
    for count, path in enumerate(paths, start=1):
        if count > max_files:
            raise ContentTooLargeError(f"more than {max_files} files")
        check_relative_path(path, max_path_bytes=max_path_bytes)
        key = collision_key(path)
        if key in files:
            other = files[key]
            what = "duplicate path" if other == path else "paths that differ only by case"
            raise UnsafePathError(f"{what}: {other[:200]!r} and {path[:200]!r}")
        files[key] = path
    for key, path in files.items():
        parts = key.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory in files:
                raise UnsafePathError(f"{files[directory][:200]!r} is a file and also a directory of {path[:200]!r}")

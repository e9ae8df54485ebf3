"""How the CLI speaks: one JSON document with ``--json``, plain lines and tables otherwise.

Anything that came from the network (a record's value or key, a peer's address) may carry
terminal escape sequences; when stdout is a terminal every line is passed through
:func:`terminal_safe`. With ``--json`` output is exact (JSON escapes control characters).
rich is imported only when a table is printed: it costs start-up time every command would pay.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

# C0 controls except tab and newline, DEL, C1 controls, and the bidirectional overrides that can
# make text display in an order other than the one it has (CVE-2021-42574 "Trojan Source").
_UNSAFE = {c for c in range(0x20) if c not in (0x09, 0x0A)} | {0x7F} | set(range(0x80, 0xA0))
_UNSAFE |= {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _UNSAFE}


def terminal_safe(text: str) -> str:
    """``text`` with control characters and bidi overrides shown as ``\\xNN`` / ``\\uNNNN``.

    Tab and newline are kept; nothing else that a terminal would interpret survives.
    """
    return text.translate(_ESCAPES)


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal (then output is made safe for it)."""
    return sys.stdout.isatty()


def print_line(text: str = "") -> None:
    """One line for people on stdout, made safe when stdout is a terminal."""
    sys.stdout.write((terminal_safe(text) if stdout_is_terminal() else text) + "\n")


def print_json(data: Any) -> None:
    """Write ``data`` as one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def print_fields(rows: Sequence[tuple[str, Any]]) -> None:
    """Name/value pairs for people, one per line, values never cut."""
    width = max((len(name) for name, _ in rows), default=0)
    for name, value in rows:
        print_line(f"{name:<{width}}  {'-' if value is None else value}")


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table for people; long values (peer ids, addresses) wrap, never get cut."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    safe = terminal_safe if stdout_is_terminal() else str
    table = Table(title=None if title is None else Text(safe(title)))
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text (not str) so that brackets in values are shown, never read as rich markup.
        table.add_row(*(Text(safe("-" if v is None else str(v))) for v in row))
    Console(soft_wrap=True).print(table)


def print_error(code: str, message: str, hint: str | None = None, *, json_mode: bool = False) -> None:
    """Report a failure: one line (and a hint) on stderr; with ``--json`` also a JSON error
    document ``{"ok": false, "error": {"code", "message", "hint"}}`` on stdout."""
    if json_mode:
        print_json({"ok": False, "error": {"code": code, "message": message, "hint": hint}})
    safe = terminal_safe if sys.stderr.isatty() else str
    sys.stderr.write(f"error: {safe(message)}\n")
    if hint:
        sys.stderr.write(f"  {safe(hint)}\n")
    sys.stderr.flush()

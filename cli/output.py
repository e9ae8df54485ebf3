"""How the CLI speaks: one JSON document with ``--json``, rich tables otherwise, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def print_json(data: Any) -> None:
    """Write ``data`` as one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table for people; long values (peer ids, addresses) wrap, never get cut."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    console.print(table)


def fail(message: str, *, hint: str | None = None, code: int = 1) -> NoReturn:
    """Print one line saying what happened (and what to do) on stderr and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err_console.print(f"  {hint}", highlight=False)
    raise typer.Exit(code)


def print_fields(rows: Sequence[tuple[str, Any]]) -> None:
    """Name/value pairs for people, one per line, values never cut."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in rows:
        table.add_row(name, "-" if value is None else str(value))
    console.print(table)

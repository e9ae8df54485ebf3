"""What every client command shares: the ``--home``/``--json`` options and the daemon call.

Failures are not handled here: :class:`~lattica.control.errors.ControlError` propagates to
``cli.main.main``, which reports it and maps it to an exit code in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lattica.control.client import call
from lattica.control.limits import DEFAULT_CALL_TIMEOUT_S
from lattica.home_layout import CONTROL_SOCKET, default_home

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="Node home directory.",
        show_default="$LATTICA_HOME, else ~/.local/share/lattica",
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help='Print one JSON document on stdout (errors too: {"ok": false, "error": ...}).'),
]


def resolve_home(home: Path | None) -> Path:
    """The home a command acts on: ``--home``, else ``$LATTICA_HOME``, else the default."""
    return (home or default_home()).expanduser().resolve()


def call_daemon(
    home: Path | None, method: str, params: object = None, *, timeout_s: float = DEFAULT_CALL_TIMEOUT_S
) -> Any:
    """Call the daemon of ``home``; raises :class:`~lattica.control.errors.ControlError`."""
    return call(resolve_home(home) / CONTROL_SOCKET, method, params, timeout_s=timeout_s)

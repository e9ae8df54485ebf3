"""What every client command shares: the ``--home``/``--json`` options and the daemon call."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cli.output import fail
from lattica.config import CONTROL_SOCKET, ConfigError, default_home
from lattica.control import ControlError, DaemonNotRunningError, call
from lattica.errors import LatticaError

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="Node home directory [default: $LATTICA_HOME or ~/.local/share/lattica]"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]

T = TypeVar("T")


class _Flags:
    debug = False


flags = _Flags()


def resolve_home(home: Path | None) -> Path:
    """The home a command acts on: ``--home``, else ``$LATTICA_HOME``, else the default."""
    return (home or default_home()).expanduser().resolve()


def guard(action: Callable[[], T]) -> T:
    """Run ``action``, turning expected failures into one line on stderr and exit code 1."""
    try:
        return action()
    except typer.Exit:
        raise
    except DaemonNotRunningError as exc:
        fail(str(exc), hint="start one with `lattica daemon` (same --home)")
    except (ControlError, ConfigError, LatticaError, OSError, ValueError) as exc:
        if flags.debug:
            traceback.print_exc()
        fail(str(exc))


def call_daemon(
    home: Path | None, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 120.0
) -> Any:
    """Call the daemon of ``home``; failures end the command with exit code 1."""
    return guard(lambda: call(resolve_home(home) / CONTROL_SOCKET, method, params, timeout_s=timeout_s))

"""SIGTERM and SIGHUP handled as Ctrl-C is (cli/stop_signals.py), and `lattica fetch`
cancelling the daemon's fetch on them (the system test sends a real SIGTERM to the CLI)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from cli import content_commands
from cli.stop_signals import STOP_SIGNALS, StopSignal, stop_signals_interrupt


@pytest.fixture
def signals_recorded() -> Iterator[list[int]]:
    """SIGTERM and SIGHUP recorded, not fatal: a test that fails must not end pytest."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, _f: received.append(n)) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("sig", STOP_SIGNALS)
@pytest.mark.usefixtures("signals_recorded")
def test_a_stop_signal_raises_once_and_the_old_handler_comes_back(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    with pytest.raises(StopSignal) as raised, stop_signals_interrupt():
        try:
            signal.raise_signal(sig)
        except StopSignal:
            signal.raise_signal(signal.SIGHUP)  # ignored: the first one's undo is running
            signal.raise_signal(signal.SIGTERM)
            raise
    assert isinstance(raised.value, KeyboardInterrupt)  # the Ctrl-C path handles it
    assert raised.value.exit_code == 128 + sig
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_fetch_cancels_the_daemons_fetch_on_a_stop_signal(
    monkeypatch: pytest.MonkeyPatch, signals_recorded: list[int], sig: signal.Signals
) -> None:
    calls: list[tuple[str, Any]] = []

    def daemon(home: Path | None, method: str, params: Any = None, **_: Any) -> Any:
        calls.append((method, params))
        if method == "content.fetch_status":
            signal.raise_signal(sig)  # while the CLI waits on the daemon
        return {"state": "cancelled"}

    monkeypatch.setattr(content_commands, "call_daemon", daemon)
    with pytest.raises(typer.Exit) as exited:
        content_commands._follow(None, 7, show_bar=False)
    assert exited.value.exit_code == 128 + sig
    assert calls[-1] == ("content.fetch_cancel", {"fetch_id": 7})
    assert signals_recorded == []  # handled by the command, not by the handler from before

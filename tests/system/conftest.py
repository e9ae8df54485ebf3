"""Real ``lattica daemon`` processes on 127.0.0.1, driven through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lattica.daemon_process import DaemonProcess, start_daemon_process

START_TIMEOUT_S = 20.0


def lattica(*args: str, home: Path | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one CLI command to completion."""
    cmd = [sys.executable, "-m", "cli.main", *args]
    if home is not None:
        cmd += ["--home", str(home)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_env())


def lattica_json(*args: str, home: Path) -> Any:
    """Run a CLI command with ``--json``; assert success and parse stdout."""
    result = lattica(*args, "--json", home=home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LATTICA_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    return env


@dataclass
class Daemon:
    """A running daemon process and what it printed at start-up."""

    started: DaemonProcess

    @property
    def home(self) -> Path:
        return self.started.home

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.started.process

    @property
    def peer_id(self) -> str:
        return self.started.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.started.addrs

    @property
    def addr(self) -> str:
        """The loopback dial string ``PEERID@127.0.0.1:PORT``."""
        return self.started.addr_on("127.0.0.1")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        """Signal the daemon and wait for it to exit; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``start_daemon(name, *extra_args)`` -> :class:`Daemon`; all are killed at the end."""
    daemons: list[Daemon] = []

    def start(name: str, *extra: str) -> Daemon:
        started = start_daemon_process(
            tmp_path / name, "--listen", "127.0.0.1:0", *extra, env=_env(), timeout_s=START_TIMEOUT_S
        )
        daemon = Daemon(started)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)
        if daemon.process.stdout:
            daemon.process.stdout.close()

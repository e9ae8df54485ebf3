"""Real ``lattica daemon`` processes on 127.0.0.1, driven through the CLI."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

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

    home: Path
    process: subprocess.Popen[bytes]
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)

    @property
    def addr(self) -> str:
        """The loopback dial string ``PEERID@127.0.0.1:PORT``."""
        return next(a for a in self.addrs if "@127.0.0.1:" in a)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        """Signal the daemon and wait for it to exit; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)


def _read_until_ready(process: subprocess.Popen[bytes], timeout_s: float) -> list[str]:
    """Lines the daemon prints up to its 'control socket' line, which it prints once ready.

    Reads the raw pipe: a buffered text reader would swallow lines the selector never sees.
    """
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            lines = buffer.decode().splitlines()
            if buffer.endswith(b"\n") and lines and lines[-1].startswith("control socket "):
                return lines
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"daemon not ready within {timeout_s} s: {lines}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"daemon exited early ({process.wait()}): {lines}")
            buffer += chunk


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``start_daemon(name, *extra_args)`` -> :class:`Daemon`; all are killed at the end."""
    daemons: list[Daemon] = []

    def start(name: str, *extra: str) -> Daemon:
        home = tmp_path / name
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "daemon", "--home", str(home), "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        daemon = Daemon(home, process)
        daemons.append(daemon)
        lines = _read_until_ready(process, START_TIMEOUT_S)
        daemon.peer_id = lines[0].split()[-1]
        daemon.addrs = [line.split()[-1] for line in lines if line.startswith("listening on")]
        return daemon

    yield start
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=10)
        if daemon.process.stdout:
            daemon.process.stdout.close()

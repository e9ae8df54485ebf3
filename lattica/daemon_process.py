"""Start a ``lattica daemon`` as a child process and wait until it serves (scripts, tests, bench).

Readiness is an event, not a delay: the daemon prints its peer line, one ``listening on`` line
per dialable address, and last ``control socket PATH`` once the CLI can talk to it.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

READY_PREFIX = "control socket "


@dataclass
class DaemonProcess:
    """A daemon child process and the addresses it announced."""

    home: Path
    process: subprocess.Popen[bytes]
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)
    """Every line the daemon printed up to its ready line (addresses, next steps)."""

    @property
    def control_socket(self) -> Path:
        """The daemon's control socket."""
        return self.home / "control.sock"

    def addr_on(self, host: str) -> str:
        """The announced ``PEERID@HOST:PORT`` for ``host`` (e.g. ``127.0.0.1``)."""
        return next(a for a in self.addrs if f"@{host}:" in a)


def read_until_ready(process: subprocess.Popen[bytes], timeout_s: float) -> list[str]:
    """The daemon's start-up lines, returned once its ``control socket`` line arrived.

    Reads the raw pipe (a buffered text reader would hide lines from the selector). Raises
    ``TimeoutError`` or ``RuntimeError`` (the daemon exited) with what it printed so far.
    """
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            lines = buffer.decode(errors="replace").splitlines()
            if buffer.endswith(b"\n") and lines and lines[-1].startswith(READY_PREFIX):
                return lines
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"daemon not ready within {timeout_s:g} s: {lines}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"daemon exited early (status {process.wait()}): {lines}")
            buffer += chunk


def start_daemon_process(
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 20.0,
    command_prefix: Sequence[str] = (),
) -> DaemonProcess:
    """Run ``python -m cli.main daemon --home HOME ARGS...`` and wait until it is ready.

    ``command_prefix`` goes before the command and must exec it (so the child is the daemon),
    e.g. ``["ip", "netns", "exec", NS]`` to run it inside a network namespace. The child's
    stderr (its log) is discarded; its log file is in ``HOME/logs``. On failure the child is
    killed before the error propagates.
    """
    process = subprocess.Popen(
        [*command_prefix, sys.executable, "-m", "cli.main", "daemon", "--home", str(home), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )
    try:
        lines = read_until_ready(process, timeout_s)
    except BaseException:
        process.kill()
        process.wait()
        raise
    daemon = DaemonProcess(home, process, announced=lines)
    daemon.peer_id = lines[0].split()[-1]
    daemon.addrs = [line.split()[-1] for line in lines if line.startswith("listening on")]
    return daemon

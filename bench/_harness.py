"""Benchmark plumbing shared by the ``bench/`` scripts: child processes, samples, result files.

Rules every benchmark built on this module keeps:

* Each side of a measurement runs in its own OS process, started with :class:`Child`, so the two
  never share an interpreter, a GIL or an event loop.
* A child talks to the parent only through JSON lines on its stdout (one object per line); its
  stderr goes to a file that the parent reads when something fails.
* No child outlives its run: the parent calls :meth:`Child.kill` in a ``finally`` on every exit
  path (SIGTERM included), and a child arms :func:`die_after` so that even a SIGKILLed parent
  leaves nothing running for long. (Not ``PR_SET_PDEATHSIG``: trio spawns from a worker thread,
  and that signal fires when the *thread* exits, which trio's thread cache does after 10 s idle.)
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

_MAX_MESSAGE_BYTES = 1 << 20


class ChildFailed(Exception):
    """A child process exited, or said something other than the JSON line it owed us."""


class Child:
    """One child process that reports JSON lines on stdout; kill it with :meth:`kill`."""

    def __init__(self, process: trio.Process, stderr_file: IO[bytes], argv: Sequence[str]) -> None:
        self._process = process
        self._stderr_file = stderr_file
        self._buffer = bytearray()
        self.argv = list(argv)

    @classmethod
    async def start(cls, argv: Sequence[str]) -> Child:
        """Start ``argv`` with stdout piped to us; raises ``OSError`` if it cannot start."""
        # Held open for the child's lifetime and closed by kill(), not by a with-block.
        stderr_file = tempfile.TemporaryFile()  # noqa: SIM115
        env = dict(os.environ)
        # Children import ``lattica`` from this work tree even when it is not installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        try:
            process = await trio.lowlevel.open_process(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                env=env,
            )
        except BaseException:
            stderr_file.close()
            raise
        return cls(process, stderr_file, argv)

    @property
    def pid(self) -> int:
        """The child's process id (to read its ``/proc`` counters)."""
        return self._process.pid

    async def read_message(self) -> dict[str, Any]:
        """The next JSON object the child prints; raises :class:`ChildFailed` at EOF."""
        stdout = self._process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            chunk = await stdout.receive_some(65536)
            if not chunk:
                await self._process.wait()
                raise ChildFailed(self.failure_text())
            self._buffer += chunk
            if len(self._buffer) > _MAX_MESSAGE_BYTES:
                raise ChildFailed("child printed an over-long line on stdout")
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            message = json.loads(line)
        except ValueError:
            raise ChildFailed(f"child printed non-JSON on stdout: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise ChildFailed(f"child printed {message!r}, not a JSON object")
        return message

    def stderr_tail(self) -> str:
        """The last non-blank line the child wrote to stderr ('' if none)."""
        self._stderr_file.seek(0)
        text = self._stderr_file.read().decode(errors="replace")
        return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")

    def failure_text(self) -> str:
        """Why the child failed: exit status and the last line of its stderr."""
        status = self._process.returncode
        prefix = "still running" if status is None else f"exited with status {status}"
        tail = self.stderr_tail()
        return f"{prefix}: {tail}" if tail else prefix

    async def kill(self) -> None:
        """Kill the child (if still running) and reap it. Safe to call more than once."""
        if self._process.returncode is None:
            self._process.kill()
        with trio.CancelScope(shield=True):
            await self._process.wait()
            if self._process.stdout is not None:
                await self._process.stdout.aclose()
        self._stderr_file.close()


@dataclass(frozen=True)
class Spread:
    """Median, minimum and maximum of some samples."""

    median: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        """The spread of ``values``, or ``None`` when there are none."""
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values))


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    # Read-only queries: which code these numbers belong to.
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the numbers then belong to no commit)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine skews the numbers)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(packages: Sequence[str]) -> dict[str, Any]:
    """What the numbers were measured on: OS, CPUs, Python and the given packages' versions."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "load_average": load_average(),
        "packages": {name: _package_version(name) for name in packages},
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }


def utc_now() -> dt.datetime:
    """The current time in UTC."""
    return dt.datetime.now(dt.UTC)


def write_results(name: str, started_at: dt.datetime, document: dict[str, Any]) -> Path:
    """Write ``document`` to ``bench/results/<name>-<UTC timestamp>.json`` (``-2``, ``-3``, ...
    appended when two runs started in the same second); returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{started_at.strftime('%Y%m%dT%H%M%SZ')}"
    text = json.dumps(document, indent=2) + "\n"
    for attempt in range(1, 100):
        path = RESULTS_DIR / (f"{stem}.json" if attempt == 1 else f"{stem}-{attempt}.json")
        try:
            with path.open("x") as file:  # never overwrite another run's results
                file.write(text)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{RESULTS_DIR}/{stem}*.json: 99 runs started in one second")


def die_after(seconds: float) -> None:
    """Child side: have the kernel end this process after ``seconds`` (SIGALRM), come what may."""
    signal.alarm(max(1, math.ceil(seconds)))


def report(message: dict[str, Any]) -> None:
    """Child side: send one JSON line to the parent."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()

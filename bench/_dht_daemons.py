"""The real-process half of ``bench/dht.py``: five ``lattica daemon`` processes on 127.0.0.1.

Daemon 0 starts alone; daemons 1-4 start with ``--bootstrap`` pointing at it and are joined
(``dht.bootstrap`` blocks until they are). Each daemon puts one record. (No
``find_providers`` here: with 5 nodes and k=20 every node stores every provider record, so it is
answered from the local store without a lookup; ``get`` always runs its lookup.)
Then, for ``rounds`` rounds, every daemon reads every other daemon's record (``dht.get``) and
pings it (``ping``), interleaved, each call timed
from the benchmark process through the daemon's control socket (``lattica.control.call``: the
same JSON line the CLI sends, without the CLI's ~0.3 s of interpreter start-up). The ping over
an already-open connection is the baseline: one RPC round trip through the same control path,
so ``get / ping`` is what the DHT lookup costs on top of one request.

A few calls also go through the CLI itself (``python -m cli.main dht get`` / ``ping -c 1``),
to show what a user waits for end to end.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _harness import REPO_ROOT

from lattica.config import CONTROL_SOCKET
from lattica.control import ControlError, call

DAEMONS = 5
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class CallSample:
    """One timed call: ``kind`` is get or ping, ``path`` control or cli."""

    kind: str
    path: str
    ok: bool
    seconds: float
    error: str | None = None


@dataclass
class DaemonsResult:
    """Everything the real-process part measured."""

    daemons: int
    rounds: int
    cli_calls: int
    samples: list[CallSample] = field(default_factory=list)
    setup_s: float = 0.0
    error: str | None = None


@dataclass
class _Daemon:
    home: Path
    process: subprocess.Popen[bytes]
    peer_id: str = ""
    addr: str = ""

    @property
    def control(self) -> Path:
        return self.home / CONTROL_SOCKET


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LATTICA_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _read_until_ready(process: subprocess.Popen[bytes], timeout_s: float) -> list[str]:
    """The daemon's start-up lines: its peer line, then one 'listening on' line per address."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            lines = buffer.decode().splitlines()
            ready = buffer.endswith(b"\n") and any(line.startswith("listening on") for line in lines)
            if ready and not selector.select(0.2):
                return lines
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"daemon not ready within {timeout_s:g} s: {lines}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"daemon exited early (status {process.wait()}): {lines}")
            buffer += chunk


def _start(home: Path, *extra: str) -> _Daemon:
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "daemon", "--home", str(home), "--listen", f"{LOOPBACK}:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=_env(),
        cwd=REPO_ROOT,
    )
    daemon = _Daemon(home, process)
    lines = _read_until_ready(process, START_TIMEOUT_S)
    daemon.peer_id = lines[0].split()[-1]
    daemon.addr = next(
        line.split()[-1] for line in lines if line.startswith("listening on") and f"@{LOOPBACK}:" in line
    )
    return daemon


def _stop(daemon: _Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait(timeout=10)
    if daemon.process.stdout is not None:
        daemon.process.stdout.close()


def _timed(kind: str, path: str, action: Callable[[], bool]) -> CallSample:
    started = time.perf_counter()
    try:
        ok = action()
    except (ControlError, OSError, subprocess.SubprocessError) as exc:
        return CallSample(kind, path, False, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:200])
    return CallSample(kind, path, ok, time.perf_counter() - started, None if ok else "wrong or missing result")


def _cli(daemon: _Daemon, *args: str) -> bool:
    completed = subprocess.run(
        [sys.executable, "-m", "cli.main", *args, "--home", str(daemon.home), "--json"],
        capture_output=True,
        timeout=CALL_TIMEOUT_S,
        env=_env(),
        cwd=REPO_ROOT,
        check=False,
    )
    return completed.returncode == 0


def run_daemons(rounds: int, cli_calls: int, progress: Callable[[str], None]) -> DaemonsResult:
    """Start the daemons, measure, stop them (also on failure); never raises for a bad run."""
    result = DaemonsResult(DAEMONS, rounds, cli_calls)
    daemons: list[_Daemon] = []
    with tempfile.TemporaryDirectory(prefix="lattica-bench-dht-") as tmp:
        try:
            setup_started = time.perf_counter()
            daemons.append(_start(Path(tmp) / "d0"))
            for i in range(1, DAEMONS):
                daemons.append(_start(Path(tmp) / f"d{i}", "--bootstrap", daemons[0].addr))
            for daemon in daemons[1:]:
                call(daemon.control, "dht.bootstrap", {}, timeout_s=CALL_TIMEOUT_S)
            keys = {d.peer_id: f"bench/{d.peer_id[:8]}" for d in daemons}
            for daemon in daemons:
                call(
                    daemon.control,
                    "dht.put",
                    {"key": keys[daemon.peer_id], "value": "v" * 100},
                    timeout_s=CALL_TIMEOUT_S,
                )
            result.setup_s = time.perf_counter() - setup_started
            progress(f"  {DAEMONS} daemons up, joined, one put each in {result.setup_s:.1f} s")

            def get(reader: _Daemon, writer: _Daemon) -> bool:
                got = call(
                    reader.control,
                    "dht.get",
                    {"key": keys[writer.peer_id], "peer": writer.peer_id},
                    timeout_s=CALL_TIMEOUT_S,
                )
                return isinstance(got, dict) and got.get("writer") == writer.peer_id

            def ping(reader: _Daemon, writer: _Daemon) -> bool:
                answer: Any = call(reader.control, "ping", {"addr": writer.addr}, timeout_s=CALL_TIMEOUT_S)
                return isinstance(answer, dict) and answer.get("peer_id") == writer.peer_id

            pairs = [(r, w) for r in daemons for w in daemons if r is not w]
            # One untimed pass opens every connection, so pings and lookups alike reuse them.
            for reader, writer in pairs:
                ping(reader, writer)
            for _ in range(rounds):
                for reader, writer in pairs:
                    for kind, action in (("ping", ping), ("get", get)):
                        result.samples.append(_timed(kind, "control", partial(action, reader, writer)))
            progress(f"  {len(result.samples)} control-socket calls done")
            for n in range(cli_calls):
                reader, writer = pairs[n % len(pairs)]
                result.samples.append(_timed("ping", "cli", partial(_cli, reader, "ping", writer.addr, "-c", "1")))
                get_args = ("dht", "get", keys[writer.peer_id], "--peer", writer.peer_id)
                result.samples.append(_timed("get", "cli", partial(_cli, reader, *get_args)))
        except (ControlError, OSError, TimeoutError, RuntimeError, StopIteration) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            for daemon in daemons:
                _stop(daemon)
    return result

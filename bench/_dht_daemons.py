"""The real-process half of ``bench/dht.py``: five ``lattica daemon`` processes on 127.0.0.1.

Daemon 0 starts alone; daemons 1-4 start with ``--bootstrap`` pointing at it and are joined
(``dht.bootstrap`` blocks until they are). Each daemon puts one record. With 5 nodes and k=20
every node stores every record and provider record, so a default ``get`` (quorum 1) answers
from the local copy and looks up in the background; ``get q=4`` waits for the newest of 4
copies, the local one and 3 from a lookup over open connections, which is the lookup's cost.
(No ``find_providers``: it is answered locally without a lookup.)
Then, for ``rounds`` rounds, every daemon reads every other daemon's record with ``get q=4``
and pings it (``ping``), interleaved, then ``rounds`` more rounds of default ``get`` (last,
because each leaves a lookup running in the background), each call timed
from the benchmark process through the daemon's control socket (``lattica.control.call``: the
same JSON line the CLI sends, without the CLI's ~0.3 s of interpreter start-up). The ping over
an already-open connection is the baseline: one RPC round trip through the same control path,
so ``get / ping`` is what the DHT lookup costs on top of one request.

A few calls also go through the CLI itself (``python -m cli.main dht get`` / ``ping -c 1``),
to show what a user waits for end to end.
"""

from __future__ import annotations

import os
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

from lattica.control import ControlError, call
from lattica.daemon_process import DaemonProcess, start_daemon_process

DAEMONS = 5
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class CallSample:
    """One timed call: ``kind`` is ping, get or "get q=4", ``path`` control or cli."""

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


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LATTICA_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _start(home: Path, *extra: str) -> DaemonProcess:
    return start_daemon_process(
        home, "--listen", f"{LOOPBACK}:0", *extra, env=_env(), cwd=REPO_ROOT, timeout_s=START_TIMEOUT_S
    )


def _stop(daemon: DaemonProcess) -> None:
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


def _cli(daemon: DaemonProcess, *args: str) -> bool:
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
    daemons: list[DaemonProcess] = []
    with tempfile.TemporaryDirectory(prefix="lattica-bench-dht-") as tmp:
        try:
            setup_started = time.perf_counter()
            daemons.append(_start(Path(tmp) / "d0"))
            for i in range(1, DAEMONS):
                daemons.append(_start(Path(tmp) / f"d{i}", "--bootstrap", daemons[0].addr_on(LOOPBACK)))
            for daemon in daemons[1:]:
                call(daemon.control_socket, "dht.bootstrap", {}, timeout_s=CALL_TIMEOUT_S)
            keys = {d.peer_id: f"bench/{d.peer_id[:8]}" for d in daemons}
            for daemon in daemons:
                call(
                    daemon.control_socket,
                    "dht.put",
                    {"key": keys[daemon.peer_id], "value": "v" * 100},
                    timeout_s=CALL_TIMEOUT_S,
                )
            result.setup_s = time.perf_counter() - setup_started
            progress(f"  {DAEMONS} daemons up, joined, one put each in {result.setup_s:.1f} s")

            def get(reader: DaemonProcess, writer: DaemonProcess, quorum: int | None = None) -> bool:
                params: dict[str, Any] = {"key": keys[writer.peer_id], "peer": writer.peer_id}
                if quorum is not None:
                    params["quorum"] = quorum
                got = call(reader.control_socket, "dht.get", params, timeout_s=CALL_TIMEOUT_S)
                return isinstance(got, dict) and got.get("writer") == writer.peer_id

            def ping(reader: DaemonProcess, writer: DaemonProcess) -> bool:
                params = {"addr": writer.addr_on(LOOPBACK)}
                answer: Any = call(reader.control_socket, "ping", params, timeout_s=CALL_TIMEOUT_S)
                return isinstance(answer, dict) and answer.get("peer_id") == writer.peer_id

            pairs = [(r, w) for r in daemons for w in daemons if r is not w]
            # One untimed pass opens every connection, so pings and lookups alike reuse them.
            for reader, writer in pairs:
                ping(reader, writer)
            # A default get answers from the local copy and leaves a lookup running in the
            # background; its calls come last so that lookup cannot slow the other calls down.
            for calls in ((("ping", ping), ("get q=4", partial(get, quorum=4))), (("get", get),)):
                for _ in range(rounds):
                    for reader, writer in pairs:
                        for kind, action in calls:
                            result.samples.append(_timed(kind, "control", partial(action, reader, writer)))
            progress(f"  {len(result.samples)} control-socket calls done")
            for n in range(cli_calls):
                reader, writer = pairs[n % len(pairs)]
                ping_args = ("ping", writer.addr_on(LOOPBACK), "-c", "1")
                result.samples.append(_timed("ping", "cli", partial(_cli, reader, *ping_args)))
                get_args = ("dht", "get", keys[writer.peer_id], "--peer", writer.peer_id)
                result.samples.append(_timed("get", "cli", partial(_cli, reader, *get_args)))
        except (ControlError, OSError, TimeoutError, RuntimeError, StopIteration) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            for daemon in daemons:
                _stop(daemon)
    return result

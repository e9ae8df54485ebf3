"""Daemon life-cycle benchmark: start-up to "control socket" and SIGTERM to exit, real processes.

Each round starts two ``lattica daemon`` processes on 127.0.0.1 in fresh homes, times daemon A
from ``Popen`` to its ``control socket PATH`` line (the line scripts wait on), opens a
connection from A to B with one ``ping`` through A's control socket (so shutdown has a live
QUIC connection, a running DHT and a control server to close), then times SIGTERM to A's exit
and checks it exited with status 0 and removed its control socket.

Baseline in the same run: a process that only imports what the daemon imports
(``python -c "import cli.main"``), i.e. the part of start-up that is interpreter and imports.

Usage::

    .venv/bin/python bench/daemon.py             # 5 rounds
    .venv/bin/python bench/daemon.py --rounds 2

Prints a table (median, min, max in ms) and writes ``bench/results/daemon-<UTC>.json``. Exit
status 1 if any daemon failed to start or to exit cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # ``lattica`` and ``cli`` from this work tree

from _harness import REPO_ROOT, machine_info, utc_now, write_results  # noqa: E402

from lattica.control import call  # noqa: E402
from lattica.daemon_process import DaemonProcess, start_daemon_process  # noqa: E402

START_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LATTICA_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _start(home: Path) -> tuple[DaemonProcess, float]:
    began = time.perf_counter()
    daemon = start_daemon_process(
        home, "--listen", "127.0.0.1:0", env=_env(), cwd=REPO_ROOT, timeout_s=START_TIMEOUT_S
    )
    return daemon, time.perf_counter() - began


def _stop(daemon: DaemonProcess) -> tuple[float, int]:
    began = time.perf_counter()
    daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=EXIT_TIMEOUT_S)
    return time.perf_counter() - began, code


def _kill(daemon: DaemonProcess | None) -> None:
    if daemon is not None and daemon.process.poll() is None:
        daemon.process.kill()
        daemon.process.wait()
    if daemon is not None and daemon.process.stdout:
        daemon.process.stdout.close()


def _import_only() -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli.main"], check=True, env=_env(), cwd=REPO_ROOT)
    return time.perf_counter() - began


def run_round() -> dict[str, Any]:
    """One round; the sample for each phase in seconds, plus what went wrong."""
    sample: dict[str, Any] = {"import_only_s": _import_only()}
    a: DaemonProcess | None = None
    b: DaemonProcess | None = None
    with tempfile.TemporaryDirectory(prefix="lattica-bench-daemon-") as tmp:
        try:
            b, _ = _start(Path(tmp) / "b")
            a, sample["start_to_control_socket_s"] = _start(Path(tmp) / "a")
            call(a.control_socket, "ping", {"addr": b.addr_on("127.0.0.1")}, timeout_s=30.0)
            sample["sigterm_to_exit_s"], sample["exit_status"] = _stop(a)
            sample["control_socket_removed"] = not a.control_socket.exists()
        except Exception as exc:
            sample["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            _kill(a)
            _kill(b)
    return sample


def _row(name: str, values: list[float], baseline: float | None) -> str:
    if not values:
        return f"{name:<28} {'-':>8} {'-':>8} {'-':>8}"
    median = statistics.median(values)
    ratio = f"{median / baseline:8.2f}x" if baseline else ""
    return f"{name:<28} {median * 1000:8.0f} {min(values) * 1000:8.0f} {max(values) * 1000:8.0f} {ratio}"


def main(argv: Sequence[str]) -> int:
    """Run the rounds, print the table, write the JSON; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="daemon start/stop rounds (default 5)")
    args = parser.parse_args(argv)
    started_at = utc_now()
    samples = []
    for index in range(args.rounds):
        samples.append(run_round())
        print(f"round {index + 1}/{args.rounds}: {samples[-1]}", file=sys.stderr, flush=True)
    ok = [s for s in samples if "error" not in s]
    failed = [s for s in samples if "error" in s or s["exit_status"] != 0 or not s["control_socket_removed"]]
    baseline = statistics.median(s["import_only_s"] for s in samples) if samples else None
    print(f"\nlattica daemon life cycle on 127.0.0.1, {args.rounds} rounds (ms)")
    print(f"{'phase':<28} {'median':>8} {'min':>8} {'max':>8} {'/ import':>9}")
    print(_row("import only (baseline)", [s["import_only_s"] for s in samples], baseline))
    print(_row("start -> control socket", [s["start_to_control_socket_s"] for s in ok], baseline))
    print(_row("SIGTERM -> exit", [s["sigterm_to_exit_s"] for s in ok], None))
    print(f"clean exits: {len(samples) - len(failed)}/{len(samples)}")
    document = {
        "benchmark": "daemon",
        "date": started_at.isoformat(),
        "machine": machine_info(["trio", "aioquic", "msgspec", "typer"]),
        "parameters": {"rounds": args.rounds},
        "samples": samples,
    }
    print(f"results: {write_results('daemon', started_at, document)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

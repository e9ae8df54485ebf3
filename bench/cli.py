"""Start-up cost of the ``lattica`` command against ``python -c pass`` (issue 8 C15).

Runs, interleaved round by round so machine noise hits all alike: ``python -c pass`` (the
interpreter's own floor), ``lattica --help``, ``lattica id`` and ``lattica status`` against one
daemon on 127.0.0.1. Prints a table (median, min, p90, and median minus the floor) and writes
JSON to ``bench/results/cli-<UTC>.json``. Target: ``lattica id`` median <= 150 ms. The table
also shows each command's median CPU time (user + system), which a loaded machine does not
inflate the way it inflates wall time.

    .venv/bin/python bench/cli.py               # 30 rounds
    .venv/bin/python bench/cli.py --rounds 5    # smoke test
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import machine_info, utc_now, write_results
from lattica.daemon_process import start_daemon_process

TARGET_ID_MEDIAN_S = 0.150


def _lattica() -> list[str]:
    """The installed console script (what a user runs), else the module."""
    script = Path(sys.executable).parent / "lattica"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def _env() -> dict[str, str]:
    # What a user has: bytecode cached in __pycache__. With PYTHONDONTWRITEBYTECODE set (as in
    # some CI and sandbox shells) every run recompiles the project's own modules, ~30-60 ms.
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``argv``; CPU time does not grow with the
    machine's load the way wall time does, so it is the steadier figure on a shared machine."""
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    completed = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60, env=_env())
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{argv} exited {completed.returncode}: {completed.stderr.decode()[-300:]}")
    return elapsed, _children_cpu_s() - cpu_before


def main() -> int:
    """Run the benchmark; returns 0, or 1 when a command failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    started_at = utc_now()
    lattica = _lattica()
    with tempfile.TemporaryDirectory(prefix="lattica-bench-cli-") as tmp:
        home = Path(tmp) / "node"
        daemon = start_daemon_process(home, "--listen", "127.0.0.1:0")
        try:
            cases = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "lattica --help": [*lattica, "--help"],
                "lattica id": [*lattica, "id", "--home", str(home)],
                "lattica status": [*lattica, "status", "--home", str(home)],
            }
            for argv in cases.values():  # warm the page cache and .pyc files; not timed
                _time(argv)
            samples: dict[str, list[float]] = {name: [] for name in cases}
            cpu: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, argv in cases.items():
                    wall_s, cpu_s = _time(argv)
                    samples[name].append(wall_s)
                    cpu[name].append(cpu_s)
        finally:
            daemon.process.terminate()
            daemon.process.wait(timeout=10)
            if daemon.process.stdout:
                daemon.process.stdout.close()
    floor = statistics.median(samples["python -c pass"])
    rows: list[dict[str, Any]] = []
    print(f"{'command':<16} {'median ms':>10} {'min ms':>8} {'p90 ms':>8} {'over floor ms':>14} {'cpu ms':>7}")
    for name, values in samples.items():
        ordered = sorted(values)
        median = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        cpu_median = statistics.median(cpu[name])
        rows.append(
            {
                "command": name,
                "median_s": median,
                "min_s": ordered[0],
                "p90_s": p90,
                "cpu_median_s": cpu_median,
                "samples_s": values,
                "cpu_samples_s": cpu[name],
            }
        )
        over_ms = (median - floor) * 1e3
        print(
            f"{name:<16} {median * 1e3:>10.1f} {ordered[0] * 1e3:>8.1f} {p90 * 1e3:>8.1f} {over_ms:>14.1f}"
            f" {cpu_median * 1e3:>7.1f}"
        )
    id_median = statistics.median(samples["lattica id"])
    met = id_median <= TARGET_ID_MEDIAN_S
    print(
        f"target: lattica id median <= {TARGET_ID_MEDIAN_S * 1e3:.0f} ms: {'met' if met else 'MISSED'}"
        f" ({id_median * 1e3:.1f} ms)"
    )
    path = write_results(
        "cli",
        started_at,
        {
            "benchmark": "cli",
            "started_at": started_at.isoformat(),
            "parameters": {"rounds": args.rounds, "lattica": lattica, "bytecode_cache": True},
            "machine": machine_info(["typer", "msgspec", "trio", "aioquic"]),
            "results": rows,
            "target": {"lattica_id_median_s": TARGET_ID_MEDIAN_S, "met": met},
        },
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (wall times grow with it)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

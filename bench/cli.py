"""Start-up cost of the ``lattica`` command against ``python -c pass`` (issue 8 C15).

Runs, interleaved round by round so machine noise hits all alike: ``python -c pass`` (the
interpreter's own floor), ``lattica --help``, ``lattica id`` and ``lattica status`` against one
daemon on 127.0.0.1. Prints a table (median, min, p90, and median minus the floor) and writes
JSON to ``bench/results/cli-<UTC>.json``. Target: ``lattica id`` median <= 150 ms.

    .venv/bin/python bench/cli.py               # 30 rounds
    .venv/bin/python bench/cli.py --rounds 5    # smoke test
"""

from __future__ import annotations

import argparse
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


def _time(argv: list[str]) -> float:
    started = time.perf_counter()
    completed = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{argv} exited {completed.returncode}: {completed.stderr.decode()[-300:]}")
    return elapsed


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
            for _ in range(args.rounds):
                for name, argv in cases.items():
                    samples[name].append(_time(argv))
        finally:
            daemon.process.terminate()
            daemon.process.wait(timeout=10)
            if daemon.process.stdout:
                daemon.process.stdout.close()
    floor = statistics.median(samples["python -c pass"])
    rows: list[dict[str, Any]] = []
    print(f"{'command':<16} {'median ms':>10} {'min ms':>8} {'p90 ms':>8} {'over floor ms':>14}")
    for name, values in samples.items():
        ordered = sorted(values)
        median = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        rows.append({"command": name, "median_s": median, "min_s": ordered[0], "p90_s": p90, "samples_s": values})
        over_ms = (median - floor) * 1e3
        print(f"{name:<16} {median * 1e3:>10.1f} {ordered[0] * 1e3:>8.1f} {p90 * 1e3:>8.1f} {over_ms:>14.1f}")
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
            "parameters": {"rounds": args.rounds, "lattica": lattica},
            "machine": machine_info(["typer", "msgspec", "trio", "aioquic"]),
            "results": rows,
            "target": {"lattica_id_median_s": TARGET_ID_MEDIAN_S, "met": met},
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Netns testbed benchmark: how long building and tearing down the real-kernel NAT testbed takes.

Builds ``deploy/netns/testbed.py``'s default topology (9 namespaces: a switch, 2 public hosts,
3 NATs with nftables rules, 3 private hosts) ``--rounds`` times and times each phase of the
build (the steps of its plan, grouped), the whole build, and the teardown (kill what runs
inside, delete the namespaces). Baseline in the same run: ``ip netns add`` + ``ip netns del`` of
one namespace, i.e. the cost of one ``ip`` process and the kernel's namespace set-up.

Needs root (CI runs as root). Usage::

    sudo .venv/bin/python bench/netns_testbed.py             # 10 rounds
    sudo .venv/bin/python bench/netns_testbed.py --rounds 3

Prints a table (median, min, max in ms) and writes ``bench/results/netns_testbed-<UTC>.json``.
Exit status 1 if a round failed, 2 if not root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "deploy" / "netns"))  # the testbed script, as a module

import testbed as tb  # noqa: E402
from _harness import Spread, machine_info, utc_now, write_results  # noqa: E402


def _phase(step: Any) -> str:
    description: str = step.description
    if description.startswith(("turn on forwarding", "load NAT")):
        return "NAT rules (sysctl + nft)"
    if description.startswith("set up"):
        return "addresses, bridges, routes"
    return description


def one_round() -> dict[str, float]:
    """Build and tear down the default topology once; milliseconds per phase."""
    bed = tb.plan_testbed()
    timings: dict[str, float] = defaultdict(float)
    began = time.perf_counter()
    try:
        for step in bed.steps:
            step_began = time.perf_counter()
            tb.run_step(step)
            timings[_phase(step)] += (time.perf_counter() - step_began) * 1000
        timings["build (total)"] = (time.perf_counter() - began) * 1000
    finally:
        teardown_began = time.perf_counter()
        tb.teardown(bed.namespaces)
        timings["teardown"] = (time.perf_counter() - teardown_began) * 1000
    return dict(timings)


def baseline_round() -> float:
    """``ip netns add`` + ``ip netns del`` of one namespace, in milliseconds."""
    name = f"{tb.new_prefix()}-baseline"
    began = time.perf_counter()
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "del", name], check=True)
    return (time.perf_counter() - began) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/netns_testbed.py needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    started_at = utc_now()
    samples: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    for _ in range(args.rounds):
        try:
            for phase, ms in one_round().items():
                samples[phase].append(ms)
            samples["baseline: one netns add + del"].append(baseline_round())
        except (tb.TestbedError, subprocess.CalledProcessError) as exc:
            failures.append(str(exc))
    print(f"netns testbed, default topology ({len(tb.plan_testbed().namespaces)} namespaces), {args.rounds} rounds")
    print(f"{'phase':<34} {'median ms':>10} {'min':>8} {'max':>8}")
    for phase, values in samples.items():
        spread = Spread.of(values)
        assert spread is not None
        print(f"{phase:<34} {spread.median:>10.1f} {spread.minimum:>8.1f} {spread.maximum:>8.1f}")
    for failure in failures:
        print(f"failed: {failure}")
    path = write_results(
        "netns_testbed",
        started_at,
        {
            "benchmark": "netns_testbed",
            "started_at": started_at.isoformat(),
            "machine": machine_info([]),
            "parameters": {"rounds": args.rounds, "namespaces": len(tb.plan_testbed().namespaces)},
            "samples_ms": samples,
            "failures": failures,
        },
    )
    print(f"results: {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

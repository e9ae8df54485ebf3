"""NAT traversal benchmark: the sim_net matrix as a table.

Runs :func:`tests.sim.nat_matrix.run_matrix` (every ordered pair of six NAT types, one public
relay, real ``Node``s, virtual time) for ``--seeds`` seeds and prints, per NAT pair (dialler ->
target) and in total: direct %, relayed %, failed %, median time-to-direct (virtual seconds
from the relayed connection to the direct path; 0 for a public target, dialled directly) and the
relay's forwarded bytes per relayed connection. Target: 0 failures, direct for every pair
without an endpoint-dependent ("symmetric") mapping on either side.

Network: ``--latency-ms`` one way between any two public addresses (default 50) and about
``--loss`` per direction (default 0.02), split over the two access links; the LAN behind each
NAT is perfect. Every pair's outcome goes to ``bench/results/nat-<UTC timestamp>.json``.

Usage::

    .venv/bin/python bench/nat.py                # 3 seeds
    .venv/bin/python bench/nat.py --seeds 1      # smoke test, ~5 s
    .venv/bin/python bench/nat.py --types public,port-restricted,symmetric

Exit status: 0 when no pair failed and every pair expected direct went direct, 1 otherwise,
2 on usage errors. (The same table on real kernel NATs is bench/nat_netns.py;
it needs root.)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

import trio
import trio.testing
from _harness import REPO_ROOT, machine_info, utc_now, write_results

sys.path.insert(0, str(REPO_ROOT))
from tests.sim.nat_matrix import NAT_TYPES, MatrixRun, PairResult, median, run_matrix


def _row(label: str, pairs: list[PairResult], relay_bytes_per_relayed: float | None) -> list[str]:
    n = len(pairs)
    share = {o: 100.0 * sum(p.outcome == o for p in pairs) / n for o in ("direct", "relayed", "failed")}
    times = [p.time_to_direct_s for p in pairs if p.time_to_direct_s is not None]
    ttd = median(times) if times else None
    return [
        label,
        str(n),
        f"{share['direct']:.0f}",
        f"{share['relayed']:.0f}",
        f"{share['failed']:.0f}",
        "-" if ttd is None else f"{ttd:.2f}",
        "-" if relay_bytes_per_relayed is None else f"{relay_bytes_per_relayed / 1000:.1f}",
    ]


def _print(rows: list[list[str]]) -> None:
    header = ["dialler -> target", "pairs", "direct %", "relayed %", "failed %", "median ttd (s)", "relay kB/conn"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = zip(row, widths, strict=True)
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(cells)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="matrix runs, seeds 1..N")
    parser.add_argument("--types", default=",".join(NAT_TYPES), help="comma-separated NAT types")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--loss", type=float, default=0.02)
    args = parser.parse_args(argv)
    types = args.types.split(",")
    unknown = [t for t in types if t not in NAT_TYPES]
    if unknown or args.seeds < 1 or not 0 <= args.loss < 1:
        parser.error(f"unknown NAT types {unknown}" if unknown else "need --seeds >= 1 and 0 <= --loss < 1")
    started_at = utc_now()
    runs: list[tuple[int, MatrixRun, float]] = []
    for seed in range(1, args.seeds + 1):
        wall = time.perf_counter()

        async def one(seed: int = seed) -> MatrixRun:
            return await run_matrix(seed=seed, types=types, latency_s=args.latency_ms / 1000, loss=args.loss)

        run = trio.run(one, clock=trio.testing.MockClock(autojump_threshold=0))
        runs.append((seed, run, time.perf_counter() - wall))
    by_cell: dict[tuple[str, str], list[PairResult]] = defaultdict(list)
    for _, run, _ in runs:
        for pair in run.pairs:
            by_cell[(pair.dialler, pair.target)].append(pair)
    all_pairs = [p for _, run, _ in runs for p in run.pairs]
    relayed_connections = sum(run.relay_circuits_opened for _, run, _ in runs)
    relay_bytes = sum(run.relay_bytes_forwarded for _, run, _ in runs)
    per_relayed = relay_bytes / relayed_connections if relayed_connections else None
    rows = [_row(f"{x} -> {y}", by_cell[(x, y)], None) for x in types for y in types]
    rows.append(_row("all", all_pairs, per_relayed))
    print(
        f"NAT matrix on sim_net: {len(types)} types, {args.seeds} seed(s), "
        f"{args.latency_ms:g} ms one way, {args.loss:.0%} loss"
    )
    _print(rows)
    failed = [p for p in all_pairs if p.outcome == "failed"]
    missed = [p for p in all_pairs if p.direct_expected and p.outcome != "direct"]
    expected = [p for p in all_pairs if p.direct_expected]
    print(
        f"failed: {len(failed)}; direct where expected: {len(expected) - len(missed)}/{len(expected)}; "
        f"relay: {relay_bytes} B over {relayed_connections} circuit(s)"
    )
    document: dict[str, Any] = {
        "benchmark": "nat",
        "started_at": started_at.isoformat(),
        "machine": machine_info(["aioquic", "trio"]),
        "parameters": {"seeds": args.seeds, "types": types, "latency_ms": args.latency_ms, "loss": args.loss},
        "runs": [
            {
                "seed": seed,
                "virtual_s": run.virtual_s,
                "wall_s": wall_s,
                "relay_bytes_forwarded": run.relay_bytes_forwarded,
                "relay_circuits_opened": run.relay_circuits_opened,
                "pairs": [
                    {
                        "dialler": p.dialler,
                        "target": p.target,
                        "outcome": p.outcome,
                        "time_to_direct_s": p.time_to_direct_s,
                        "direct_expected": p.direct_expected,
                        "error": p.error,
                    }
                    for p in run.pairs
                ],
            }
            for seed, run, wall_s in runs
        ],
    }
    print(f"results: {write_results('nat', started_at, document)}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())

"""NAT traversal on real kernel NATs: ``bench/nat.py``'s matrix on the netns testbed.

For each ordered pair (dialler -> target) of ``pub2``, ``cone1-pc``, ``cone2-pc`` and ``sym-pc``
(``deploy/netns/testbed.py``: cone1/cone2 are endpoint-independent nftables masquerade, sym is
``fully-random``, pub2 is public; every NAT filters like a home router), in a testbed of its own:

1. start ``lattica daemon`` on pub1 with ``--relay-service`` and on the two hosts of the pair
   (``tests/netns/harness.py``), in parallel;
2. a NATed target reserves on pub1 (``lattica relay reserve``); the dialler pings it through that
   relayed address (``lattica ping RELAYED --count 1``), or pings a public target directly;
3. poll ``lattica peers --json`` on both sides until the dialler holds a direct connection to the
   target or ``--wait-s`` has passed, and record direct / relayed / failed and ``direct_after_s``
   (the hole-punch initiator's time from the relayed connection to the direct one).

Each pair gets a freshly built testbed and fresh daemons: a daemon restart alone would keep the
NATs' conntrack entries (UDP: 30 s unreplied, 120 s assured), i.e. the mappings and filter holes
of the previous pair, and there is no ``conntrack`` tool here to flush them. Building costs
~0.25 s (``bench/netns_testbed.py``); the daemons' start-up dominates.

Needs root; not part of ``make bench`` (like ``bench/netns_testbed.py``). Usage::

    sudo .venv/bin/python bench/nat_netns.py                        # all 12 pairs, ~1.5 min
    sudo .venv/bin/python bench/nat_netns.py --pairs cone1-pc:cone2-pc,sym-pc:pub2 --wait-s 5

Prints a table and writes ``bench/results/nat_netns-<UTC>.json``. Everything (daemons, the
testbed's namespaces) is torn down on every exit path, SIGTERM/SIGINT included. Exit status: 0
when no pair failed and every pair without the symmetric NAT went direct, 1 otherwise, 2 on
usage errors or when not root.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from _harness import REPO_ROOT, machine_info, utc_now, write_results

sys.path.insert(0, str(REPO_ROOT))
from tests.deploy_testbed import testbed as tb
from tests.netns.harness import NetnsDaemon, start_daemon_in, stop_daemons

HOSTS = ("pub2", "cone1-pc", "cone2-pc", "sym-pc")
RELAY_HOST = "pub1"
POLL_S = 0.1
"""How often ``lattica peers --json`` is asked while waiting for the direct path (each ask is a
CLI process start, ~0.2 s here, so the observed wall time is coarse; ``direct_after_s`` is the
daemon's own measurement)."""


def _symmetric(bed: Any, host: str) -> bool:
    nat = bed.hosts[host].nat
    return nat is not None and bed.nats[nat].mapping == "endpoint-dependent"


def _rows(daemon: NetnsDaemon, peer_id: str) -> list[dict[str, Any]]:
    return [row for row in daemon.peer_rows() if row["peer_id"] == peer_id]


def _start(bed: Any, homes: Path, names: list[str]) -> dict[str, NetnsDaemon]:
    """The relay on pub1 and a daemon on each of ``names``, started in parallel; on any failure
    the ones that started are stopped and the error is raised."""
    daemons: dict[str, NetnsDaemon] = {}
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=len(names) + 1) as pool:
        futures = {
            RELAY_HOST: pool.submit(start_daemon_in, bed.hosts[RELAY_HOST], homes / RELAY_HOST, "--relay-service")
        }
        futures |= {name: pool.submit(start_daemon_in, bed.hosts[name], homes / name) for name in names}
        for name, future in futures.items():
            try:
                daemons[name] = future.result()
            except Exception as exc:  # collect all, stop the ones that started, then fail
                errors.append(f"{name}: {exc}")
    if errors:
        stop_daemons(list(daemons.values()))
        raise RuntimeError(f"daemons did not start: {errors}")
    return daemons


def run_pair(dialler_name: str, target_name: str, wait_s: float, homes: Path) -> dict[str, Any]:
    """One pair in a testbed of its own; the outcome as a JSON-ready dict."""
    result: dict[str, Any] = {"dialler": dialler_name, "target": target_name, "outcome": "failed", "error": None}
    began = time.monotonic()
    with tb.testbed() as bed:
        target_public = bed.hosts[target_name].nat is None
        result["direct_expected"] = not (_symmetric(bed, dialler_name) or _symmetric(bed, target_name))
        daemons = _start(bed, homes, [dialler_name, target_name])
        try:
            result["start_s"] = round(time.monotonic() - began, 2)
            relay, dialler, target = daemons[RELAY_HOST], daemons[dialler_name], daemons[target_name]
            try:
                addr = target.dial if target_public else target.cli("relay", "reserve", relay.dial)["relayed_addr"]
                pinged_at = time.monotonic()
                pong = dialler.cli("ping", addr, "--count", "1")
            except AssertionError as exc:  # the harness asserts on a failed CLI run
                result["error"] = str(exc)[:500]
                return result
            result["ping"] = {"addr": addr, "via": pong.get("via"), "rtt_ms": pong.get("rtt_ms")}
            deadline = pinged_at + wait_s
            while True:
                rows = _rows(dialler, target.peer_id)
                direct = [row for row in rows if row["path"] == "direct"]
                if direct or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            result["seen_direct_after_s"] = round(time.monotonic() - pinged_at, 2) if direct else None
            back = _rows(target, dialler.peer_id)
            result["dialler_rows"], result["target_rows"] = rows, back
            if direct:
                result["outcome"] = "direct"
                # The initiator (the target, which accepted the relayed connection) measured it;
                # take whichever side has it.
                times = [r["direct_after_s"] for r in [*back, *direct] if r.get("direct_after_s") is not None]
                result["direct_after_s"] = times[0] if times else None
                result["public_target"] = target_public
            elif any(row["path"] == "relayed" for row in rows):
                result["outcome"] = "relayed"
            else:
                result["error"] = f"no connection left after the ping: {rows}"
        finally:
            stop_daemons(list(daemons.values()))
            result["wall_s"] = round(time.monotonic() - began, 2)
    return result


def _cell(pair: dict[str, Any]) -> str:
    if pair["outcome"] != "direct":
        return str(pair["outcome"])
    if pair.get("public_target"):
        return "direct (public)"
    ttd = pair.get("direct_after_s")
    return "direct" if ttd is None else f"direct {ttd:.2f} s"


def _print_table(pairs: list[dict[str, Any]], hosts: list[str]) -> None:
    by_pair = {(p["dialler"], p["target"]): p for p in pairs}
    header = ["dialler \\ target", *hosts]
    rows = [[d, *(_cell(by_pair[(d, t)]) if (d, t) in by_pair else "" for t in hosts)] for d in hosts]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs",
        default="",
        help="comma-separated DIALLER:TARGET pairs (default: every ordered pair of " + ", ".join(HOSTS) + ")",
    )
    parser.add_argument(
        "--wait-s", type=float, default=8.0, help="how long a pair may take to go direct after the ping"
    )
    args = parser.parse_args(argv)
    pairs = [(d, t) for d in HOSTS for t in HOSTS if d != t]
    if args.pairs:
        asked = [p.split(":") for p in args.pairs.split(",")]
        bad = [p for p in asked if len(p) != 2 or p[0] == p[1] or not set(p) <= set(HOSTS)]
        if bad:
            parser.error(f"bad pairs {bad}: DIALLER:TARGET, two different hosts of {', '.join(HOSTS)}")
        pairs = [(d, t) for d, t in asked]
    if os.geteuid() != 0:
        print("bench/nat_netns.py needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    missing = tb.missing_tools()
    if missing:
        print("; ".join(missing), file=sys.stderr)
        return 2
    # SIGTERM/SIGHUP/SIGINT unwind through the finally blocks: daemons stopped, testbed removed.
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _raise_on_signal)
    tb.sweep()
    started_at = utc_now()
    began = time.monotonic()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nat-netns-") as tmp:
        for index, (dialler, target) in enumerate(pairs):
            try:
                pair = run_pair(dialler, target, args.wait_s, Path(tmp) / str(index))
            except (RuntimeError, tb.TestbedError, subprocess.SubprocessError, OSError) as exc:
                pair = {"dialler": dialler, "target": target, "outcome": "failed", "error": str(exc)[:500]}
            results.append(pair)
            print(f"{dialler} -> {target}: {_cell(pair)}  ({pair.get('wall_s', '?')} s)", flush=True)
    total_s = time.monotonic() - began
    print(f"\nNAT matrix on the netns testbed (real nftables NATs, real daemons), {len(pairs)} pairs, {total_s:.0f} s")
    _print_table(results, list(HOSTS))
    failed = [p for p in results if p["outcome"] == "failed"]
    missed = [p for p in results if p.get("direct_expected") and p["outcome"] != "direct"]
    expected = [p for p in results if p.get("direct_expected")]
    print(f"failed: {len(failed)}; direct where expected: {len(expected) - len(missed)}/{len(expected)}")
    for pair in failed:
        print(f"  {pair['dialler']} -> {pair['target']}: {pair['error']}")
    document: dict[str, Any] = {
        "benchmark": "nat_netns",
        "started_at": started_at.isoformat(),
        "machine": machine_info(["aioquic", "trio"]),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "parameters": {"pairs": [f"{d}:{t}" for d, t in pairs], "wait_s": args.wait_s},
        "wall_s": round(total_s, 1),
        "pairs": results,
    }
    print(f"results: {write_results('nat_netns', started_at, document)}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())

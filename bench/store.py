"""Store benchmark: 1,000 signed records stored on one real node by 10 peers at once.

Three OS processes on 127.0.0.1, real disk, real clock:

* the *victim*: one ``Node`` with its ``lattica.db`` in a fresh temporary directory;
* the *storers*: 10 ``Node``s, each sending 100 pre-signed records (512-byte values) to the
  victim as DHT ``PutValue`` requests, 10 in flight per peer (100 at once in all);
* the *pinger*: one ``Node`` starting a ping to the victim every 10 ms throughout (each ping in its
  own task, at most 20 in flight, so pings sent during a stall all see it).

Reported per mode: stores/s (acknowledged records / time from the first send to the last
acknowledgement), the p50/p99/max of the pings sent while the stores ran, the same for pings
while the victim was idle (before the stores), how many transactions the victim committed and
the CPU time it used (all its threads) from the first store to the end of the run.

Modes, measured in the same invocation and alternated run by run:

* ``inline`` -- the baseline: the old path, each write committed on the trio thread in its own
  transaction (WAL, ``synchronous=FULL``): ``SqliteWriter(path, inline=True)``;
* ``thread`` -- the store as the node runs it: group commit on a worker thread, each write
  acknowledged after its commit (same ``synchronous=FULL``).

Usage::

    .venv/bin/python bench/store.py                # 3 runs per mode
    .venv/bin/python bench/store.py --runs 1

Percentiles are nearest-rank. Results go to ``bench/results/store-<UTC timestamp>.json``.
Exit status: 0 when every run finished, 1 when one could not run, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(BENCH_DIR.parent))  # ``lattica`` from this work tree

import trio  # noqa: E402
from _harness import (  # noqa: E402
    Child,
    ChildFailed,
    die_after,
    load_average,
    machine_info,
    report,
    utc_now,
    write_results,
)

MODES = ("inline", "thread")
STORERS = 10
RECORDS_PER_STORER = 100
IN_FLIGHT_PER_STORER = 10
VALUE_BYTES = 512
PING_INTERVAL_S = 0.01
IDLE_PINGS_S = 1.5
MAX_PINGS_IN_FLIGHT = 20
CHILD_LIFETIME_S = 300.0


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) or None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


# == children ===================================================================================


async def run_victim(mode: str, directory: Path) -> None:
    """Serve DHT requests on a file database; report the dial address, then writer stats."""
    from lattica import node as node_module
    from lattica.dht.store import DhtStore
    from lattica.identity import Identity
    from lattica.net import UdpSocket
    from lattica.node import Node
    from lattica.storage import SqliteWriter

    if mode == "inline":
        # The baseline: the same store on a writer that commits inline, one write per commit.
        def inline_store(database: Path, *, own_key: bytes) -> DhtStore:
            return DhtStore(SqliteWriter(database, inline=True), own_key=own_key)

        node_module.DhtStore = inline_store  # type: ignore[attr-defined,assignment]
    identity = Identity.generate()
    async with Node(identity, UdpSocket.bind("127.0.0.1", 0), database=directory / "lattica.db") as node:
        report({"addr": node.dial_strings()[0]})
        writer = node.dht_store.writer
        while True:
            report(
                {
                    "commits": writer.commit_count,
                    "writes": writer.write_count,
                    "records": node.dht_store.record_count(),
                    "cpu_s": time.process_time(),  # all threads of the victim
                }
            )
            await trio.sleep(0.2)


async def run_pinger(addr: str) -> None:
    """Start a ping to the victim every ``PING_INTERVAL_S`` (not waiting for the previous one,
    so a stall is sampled by every ping sent during it); report batches of (unix send time,
    rtt s)."""
    from lattica.identity import Identity
    from lattica.net import UdpSocket
    from lattica.net.address import PeerAddr
    from lattica.node import Node

    target = PeerAddr.parse(addr)
    assert target.peer_id is not None
    peer = target.peer_id
    batch: list[tuple[float, float]] = []
    in_flight = trio.CapacityLimiter(MAX_PINGS_IN_FLIGHT)

    async def ping_once(node: Node) -> None:
        async with in_flight:
            sent_at = time.time()
            rtt_s = (await node.ping(peer)).rtt_s
            batch.append((sent_at, rtt_s))

    async with Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0)) as node, trio.open_nursery() as nursery:
        await node.connect(target)
        report({"ready": True})
        next_at = trio.current_time()
        while True:
            nursery.start_soon(ping_once, node)
            if len(batch) >= 20:
                report({"pings": batch})
                batch = []
            next_at += PING_INTERVAL_S
            await trio.sleep_until(next_at)


async def run_storers(addr: str) -> None:
    """10 peers store 100 pre-signed records each on the victim; report timing and outcomes."""
    from lattica.dht.messages import PROTOCOL_ID, Ack, PeerInfo, PutValue, decode_response, encode_message
    from lattica.dht.records import sign_record
    from lattica.identity import Identity
    from lattica.net import UdpSocket
    from lattica.net.address import PeerAddr
    from lattica.node import Node

    target = PeerAddr.parse(addr)
    assert target.peer_id is not None
    expires_at = int(time.time()) + 3600
    identities = [Identity.generate() for _ in range(STORERS)]
    payloads = [
        [
            encode_message(
                PutValue(
                    sender=PeerInfo.of(identity.peer_id, []),
                    client=True,
                    record=sign_record(identity, f"key-{i}".encode(), bytes(VALUE_BYTES), seq=1, expires_at=expires_at),
                )
            )
            for i in range(RECORDS_PER_STORER)
        ]
        for identity in identities
    ]
    outcomes = {"stored": 0, "refused": 0, "failed": 0}
    latencies: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(Node(identity, UdpSocket.bind("127.0.0.1", 0))) for identity in identities
        ]
        for node in nodes:
            await node.connect(target)

        async def store(node: Node, queue: list[bytes]) -> None:
            assert target.peer_id is not None
            while queue:
                payload = queue.pop()
                sent = trio.current_time()
                try:
                    raw = await node.rpc.request(target.peer_id, PROTOCOL_ID, payload, timeout_s=30)
                    reply = decode_response(raw)
                except Exception:
                    outcomes["failed"] += 1
                    continue
                latencies.append(trio.current_time() - sent)
                if isinstance(reply, Ack) and reply.stored:
                    outcomes["stored"] += 1
                else:
                    outcomes["refused"] += 1

        start = time.time()
        async with trio.open_nursery() as senders:
            for node, queue in zip(nodes, payloads, strict=True):
                for _ in range(IN_FLIGHT_PER_STORER):
                    senders.start_soon(store, node, queue)
        end = time.time()
        report(
            {
                "start": start,
                "end": end,
                **outcomes,
                "put_p50_ms": 1000 * (percentile(latencies, 50) or 0),
                "put_p99_ms": 1000 * (percentile(latencies, 99) or 0),
            }
        )


# == parent =====================================================================================


async def one_run(mode: str) -> dict[str, Any]:
    """One measurement: victim in ``mode``, pinger, storers; returns the figures."""
    directory = Path(tempfile.mkdtemp(prefix="lattica-bench-store-"))
    script = str(SCRIPT)
    children: list[Child] = []
    cpu_before = 0.0
    pings: list[tuple[float, float]] = []
    victim_stats: dict[str, Any] = {}
    try:
        victim = await Child.start(
            [sys.executable, script, "--role", "victim", "--mode", mode, "--dir", str(directory)]
        )
        children.append(victim)
        addr = str((await victim.read_message())["addr"])
        pinger = await Child.start([sys.executable, script, "--role", "pinger", "--addr", addr])
        children.append(pinger)
        await pinger.read_message()
        async with trio.open_nursery() as nursery:

            async def collect_pings() -> None:
                while True:
                    pings.extend((t, rtt) for t, rtt in (await pinger.read_message())["pings"])

            async def collect_victim_stats() -> None:
                while True:
                    victim_stats.update(await victim.read_message())

            nursery.start_soon(collect_pings)
            nursery.start_soon(collect_victim_stats)
            await trio.sleep(IDLE_PINGS_S)
            cpu_before = victim_stats.get("cpu_s", 0.0)
            storers = await Child.start([sys.executable, script, "--role", "storers", "--addr", addr])
            children.append(storers)
            stored = await storers.read_message()
            await trio.sleep(0.5)  # the stats line after the last commit
            nursery.cancel_scope.cancel()
    finally:
        for child in children:
            await child.kill()
        shutil.rmtree(directory, ignore_errors=True)
    idle = [rtt for t, rtt in pings if t < stored["start"]]
    loaded = [rtt for t, rtt in pings if stored["start"] <= t <= stored["end"]]
    elapsed = stored["end"] - stored["start"]
    return {
        "mode": mode,
        "stored": stored["stored"],
        "refused": stored["refused"],
        "failed": stored["failed"],
        "elapsed_s": elapsed,
        "stores_per_s": stored["stored"] / elapsed if elapsed > 0 else None,
        "put_p50_ms": stored["put_p50_ms"],
        "put_p99_ms": stored["put_p99_ms"],
        "ping_idle": _ms_summary(idle),
        "ping_during_stores": _ms_summary(loaded),
        "victim_commits": victim_stats.get("commits"),
        "victim_writes": victim_stats.get("writes"),
        "victim_records": victim_stats.get("records"),
        "victim_cpu_s": victim_stats.get("cpu_s", 0.0) - cpu_before,
    }


def _ms_summary(values: list[float]) -> dict[str, Any]:
    return {
        "samples": len(values),
        "p50_ms": None if not values else 1000 * (percentile(values, 50) or 0),
        "p99_ms": None if not values else 1000 * (percentile(values, 99) or 0),
        "max_ms": None if not values else 1000 * max(values),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(runs: list[dict[str, Any]]) -> None:
    """One row per run, then the median per mode."""
    header = (
        f"{'mode':8s} {'stored':>6s} {'stores/s':>9s} {'put p99 ms':>10s} {'ping idle p99':>13s} "
        f"{'ping p50':>8s} {'ping p99':>8s} {'ping max':>8s} {'commits':>7s} {'victim cpu s':>12s}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        busy = run["ping_during_stores"]
        print(
            f"{run['mode']:8s} {run['stored']:6d} {_fmt(run['stores_per_s'], 0):>9s} {_fmt(run['put_p99_ms']):>10s} "
            f"{_fmt(run['ping_idle']['p99_ms']):>13s} {_fmt(busy['p50_ms']):>8s} {_fmt(busy['p99_ms']):>8s} "
            f"{_fmt(busy['max_ms']):>8s} {run['victim_commits'] or 0:7d} {_fmt(run['victim_cpu_s'], 2):>12s}"
        )
    print()
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        rate = statistics.median(r["stores_per_s"] or 0 for r in mine)
        p99 = statistics.median(r["ping_during_stores"]["p99_ms"] or 0 for r in mine)
        print(f"median {mode:8s}: {rate:7.0f} stores/s, ping p99 during stores {p99:7.1f} ms")


async def parent(runs: int) -> int:
    started_at = utc_now()
    results: list[dict[str, Any]] = []
    failed = False
    for i in range(runs):
        for mode in MODES if i % 2 == 0 else tuple(reversed(MODES)):
            try:
                results.append(await one_run(mode))
            except ChildFailed as exc:
                print(f"{mode}: run failed: {exc}", file=sys.stderr)
                failed = True
    print_table(results)
    path = write_results(
        "store",
        started_at,
        {
            "benchmark": "store",
            "started_at": started_at.isoformat(),
            "parameters": {
                "storers": STORERS,
                "records_per_storer": RECORDS_PER_STORER,
                "in_flight_per_storer": IN_FLIGHT_PER_STORER,
                "value_bytes": VALUE_BYTES,
                "ping_interval_s": PING_INTERVAL_S,
                "runs_per_mode": runs,
            },
            "machine": machine_info(["trio", "aioquic", "msgspec"]),
            "load_average_after": load_average(),
            "runs": results,
        },
    )
    print(f"\nresults: {path}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--role", choices=("victim", "pinger", "storers"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="thread", help=argparse.SUPPRESS)
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.role is None:
        return trio.run(parent, args.runs)
    die_after(CHILD_LIFETIME_S)
    if args.role == "victim":
        trio.run(run_victim, args.mode, args.dir)
    elif args.role == "pinger":
        trio.run(run_pinger, args.addr)
    else:
        trio.run(run_storers, args.addr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

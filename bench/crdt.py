"""CRDT benchmark: convergence after a partition heals, and write throughput with persistence.

Two parts, one invocation, one process (nothing here opens a kernel socket):

* **heal** (sim_net, virtual time): ``N`` real ``Node``s (50 and 200 by default) on paths of
  50 ms one-way latency and ``--loss`` per path and direction. Node 0 creates a space with every
  node as a writer; the others join it (each through the owner and one earlier replica). 20
  concurrent 8 KiB writes by random writers build a document of ~100 KB (some keys are
  written twice); every replica holds it. Then the network is cut into two halves, each half
  makes 20 small writes (100-byte values)
  and spreads them inside its half; then the cut heals. Measured from the heal until every
  replica holds every update: virtual seconds, bytes the sync protocol sent (all nodes), and
  the bytes that had to move at least (each replica's missing updates, body bytes). The ratio
  says whether a heal costs the missing updates or the whole document (``doc x N`` is shown).
* **write** (real clock, real disk): one node, one space, its log in a fresh ``lattica.db``
  (WAL, ``synchronous=FULL``: a write is acknowledged after its COMMIT). ``set`` one at a time
  (each waits for its own commit), then from 100 concurrent tasks (commits grouped by the store's
  writer thread), then -- the ceiling -- the same writes to a plain in-memory pycrdt ``Doc``, with
  each transaction's update captured (what a replica must sign and send) and without. The
  rate limit (``crdt.max_updates_per_s``) is lifted for this part.

Usage::

    .venv/bin/python bench/crdt.py                  # 50 and 200 replicas, 2,000 writes
    .venv/bin/python bench/crdt.py --quick          # 20 replicas, 300 writes: smoke test
    .venv/bin/python bench/crdt.py --sizes 50 --writes 1000

Deterministic per ``--seed`` in the heal part (``PYTHONHASHSEED=0`` and trio's deterministic
scheduling are set here, as ``bench/dht.py`` does). Results go to
``bench/results/crdt-<UTC timestamp>.json``; a table is printed. Exit status 1 when a part
failed (e.g. no convergence within ``--timeout``), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if os.environ.get("PYTHONHASHSEED") != "0":
    # Set orders of bytes must not vary between runs of one seed: re-run this script with it.
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # ``lattica`` from this work tree

import pycrdt  # noqa: E402
import trio  # noqa: E402
import trio.testing  # noqa: E402
from _harness import load_average, machine_info, utc_now, write_results  # noqa: E402

from lattica.config import NodeConfig  # noqa: E402
from lattica.crdt import CrdtConfig, SpaceId, WriteResult  # noqa: E402
from lattica.identity import Identity  # noqa: E402
from lattica.net.config import NetConfig  # noqa: E402
from lattica.node import Node  # noqa: E402
from sim_net import LinkConfig, Network  # noqa: E402

PORT = 4001
BIG_WRITES, BIG_VALUE_BYTES = 20, 8192
SIDE_WRITES, SIDE_VALUE_BYTES = 20, 100
KEYS = 20
CONCURRENT_WRITERS = 100
# Anti-entropy every 5 s with one random replica, pushes to 3 (as the sim tests use); no QUIC
# keepalives (no NATs here; see tests/sim/dht_cluster.py for why they are off in simulations).
SIM_CONFIG = NodeConfig(
    net=NetConfig(keepalive_interval_s=float("inf")),
    crdt=CrdtConfig(anti_entropy_interval_s=5.0, fanout=3, request_timeout_s=5.0, discovery_interval_s=3600.0),
)
WRITE_CONFIG = NodeConfig(crdt=CrdtConfig(max_updates_per_s=1e6, update_burst=1_000_000))


def _identity(seed: int, index: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"bench-crdt/%d/%d" % (seed, index)).digest())


def _host_ip(index: int) -> str:
    return f"10.0.{index // 250}.{index % 250 + 1}"


# -- heal ------------------------------------------------------------------------------------------


@dataclass
class HealResult:
    """One heal measurement (virtual seconds, bytes of the sync protocol)."""

    replicas: int
    loss_per_path: float
    converged: bool
    heal_virtual_s: float | None
    heal_bytes_sent: int
    missing_update_bytes: int
    bytes_per_missing_byte: float | None
    doc_bytes: int
    doc_times_replicas_bytes: int
    setup_virtual_s: float
    cpu_s: float
    wall_s: float
    error: str | None = None


async def _wait_until_holding(nodes: list[Node], space: SpaceId, targets: dict[int, int]) -> None:
    """Wait on change events until node ``i`` holds ``targets[i]`` envelopes."""
    for i, target in targets.items():
        while sum(nodes[i].crdt.info(space).version_vector.values()) < target:
            await nodes[i].crdt.wait_change(space)


async def _write(
    nodes: list[Node], writers: range, space: SpaceId, count: int, value_bytes: int, rng: random.Random
) -> list[WriteResult]:
    """``count`` writes by random ``writers`` to :data:`KEYS` shared keys, spread over 10 s."""
    results: list[WriteResult] = []
    async with trio.open_nursery() as nursery:
        for n in range(count):
            writer, key, at = rng.choice(writers), f"k{rng.randrange(KEYS)}", rng.uniform(0, 10)
            value = {"by": writer, "n": n, "pad": "x" * value_bytes}

            async def write(writer: int = writer, key: str = key, value: object = value, at: float = at) -> None:
                await trio.sleep(at)
                results.append(await nodes[writer].crdt.set(space, key, value))

            nursery.start_soon(write)
    return results


async def heal_run(size: int, seed: int, loss: float, timeout_s: float) -> HealResult:
    """See the module docstring (part "heal")."""
    # trio's scheduler: seeded, and timers due at one instant woken in a fixed order (see
    # bench/_dht_sim.py; trio offers no public switch for either).
    trio._core._run._r.seed(seed)
    trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    rng = random.Random(seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    # Two access links per path: per-link loss l gives 1 - (1 - l)**2 per path.
    link = LinkConfig(latency_s=0.025, loss=1 - (1 - loss) ** 0.5)
    async with Network(seed=seed) as net, trio.open_nursery() as nursery:
        hosts = [net.add_host(_host_ip(i), link) for i in range(size)]
        nodes: list[Node] = []
        for i in range(size):
            node = Node(_identity(seed, i), hosts[i].bind(PORT), SIM_CONFIG, rng=random.Random(seed * 1000 + i))
            nodes.append(await nursery.start(_run_node, node))
        for node in nodes:  # addresses only: replicas meet as sync partners
            for other in nodes:
                if other is not node:
                    node.connections.add_addresses(other.peer_id, other.listen_addresses())
        owner = nodes[0]
        space = (await owner.crdt.create_space("bench", writers=[n.peer_id for n in nodes[1:]])).space_id
        for i, node in enumerate(nodes[1:], start=1):
            await node.crdt.join_space(space, peers=[owner.peer_id, nodes[rng.randrange(i)].peer_id])
        await _write(nodes, range(size), space, BIG_WRITES, BIG_VALUE_BYTES, rng)
        total = size - 1 + BIG_WRITES
        with trio.move_on_after(timeout_s) as scope:
            await _wait_until_holding(nodes, space, dict.fromkeys(range(size), total))
        doc_bytes = len(owner.crdt.doc(space).get_update())

        half = size // 2
        cut = net.partition(hosts[:half], hosts[half:])
        side_a = await _write(nodes, range(half), space, SIDE_WRITES, SIDE_VALUE_BYTES, rng)
        side_b = await _write(nodes, range(half, size), space, SIDE_WRITES, SIDE_VALUE_BYTES, rng)
        with trio.move_on_after(timeout_s):
            await _wait_until_holding(nodes, space, dict.fromkeys(range(size), total + SIDE_WRITES))
        setup_virtual_s = trio.current_time()

        sent_before = sum(n.crdt.stats.bytes_sent for n in nodes)
        healed_at = trio.current_time()
        net.heal(cut)
        converged = False
        with trio.move_on_after(timeout_s):
            await _wait_until_holding(nodes, space, dict.fromkeys(range(size), total + 2 * SIDE_WRITES))
            converged = True
        heal_virtual_s = trio.current_time() - healed_at
        heal_bytes = sum(n.crdt.stats.bytes_sent for n in nodes) - sent_before
        states = [n.crdt.get(space) for n in nodes]
        error = None
        if not scope.cancelled_caught and converged and any(s != states[0] for s in states):
            error = "replicas hold the same updates but differ in state"
        elif not converged:
            error = f"not converged within {timeout_s:g} virtual s"
        nursery.cancel_scope.cancel()
    missing = (size - half) * sum(w.update_bytes for w in side_a) + half * sum(w.update_bytes for w in side_b)
    return HealResult(
        replicas=size,
        loss_per_path=loss,
        converged=converged and error is None,
        heal_virtual_s=heal_virtual_s if converged else None,
        heal_bytes_sent=heal_bytes,
        missing_update_bytes=missing,
        bytes_per_missing_byte=heal_bytes / missing if missing else None,
        doc_bytes=doc_bytes,
        doc_times_replicas_bytes=doc_bytes * size,
        setup_virtual_s=setup_virtual_s,
        cpu_s=time.process_time() - cpu0,
        wall_s=time.perf_counter() - wall0,
        error=error,
    )


async def _run_node(node: Node, *, task_status: trio.TaskStatus[Node]) -> None:
    async with node:
        task_status.started(node)
        await trio.sleep_forever()


# -- write throughput --------------------------------------------------------------------------------


@dataclass
class WriteMode:
    """Writes per second of one mode."""

    mode: str
    writes: int
    seconds: float
    writes_per_s: float
    note: str


def _value(n: int) -> dict[str, Any]:
    return {"n": n, "shard": n % 64, "peer": f"peer-{n % 100:03d}"}


async def write_run(writes: int) -> list[WriteMode]:
    """See the module docstring (part "write")."""
    modes: list[WriteMode] = []
    with tempfile.TemporaryDirectory(prefix="lattica-bench-crdt-") as tmp:
        async with Network(seed=1) as net:
            node = Node(
                Identity.from_seed(b"\x01" * 32),
                net.add_host("10.0.0.1").bind(PORT),
                WRITE_CONFIG,
                database=Path(tmp) / "lattica.db",
            )
            async with node:
                space = (await node.crdt.create_space("bench")).space_id
                sequential = max(1, writes // 4)  # one fsync each: slow, so fewer
                start = time.perf_counter()
                for n in range(sequential):
                    await node.crdt.set(space, f"k{n % 100}", _value(n))
                seconds = time.perf_counter() - start
                modes.append(WriteMode("lattica, one at a time", sequential, seconds, sequential / seconds,
                                       "each set waits for its own COMMIT (fsync)"))

                async def writer(first: int) -> None:
                    for n in range(first, writes, CONCURRENT_WRITERS):
                        await node.crdt.set(space, f"k{n % 100}", _value(n))

                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for first in range(CONCURRENT_WRITERS):
                        nursery.start_soon(writer, first)
                seconds = time.perf_counter() - start
                modes.append(WriteMode(f"lattica, {CONCURRENT_WRITERS} concurrent", writes, seconds, writes / seconds,
                                       "group commit: concurrent sets share a COMMIT"))
    _pycrdt_writes(writes, capture=False)  # warm-up: the first pass pays for imports and caches
    for capture in (True, False):
        seconds = _pycrdt_writes(writes, capture=capture)
        label = "pycrdt in memory" + (", updates captured" if capture else "")
        note = "ceiling: the update bytes a replica signs, no signing or disk" if capture else "no update bytes taken"
        modes.append(WriteMode(label, writes, seconds, writes / seconds, note))
    return modes


def _pycrdt_writes(writes: int, *, capture: bool) -> float:
    """Seconds for ``writes`` one-key transactions on a fresh in-memory ``Doc``."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    root: pycrdt.Map[Any] = doc.get("state", type=pycrdt.Map)
    captured: list[bytes] = []
    subscription = doc.observe(lambda event: captured.append(bytes(event.update))) if capture else None
    start = time.perf_counter()
    for n in range(writes):
        with doc.transaction():
            root[f"k{n % 100}"] = _value(n)
    seconds = time.perf_counter() - start
    if subscription is not None:
        doc.unobserve(subscription)
    return seconds


# -- report --------------------------------------------------------------------------------------


def print_tables(heals: list[HealResult], writes: list[WriteMode]) -> None:
    """The two tables of the module docstring."""
    header = (
        f"{'replicas':>8s} {'loss':>5s} {'heal s':>7s} {'bytes sent':>11s} {'missing B':>10s} "
        f"{'ratio':>6s} {'doc B':>8s} {'doc x N B':>11s} {'cpu s':>7s}"
    )
    print("Convergence after a partition heals (virtual time)")
    print(header)
    print("-" * len(header))
    for h in heals:
        heal_s = "-" if h.heal_virtual_s is None else f"{h.heal_virtual_s:.1f}"
        ratio = "-" if h.bytes_per_missing_byte is None else f"{h.bytes_per_missing_byte:.1f}"
        print(
            f"{h.replicas:8d} {h.loss_per_path:5.0%} {heal_s:>7s} {h.heal_bytes_sent:11d} "
            f"{h.missing_update_bytes:10d} {ratio:>6s} {h.doc_bytes:8d} {h.doc_times_replicas_bytes:11d} "
            f"{h.cpu_s:7.1f}" + (f"  FAILED: {h.error}" if h.error else "")
        )
    print()
    print("Write throughput to one space (real clock, real disk)")
    header = f"{'mode':36s} {'writes':>7s} {'writes/s':>9s}  note"
    print(header)
    print("-" * len(header))
    for w in writes:
        print(f"{w.mode:36s} {w.writes:7d} {w.writes_per_s:9.0f}  {w.note}")


def main() -> int:
    """Parse arguments, run both parts, print and store the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,200", help="replica counts for the heal part (default 50,200)")
    parser.add_argument("--writes", type=int, default=2000, help="writes in the throughput part (default 2000)")
    parser.add_argument("--loss", type=float, default=0.10, help="loss per path and direction (default 0.10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="virtual seconds to wait per phase")
    parser.add_argument("--quick", action="store_true", help="20 replicas, 300 writes: a smoke test")
    args = parser.parse_args()
    try:
        sizes = [20] if args.quick else [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes is a comma-separated list of integers")
    writes = 300 if args.quick else args.writes
    if any(s < 4 for s in sizes) or writes < 4 or not 0 <= args.loss < 1:
        parser.error("sizes >= 4, writes >= 4, 0 <= loss < 1")
    # aioquic logs every dropped handshake packet (10% loss makes many); the numbers are the output.
    logging.getLogger("quic").setLevel(logging.CRITICAL)
    started_at = utc_now()
    heals: list[HealResult] = []
    for size in sizes:
        result = trio.run(
            heal_run, size, args.seed, args.loss, args.timeout,
            clock=trio.testing.MockClock(autojump_threshold=0),
            strict_exception_groups=True,
        )  # fmt: skip
        heals.append(result)
        # The 200-replica run takes minutes of CPU: say where it is.
        done = "converged" if result.converged else f"FAILED ({result.error})"
        print(f"heal, {size} replicas: {done}, {result.cpu_s:.0f} s CPU", file=sys.stderr, flush=True)
    write_modes = trio.run(write_run, writes)
    print_tables(heals, write_modes)
    path = write_results(
        "crdt",
        started_at,
        {
            "benchmark": "crdt",
            "started_at": started_at.isoformat(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "parameters": {
                "sizes": sizes,
                "writes": writes,
                "loss_per_path": args.loss,
                "seed": args.seed,
                "timeout_virtual_s": args.timeout,
                "big_writes": BIG_WRITES,
                "big_value_bytes": BIG_VALUE_BYTES,
                "side_writes": SIDE_WRITES,
                "side_value_bytes": SIDE_VALUE_BYTES,
                "concurrent_writers": CONCURRENT_WRITERS,
                "sim_crdt_config": asdict(SIM_CONFIG.crdt),
            },
            "machine": machine_info(["trio", "aioquic", "msgspec", "pycrdt"]),
            "load_average_after": load_average(),
            "heal": [asdict(h) for h in heals],
            "write": [asdict(w) for w in write_modes],
        },
    )
    print(f"\nresults: {path}")
    return 1 if any(h.error for h in heals) else 0


if __name__ == "__main__":
    sys.exit(main())

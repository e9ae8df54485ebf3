"""Multi-source fetch on sim_net (virtual time): 4 seeders with 10 MB/s uplinks, a downloader
with a 100 MB/s downlink, 10 ms per access link (40 ms round trips), no loss.

The real ``Node`` and content service run on sim_net under ``MockClock``; each seeder publishes
the same seeded random file (so all hold it), the downloader connects to all four and fetches
it. Reports the virtual completion time of ``node.content.fetch`` against the ideal
``size / 40 MB/s`` (the seeders' uplinks together) and how the bytes were spread. The issue's
target is at most 1.11x the ideal. What separates a fetch from the ideal: a fixed start-up
cost of ~0.25 s (the manifest round trip, the request's and the last byte's trips, and QUIC
slow start from the standard 10-datagram initial window on fresh connections: ~5 round trips
to fill 10 MB/s x 40 ms), plus ~5% per byte (IP, UDP and QUIC headers and the AEAD tag in each
1228-byte datagram on the wire), so the ratio falls with the size towards ~1.05.
CPU cost is real: ~0.35 s of CPU per MiB on this machine (256 MiB: ~90 s).

Deterministic per ``--seeds``: ``PYTHONHASHSEED=0`` (the script re-runs itself with it) and
trio's scheduler seeded with its deterministic-scheduling flag (see ``bench/_dht_sim.py``).
Without that, timers due at one virtual instant wake in an order that depends on memory
addresses and a 16 MiB run varied by ~0.06 s from run to run; the loss-free links leave trio's
scheduling order as the only thing a seed changes, so ``--seeds 5`` shows how much one
figure depends on it (median, min and max per size).

Usage::

    .venv/bin/python bench/transfer_sim.py                   # 16, 64 and 256 MiB, 1 MiB chunks
    .venv/bin/python bench/transfer_sim.py --sizes-mib 8 --chunk-kib 256
    .venv/bin/python bench/transfer_sim.py --sizes-mib 16 64 --seeds 5

Prints a table and writes ``bench/results/transfer-sim-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import statistics
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

if os.environ.get("PYTHONHASHSEED") != "0":
    # Set orders of bytes must not vary between runs of one seed: re-run this script with it.
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import trio
import trio.testing

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from _harness import machine_info, utc_now, write_results  # noqa: E402

from lattica.config import NodeConfig  # noqa: E402
from lattica.content import ContentConfig  # noqa: E402
from lattica.identity import Identity  # noqa: E402
from lattica.net.address import PeerAddr  # noqa: E402
from lattica.net.config import NetConfig  # noqa: E402
from lattica.node import Node  # noqa: E402
from sim_net import LinkConfig, Network  # noqa: E402

SEEDERS = 4
UPLINK_BPS = 80e6  # 10 MB/s
DOWNLINK_BPS = 800e6  # 100 MB/s
IDEAL_BYTES_PER_S = SEEDERS * UPLINK_BPS / 8
_PIECE_BYTES = 64 << 20


async def one_fetch(tmp: Path, size: int, chunk_bytes: int) -> dict[str, Any]:
    """Publish on the seeders, fetch on the downloader; virtual seconds and the spread."""
    config = NodeConfig(
        net=NetConfig(keepalive_interval_s=math.inf), content=ContentConfig(chunk_bytes=chunk_bytes)
    )
    source = tmp / "data.bin"
    rng = random.Random(3)
    with source.open("wb") as out:
        # randbytes() overflows above 256 MiB; pieces of 64 MiB keep the smaller files' bytes.
        for start in range(0, size, _PIECE_BYTES):
            out.write(rng.randbytes(min(_PIECE_BYTES, size - start)))
    quiet = LinkConfig(latency_s=0.01)
    async with Network(seed=1) as net, AsyncExitStack() as stack:
        hosts = [
            net.add_host(f"10.0.0.{i + 1}", up=LinkConfig(latency_s=0.01, bandwidth_bps=UPLINK_BPS), down=quiet)
            for i in range(SEEDERS)
        ]
        hosts.append(net.add_host("10.0.0.99", up=quiet, down=LinkConfig(latency_s=0.01, bandwidth_bps=DOWNLINK_BPS)))
        nodes = []
        for i, host in enumerate(hosts):
            identity = Identity.from_seed(hashlib.sha256(b"transfer-sim-%d" % i).digest())
            node = Node(identity, host.bind(4001), config, blocks_dir=tmp / f"node{i}", rng=random.Random(i))
            nodes.append(await stack.enter_async_context(node))
        downloader = nodes[-1]
        cid = None
        for seeder in nodes[:-1]:
            assert seeder.content is not None
            cid = (await seeder.content.publish(source)).cid
            await downloader.connect(PeerAddr(seeder.listen_addresses()[0], seeder.peer_id))
        assert cid is not None and downloader.content is not None
        began = trio.current_time()
        progress = await downloader.content.fetch(cid)
        seconds = trio.current_time() - began
    ideal = size / IDEAL_BYTES_PER_S
    return {
        "size_bytes": size,
        "chunk_bytes": chunk_bytes,
        "virtual_s": seconds,
        "ideal_s": ideal,
        "ratio": seconds / ideal,
        "peer_bytes": sorted(progress.peer_bytes.values()),
    }


def main(argv: list[str]) -> int:
    """Run each size, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 64, 256], help="sizes (default 16 64 256)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="chunk size (default 1024)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per size, scheduler seeds 0.. (default 1)")
    args = parser.parse_args(argv)
    started_at = utc_now()
    rows = []
    for size_mib in args.sizes_mib:
        for seed in range(args.seeds):
            # trio's private switches (no public ones): seeded batches, sorted by task creation.
            trio._core._run._r.seed(seed)
            trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
            with tempfile.TemporaryDirectory(prefix="lattica-bench-transfer-sim-") as tmp:
                row = trio.run(
                    one_fetch, Path(tmp), size_mib << 20, args.chunk_kib << 10,
                    clock=trio.testing.MockClock(autojump_threshold=0),
                )
            row["seed"] = seed
            rows.append(row)
            print(f"{size_mib} MiB seed {seed}: {row}", file=sys.stderr, flush=True)
    print(f"\n{SEEDERS} seeders x 10 MB/s uplink -> 100 MB/s downlink, 40 ms RTT, {args.chunk_kib} KiB chunks")
    print(f"{'size':>8} {'seed':>4} {'virtual s':>10} {'ideal s':>8} {'ratio':>6}  bytes per seeder")
    for row in rows:
        spread = ", ".join(f"{b / 2**20:.1f}" for b in row["peer_bytes"])
        print(
            f"{row['size_bytes'] >> 20:>5} MiB {row['seed']:>4} {row['virtual_s']:10.3f} {row['ideal_s']:8.3f} "
            f"{row['ratio']:6.2f}  {spread} MiB"
        )
    if args.seeds > 1:
        print(f"\n{'size':>8} {'median ratio':>12} {'min':>6} {'max':>6}  ({args.seeds} seeds)")
        for size_mib in args.sizes_mib:
            ratios = [r["ratio"] for r in rows if r["size_bytes"] == size_mib << 20]
            print(f"{size_mib:>5} MiB {statistics.median(ratios):12.3f} {min(ratios):6.3f} {max(ratios):6.3f}")
    path = write_results(
        "transfer-sim",
        started_at,
        {"benchmark": "transfer-sim", "rows": rows, "machine": machine_info(["aioquic", "trio"])},
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

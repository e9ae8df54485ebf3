"""Chunk hash benchmark: SHA-256 (hashlib) against BLAKE3 (PyPI ``blake3``) on this machine.

Measures, in one process, interleaved run by run so machine load hits both alike:

* ``chunk``: hashing 1 MiB chunks one by one (one hasher per chunk, as the block store does);
* ``file``: hashing a whole file streamed in 1 MiB reads from the page cache (as publishing
  does), so the read cost is included and is the same for both;
* for BLAKE3 also ``max_threads=AUTO`` on whole chunks (its Rust code may use every core).

Usage::

    .venv/bin/python bench/chunk_hash.py               # 64 MiB of data, 5 runs
    .venv/bin/python bench/chunk_hash.py --mib 256 --runs 3

Prints a table (MB/s, 1 MB = 10^6 bytes; median, min, max) and writes
``bench/results/chunk_hash-<UTC timestamp>.json``. Exit 0 when every run finished.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Spread, machine_info, utc_now, write_results

CHUNK = 1 << 20


def _sha256_chunks(data: memoryview) -> None:
    for start in range(0, len(data), CHUNK):
        hashlib.sha256(data[start : start + CHUNK]).digest()


def _blake3_chunks(data: memoryview) -> None:
    for start in range(0, len(data), CHUNK):
        blake3.blake3(data[start : start + CHUNK]).digest()


def _blake3_chunks_threads(data: memoryview) -> None:
    for start in range(0, len(data), CHUNK):
        blake3.blake3(data[start : start + CHUNK], max_threads=blake3.blake3.AUTO).digest()


def _file_hasher(make: Callable[[], object]) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        hasher = make()
        with path.open("rb") as file:
            while block := file.read(CHUNK):
                hasher.update(block)  # type: ignore[attr-defined]
        hasher.digest()  # type: ignore[attr-defined]

    return run


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="data size in MiB (default 64)")
    parser.add_argument("--runs", type=int, default=5, help="runs per mode (default 5)")
    args = parser.parse_args(argv)
    started = utc_now()
    size = args.mib << 20
    data = memoryview(os.urandom(size))
    modes_chunk: dict[str, Callable[[memoryview], None]] = {
        "sha256 chunk": _sha256_chunks,
        "blake3 chunk": _blake3_chunks,
        "blake3 chunk (threads=AUTO)": _blake3_chunks_threads,
    }
    modes_file: dict[str, Callable[[Path], None]] = {
        "sha256 file": _file_hasher(hashlib.sha256),
        "blake3 file": _file_hasher(blake3.blake3),
    }
    samples: dict[str, list[float]] = {name: [] for name in [*modes_chunk, *modes_file]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.bin"
        path.write_bytes(data)
        for _ in range(args.runs):
            for name, chunk_fn in modes_chunk.items():
                t0 = time.perf_counter()
                chunk_fn(data)
                samples[name].append(size / (time.perf_counter() - t0) / 1e6)
            for name, file_fn in modes_file.items():
                t0 = time.perf_counter()
                file_fn(path)
                samples[name].append(size / (time.perf_counter() - t0) / 1e6)
    baseline = Spread.of(samples["sha256 chunk"])
    assert baseline is not None
    rows = []
    print(f"{args.mib} MiB, {args.runs} runs, 1 MiB chunks; MB/s")
    print(f"{'mode':30} {'median':>9} {'min':>9} {'max':>9} {'vs sha256 chunk':>16}")
    for name, values in samples.items():
        spread = Spread.of(values)
        assert spread is not None
        ratio = spread.median / baseline.median
        rows.append(
            {
                "mode": name,
                "median_mbps": spread.median,
                "min_mbps": spread.minimum,
                "max_mbps": spread.maximum,
                "ratio_vs_sha256_chunk": ratio,
                "samples": values,
            }
        )
        print(f"{name:30} {spread.median:9.1f} {spread.minimum:9.1f} {spread.maximum:9.1f} {ratio:16.2f}")
    path = write_results(
        "chunk_hash",
        started,
        {
            "started_at": started.isoformat(),
            "mib": args.mib,
            "runs": args.runs,
            "chunk_bytes": CHUNK,
            "machine": machine_info(["blake3"]),
            "rows": rows,
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

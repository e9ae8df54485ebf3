"""Dedupe benchmark: bytes transferred to fetch a second model that shares tensors with one held.

Two seeded random safetensors models: A (``base``) and B (``tuned``), a fine-tune that froze
the first half of the layers -- those tensors are byte-identical in both, the rest (the later
layers and the head) are new. Three daemons on 127.0.0.1, driven through the CLI:

* daemon P publishes A and B (``lattica publish``);
* daemon D fetches A, then B (``lattica fetch CID --json``): what B costs a node that holds A;
* daemon E, empty, fetches B in the same run: the baseline.

For each fetch of B it reports B's size (the chunk bytes the fetch needs), the bytes received
over the network (the fetch's ``received_bytes``), the chunks of B the node held already and
reused from its store (B's chunks, counted by ``lattica verify``, minus the chunk block files the
fetch added to the store), and the fetch's wall time. Every exported file is checked byte for byte.

Usage::

    .venv/bin/python bench/transfer_dedupe.py                   # 16 layers of 2 MiB, 8 frozen
    .venv/bin/python bench/transfer_dedupe.py --layers 8 --frozen 6

Prints a table and writes ``bench/results/transfer_dedupe-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # ``lattica`` and ``cli`` from this work tree

import numpy as np  # noqa: E402
from _harness import REPO_ROOT, machine_info, utc_now, write_results  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transfer import _cli, _env, _home, _sha256, _stop  # noqa: E402

from lattica.daemon_process import DaemonProcess, start_daemon_process  # noqa: E402

LAYER_SHAPE = (512, 1024)  # float32: 2 MiB per tensor
HEAD_SHAPE = (256, 1024)  # 1 MiB


def _model(folder: Path, layers: int, frozen: int, tuned: bool) -> str:
    """Write ``folder/model.safetensors``; returns its SHA-256. Layers below ``frozen`` come
    from one seed in both models (byte-identical); the others and the head differ with ``tuned``."""
    folder.mkdir(parents=True)
    tensors: dict[str, Any] = {}
    for index in range(layers):
        seed = 1000 + index if index < frozen or not tuned else 2000 + index
        tensors[f"layers.{index}.weight"] = np.random.default_rng(seed).standard_normal(LAYER_SHAPE, dtype=np.float32)
    tensors["head.weight"] = np.random.default_rng(2 if tuned else 1).standard_normal(HEAD_SHAPE, dtype=np.float32)
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    return _sha256(path)


def _block_files(home: Path) -> int:
    """Block files in a node's store (its ``tmp`` staging folder left out)."""
    return sum(1 for p in (home / "blocks").rglob("*") if p.is_file() and p.parent.name != "tmp")


def _fetch_b(daemon: DaemonProcess, cid: str, out: Path, expected_sha256: str) -> dict[str, Any]:
    """Fetch ``cid`` on ``daemon`` through the CLI and measure what it cost."""
    blocks_before = _block_files(daemon.home)
    began = time.perf_counter()
    fetched = _cli(daemon.home, "fetch", cid, "-o", str(out))
    fetch_s = time.perf_counter() - began
    # B's manifest is one block file too (block_store.py: a root's own bytes are a block), and
    # B is a new root on both nodes: the rest of the new files are the chunks received.
    new_chunks = _block_files(daemon.home) - blocks_before - 1
    chunks = _cli(daemon.home, "verify", cid)
    total_chunks = int(chunks["checked"]) + int(chunks["missing"])
    return {
        "bytes": fetched["bytes"],
        "received_bytes": fetched["received_bytes"],
        "chunks": total_chunks,
        "chunks_received": new_chunks,
        "chunks_reused": total_chunks - new_chunks,
        "bad_chunks": chunks["bad"],
        "fetch_s": fetch_s,
        "identical": _sha256(out / "model.safetensors") == expected_sha256,
    }


def run(tmp: Path, layers: int, frozen: int) -> dict[str, Any]:
    """Build the models, publish both on P, fetch A then B on D, and B alone on empty E."""
    _model(tmp / "models" / "base", layers, frozen, tuned=False)
    tuned_sha = _model(tmp / "models" / "tuned", layers, frozen, tuned=True)
    publisher = holder = empty = None
    try:
        publisher = start_daemon_process(
            _home(tmp / "p", tcp=False), "--listen", "127.0.0.1:0", env=_env(), cwd=REPO_ROOT
        )
        bootstrap = ("--listen", "127.0.0.1:0", "--bootstrap", publisher.addr_on("127.0.0.1"))
        holder = start_daemon_process(_home(tmp / "d", tcp=False), *bootstrap, env=_env(), cwd=REPO_ROOT)
        empty = start_daemon_process(_home(tmp / "e", tcp=False), *bootstrap, env=_env(), cwd=REPO_ROOT)
        base = _cli(publisher.home, "publish", str(tmp / "models" / "base"))
        tuned = _cli(publisher.home, "publish", str(tmp / "models" / "tuned"))
        # The baseline first: the empty node can then only get B from the publisher, never from D.
        baseline = _fetch_b(empty, tuned["cid"], tmp / "out-e", tuned_sha)
        first = _cli(holder.home, "fetch", base["cid"])
        held = _fetch_b(holder, tuned["cid"], tmp / "out-d", tuned_sha)
        return {"publish": {"base": base, "tuned": tuned}, "fetch_a": first, "holder": held, "baseline": baseline}
    finally:
        _stop(empty)
        _stop(holder)
        _stop(publisher)


def main(argv: list[str]) -> int:
    """Run once, print the table, write the JSON; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=16, help="2 MiB layer tensors per model (default 16)")
    parser.add_argument("--frozen", type=int, default=8, help="layers B shares with A (default 8)")
    args = parser.parse_args(argv)
    if not 0 <= args.frozen <= args.layers:
        parser.error("--frozen must be between 0 and --layers")
    started_at = utc_now()
    with tempfile.TemporaryDirectory(prefix="lattica-bench-dedupe-") as tmp_text:
        result = run(Path(tmp_text), args.layers, args.frozen)
    rows = (("B on a node holding A", result["holder"]), ("B on an empty node (baseline)", result["baseline"]))
    print(
        f"\ndedupe: model B = A with {args.frozen} of {args.layers} 2 MiB layers frozen, new head; "
        f"3 daemons on 127.0.0.1 through the CLI"
    )
    print(f"{'fetch of B':<31} {'B size':>10} {'received':>10} {'chunks reused':>14} {'seconds':>8}  identical")
    for label, row in rows:
        print(
            f"{label:<31} {row['bytes'] / 2**20:6.2f} MiB {row['received_bytes'] / 2**20:6.2f} MiB "
            f"{row['chunks_reused']:>6} of {row['chunks']:<5} {row['fetch_s']:8.2f}  {row['identical']}"
        )
    saved = 1 - result["holder"]["received_bytes"] / result["baseline"]["received_bytes"]
    print(f"received on the wire, holder vs baseline: {saved:.1%} less")
    path = write_results(
        "transfer_dedupe",
        started_at,
        {
            "benchmark": "transfer_dedupe",
            "layers": args.layers,
            "frozen": args.frozen,
            "layer_bytes": int(np.prod(LAYER_SHAPE)) * 4,
            **result,
            "machine": machine_info(["aioquic", "msgspec", "blake3", "trio", "safetensors", "numpy"]),
        },
    )
    print(f"results: {path}")
    return 0 if all(row["identical"] and row["bad_chunks"] == 0 for _, row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""DHT store at its size cap: what one insert costs when it must evict.

One process, real disk, a fresh temporary ``lattica.db`` per size. The store is filled with N
signed records of other writers (512-byte values, each writer under its quota), then:

* ``below cap`` -- the baseline: inserts into a store whose cap is far away (no eviction);
* ``at cap`` -- inserts into the same store with the cap set to what it holds, each one nearer
  to our id than the farthest held record, so each evicts (the indexed, lazy eviction);
  alternated insert by insert with ``below cap``;
* ``full scan`` -- the old eviction's read alone on the same table: every evictable row's key
  and size read and sorted by XOR distance (what each insert at the cap paid before the
  distance index), timed without its insert.

Times are per insert (each awaited, so each includes its own COMMIT with ``synchronous=FULL``),
median of ``--inserts`` inserts. Usage::

    .venv/bin/python bench/store_cap.py                     # N = 10,000 and 50,000
    .venv/bin/python bench/store_cap.py --sizes 2000 --inserts 50

Results go to ``bench/results/store_cap-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # ``lattica`` from this work tree

import trio  # noqa: E402
from _harness import machine_info, utc_now, write_results  # noqa: E402

from lattica.dht.keys import key_to_int  # noqa: E402
from lattica.dht.records import SignedRecord, encode_record, sign_record  # noqa: E402
from lattica.dht.store import DhtStore  # noqa: E402
from lattica.identity import Identity  # noqa: E402

NOW = 1_750_000_000
VALUE = b"v" * 512
RECORDS_PER_WRITER = 100


def _records(count: int, first_writer: int) -> list[SignedRecord]:
    out = []
    for i in range(count):
        writer = Identity.from_seed((first_writer + i // RECORDS_PER_WRITER).to_bytes(32, "big"))
        out.append(sign_record(writer, f"k{i}".encode(), VALUE, seq=1, expires_at=NOW + 86_400))
    return out


def _old_scan_s(store: DhtStore) -> float:
    """The read the old ``_make_room`` did on every insert at the cap."""
    own = key_to_int(store.own_key)

    def scan(conn: Any) -> int:
        candidates = [
            (int.from_bytes(key, "big") ^ own, key, size)
            for key, size in conn.execute("SELECT dht_key, size FROM dht_records WHERE own = 0")
        ]
        candidates += [
            (int.from_bytes(key, "big") ^ own, key, size)
            for key, _provider, size in conn.execute("SELECT dht_key, provider, size FROM dht_providers")
        ]
        candidates.sort(key=lambda c: c[0], reverse=True)
        return len(candidates)

    began = time.perf_counter()
    store.writer.read(scan)
    return time.perf_counter() - began


async def _measure(size: int, inserts: int) -> dict[str, Any]:
    own = Identity.from_seed(b"\x01" * 32)
    own_int = key_to_int(own.peer_id.dht_key())
    held = _records(size, first_writer=1_000)
    fresh = _records(inserts * 4, first_writer=9_000_000)
    farthest = max(key_to_int(r.dht_key) ^ own_int for r in held)
    nearer = [r for r in fresh if key_to_int(r.dht_key) ^ own_int < farthest][: inserts * 2]
    with tempfile.TemporaryDirectory() as tmp:
        store = DhtStore(Path(tmp) / "lattica.db", own_key=own.peer_id.dht_key(), max_bytes=1 << 40)
        # Filled in one transaction per 1,000 records: the fill is setup, not the measurement.
        for start in range(0, size, 1_000):
            async with trio.open_nursery() as nursery:
                for record in held[start : start + 1_000]:
                    nursery.start_soon(store.put_record, record)
        # Alternated, so checkpoints and the machine's noise fall on both alike.
        below: list[float] = []
        at_cap: list[float] = []
        for below_record, at_cap_record in zip(nearer[:inserts], nearer[inserts:], strict=False):
            for record, cap, samples in ((below_record, 1 << 40, below), (at_cap_record, None, at_cap)):
                store.max_bytes = cap if cap is not None else store.total_bytes
                began = time.perf_counter()
                await store.put_record(record)
                samples.append(time.perf_counter() - began)
            assert store.total_bytes <= store.max_bytes
        scans = [_old_scan_s(store) for _ in range(5)]
        store.close()
    return {
        "records": size,
        "record_bytes": len(encode_record(held[0])),
        "below_cap_ms": 1000 * statistics.median(below),
        "at_cap_ms": 1000 * statistics.median(at_cap),
        "old_full_scan_ms": 1000 * statistics.median(scans),
        "inserts": len(at_cap),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--inserts", type=int, default=100)
    args = parser.parse_args()
    started = utc_now()
    rows = [trio.run(_measure, size, args.inserts) for size in args.sizes]
    print(f"{'records':>8} {'below cap ms':>13} {'at cap ms':>10} {'old full scan ms':>17}")
    for row in rows:
        print(
            f"{row['records']:>8} {row['below_cap_ms']:>13.2f} {row['at_cap_ms']:>10.2f}"
            f" {row['old_full_scan_ms']:>17.1f}"
        )
    path = write_results("store_cap", started, {"machine": machine_info(["msgspec"]), "rows": rows})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

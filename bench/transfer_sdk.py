"""Baseline for the transfer benchmark: the Lattica SDK (PyPI ``lattica``, Rust libp2p) moving a
random block between two of its nodes on loopback (issue 11, benchmark 1).

Root only, not in ``make bench``: each run happens inside a fresh network namespace
(``unshare -n``) whose only interface is ``lo``. The SDK's start-up sends STUN probes to public
servers and it unpickles DHT values and RPC arguments received from the network
(the team's field notes, "Lattica SDK"), so it must never see a real interface; the driver checks that
``lo`` is the only link before it starts a node.

The SDK goes into its own venv, ``bench/results/sdk-venv`` (git-ignored; created with
``pip install lattica`` on first use), never into the project's venv: it installs a top-level
package named ``lattica`` too. Its interpreter runs this file with ``-I`` so neither the work
tree nor ``bench/`` is on ``sys.path``.

Per mode, two SDK nodes (separate processes; TCP on 127.0.0.1 only, mDNS/UPnP/AutoNAT off, fresh
key and storage directories; the receiver bootstraps through the provider):

* ``bitswap``: the provider ``put_block``\\ s the whole random block, the receiver times
  ``get_block(cid)`` (the SDK's content transfer; it returns the block in memory).
* ``rpc_stream_iter``: the provider's ``@rpc_stream_iter`` method yields the block in 1 MiB
  ``bytes`` chunks; the receiver times iterating the stub until the last chunk, hashing as it goes.

MB/s is 10^6 bytes per second of the timed call (the connection is already up: the bootstrap
happens in ``build()``). MB per CPU-second counts both nodes' user+system CPU (all threads)
over the timed call. Peak RSS is the receiver's ``VmHWM`` after the transfer (for ``bitswap``
it includes the returned block itself). The received bytes are checked (SHA-256).

``bench/transfer.py`` runs the same transfers next to its own modes in one run
(:func:`sdk_unavailable_reason`, :func:`ensure_sdk_venv`, :func:`run_mode`); the block is
``random.Random(seed)`` drawn 1 MiB at a time, the same bytes as that script's file for the
same seed.

Usage (root)::

    python3 bench/transfer_sdk.py                      # 256 MiB, both modes, 1 run each
    python3 bench/transfer_sdk.py --size-mib 64 --runs 3 --modes bitswap

Any Python >= 3.11 with trio runs the outer part (``.venv/bin/python`` of the work tree works).
Prints a table and writes ``bench/results/transfer_sdk-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
SDK_VENV = BENCH_DIR / "results" / "sdk-venv"
SDK_PYTHON = SDK_VENV / "bin" / "python"
MB = 1e6
PORT = 4001  # fixed: each run has a namespace of its own
CHUNK_BYTES = 1 << 20
START_TIMEOUT_S = 60.0
MODES = ("bitswap", "rpc_stream_iter")


# --- inside the namespace (run by the SDK venv's interpreter with -I) -------------------------


def _block(size: int, seed: int) -> bytes:
    rng = random.Random(seed)  # randbytes() of 256 MiB at once overflows a C int: 1 MiB at a time
    return b"".join(rng.randbytes(min(CHUNK_BYTES, size - at)) for at in range(0, size, CHUNK_BYTES))


def _peak_rss_bytes() -> int | None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _node(listen_port: int, work: str, bootstrap: str | None) -> Any:
    from lattica import Lattica  # the SDK: importable only in its own venv

    builder = (
        Lattica.builder()
        .with_listen_addrs([f"/ip4/127.0.0.1/tcp/{listen_port}"])
        .with_mdns(False)
        .with_upnp(False)
        .with_autonat(False)
        .with_storage_path(os.path.join(work, "storage"))
        .with_dht_db_path(os.path.join(work, "dht"))
        .with_key_path(os.path.join(work, "key"))
    )
    if bootstrap is not None:
        builder = builder.with_bootstraps([bootstrap])
    return builder.build()


def _service_class() -> Any:
    from lattica import ConnectionHandler, rpc_stream_iter

    class BlobService(ConnectionHandler):  # type: ignore[misc]
        """Serves ``block`` in CHUNK_BYTES pieces (both nodes register it: the stub needs it)."""

        block = b""

        @rpc_stream_iter  # type: ignore[misc]
        def fetch(self) -> Any:
            view = memoryview(self.block)
            for offset in range(0, len(view), CHUNK_BYTES):
                yield bytes(view[offset : offset + CHUNK_BYTES])

    return BlobService


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads (the SDK's Rust runtime included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all threads (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def role_provider(args: argparse.Namespace) -> None:
    """Build a node, offer the block by ``args.mode``, report its address, wait for stdin EOF."""
    signal.alarm(int(args.timeout_s) + 60)
    block = _block(args.size, args.seed)
    work = os.path.join(args.work, "provider")  # the driver removes it, also after a kill
    node = _node(PORT, work, None)
    service = _service_class()
    service.block = block
    service(node)
    cid = node.put_block(block) if args.mode == "bitswap" else None
    _say({"peer_id": node.peer_id(), "cid": cid, "sha256": hashlib.sha256(block).hexdigest()})
    sys.stdin.read()
    node.close()


def role_receiver(args: argparse.Namespace) -> None:
    """Bootstrap through the provider, time the transfer, report MB/s, digest and peak RSS."""
    signal.alarm(int(args.timeout_s) + 30)
    work = os.path.join(args.work, "receiver")
    bootstrap = f"/ip4/127.0.0.1/tcp/{PORT}/p2p/{args.peer_id}"
    node = _node(0, work, bootstrap)
    service = _service_class()(node)
    # build() returns before the bootstrap connection is up; a stream call made earlier fails
    # with "Failed to reconnect to peer". The SDK has no event for it, hence the poll.
    deadline = time.monotonic() + START_TIMEOUT_S
    while args.peer_id not in node.get_all_peers() and time.monotonic() < deadline:
        time.sleep(0.05)
    digest = hashlib.sha256()
    _say({"started": True})  # the driver samples the provider's CPU from here on
    cpu_before = _cpu_s()
    started = time.perf_counter()
    if args.mode == "bitswap":
        _source, data = node.get_block(args.cid, timeout_secs=int(args.timeout_s))
        received = len(data)
        digest.update(data)
    else:
        received = 0
        for chunk in service.get_stub(args.peer_id).fetch():
            received += len(chunk)
            digest.update(chunk)
    elapsed = time.perf_counter() - started
    cpu_s = _cpu_s() - cpu_before
    _say(
        {
            "bytes": received,
            "seconds": round(elapsed, 4),
            "mb_per_s": round(received / MB / elapsed, 1),
            "receiver_cpu_s": round(cpu_s, 3),
            "sha256": digest.hexdigest(),
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    )
    node.close()


def _links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if line.strip()]


def role_driver(args: argparse.Namespace) -> None:
    """Inside the new namespace: bring ``lo`` up, refuse any other link, run both nodes."""
    if _links() != ["lo"]:
        raise SystemExit(f"refusing to start the SDK: links in this namespace are {_links()}, not only lo")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    common = [
        "--mode",
        args.mode,
        "--size",
        str(args.size),
        "--seed",
        str(args.seed),
        "--timeout-s",
        str(args.timeout_s),
    ]
    me = [sys.executable, "-I", str(Path(__file__).resolve())]
    # The nodes' stores live under one folder the driver owns: a node killed at the end (the
    # provider waits for EOF) cleaned up nothing, and each run left its GiB store in /tmp.
    with tempfile.TemporaryDirectory(prefix="sdk-bench-") as work:
        _drive(args, me, [*common, "--work", work])


def _drive(args: argparse.Namespace, me: list[str], common: list[str]) -> None:
    provider = subprocess.Popen(
        [*me, "--role", "provider", *common], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    receiver: subprocess.Popen[str] | None = None
    try:
        offer = json.loads(provider.stdout.readline() or "null")  # type: ignore[union-attr]
        if not offer:
            raise SystemExit(f"provider exited with {provider.wait()} before reporting its address")
        receiver = subprocess.Popen(
            [*me, "--role", "receiver", *common, "--peer-id", offer["peer_id"], "--cid", str(offer["cid"])],
            stdout=subprocess.PIPE,
            text=True,
        )
        # Blocking reads are bounded: the receiver's alarm ends it (EOF) if it hangs.
        started = json.loads(receiver.stdout.readline() or "null")  # type: ignore[union-attr]
        provider_cpu_before = process_cpu_s(provider.pid) if started else 0.0
        line = receiver.stdout.readline() if started else ""  # type: ignore[union-attr]
        provider_cpu_s = process_cpu_s(provider.pid) - provider_cpu_before if line else 0.0
        if receiver.wait() != 0 or not line:
            _say({"error": f"receiver exited with {receiver.returncode}"})
            return
        result = json.loads(line)
        result["provider_cpu_s"] = round(provider_cpu_s, 3)
        result["cpu_s"] = round(result["receiver_cpu_s"] + provider_cpu_s, 3)
        result["mb_per_cpu_s"] = round(result["bytes"] / MB / result["cpu_s"], 1) if result["cpu_s"] > 0 else None
        result["identical"] = result["sha256"] == offer["sha256"] and result["bytes"] == args.size
        _say(result)
    finally:
        for child in (receiver, provider):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()


# --- outside (the project's side) -------------------------------------------------------------


def ensure_sdk_venv() -> str:
    """Create ``bench/results/sdk-venv`` with ``pip install lattica`` unless it has it; return its
    ``lattica`` version."""
    if not SDK_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(SDK_VENV)], check=True)
    probe = [str(SDK_PYTHON), "-I", "-c", "import importlib.metadata as m; print(m.version('lattica'))"]
    found = subprocess.run(probe, capture_output=True, text=True)
    if found.returncode != 0:
        subprocess.run([str(SDK_PYTHON), "-m", "pip", "install", "-q", "lattica"], check=True)
        found = subprocess.run(probe, capture_output=True, text=True, check=True)
    return found.stdout.strip()


def sdk_unavailable_reason() -> str | None:
    """Why this process cannot run the SDK baseline (not root, no ``unshare``), or ``None``."""
    if os.geteuid() != 0:
        return "needs root (unshare -n: the SDK runs only in a lo-only network namespace)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    return None


def run_mode(mode: str, size: int, seed: int, timeout_s: float) -> dict[str, Any]:
    """One transfer in a fresh namespace (root): the receiver's result or ``{"error": ...}``.

    The result holds ``bytes``, ``seconds``, ``mb_per_s``, ``cpu_s`` (both nodes, over the timed
    call), ``mb_per_cpu_s``, ``peak_rss_bytes`` (the receiver's), ``sha256`` of what arrived and
    ``identical`` (it matches what the provider offered); ``mode`` is one of :data:`MODES`.
    """
    argv = ["unshare", "-n", str(SDK_PYTHON), "-I", str(Path(__file__).resolve()), "--role", "driver"]
    argv += ["--mode", mode, "--size", str(size), "--seed", str(seed), "--timeout-s", str(timeout_s)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 2 * START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": "driver timed out"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"driver exited with {done.returncode}: {done.stderr.strip()[-500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> int:
    """Outer entry point: run each mode ``--runs`` times, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--timeout-s", type=float, default=180.0, help="per transfer")
    args = parser.parse_args()
    reason = sdk_unavailable_reason()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCH_DIR))
    from _harness import Spread, machine_info, utc_now, write_results

    started_at = utc_now()
    version = ensure_sdk_venv()
    size = args.size_mib << 20
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    for index in range(args.runs):
        for mode in args.modes:
            samples[mode].append(run_mode(mode, size, args.seed, args.timeout_s))
            print(f"run {index + 1}/{args.runs} {mode}: {samples[mode][-1]}", file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []
    for mode, results in samples.items():
        good = [r for r in results if "mb_per_s" in r]
        rate = Spread.of([r["mb_per_s"] for r in good])
        per_cpu = Spread.of([r["mb_per_cpu_s"] for r in good if r.get("mb_per_cpu_s")])
        rows.append(
            {
                "mode": f"Lattica SDK {version}, {mode}",
                "mb_per_s": None if rate is None else dataclasses.asdict(rate),
                "mb_per_cpu_s": None if per_cpu is None else dataclasses.asdict(per_cpu),
                "peak_rss_bytes": max((r["peak_rss_bytes"] or 0 for r in good), default=None),
                "identical": all(r["identical"] for r in good) if good else None,
                "note": next((r["error"] for r in results if "error" in r), None),
            }
        )
    print(f"\nLattica SDK {version}, {args.size_mib} MiB random block, lo-only netns, {args.runs} run(s) per mode")
    print(f"{'mode':<40} {'MB/s':>8} {'MB/CPU-s':>9} {'receiver peak RSS':>18}  note")
    for row in rows:
        rate_text = f"{row['mb_per_s']['median']:8.1f}" if row["mb_per_s"] else f"{'-':>8}"
        rate_text += f" {row['mb_per_cpu_s']['median']:9.1f}" if row["mb_per_cpu_s"] else f" {'-':>9}"
        rss_text = f"{row['peak_rss_bytes'] / 2**20:14.0f} MiB" if row["peak_rss_bytes"] else f"{'-':>18}"
        print(f"{row['mode']:<40} {rate_text} {rss_text}  {row['note'] or ''}")
    path = write_results(
        "transfer_sdk",
        started_at,
        {
            "benchmark": "transfer_sdk",
            "sdk_version": version,
            "size_bytes": size,
            "runs": args.runs,
            "chunk_bytes": CHUNK_BYTES,
            "rows": rows,
            "samples": samples,
            "machine": machine_info([]),
        },
    )
    print(f"results: {path}")
    return 0 if all(r.get("identical", True) for results in samples.values() for r in results) else 1


def _inner() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("driver", "provider", "receiver"), required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--timeout-s", type=float, required=True)
    parser.add_argument("--peer-id")
    parser.add_argument("--cid")
    parser.add_argument("--work", help="folder for the nodes' stores (made by the driver)")
    args = parser.parse_args()
    {"driver": role_driver, "provider": role_provider, "receiver": role_receiver}[args.role](args)


if __name__ == "__main__":
    if "--role" in sys.argv:
        _inner()
    else:
        sys.exit(main())

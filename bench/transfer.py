"""Transfer benchmark, single source: a random file from one daemon to another through the CLI.

Each run starts daemons A and B (fresh homes, 127.0.0.1, B bootstraps through A), publishes a
seeded random file on A (``lattica publish``) and times ``lattica fetch CID -o DIR --json`` on
B from the command's start to its exit (the manifest lookup, the transfer, verification,
storing and the atomic export included). MB/s is 10^6 bytes per second of that time; the
fetching daemon's peak RSS is ``VmHWM`` from ``/proc/PID/status`` after the fetch. The output
file is checked byte for byte (SHA-256).

Transports: QUIC, and TLS-over-TCP (both daemons with ``[net] tcp_listen = true``: the
exchange then takes TCP for the transfer, ``node.bulk``).

Baseline in the same run: ``curl`` fetching the same file over HTTPS (TLS 1.3, self-signed
certificate) from a local ``nginx`` -- what a user would do instead. Skipped with a note when
nginx or openssl is not installed (``apt-get install -y nginx``).

Usage::

    .venv/bin/python bench/transfer.py                 # 256 MiB, 1 run per mode
    .venv/bin/python bench/transfer.py --size-mib 64 --runs 3

Prints a table and writes ``bench/results/transfer-<UTC timestamp>.json``.
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
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # ``lattica`` and ``cli`` from this work tree

from _harness import REPO_ROOT, Spread, machine_info, utc_now, write_results  # noqa: E402

from lattica.daemon_process import DaemonProcess, start_daemon_process  # noqa: E402

MB = 1e6
START_TIMEOUT_S = 30.0
FETCH_TIMEOUT_S = 1800.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LATTICA_HOME", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(home: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", *args, "--json", "--home", str(home)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO_ROOT,
        timeout=FETCH_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"lattica {args[0]} failed: {result.stderr.strip()}")
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _random_file(path: Path, size: int) -> str:
    rng = random.Random(20261129)
    digest = hashlib.sha256()
    with path.open("wb") as file:
        left = size
        while left:
            block = rng.randbytes(min(left, 1 << 20))
            digest.update(block)
            file.write(block)
            left -= len(block)
    return digest.hexdigest()


def _stop(daemon: DaemonProcess | None) -> None:
    if daemon is None:
        return
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
    if daemon.process.stdout:
        daemon.process.stdout.close()


def _home(path: Path, *, tcp: bool) -> Path:
    path.mkdir(mode=0o700)
    if tcp:  # both ends run TLS-over-TCP; the exchange then takes it for the transfer
        (path / "config.toml").write_text("[net]\ntcp_listen = true\n")
    return path


def run_lattica(tmp: Path, source: Path, expected_sha256: str, *, tcp: bool = False) -> dict[str, Any]:
    """One run: publish on A, fetch on B through the CLI (over TLS-over-TCP with ``tcp``)."""
    a = b = None
    try:
        a = start_daemon_process(_home(tmp / "a", tcp=tcp), "--listen", "127.0.0.1:0", env=_env(), cwd=REPO_ROOT)
        b = start_daemon_process(
            _home(tmp / "b", tcp=tcp),
            "--listen",
            "127.0.0.1:0",
            "--bootstrap",
            a.addr_on("127.0.0.1"),
            env=_env(),
            cwd=REPO_ROOT,
        )
        began = time.perf_counter()
        cid = _cli(a.home, "publish", str(source))["cid"]
        publish_s = time.perf_counter() - began
        out = tmp / "out"
        cpu_before = _cpu_s(a.process.pid) + _cpu_s(b.process.pid)
        began = time.perf_counter()
        fetched = _cli(b.home, "fetch", cid, "-o", str(out))
        fetch_s = time.perf_counter() - began
        cpu_s = _cpu_s(a.process.pid) + _cpu_s(b.process.pid) - cpu_before
        rss = _peak_rss_bytes(b.process.pid)
        identical = _sha256(out / source.name) == expected_sha256
        return {
            "publish_s": publish_s,
            "fetch_s": fetch_s,
            "daemon_reported_s": fetched["seconds"],
            "mb_per_s": source.stat().st_size / fetch_s / MB,
            "cpu_s": cpu_s,
            "mb_per_cpu_s": source.stat().st_size / cpu_s / MB,
            "peak_rss_bytes": rss,
            "identical": identical,
        }
    finally:
        _stop(b)
        _stop(a)


_NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        ssl_protocols TLSv1.3;
        root {root};
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_nginx(tmp: Path, source: Path, expected_sha256: str) -> dict[str, Any]:
    """One baseline run: curl over HTTPS from a local nginx (both on 127.0.0.1)."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None or shutil.which("openssl") is None or shutil.which("curl") is None:
        return {"skipped": "nginx, openssl or curl is not installed (apt-get install -y nginx)"}
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=127.0.0.1", "-days", "1", "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(tmp=tmp, port=port, root=source.parent))
    server = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)], stderr=subprocess.DEVNULL)
    try:
        url = f"https://127.0.0.1:{port}/{source.name}"
        for _ in range(100):  # until nginx listens (a failed connect costs nothing)
            probe = subprocess.run(["curl", "-skI", url], capture_output=True, check=False)
            if probe.returncode == 0:
                break
            time.sleep(0.05)
        out = tmp / "curl.out"
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True,
                                                   text=True, check=False).stdout.split()]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_before = sum(_cpu_s(w) for w in workers)
        began = time.perf_counter()
        subprocess.run(["curl", "-fsk", "--tlsv1.3", "-o", str(out), url], check=True)
        fetch_s = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        curl_cpu_s = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        cpu_s = curl_cpu_s + sum(_cpu_s(w) for w in workers) - cpu_before
        return {
            "fetch_s": fetch_s,
            "mb_per_s": source.stat().st_size / fetch_s / MB,
            "cpu_s": cpu_s,
            "mb_per_cpu_s": source.stat().st_size / cpu_s / MB if cpu_s > 0 else None,
            "identical": _sha256(out) == expected_sha256,
        }
    finally:
        server.terminate()
        server.wait(timeout=10)


def main(argv: list[str]) -> int:
    """Run the modes, print the table, write the JSON; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--runs", type=int, default=1, help="runs per mode (default 1)")
    args = parser.parse_args(argv)
    started_at = utc_now()
    size = args.size_mib << 20
    quic: list[dict[str, Any]] = []
    tcp: list[dict[str, Any]] = []
    nginx: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lattica-bench-transfer-") as tmp_text:
        tmp = Path(tmp_text)
        tmp.chmod(0o755)  # nginx's worker runs as an unprivileged user and must read the file
        (tmp / "src").mkdir(mode=0o755)
        source = tmp / "src" / f"random-{args.size_mib}MiB.bin"
        expected = _random_file(source, size)
        source.chmod(0o644)
        for index in range(args.runs):  # alternated, so load changes hit both modes alike
            modes: tuple[tuple[str, Callable[[Path, Path, str], dict[str, Any]], list[dict[str, Any]]], ...] = (
                ("quic", run_lattica, quic),
                ("tcp", partial(run_lattica, tcp=True), tcp),
                ("nginx", run_nginx, nginx),
            )
            for name, runner, results in modes:
                work = tmp / f"{name}-{index}"
                work.mkdir()
                try:
                    results.append(runner(work, source, expected))
                except Exception as exc:
                    results.append({"error": f"{type(exc).__name__}: {exc}"})
                print(f"run {index + 1}/{args.runs} {name}: {results[-1]}", file=sys.stderr, flush=True)
    rows = []
    labelled = (
        ("lattica fetch, QUIC", quic),
        ("lattica fetch, TLS-over-TCP", tcp),
        ("curl + nginx, HTTPS (baseline)", nginx),
    )
    for label, results in labelled:
        good = [r for r in results if "mb_per_s" in r]
        rate = Spread.of([r["mb_per_s"] for r in good])
        rss = max((r["peak_rss_bytes"] for r in good if "peak_rss_bytes" in r), default=None)
        per_cpu = Spread.of([r["mb_per_cpu_s"] for r in good if r.get("mb_per_cpu_s")])
        note = next((r.get("skipped") or r.get("error") for r in results if "mb_per_s" not in r), None)
        rows.append(
            {
                "mode": label,
                "mb_per_s": None if rate is None else dataclasses.asdict(rate),
                "mb_per_cpu_s": None if per_cpu is None else dataclasses.asdict(per_cpu),
                "peak_rss_bytes": rss,
                "identical": all(r["identical"] for r in good) if good else None,
                "note": note,
            }
        )
    print(f"\nsingle source, {args.size_mib} MiB random file, 127.0.0.1, {args.runs} run(s) per mode")
    print(f"{'mode':<34} {'MB/s':>8} {'MB/CPU-s':>9} {'peak RSS':>10}  note")
    for row in rows:
        rate_text = f"{row['mb_per_s']['median']:8.1f}" if row["mb_per_s"] else f"{'-':>8}"
        rate_text += f" {row['mb_per_cpu_s']['median']:9.1f}" if row["mb_per_cpu_s"] else f" {'-':>9}"
        rss_text = f"{row['peak_rss_bytes'] / 2**20:7.0f} MiB" if row["peak_rss_bytes"] else f"{'-':>10}"
        print(f"{row['mode']:<34} {rate_text} {rss_text}  {row['note'] or ''}")
    path = write_results(
        "transfer",
        started_at,
        {
            "benchmark": "transfer",
            "size_bytes": size,
            "runs": args.runs,
            "rows": rows,
            "samples": {"quic": quic, "tcp": tcp, "nginx": nginx},
            "machine": machine_info(["aioquic", "msgspec", "blake3", "trio"]),
        },
    )
    print(f"results: {path}")
    return 0 if all(r.get("identical", True) for r in quic + tcp + nginx) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

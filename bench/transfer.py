"""Transfer benchmark, single source (issue 11, benchmark 1): a random file from one daemon to
another through the CLI, with the issue's baselines measured in the same run.

Each lattica run starts daemons A and B (fresh homes, 127.0.0.1, B bootstraps through A), publishes
a seeded random file on A (``lattica publish``) and times ``lattica fetch CID -o DIR --json`` on B
from the command's start to its exit (the manifest lookup, the transfer, verification, storing
and the atomic export included). MB/s is 10^6 bytes per second of that time. MB per CPU-second
counts the user+system CPU of both daemons and the ``lattica fetch`` client during the fetch.
The fetching process's peak RSS is ``VmHWM`` from ``/proc/PID/status`` after the fetch: a
high-water mark, so every run starts fresh daemons. The output is checked byte for byte (SHA-256).

Modes (``--modes``, default all), interleaved run by run so load changes hit them alike:

* ``quic``: both daemons on QUIC only.
* ``tcp``: both daemons with ``[net] tcp_listen = true``; the exchange then takes TLS-over-TCP.
* ``nginx``: ``curl`` fetching the same file over HTTPS (TLS 1.3, self-signed certificate) from a
  local ``nginx`` -- what a user would do instead. CPU: curl and the nginx worker; peak RSS:
  curl's. Skipped with a note when nginx, openssl or curl is missing (``apt-get install -y nginx``).
* ``ceiling``: the bound of the design (``bench/transfer_ceiling.py``): two bare Python
  processes moving the file over pyOpenSSL with the hashing a fetch must do (BLAKE3 at both
  ends, SHA-256 of the file) and nothing else. Not a competitor: the room left for Lattica's
  protocol and daemon, and what Python plus verification cost against nginx+curl.
* ``ceiling-min``: the same with only BLAKE3 of each chunk on arrival (no SHA-256 of the file,
  no re-hash by the server): the bound even without the checks Lattica could drop.
* ``sdk``: the Lattica SDK (PyPI ``lattica``), ``put_block``/``get_block`` and
  ``rpc_stream_iter`` on the same bytes, through ``bench/transfer_sdk.py`` (its own venv, one
  lo-only network namespace per transfer). Root only: unprivileged runs print a note and leave
  these rows out. Mind the memory: ``get_block`` returns the block in memory and its receiver
  peaked at ~5 GiB for 1 GiB (1.3 GiB for 256 MiB), the provider holding another copy or two.

Per size the table gives each mode's MB/s (median, min-max when runs > 1), MB per CPU-second,
peak RSS of the fetching process and whether every output was byte-identical, then the issue's
ratios from the medians: our TLS-over-TCP fetch / nginx+curl (target >= 0.6) and / the SDK's best
method (target >= 2), and our peak RSS against its 150 MiB target.

Usage::

    .venv/bin/python bench/transfer.py                          # 256 and 1024 MiB, all modes, 1 run
    .venv/bin/python bench/transfer.py --sizes-mib 64 --runs 3 --modes tcp nginx sdk

Prints the tables and writes ``bench/results/transfer-<UTC timestamp>.json``.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # ``lattica`` and ``cli`` from this work tree

import transfer_sdk  # noqa: E402
from _harness import REPO_ROOT, Spread, load_average, machine_info, utc_now, write_results  # noqa: E402
from transfer_ceiling import run_ceiling, run_ceiling_minimal  # noqa: E402
from transfer_sdk import process_cpu_s  # noqa: E402

from lattica.daemon_process import DaemonProcess, start_daemon_process  # noqa: E402

MB = 1e6
MIB = 1 << 20
SEED = 20261129  # the file's bytes; the SDK draws the same bytes from the same seed
START_TIMEOUT_S = 30.0
FETCH_TIMEOUT_S = 1800.0
MODES = ("quic", "tcp", "nginx", "ceiling", "ceiling-min", "sdk")
RSS_TARGET_BYTES = 150 * MIB


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LATTICA_HOME", None)
    # What a user has: bytecode cached in __pycache__ (as bench/cli.py). With
    # PYTHONDONTWRITEBYTECODE set (this machine's shells set it) every CLI run recompiled the
    # project's modules it imports, 30-60 ms of each timed fetch that a user never pays.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _children_cpu_s() -> float:
    """User + system CPU of this process's reaped children so far (the CLI commands it ran)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _random_file(path: Path, size: int) -> str:
    # 1 MiB per draw, as bench/transfer_sdk.py's _block(): the same seed gives the same bytes.
    rng = random.Random(SEED)
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
        daemons_before = process_cpu_s(a.process.pid) + process_cpu_s(b.process.pid)
        cli_before = _children_cpu_s()
        began = time.perf_counter()
        fetched = _cli(b.home, "fetch", cid, "-o", str(out))
        fetch_s = time.perf_counter() - began
        cli_cpu_s = _children_cpu_s() - cli_before
        daemons_cpu_s = process_cpu_s(a.process.pid) + process_cpu_s(b.process.pid) - daemons_before
        cpu_s = daemons_cpu_s + cli_cpu_s
        rss = _peak_rss_bytes(b.process.pid)
        identical = _sha256(out / source.name) == expected_sha256
        return {
            "publish_s": publish_s,
            "fetch_s": fetch_s,
            "daemon_reported_s": fetched["seconds"],
            "mb_per_s": source.stat().st_size / fetch_s / MB,
            "daemons_cpu_s": daemons_cpu_s,
            "cli_cpu_s": cli_cpu_s,
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
        cpu_before = sum(process_cpu_s(w) for w in workers)
        began = time.perf_counter()
        curl = subprocess.Popen(
            ["curl", "-fsk", "--tlsv1.3", "--max-time", f"{FETCH_TIMEOUT_S:.0f}", "-o", str(out), url],
            stdin=subprocess.DEVNULL,
        )
        # wait4: this one child's own CPU and peak RSS (RUSAGE_CHILDREN's maxrss would be the
        # largest of every child reaped so far, daemons and CLI commands included).
        _, status, usage = os.wait4(curl.pid, 0)
        fetch_s = time.perf_counter() - began
        curl.returncode = os.waitstatus_to_exitcode(status)
        if curl.returncode != 0:
            raise RuntimeError(f"curl exited with {curl.returncode}")
        curl_cpu_s = usage.ru_utime + usage.ru_stime
        cpu_s = curl_cpu_s + sum(process_cpu_s(w) for w in workers) - cpu_before
        return {
            "fetch_s": fetch_s,
            "mb_per_s": source.stat().st_size / fetch_s / MB,
            "curl_cpu_s": curl_cpu_s,
            "cpu_s": cpu_s,
            "mb_per_cpu_s": source.stat().st_size / cpu_s / MB if cpu_s > 0 else None,
            "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
            "identical": _sha256(out) == expected_sha256,
        }
    finally:
        server.terminate()
        server.wait(timeout=10)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a mode (the SDK mode gives two) and how to run it once."""

    key: str
    label: str
    run: Callable[[Path, Path, str], dict[str, Any]]


def _run_tcp(tmp: Path, source: Path, expected_sha256: str) -> dict[str, Any]:
    return run_lattica(tmp, source, expected_sha256, tcp=True)


def _sdk_runner(mode: str) -> Callable[[Path, Path, str], dict[str, Any]]:
    def run(tmp: Path, source: Path, expected_sha256: str) -> dict[str, Any]:
        """One SDK transfer of the same bytes (``tmp`` unused: the SDK nodes make their own)."""
        size = source.stat().st_size
        result = transfer_sdk.run_mode(mode, size, SEED, timeout_s=max(180.0, size / (5 * MB)))
        if "error" in result:
            raise RuntimeError(result["error"])
        # Identical to what its provider offered, and to our file: the same seed, the same bytes.
        result["identical"] = bool(result["identical"]) and result.get("sha256") == expected_sha256
        return result

    return run


_SDK_LABELS = {"bitswap": "put_block/get_block", "rpc_stream_iter": "rpc_stream_iter"}


def table_rows(modes: Sequence[str]) -> tuple[list[Row], dict[str, Any]]:
    """The rows ``modes`` ask for, and what became of the SDK (its version or why it is left out)."""
    rows: list[Row] = []
    sdk: dict[str, Any] = {"requested": "sdk" in modes}
    for mode in MODES:
        if mode not in modes:
            continue
        if mode == "quic":
            rows.append(Row("quic", "lattica fetch, QUIC", run_lattica))
        elif mode == "tcp":
            rows.append(Row("tcp", "lattica fetch, TLS-over-TCP", _run_tcp))
        elif mode == "nginx":
            rows.append(Row("nginx", "curl + nginx, HTTPS (baseline)", run_nginx))
        elif mode == "ceiling":
            rows.append(Row("ceiling", "Python ceiling: TLS + same hashing", run_ceiling))
        elif mode == "ceiling-min":
            rows.append(Row("ceiling-min", "Python ceiling: TLS + chunk BLAKE3 only", run_ceiling_minimal))
        else:
            reason = transfer_sdk.sdk_unavailable_reason()
            if reason is None:
                try:
                    sdk["version"] = transfer_sdk.ensure_sdk_venv()
                except (OSError, subprocess.SubprocessError) as exc:
                    reason = f"its venv could not be made ({type(exc).__name__}: {exc})"
            if reason is not None:
                sdk["left_out"] = reason
                print(f"note: Lattica SDK baseline left out: {reason}", file=sys.stderr, flush=True)
                continue
            for sdk_mode in transfer_sdk.MODES:
                label = f"Lattica SDK {sdk['version']}, {_SDK_LABELS[sdk_mode]}"
                rows.append(Row(f"sdk-{sdk_mode}", label, _sdk_runner(sdk_mode)))
    return rows, sdk


def summarize(row: Row, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One mode's runs at one size: spreads of MB/s and MB per CPU-second, peak RSS, identity."""
    good = [r for r in results if "mb_per_s" in r]
    rate = Spread.of([r["mb_per_s"] for r in good])
    per_cpu = Spread.of([r["mb_per_cpu_s"] for r in good if r.get("mb_per_cpu_s")])
    return {
        "key": row.key,
        "mode": row.label,
        "ok_runs": len(good),
        "failed_runs": len(results) - len(good),
        "mb_per_s": None if rate is None else dataclasses.asdict(rate),
        "mb_per_cpu_s": None if per_cpu is None else dataclasses.asdict(per_cpu),
        "peak_rss_bytes": max((r["peak_rss_bytes"] for r in good if r.get("peak_rss_bytes")), default=None),
        "identical": all(r["identical"] for r in good) if good else None,
        "note": next((r.get("skipped") or r.get("error") for r in results if "mb_per_s" not in r), None),
    }


def _median_rate(summary: dict[str, Any] | None) -> float | None:
    if summary is None or summary["mb_per_s"] is None:
        return None
    median: float = summary["mb_per_s"]["median"]
    return median


def ratios(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's ratios from the medians (``None`` where a side is missing) and the RSS check."""
    by_key = {s["key"]: s for s in summaries}
    nginx = _median_rate(by_key.get("nginx"))
    sdk_rates = {s["key"]: _median_rate(s) for s in summaries if s["key"].startswith("sdk-")}
    sdk_best_key = max((k for k, v in sdk_rates.items() if v), key=lambda k: sdk_rates[k] or 0.0, default=None)
    sdk_best = sdk_rates[sdk_best_key] if sdk_best_key else None
    ceiling = _median_rate(by_key.get("ceiling"))
    ceiling_min = _median_rate(by_key.get("ceiling-min"))
    result: dict[str, Any] = {
        "nginx_mb_per_s": nginx,
        "ceiling_mb_per_s": ceiling,
        "ceiling_vs_nginx": ceiling / nginx if ceiling and nginx else None,
        "ceiling_min_vs_nginx": ceiling_min / nginx if ceiling_min and nginx else None,
        "sdk_best": None if sdk_best_key is None else by_key[sdk_best_key]["mode"],
        "sdk_best_mb_per_s": sdk_best,
    }
    for key in ("tcp", "quic"):
        ours = _median_rate(by_key.get(key))
        result[f"{key}_vs_nginx"] = ours / nginx if ours and nginx else None
        result[f"{key}_vs_sdk_best"] = ours / sdk_best if ours and sdk_best else None
        result[f"{key}_vs_ceiling"] = ours / ceiling if ours and ceiling else None
    ours_rss = [by_key[k]["peak_rss_bytes"] for k in ("quic", "tcp") if k in by_key and by_key[k]["peak_rss_bytes"]]
    result["lattica_peak_rss_bytes"] = max(ours_rss, default=None)
    return result


def _rate_text(spread: dict[str, float] | None, runs: int) -> str:
    if spread is None:
        return "-"
    if runs > 1:
        return f"{spread['median']:.1f} ({spread['minimum']:.1f}-{spread['maximum']:.1f})"
    return f"{spread['median']:.1f}"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_size(size_mib: int, runs: int, summaries: Sequence[dict[str, Any]], found: dict[str, Any]) -> str:
    """The plain-text table of one size, with the issue's ratios under it."""
    spread_title = "MB/s (median, min-max)" if runs > 1 else "MB/s"
    header = f"{'mode':<40} {spread_title:>24} {'MB/CPU-s':>9} {'peak RSS':>10} {'identical':>9}  note"
    lines = [
        f"single source, {size_mib} MiB random file, 127.0.0.1, {runs} run(s) per mode, modes interleaved",
        header,
        "-" * len(header),
    ]
    by_key = {row["key"]: row for row in summaries}
    for row in summaries:
        per_cpu = row["mb_per_cpu_s"]
        per_cpu_text = "-" if per_cpu is None else f"{per_cpu['median']:.1f}"
        rss_text = "-" if row["peak_rss_bytes"] is None else f"{row['peak_rss_bytes'] / MIB:.0f} MiB"
        identical = {True: "yes", False: "NO", None: "-"}[row["identical"]]
        lines.append(
            f"{row['mode']:<40} {_rate_text(row['mb_per_s'], runs):>24} {per_cpu_text:>9} {rss_text:>10} "
            f"{identical:>9}  {row['note'] or ''}"
        )
    ours = [(key, name) for key, name in (("tcp", "TLS-over-TCP"), ("quic", "QUIC")) if key in by_key]
    if found["nginx_mb_per_s"]:
        parts = [f"{name} {_ratio_text(found[f'{key}_vs_nginx'])}" for key, name in ours]
        lines.append(f"  lattica fetch / curl+nginx (target >= 0.60): {', '.join(parts) or '-'}")
    if found["ceiling_mb_per_s"]:
        parts = [f"{name} {_ratio_text(found[f'{key}_vs_ceiling'])}" for key, name in ours]
        lines.append(f"  lattica fetch / Python ceiling: {', '.join(parts) or '-'}")
        if found["nginx_mb_per_s"]:
            lines.append(f"  Python ceiling / curl+nginx: {_ratio_text(found['ceiling_vs_nginx'])}")
    if found["ceiling_min_vs_nginx"]:
        lines.append(f"  Python ceiling, chunk BLAKE3 only / curl+nginx: {_ratio_text(found['ceiling_min_vs_nginx'])}")
    if found["sdk_best_mb_per_s"]:
        parts = [f"{name} {_ratio_text(found[f'{key}_vs_sdk_best'])}" for key, name in ours]
        best = f"{found['sdk_best']}, {found['sdk_best_mb_per_s']:.1f} MB/s"
        lines.append(f"  lattica fetch / SDK best ({best}; target >= 2): {', '.join(parts) or '-'}")
    rss = found["lattica_peak_rss_bytes"]
    if rss is not None:
        verdict = "meets" if rss <= RSS_TARGET_BYTES else "MISSES"
        lines.append(f"  lattica fetch peak RSS: {rss / MIB:.0f} MiB ({verdict} the <= 150 MiB target)")
    return "\n".join(lines)


def _outcome(result: dict[str, Any]) -> str:
    if "mb_per_s" not in result:
        return f"{result.get('skipped') or result.get('error')}"
    rss = result.get("peak_rss_bytes")
    rss_text = f", peak RSS {rss / MIB:.0f} MiB" if rss else ""
    return f"{result['mb_per_s']:.1f} MB/s{rss_text}, identical {result['identical']}"


def measure_size(tmp: Path, size_mib: int, runs: int, rows: Sequence[Row]) -> dict[str, list[dict[str, Any]]]:
    """``runs`` rounds of every row at one size (modes interleaved within a round); samples by row key."""
    source = tmp / "src" / f"random-{size_mib}MiB.bin"
    expected = _random_file(source, size_mib * MIB)
    source.chmod(0o644)
    samples: dict[str, list[dict[str, Any]]] = {row.key: [] for row in rows}
    try:
        for index in range(runs):
            for row in rows:
                work = tmp / f"{size_mib}MiB-{row.key}-{index}"
                work.mkdir()
                try:
                    samples[row.key].append(row.run(work, source, expected))
                except Exception as exc:
                    samples[row.key].append({"error": f"{type(exc).__name__}: {exc}"})
                finally:  # a 1 GiB run leaves GiBs behind (stores, output): not kept for the next
                    shutil.rmtree(work, ignore_errors=True)
                outcome = _outcome(samples[row.key][-1])
                print(f"{size_mib} MiB run {index + 1}/{runs} {row.key}: {outcome}", file=sys.stderr, flush=True)
    finally:
        source.unlink()
    return samples


def _sizes(text: str) -> int:
    size = int(text)
    if size <= 0:
        raise argparse.ArgumentTypeError("sizes are positive MiB counts")
    return size


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line: ``--sizes-mib`` (alias ``--size-mib``), ``--runs``, ``--modes``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sizes-mib",
        "--size-mib",
        dest="sizes_mib",
        type=_sizes,
        nargs="+",
        default=[256, 1024],
        help="file sizes in MiB, measured one after the other (default 256 1024)",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per mode and size (default 1)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="modes to run (default all; sdk needs root and is left out with a note otherwise)",
    )
    args = parser.parse_args(argv)
    if args.runs <= 0:
        parser.error("--runs must be positive")
    return args


def main(argv: list[str]) -> int:
    """Run the modes at every size, print the tables, write the JSON; returns the exit status
    (1 when a run failed or an output differed)."""
    args = parse_args(argv)
    started_at = utc_now()
    rows, sdk = table_rows(args.modes)
    per_size: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lattica-bench-transfer-") as tmp_text:
        tmp = Path(tmp_text)
        tmp.chmod(0o755)  # nginx's worker runs as an unprivileged user and must read the file
        (tmp / "src").mkdir(mode=0o755)
        for size_mib in args.sizes_mib:
            samples = measure_size(tmp, size_mib, args.runs, rows)
            summaries = [summarize(row, samples[row.key]) for row in rows]
            per_size.append(
                {
                    "size_bytes": size_mib * MIB,
                    "rows": summaries,
                    "ratios": ratios(summaries),
                    "samples": samples,
                    "load_average_after": load_average(),
                }
            )
    print()
    for size_mib, measured in zip(args.sizes_mib, per_size, strict=True):
        print(render_size(size_mib, args.runs, measured["rows"], measured["ratios"]))
        print()
    if "left_out" in sdk:
        print(f"Lattica SDK rows left out: {sdk['left_out']}")
    path = write_results(
        "transfer",
        started_at,
        {
            "benchmark": "transfer",
            "sizes_bytes": [m * MIB for m in args.sizes_mib],
            "runs": args.runs,
            "modes": args.modes,
            "seed": SEED,
            "sdk": sdk,
            "mb": "1e6 bytes",
            "sizes": per_size,
            "machine": machine_info(["aioquic", "msgspec", "blake3", "trio", "pyOpenSSL"]),
        },
    )
    print(f"results: {path}")
    every = [r for m in per_size for results in m["samples"].values() for r in results]
    failed = any("error" in r or r.get("identical") is False for r in every)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

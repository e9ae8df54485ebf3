"""TLS-over-TCP benchmark: one large stream between two processes on 127.0.0.1.

Compares, side by side in one run:

* ``sslstream``  trio's ``SSLStream`` (stdlib ssl, TLS 1.3, server auth only, no multiplexer):
                 the ceiling for TLS from trio,
* ``tls-tcp``    Lattica's TLS 1.3-over-TCP transport (``lattica.net.TcpTransport``: pyOpenSSL
                 mutual auth, yamux stream, the same ``QuicStream`` interface RPC uses),
* ``quic``       Lattica's QUIC endpoint (``lattica.net.Endpoint``), the path through NATs.

Each run starts a receiver and a sender process; the sender times from its first byte written
to the receiver's one-byte acknowledgement of EOF (handshakes are not timed; the protocol is
``bench/_transport_modes.py``'s). The peak resident set size of both processes is read from
``/proc/PID/status`` (``VmHWM``) when the transfer is done. Modes are interleaved run by run.
Results go to ``bench/results/transport_tcp-<UTC timestamp>.json``.

Usage::

    .venv/bin/python bench/transport_tcp.py            # 256 MiB, 3 runs per mode
    .venv/bin/python bench/transport_tcp.py --quick    # 16 MiB, 1 run: smoke test
    .venv/bin/python bench/transport_tcp.py --mib 64 --runs 5 --modes sslstream,tls-tcp

Exit status: 0 when every run succeeded, 1 otherwise, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import trio
from _harness import Child, ChildFailed, Spread, die_after, load_average, machine_info, report, utc_now, write_results
from _transport_modes import (
    ACK,
    LOOPBACK,
    RECEIVE_BYTES,
    Transfer,
    _check_ack,
    _Clock,
    _ReceiveTally,
    _report_sent,
    lattica_receiver,
    lattica_sender,
    receive_payload,
    send_payload,
)

MODES = ("sslstream", "tls-tcp", "quic")
MODE_DESCRIPTIONS = {
    "sslstream": "trio SSLStream, stdlib ssl, no mux (ceiling)",
    "tls-tcp": "Lattica TLS 1.3-over-TCP + yamux (lattica.net.TcpTransport)",
    "quic": "Lattica QUIC endpoint (lattica.net.Endpoint)",
}
MIB = 1024 * 1024
SCRIPT = Path(__file__).resolve()
CHILD_GRACE_S = 5.0


# --- children --------------------------------------------------------------------------------


def _identity_files(directory: Path) -> tuple[Any, Path, Path]:
    """An Ed25519 identity and its certificate and key as PEM files (stdlib ssl loads files)."""
    from cryptography.hazmat.primitives import serialization

    from lattica.identity import Identity
    from lattica.net.tls_identity import certificate_for, private_key_for

    identity = Identity.generate()
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate_for(identity).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        private_key_for(identity).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return identity, cert_path, key_path


async def sslstream_receiver(port: int, total_bytes: int) -> None:
    """Accept one TLS 1.3 connection (trio SSLStream), count ``total_bytes``, acknowledge.

    TLS has no half-close (SSLStream has no ``send_eof``), so the receiver is told the length."""
    with tempfile.TemporaryDirectory() as directory:
        _identity, cert_path, key_path = _identity_files(Path(directory))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(cert_path, key_path)
    (listener,) = await trio.open_tcp_listeners(port, host=LOOPBACK)
    report({"event": "ready", "port": listener.socket.getsockname()[1], "peer": None})
    async with listener:
        tcp = await listener.accept()
    stream = trio.SSLStream(tcp, context, server_side=True)
    await stream.do_handshake()
    tally = _ReceiveTally()
    while tally.received_bytes < total_bytes:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            break
        tally.add(data)
    tally.report()
    await stream.send_all(ACK)
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.aclose()


async def sslstream_sender(port: int, transfer: Transfer) -> None:
    """Send ``transfer`` over one TLS 1.3 connection (trio SSLStream, server auth only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tcp = await trio.open_tcp_stream(LOOPBACK, port)
    stream = trio.SSLStream(tcp, context)
    await stream.do_handshake()
    clock = _Clock()
    for chunk in transfer.chunks():
        await stream.send_all(chunk)
    _check_ack(await stream.receive_some(1))
    _report_sent(transfer, clock)
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.aclose()


async def tls_tcp_receiver(port: int) -> None:
    """Accept one Lattica TLS-over-TCP connection and stream, count to EOF, acknowledge."""
    from lattica.identity import Identity
    from lattica.net import TcpTransport
    from lattica.net.stream import QuicStream

    done = trio.Event()

    async def handle(stream: QuicStream) -> None:
        await receive_payload(stream)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_eof()
        done.set()

    identity = Identity.generate()
    transport = TcpTransport(identity, stream_handler=handle)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        _host, bound_port = await transport.listen(LOOPBACK, port)
        report({"event": "ready", "port": bound_port, "peer": str(identity.peer_id)})
        await done.wait()
        await trio.sleep(1.0)  # let the acknowledgement leave before the connection closes
        nursery.cancel_scope.cancel()


async def tls_tcp_sender(port: int, peer: str, transfer: Transfer) -> None:
    """Send ``transfer`` on one stream of a Lattica TLS-over-TCP connection."""
    from lattica.identity import Identity, PeerId
    from lattica.net import TcpTransport
    from lattica.net.address import PeerAddr

    transport = TcpTransport(Identity.generate())
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        connection = await transport.connect(PeerAddr((LOOPBACK, port), PeerId.parse(peer)))
        stream = await connection.open_stream()
        async with stream:
            await send_payload(stream, transfer)
        nursery.cancel_scope.cancel()


def _child_main(args: argparse.Namespace) -> NoReturn:
    transfer = Transfer(total_bytes=args.bytes, chunk_bytes=args.chunk_bytes)
    die_after(args.timeout + CHILD_GRACE_S)
    try:
        if args.role == "receiver" and args.mode == "sslstream":
            trio.run(sslstream_receiver, args.port, transfer.total_bytes)
        elif args.role == "receiver":
            trio.run(tls_tcp_receiver if args.mode == "tls-tcp" else lattica_receiver, args.port)
        elif args.mode == "sslstream":
            trio.run(sslstream_sender, args.port, transfer)
        elif args.mode == "tls-tcp":
            trio.run(tls_tcp_sender, args.port, args.peer, transfer)
        else:
            trio.run(lattica_sender, args.port, args.peer, transfer)
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]  # type: ignore[assignment]
        print(f"{args.role} ({args.mode}): {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


# --- the parent ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One run of one mode; ``error`` is set (and the numbers are not) when it failed."""

    mode: str
    run: int
    error: str | None = None
    seconds: float | None = None
    mb_per_s: float | None = None
    sender_peak_rss_mib: float | None = None
    receiver_peak_rss_mib: float | None = None
    sender_cpu_seconds: float | None = None
    receiver_cpu_seconds: float | None = None


def peak_rss_mib(pid: int) -> float | None:
    """``VmHWM`` of a live process in MiB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _argv(
    role: str, mode: str, transfer: Transfer, args: argparse.Namespace, port: int = 0, peer: str | None = None
) -> list[str]:
    argv = [sys.executable, str(SCRIPT), "--role", role, "--mode", mode, "--port", str(port)]
    argv += ["--bytes", str(transfer.total_bytes), "--chunk-bytes", str(transfer.chunk_bytes)]
    argv += ["--timeout", str(args.timeout)]
    if peer:
        argv += ["--peer", peer]
    if args.debug:
        argv.append("--debug")
    return argv


async def _expect(child: Child, side: str, event: str) -> dict[str, Any]:
    try:
        message = await child.read_message()
    except ChildFailed as exc:
        raise ChildFailed(f"{side}: {exc}") from None
    if message.get("event") != event:
        raise ChildFailed(f"{side}: expected {event!r}, got {message!r}")
    return message


async def run_once(mode: str, run: int, transfer: Transfer, args: argparse.Namespace) -> Sample:
    """One transfer in ``mode`` between a fresh receiver and a fresh sender process."""
    receiver: Child | None = None
    sender: Child | None = None
    try:
        with trio.fail_after(args.timeout):
            receiver = await Child.start(_argv("receiver", mode, transfer, args))
            ready = await _expect(receiver, "receiver", "ready")
            sender = await Child.start(_argv("sender", mode, transfer, args, int(ready["port"]), ready.get("peer")))
            # The sender's report comes last but its failure first: wait on it first.
            sent = await _expect(sender, "sender", "sent")
            received = await _expect(receiver, "receiver", "received")
            receiver_rss = peak_rss_mib(receiver.pid)
            sender_rss = peak_rss_mib(sender.pid)
    except trio.TooSlowError:
        return Sample(mode, run, error=f"timed out after {args.timeout:g} s")
    except ChildFailed as exc:
        return Sample(mode, run, error=str(exc))
    finally:
        for child in (sender, receiver):
            if child is not None:
                await child.kill()
    if received["bytes"] != transfer.total_bytes:
        return Sample(mode, run, error=f"receiver counted {received['bytes']} B of {transfer.total_bytes}")
    seconds = float(sent["seconds"])
    return Sample(
        mode,
        run,
        seconds=seconds,
        mb_per_s=transfer.total_bytes / 1e6 / seconds,
        sender_peak_rss_mib=sender_rss,
        receiver_peak_rss_mib=receiver_rss,
        sender_cpu_seconds=float(sent["cpu_seconds"]),
        receiver_cpu_seconds=float(received["cpu_seconds"]),
    )


def _median(values: Sequence[float | None]) -> float | None:
    spread = Spread.of([v for v in values if v is not None])
    return spread.median if spread else None


def summarize(samples: Sequence[Sample], modes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Median/min/max MB/s, median MiB/s and peak RSS of each mode's successful runs."""
    summary: dict[str, dict[str, Any]] = {}
    for mode in modes:
        ok = [s for s in samples if s.mode == mode and s.error is None]
        spread = Spread.of([s.mb_per_s for s in ok if s.mb_per_s is not None])
        summary[mode] = {
            "ok_runs": len(ok),
            "failed_runs": sum(1 for s in samples if s.mode == mode and s.error is not None),
            "median_mb_per_s": spread.median if spread else None,
            "min_mb_per_s": spread.minimum if spread else None,
            "max_mb_per_s": spread.maximum if spread else None,
            "median_mib_per_s": spread.median * 1e6 / MIB if spread else None,
            "sender_peak_rss_mib": _median([s.sender_peak_rss_mib for s in ok]),
            "receiver_peak_rss_mib": _median([s.receiver_peak_rss_mib for s in ok]),
        }
    ceiling = summary.get("sslstream", {}).get("median_mb_per_s")
    for values in summary.values():
        median = values["median_mb_per_s"]
        values["vs_sslstream"] = median / ceiling if median and ceiling else None
    return summary


def render_table(summary: dict[str, dict[str, Any]], runs: int) -> str:
    """The plain-text result table."""
    header = (
        f"{'mode':<10} {'median MB/s':>11} {'MiB/s':>7} {'min':>7} {'max':>7} {'runs ok':>7} "
        f"{'vs ssl':>7} {'peak RSS snd/rcv MiB':>21}"
    )
    lines = [header, "-" * len(header)]
    for mode, v in summary.items():
        if v["median_mb_per_s"] is None:
            lines.append(f"{mode:<10} failed")
            continue
        ratio = "—" if v["vs_sslstream"] is None else f"{v['vs_sslstream']:.2f}"
        rss = f"{v['sender_peak_rss_mib'] or 0:.0f}/{v['receiver_peak_rss_mib'] or 0:.0f}"
        ok_runs = f"{v['ok_runs']}/{runs}"
        lines.append(
            f"{mode:<10} {v['median_mb_per_s']:>11.1f} {v['median_mib_per_s']:>7.1f} {v['min_mb_per_s']:>7.1f} "
            f"{v['max_mb_per_s']:>7.1f} {ok_runs:>7} {ratio:>7} {rss:>21}"
        )
    return "\n".join(lines)


async def benchmark(args: argparse.Namespace) -> int:
    """Run every mode ``args.runs`` times, interleaved; print the table; write the JSON."""
    started_at = utc_now()
    transfer = Transfer(total_bytes=args.mib * MIB, chunk_bytes=args.chunk_kib * 1024)
    print(f"TLS-over-TCP benchmark: {args.mib} MiB over one stream on {LOOPBACK}, {args.runs} run(s) per mode")
    for mode in args.modes:
        print(f"  {mode:<10} {MODE_DESCRIPTIONS[mode]}")
    samples: list[Sample] = []
    for run in range(1, args.runs + 1):
        for mode in args.modes:
            sample = await run_once(mode, run, transfer, args)
            samples.append(sample)
            outcome = f"{sample.mb_per_s:10.1f} MB/s" if sample.error is None else f"FAILED: {sample.error}"
            print(f"  run {run}/{args.runs} {mode:<10} {outcome}", flush=True)
    summary = summarize(samples, args.modes)
    print()
    print(render_table(summary, args.runs))
    document = {
        "benchmark": "transport_tcp",
        "date": started_at.isoformat(),
        "machine": machine_info(["trio", "pyOpenSSL", "cryptography", "aioquic"]),
        "openssl": ssl.OPENSSL_VERSION,
        "parameters": {
            "host": LOOPBACK,
            "mib": args.mib,
            "chunk_bytes": transfer.chunk_bytes,
            "runs": args.runs,
            "modes": args.modes,
            "mb": "1e6 bytes",
            "timing": "sender: first byte written to the receiver's 1-byte acknowledgement of EOF",
            "peak_rss": "VmHWM of each process, read when the transfer is done",
        },
        "load_average_at_end": load_average(),
        "summary": summary,
        "samples": [asdict(s) for s in samples],
    }
    print(f"results: {write_results('transport_tcp', started_at, document)}")
    return 1 if any(s.error is not None for s in samples) else 0


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"modes are a comma list of {', '.join(MODES)}")
    return [m for m in MODES if m in modes]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (the parent's options, plus the hidden child options)."""
    parser = argparse.ArgumentParser(description="One stream between two processes on 127.0.0.1: TLS over TCP vs QUIC.")
    parser.add_argument("--mib", type=int, default=None, help="MiB per transfer (default 256; 16 with --quick)")
    parser.add_argument("--runs", type=int, default=None, help="runs per mode (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 MiB, 1 run")
    parser.add_argument("--modes", type=_modes, default=list(MODES), help="comma list (default all)")
    parser.add_argument("--chunk-kib", type=int, default=64, help="bytes per sender write, in KiB (default 64)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per run")
    parser.add_argument("--debug", action="store_true", help="children print tracebacks")
    parser.add_argument("--role", choices=("receiver", "sender"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-bytes", type=int, default=65536, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mib is None:
        args.mib = 16 if args.quick else 256
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.mib <= 0 or args.runs <= 0 or args.chunk_kib <= 0:
        parser.error("--mib, --runs and --chunk-kib must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the benchmark, or one side of a transfer when ``--role`` is given."""
    args = parse_args(argv)
    if args.role is not None:
        _child_main(args)
    try:
        return trio.run(benchmark, args)
    except KeyboardInterrupt:
        print("interrupted; children killed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

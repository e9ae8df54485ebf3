"""Transport benchmark: one large stream between two processes on 127.0.0.1.

Compares, side by side in one run:

* ``tcp``      plain trio TCP (the ceiling),
* ``asyncio``  aioquic's own asyncio API (``aioquic.asyncio.connect`` / ``serve``),
* ``lattica``  Lattica's QUIC endpoint (``lattica.net.Endpoint``).

Each run starts a receiver process and a sender process; the sender times from its first byte
written to the receiver's one-byte acknowledgement of EOF (the handshake is not timed). Modes are
interleaved run by run (tcp, asyncio, lattica, tcp, ...) so machine noise hits all of them alike.
The table shows the median MB/s (1 MB = 10**6 bytes) with min and max; every sample goes to
``bench/results/transport-<UTC timestamp>.json``.

Usage::

    .venv/bin/python bench/transport.py            # 256 MiB, 3 runs per mode
    .venv/bin/python bench/transport.py --quick    # 16 MiB, 1 run: smoke test
    .venv/bin/python bench/transport.py --mib 64 --runs 5 --modes tcp,lattica

Exit status: 0 when every run of every available mode succeeded, 1 otherwise, 2 on usage errors.
A mode that cannot be imported (Lattica's endpoint while it is being written) is reported as
"not available" and does not fail the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import trio
from _harness import (
    Child,
    ChildFailed,
    Spread,
    die_after,
    load_average,
    machine_info,
    report,
    utc_now,
    write_results,
)
from _transport_modes import (
    ASYNCIO_SEND_BUFFER_BYTES,
    LOOPBACK,
    QUIC_MAX_DATA_BYTES,
    QUIC_MAX_STREAM_DATA_BYTES,
    RECEIVE_BYTES,
    Transfer,
    asyncio_receiver,
    asyncio_sender,
    lattica_configuration,
    lattica_receiver,
    lattica_sender,
    lattica_unavailable_reason,
    tcp_receiver,
    tcp_sender,
)

MODES = ("tcp", "asyncio", "lattica")
MODE_DESCRIPTIONS = {
    "tcp": "plain trio TCP (ceiling)",
    "asyncio": "aioquic asyncio API (connect/serve)",
    "lattica": "Lattica QUIC endpoint (lattica.net)",
}
MIB = 1024 * 1024
DEFAULT_MIB = 256
DEFAULT_RUNS = 3
QUICK_MIB = 16
QUICK_RUNS = 1
SCRIPT = Path(__file__).resolve()
# A child ends itself this long after the parent's per-run timeout, had the parent not killed it.
CHILD_GRACE_S = 5.0


@dataclass(frozen=True)
class Sample:
    """One run of one mode; ``error`` is set (and the numbers are not) when it failed."""

    mode: str
    run: int
    error: str | None = None
    total_bytes: int | None = None
    seconds: float | None = None
    mb_per_s: float | None = None
    receiver_seconds: float | None = None
    sender_cpu_seconds: float | None = None
    receiver_cpu_seconds: float | None = None


@dataclass(frozen=True)
class ModeSummary:
    """What the table shows for one mode."""

    mode: str
    unavailable: str | None
    throughput: Spread | None
    ok_runs: int
    failed_runs: int
    first_error: str | None
    sender_cpu_share: float | None
    receiver_cpu_share: float | None


# --- child processes -------------------------------------------------------------------------


def _innermost(exc: BaseException) -> BaseException:
    # trio wraps a task's error in nursery ExceptionGroups; the first leaf says what happened.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _child_main(args: argparse.Namespace) -> NoReturn:
    """Run one side of one transfer (or probe a mode) and exit; errors are one stderr line."""
    transfer = Transfer(total_bytes=args.bytes, chunk_bytes=args.chunk_bytes)
    die_after(args.timeout + CHILD_GRACE_S)
    try:
        if args.role == "probe":
            reason = lattica_unavailable_reason() if args.mode == "lattica" else None
            configuration = lattica_configuration() if args.mode == "lattica" and reason is None else None
            report({"event": "probe", "unavailable": reason, "configuration": configuration})
        elif args.role == "receiver":
            if args.mode == "tcp":
                trio.run(tcp_receiver, args.port)
            elif args.mode == "asyncio":
                asyncio.run(asyncio_receiver(args.port))
            else:
                trio.run(lattica_receiver, args.port)
        elif args.mode == "tcp":
            trio.run(tcp_sender, args.port, transfer)
        elif args.mode == "asyncio":
            asyncio.run(asyncio_sender(args.port, transfer))
        else:
            trio.run(lattica_sender, args.port, args.peer, transfer)
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        cause = _innermost(exc)
        print(f"{args.role} ({args.mode}): {type(cause).__name__}: {cause}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


def _child_argv(
    role: str,
    mode: str,
    transfer: Transfer,
    *,
    timeout_s: float,
    port: int = 0,
    peer: str | None = None,
    debug: bool = False,
) -> list[str]:
    argv = [
        sys.executable,
        str(SCRIPT),
        "--role",
        role,
        "--mode",
        mode,
        "--port",
        str(port),
        "--bytes",
        str(transfer.total_bytes),
        "--chunk-bytes",
        str(transfer.chunk_bytes),
        "--timeout",
        str(timeout_s),
    ]
    if peer is not None:
        argv += ["--peer", peer]
    if debug:
        argv.append("--debug")
    return argv


# --- the parent ------------------------------------------------------------------------------


async def _read_event(child: Child, side: str, event: str) -> dict[str, Any]:
    try:
        message = await child.read_message()
    except ChildFailed as exc:
        raise ChildFailed(f"{side}: {exc}") from None
    if message.get("event") != event:
        raise ChildFailed(f"{side}: expected a {event!r} report, got {message!r}")
    return message


@dataclass(frozen=True)
class Probe:
    """Whether a mode can run here (``unavailable`` says why not) and its QUIC configuration."""

    unavailable: str | None
    configuration: dict[str, Any] | None


async def probe(mode: str, timeout_s: float) -> Probe:
    """Ask a child process whether ``mode`` can run here (only ``lattica`` may not)."""
    if mode != "lattica":
        return Probe(None, None)
    child = await Child.start(_child_argv("probe", mode, Transfer(0, 1), timeout_s=timeout_s))
    try:
        with trio.fail_after(timeout_s):
            message = await _read_event(child, "probe", "probe")
    except (ChildFailed, trio.TooSlowError) as exc:
        return Probe(f"probe failed: {exc}", None)
    finally:
        await child.kill()
    reason = message.get("unavailable")
    return Probe(None if reason is None else str(reason), message.get("configuration"))


async def run_once(mode: str, run: int, transfer: Transfer, timeout_s: float, debug: bool) -> Sample:
    """One transfer in ``mode`` between a fresh receiver and a fresh sender process."""
    receiver: Child | None = None
    sender: Child | None = None
    try:
        with trio.fail_after(timeout_s):
            receiver = await Child.start(_child_argv("receiver", mode, transfer, timeout_s=timeout_s, debug=debug))
            ready = await _read_event(receiver, "receiver", "ready")
            sender = await Child.start(
                _child_argv(
                    "sender",
                    mode,
                    transfer,
                    timeout_s=timeout_s,
                    port=int(ready["port"]),
                    peer=ready.get("peer"),
                    debug=debug,
                )
            )
            sent = await _read_event(sender, "sender", "sent")
            received = await _read_event(receiver, "receiver", "received")
    except trio.TooSlowError:
        said = [
            f"{side}: {child.stderr_tail()}"
            for side, child in (("sender", sender), ("receiver", receiver))
            if child is not None and child.stderr_tail()
        ]
        return Sample(mode, run, error="; ".join([f"timed out after {timeout_s:g} s", *said]))
    except ChildFailed as exc:
        return Sample(mode, run, error=str(exc))
    finally:
        for child in (sender, receiver):
            if child is not None:
                await child.kill()
    if not sent["bytes"] == received["bytes"] == transfer.total_bytes:
        return Sample(
            mode,
            run,
            error=f"sent {sent['bytes']} B, receiver counted {received['bytes']} B, expected {transfer.total_bytes} B",
        )
    seconds = float(sent["seconds"])
    return Sample(
        mode,
        run,
        total_bytes=transfer.total_bytes,
        seconds=seconds,
        mb_per_s=transfer.total_bytes / 1e6 / seconds,
        receiver_seconds=float(received["seconds"]),
        sender_cpu_seconds=float(sent["cpu_seconds"]),
        receiver_cpu_seconds=float(received["cpu_seconds"]),
    )


def summarize(mode: str, unavailable: str | None, samples: Sequence[Sample]) -> ModeSummary:
    """Median/min/max throughput and median CPU share of the successful runs of ``mode``."""
    ok = [s for s in samples if s.mode == mode and s.error is None]
    failed = [s for s in samples if s.mode == mode and s.error is not None]
    sender_share = Spread.of(
        [s.sender_cpu_seconds / s.seconds for s in ok if s.sender_cpu_seconds is not None and s.seconds]
    )
    receiver_share = Spread.of(
        [s.receiver_cpu_seconds / s.seconds for s in ok if s.receiver_cpu_seconds is not None and s.seconds]
    )
    return ModeSummary(
        mode=mode,
        unavailable=unavailable,
        throughput=Spread.of([s.mb_per_s for s in ok if s.mb_per_s is not None]),
        ok_runs=len(ok),
        failed_runs=len(failed),
        first_error=failed[0].error if failed else None,
        sender_cpu_share=sender_share.median if sender_share else None,
        receiver_cpu_share=receiver_share.median if receiver_share else None,
    )


def _ratio(summary: ModeSummary, baseline: ModeSummary | None) -> float | None:
    if summary.throughput is None or baseline is None or baseline.throughput is None:
        return None
    return summary.throughput.median / baseline.throughput.median


def render_table(summaries: Sequence[ModeSummary], runs: int) -> str:
    """The plain-text result table."""
    by_mode = {s.mode: s for s in summaries}
    header = (
        f"{'mode':<9} {'median MB/s':>11} {'min':>9} {'max':>9} {'runs ok':>7} "
        f"{'vs asyncio':>10} {'vs tcp':>8} {'CPU snd/rcv':>11}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        if s.unavailable is not None:
            lines.append(f"{s.mode}: not available ({s.unavailable})")
            continue
        if s.throughput is None:
            lines.append(f"{s.mode}: failed ({s.first_error})")
            continue
        vs_asyncio = _ratio(s, by_mode.get("asyncio"))
        vs_tcp = _ratio(s, by_mode.get("tcp"))
        cpu = "/".join(
            "  ?" if share is None else f"{100 * share:3.0f}%" for share in (s.sender_cpu_share, s.receiver_cpu_share)
        )
        lines.append(
            f"{s.mode:<9} {s.throughput.median:>11.1f} {s.throughput.minimum:>9.1f} "
            f"{s.throughput.maximum:>9.1f} {f'{s.ok_runs}/{runs}':>7} "
            f"{'—' if vs_asyncio is None else f'{vs_asyncio:.3f}':>10} "
            f"{'—' if vs_tcp is None else f'{vs_tcp:.4f}':>8} {cpu:>11}"
        )
        if s.failed_runs:
            lines.append(f"{'':<9} {s.failed_runs} run(s) failed, first: {s.first_error}")
    return "\n".join(lines)


async def benchmark(args: argparse.Namespace) -> int:
    """Run every mode ``args.runs`` times, interleaved; print the table; write the JSON."""
    started_at = utc_now()
    transfer = Transfer(total_bytes=args.mib * MIB, chunk_bytes=args.chunk_kib * 1024)
    modes: list[str] = args.modes
    probes = {mode: await probe(mode, args.timeout) for mode in modes}
    unavailable = {mode: p.unavailable for mode, p in probes.items()}
    print(
        f"transport benchmark: {args.mib} MiB over one stream on {LOOPBACK}, "
        f"{args.runs} run(s) per mode, interleaved; {transfer.chunk_bytes // 1024} KiB writes"
    )
    for mode in modes:
        note = f" — not available ({unavailable[mode]})" if unavailable[mode] else ""
        print(f"  {mode:<8} {MODE_DESCRIPTIONS[mode]}{note}")

    samples: list[Sample] = []
    for run in range(1, args.runs + 1):
        for mode in modes:
            if unavailable[mode] is not None:
                continue
            sample = await run_once(mode, run, transfer, args.timeout, args.debug)
            samples.append(sample)
            if sample.error is None:
                print(
                    f"  run {run}/{args.runs} {mode:<8} {sample.mb_per_s:10.1f} MB/s ({sample.seconds:.3f} s)",
                    flush=True,
                )
            else:
                print(f"  run {run}/{args.runs} {mode:<8} FAILED: {sample.error}", flush=True)

    summaries = [summarize(mode, unavailable[mode], samples) for mode in modes]
    print()
    print(render_table(summaries, args.runs))
    print(
        "CPU snd/rcv: median CPU time of the sender / receiver process over the timed interval (100% = one core busy)"
    )

    document = {
        "benchmark": "transport",
        "date": started_at.isoformat(),
        "machine": machine_info(["aioquic", "trio", "cryptography", "pynacl"]),
        "parameters": {
            "host": LOOPBACK,
            "mib": args.mib,
            "total_bytes": transfer.total_bytes,
            "chunk_bytes": transfer.chunk_bytes,
            "receive_bytes": RECEIVE_BYTES,
            "runs": args.runs,
            "modes": modes,
            "quick": args.quick,
            "timeout_s": args.timeout,
            "mb": "1e6 bytes",
            "timing": "sender: first byte written to the receiver's 1-byte acknowledgement of EOF",
            "asyncio_quic": {
                "max_data": QUIC_MAX_DATA_BYTES,
                "max_stream_data": QUIC_MAX_STREAM_DATA_BYTES,
                "send_buffer_bytes": ASYNCIO_SEND_BUFFER_BYTES,
                "certificate": "self-signed Ed25519, verify_mode=CERT_NONE",
            },
            "lattica_quic": probes["lattica"].configuration if "lattica" in probes else None,
        },
        "load_average_at_end": load_average(),
        "unavailable": {m: r for m, r in unavailable.items() if r is not None},
        "summary": {
            s.mode: {
                "median_mb_per_s": s.throughput.median if s.throughput else None,
                "min_mb_per_s": s.throughput.minimum if s.throughput else None,
                "max_mb_per_s": s.throughput.maximum if s.throughput else None,
                "ok_runs": s.ok_runs,
                "failed_runs": s.failed_runs,
                "vs_asyncio": _ratio(s, next((x for x in summaries if x.mode == "asyncio"), None)),
                "vs_tcp": _ratio(s, next((x for x in summaries if x.mode == "tcp"), None)),
                "sender_cpu_share": s.sender_cpu_share,
                "receiver_cpu_share": s.receiver_cpu_share,
            }
            for s in summaries
            if s.unavailable is None
        },
        "samples": [asdict(s) for s in samples],
    }
    path = write_results("transport", started_at, document)
    print(f"results: {path}")
    return 1 if any(s.error is not None for s in samples) else 0


# --- command line ----------------------------------------------------------------------------


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes are a comma list of {', '.join(MODES)}")
    return [m for m in MODES if m in modes]  # table order is fixed: tcp, asyncio, lattica


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (the parent's options, plus the hidden child options)."""
    parser = argparse.ArgumentParser(
        description="Throughput of one stream between two processes on 127.0.0.1: "
        "trio TCP vs aioquic's asyncio API vs Lattica's QUIC endpoint."
    )
    parser.add_argument(
        "--mib",
        type=_positive_int,
        default=None,
        help=f"MiB per transfer (default {DEFAULT_MIB}; {QUICK_MIB} with --quick)",
    )
    parser.add_argument(
        "--runs",
        type=_positive_int,
        default=None,
        help=f"runs per mode (default {DEFAULT_RUNS}; {QUICK_RUNS} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_MIB} MiB, {QUICK_RUNS} run")
    parser.add_argument(
        "--modes", type=_modes, default=list(MODES), help="comma list of modes (default tcp,asyncio,lattica)"
    )
    parser.add_argument(
        "--chunk-kib", type=_positive_int, default=64, help="bytes per sender write, in KiB (default 64)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds allowed per run before both processes are killed"
    )
    parser.add_argument("--debug", action="store_true", help="children print tracebacks")
    # Child-process options (the parent passes these; not for people).
    parser.add_argument("--role", choices=("receiver", "sender", "probe"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-bytes", type=int, default=65536, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None and args.mode is None:
        parser.error("--role needs --mode")
    if args.mib is None:
        args.mib = QUICK_MIB if args.quick else DEFAULT_MIB
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else DEFAULT_RUNS
    return args


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so the finally blocks kill the children.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the benchmark, or one side of a transfer when ``--role`` is given."""
    args = parse_args(argv)
    if args.role is not None:
        _child_main(args)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return trio.run(benchmark, args)
    except KeyboardInterrupt:
        print("interrupted; children killed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

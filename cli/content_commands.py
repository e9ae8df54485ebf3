"""``lattica publish/fetch/ls/pin/unpin/gc/verify``: content through the daemon's content service.

A fetch runs inside the daemon (``content.fetch``); this command follows its progress
(``content.fetch_status`` with ``wait_s``: each call returns when the fetch ends or after
0.25 s, so the end is seen at once) and draws a progress bar (bytes, rate, ETA, peers) when stdout is a
terminal, nothing when it is a pipe. Ctrl-C cancels the daemon's fetch, which keeps every
verified chunk: the same command resumes it. SIGTERM and SIGHUP do the same
(:mod:`cli.stop_signals`; the exit code is 128 + the signal's number, as Ctrl-C's is 130).
"""

# No `from __future__ import annotations`: typer would eval every annotation string at start-up.
import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.arguments import check_cid
from cli.daemon_client import HomeOption, JsonOption, call_daemon
from cli.output import print_json, print_line, print_table, stdout_is_terminal
from cli.stop_signals import StopSignal, stop_signals_interrupt
from lattica.control.errors import FAILED, ControlError

_POLL_S = 0.25  # the daemon answers after this long, or at once when the fetch ends
_LONG_CALL_S = 24 * 3600.0  # publishing a large folder hashes every byte

GlobOption = Annotated[
    list[str] | None,
    typer.Option("--include", help="Only files whose path matches this glob (repeatable).", show_default="all files"),
]
ExcludeOption = Annotated[
    list[str] | None, typer.Option("--exclude", help="Leave out files whose path matches this glob (repeatable).")
]
TensorsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tensors",
        help="Only tensors whose name matches this pattern, e.g. 'encoder.layer.0.*' (repeatable); "
        "each safetensors file is written with just those tensors. Verified against the manifest's "
        "chunk hashes (the CID) only: a partial file cannot be checked against the file's SHA-256.",
    ),
]
CidArgument = Annotated[str, typer.Argument(metavar="CID", callback=check_cid, help="Content id (from publish).")]


def _example(*lines: str) -> str:
    return "Example:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def publish(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="File or folder (e.g. a Hugging Face model folder).")],
    name: Annotated[str | None, typer.Option("--name", help="Name recorded in the manifest.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag recorded in the manifest (repeatable).")] = None,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Add a file or folder to this node and announce it; prints its content id."""
    params: dict[str, Any] = {"path": str(path.expanduser().resolve()), "tags": tag or []}
    if name is not None:
        params["name"] = name
    result = call_daemon(home, "content.publish", params, timeout_s=_LONG_CALL_S)
    if json:
        print_json(result)
        return
    print_line(result["cid"])
    if stdout_is_terminal():
        sys.stderr.write(
            f"published {result['name']!r}: {result['files']} file(s), {_size(result['bytes'])} "
            f"({_size(result['new_bytes'])} new)\n"
        )


def _fetch_summary(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "cid": status["cid"],
        "bytes": status["total_bytes"],
        "received_bytes": status["received_bytes"],
        "seconds": status["seconds"],
        "peers": [p["peer_id"] for p in status["peers"]],
        "path": status["path"],
        "paths": status["paths"],
    }


def _follow(home: Path | None, fetch_id: int, show_bar: bool) -> dict[str, Any]:
    """Poll the daemon's fetch until it ends; a bar on a terminal. Ctrl-C, SIGTERM and SIGHUP
    cancel it there; the command then exits 130, or 128 + the signal's number."""
    with stop_signals_interrupt():
        try:
            return _poll(home, fetch_id, show_bar)
        except KeyboardInterrupt as stop:
            with contextlib.suppress(ControlError):  # the daemon may be gone; nothing to undo then
                call_daemon(home, "content.fetch_cancel", {"fetch_id": fetch_id}, timeout_s=10.0)
            sys.stderr.write("fetch stopped; what arrived is kept: run the same command to resume\n")
            if isinstance(stop, StopSignal):
                raise typer.Exit(stop.exit_code) from None
            raise


def _poll(home: Path | None, fetch_id: int, show_bar: bool) -> dict[str, Any]:
    status: dict[str, Any]
    if not show_bar:
        while True:
            status = call_daemon(home, "content.fetch_status", {"fetch_id": fetch_id, "wait_s": _POLL_S})
            if status["state"] in ("done", "failed", "cancelled"):
                return status
    from rich.progress import (  # only a terminal pays for rich
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[peers]} peer(s)"),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("finding", total=None, peers=0)
        while True:
            status = call_daemon(home, "content.fetch_status", {"fetch_id": fetch_id, "wait_s": _POLL_S})
            bar.update(
                task,
                description=status["state"],
                total=status["total_bytes"] or None,
                completed=status["held_bytes"],
                peers=len(status["peers"]),
            )
            if status["state"] in ("done", "failed", "cancelled"):
                return status


def fetch(
    cid: CidArgument,
    out: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Write the files under this folder.", show_default="keep in the store"),
    ] = None,
    include: GlobOption = None,
    exclude: ExcludeOption = None,
    tensors: TensorsOption = None,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Fetch content from the peers that have it (verified, resumable), optionally into -o DIR.

    After a fetch this node serves the content and announces itself as a provider.
    """
    params: dict[str, Any] = {"cid": cid, "include": include or [], "exclude": exclude or [], "tensors": tensors or []}
    if out is not None:
        params["out_dir"] = str(out.expanduser().resolve())
    started = call_daemon(home, "content.fetch", params)
    status = _follow(home, started["fetch_id"], show_bar=stdout_is_terminal() and not json)
    if status["state"] != "done":
        raise ControlError(FAILED, status["error"] or f"fetch {status['state']}")
    summary = _fetch_summary(status)
    if json:
        print_json(summary)
        return
    where = f" into {summary['path']}" if summary["path"] else ""
    rate = status["received_bytes"] / status["seconds"] / 1e6 if status["seconds"] else 0.0
    print_line(
        f"fetched {cid}{where}: {_size(summary['bytes'])} ({_size(status['received_bytes'])} from "
        f"{len(summary['peers'])} peer(s) in {status['seconds']:.1f} s, {rate:.1f} MB/s)"
    )


def ls(home: HomeOption = None, json: JsonOption = False) -> None:
    """Content held by this node: id, name, size, held (complete, partial with how much of
    its chunks, or FAILED), pinned. In --json, ``chunk_bytes`` is the size of the content's
    distinct chunks and ``held_bytes`` how much of that is stored here."""
    rows = call_daemon(home, "content.ls")
    if json:
        print_json(rows)
        return
    print_table(
        f"{len(rows)} root(s)",
        ["cid", "name", "size", "held", "pinned"],
        [
            [r["cid"], r["name"], _size(r["total_bytes"]),
             "FAILED" if r.get("failed") else "complete" if r["complete"]
             else f"partial: {_size(r['held_bytes'])} of {_size(r['chunk_bytes'])}",
             "yes" if r["pinned"] else "no"]
            for r in rows
        ],
    )


def pin(cid: CidArgument, home: HomeOption = None, json: JsonOption = False) -> None:
    """Keep CID through gc."""
    result = call_daemon(home, "content.pin", {"cid": cid})
    print_json(result) if json else print_line(f"pinned {cid}")


def unpin(cid: CidArgument, home: HomeOption = None, json: JsonOption = False) -> None:
    """Let gc remove CID (and chunks no other root uses)."""
    result = call_daemon(home, "content.unpin", {"cid": cid})
    print_json(result) if json else print_line(f"unpinned {cid}")


def gc(home: HomeOption = None, json: JsonOption = False) -> None:
    """Remove unpinned content and chunks nothing references."""
    result = call_daemon(home, "content.gc", timeout_s=_LONG_CALL_S)
    if json:
        print_json(result)
        return
    print_line(
        f"removed {result['roots_removed']} root(s), {result['blocks_removed']} chunk(s), "
        f"{_size(result['bytes_freed'])} freed"
    )


def verify(cid: CidArgument, home: HomeOption = None, json: JsonOption = False) -> None:
    """Re-hash CID's chunks on disk (bad or missing ones are removed and, for content held
    whole, fetched again), then check each whole file against the manifest's SHA-256 (exit 1
    on a mismatch). Of partial content (--include/--tensors) only the chunks held are checked."""
    result = call_daemon(home, "content.verify", {"cid": cid}, timeout_s=_LONG_CALL_S)
    repaired = None
    if result["repair_fetch_id"] is not None:
        status = _follow(home, result["repair_fetch_id"], show_bar=stdout_is_terminal() and not json)
        repaired = status["state"] == "done"
        result["repair"] = _fetch_summary(status) | {"state": status["state"], "error": status["error"]}
    if json:
        print_json(result)
    else:
        print_line(f"checked {result['checked']} chunk(s): {result['bad']} bad, {result['missing']} missing")
        if result.get("not_held"):
            dropped = result["bad"] + result["missing"]
            again = f"; {dropped} dropped: fetch it again as before to repair them" if dropped else ""
            print_line(f"partial content: {result['not_held']} chunk(s) were never fetched here{again}")
        if repaired is not None:
            print_line("repaired: fetched again" if repaired else f"repair failed: {result['repair']['error']}")
        for path in result.get("sha256_mismatch", []):
            print_line(f"{path}: SHA-256 differs from the manifest's (the manifest is wrong; marked failed, unpinned)")
    if repaired is False or result.get("sha256_mismatch"):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the content commands to the top-level ``lattica`` command."""
    app.command(epilog=_example("lattica publish ./all-MiniLM-L6-v2 --tag bert", "lattica publish weights.bin --json"))(
        publish
    )
    app.command(
        epilog=_example(
            "lattica fetch bagaybqab... -o ./model",
            "lattica fetch bagaybqab... -o ./model --include '*.json'",
            "lattica fetch bagaybqab... -o ./part --tensors 'encoder.layer.0.*'",
        )
    )(fetch)
    app.command(epilog=_example("lattica ls", "lattica ls --json"))(ls)
    app.command(epilog=_example("lattica pin bagaybqab..."))(pin)
    app.command(epilog=_example("lattica unpin bagaybqab..."))(unpin)
    app.command(epilog=_example("lattica gc"))(gc)
    app.command(epilog=_example("lattica verify bagaybqab..."))(verify)

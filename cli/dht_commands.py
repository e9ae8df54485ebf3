"""``lattica dht ...``: signed records and provider records through the daemon's DHT."""

# No `from __future__ import annotations`: typer would eval every annotation string at start-up
# (typing.get_type_hints, ~25 ms per command on this machine).
import base64
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.arguments import check_cid, check_dial_strings, check_key, check_peer_id, read_value, record_ttl_s
from cli.daemon_client import HomeOption, JsonOption, call_daemon
from cli.output import print_json, print_line, print_table, stdout_is_terminal
from lattica.control.limits import MAX_PROVIDERS, MAX_QUORUM, MAX_RECORD_TTL_S, MAX_VALUE_BYTES, MIN_RECORD_TTL_S

app = typer.Typer(
    help="The Kademlia DHT: signed records and provider records.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _example(*lines: str) -> str:
    # \b keeps click from re-wrapping the example lines into one paragraph.
    return "Example:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


_TTL_HELP = (
    f"How long the record lives: 90s, 30m, 24h, 2d; from {MIN_RECORD_TTL_S:g}s "
    f"to {MAX_RECORD_TTL_S / 86400:g}d (replicas refuse longer)."
)


@app.command(
    epilog=_example(
        "lattica dht put model/latest sha256:abc --ttl 24h",
        "lattica dht put weights/manifest --file manifest.json",
        "cat manifest.json | lattica dht put weights/manifest -",
    )
)
def put(
    key: Annotated[str, typer.Argument(metavar="KEY", callback=check_key, help="Record key (in your own namespace).")],
    value: Annotated[
        str | None,
        typer.Argument(
            metavar="VALUE",
            help=f"Value as UTF-8 text, or - to read stdin; at most {MAX_VALUE_BYTES // 1024} KiB.",
        ),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the value (any bytes) from this file (- for stdin).")
    ] = None,
    ttl: Annotated[str, typer.Option("--ttl", help=_TTL_HELP)] = "24h",
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Store a record signed by this node; reports how many replicas acknowledged."""
    ttl_s = record_ttl_s(ttl)
    data = read_value(value, file)
    try:
        params = {"key": key, "value": data.decode("utf-8"), "encoding": "utf-8", "ttl_s": ttl_s}
    except UnicodeDecodeError:
        params = {"key": key, "value": base64.b64encode(data).decode("ascii"), "encoding": "base64", "ttl_s": ttl_s}
    result = call_daemon(home, "dht.put", params)
    if json:
        print_json(result)
        return
    print_line(f"stored {key!r} (seq {result['seq']}, {len(data)} bytes) on {result['acks']} peer(s)")


def _print_value(result: dict[str, object]) -> None:
    """The value alone: made safe on a terminal, exact bytes when redirected."""
    text = str(result["value"])
    binary = result["encoding"] == "base64"
    if stdout_is_terminal():
        if binary:
            size = len(base64.b64decode(text))
            print_line(f"(binary value, {size} bytes: use --json, or redirect stdout to a file for the bytes)")
        else:
            print_line(text)
        return
    sys.stdout.flush()
    sys.stdout.buffer.write(base64.b64decode(text) if binary else text.encode("utf-8") + b"\n")
    sys.stdout.buffer.flush()


@app.command(
    epilog=_example(
        "lattica dht get model/latest                      # a record this node wrote",
        "lattica dht get model/latest --peer WRITER_PEER_ID  # another node's record",
        "lattica dht get model/latest --peer WRITER_PEER_ID --quorum 4 --json",
    )
)
def get(
    key: Annotated[str, typer.Argument(metavar="KEY", callback=check_key, help="Record key.")],
    peer: Annotated[
        str | None,
        typer.Option(
            "--peer", callback=lambda v: None if v is None else check_peer_id(v), help="The writer's peer id.",
            show_default="this node",
        ),
    ] = None,
    local: Annotated[bool, typer.Option("--local", help="Only look in this node's own store.")] = False,
    quorum: Annotated[
        int | None,
        typer.Option(
            "--quorum",
            min=1,
            max=MAX_QUORUM,
            help="Answer with the newest of this many copies (more is fresher, slower).",
            show_default="1",
        ),
    ] = None,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Fetch the newest valid record; exit 1 with 'not found' when there is none.

    Records live in their writer's namespace: without --peer this reads a record this node wrote.
    On a terminal, control characters in the value are shown escaped; --json is exact, and a
    redirected stdout gets the value's exact bytes.
    """
    params: dict[str, str | bool | int] = {"key": key, "local": local}
    if peer:
        params["peer"] = peer
    if quorum is not None:
        params["quorum"] = quorum
    result = call_daemon(home, "dht.get", params)
    if json:
        print_json(result)
        return
    _print_value(result)
    copies = result.get("copies_found")
    if quorum is not None and copies is not None:
        sys.stderr.write(f"newest of {copies} cop{'y' if copies == 1 else 'ies'} found (asked for {quorum})\n")


@app.command(epilog=_example("lattica dht provide bafy-model-shard-17"))
def provide(
    cid: Annotated[str, typer.Argument(metavar="CID", callback=check_cid, help="Content id this node can serve.")],
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Announce that this node provides CID (republished while the daemon runs)."""
    result = call_daemon(home, "dht.provide", {"cid": cid})
    if json:
        print_json(result)
        return
    print_line(f"providing {cid} (announced to {result['acks']} peer(s))")


@app.command(epilog=_example("lattica dht providers bafy-model-shard-17 --count 5"))
def providers(
    cid: Annotated[str, typer.Argument(metavar="CID", callback=check_cid, help="Content id.")],
    count: Annotated[int, typer.Option("--count", min=1, max=MAX_PROVIDERS, help="How many to find.")] = 20,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Find peers that provide CID, with their dialable addresses; exit 1 when there are none."""
    result = call_daemon(home, "dht.providers", {"cid": cid, "count": count})
    if json:
        print_json(result)
        return
    print_table(
        f"{len(result)} provider(s)",
        ["peer id", "addresses"],
        [[r["peer_id"], ", ".join(r["addrs"])] for r in result],
    )


@app.command(epilog=_example("lattica dht routing", "lattica dht routing --json"))
def routing(home: HomeOption = None, json: JsonOption = False) -> None:
    """The routing table: buckets, peers, last seen."""
    result = call_daemon(home, "dht.routing")
    if json:
        print_json(result)
        return
    rows = [
        [bucket["index"], peer["peer_id"], ", ".join(peer["addrs"]), f"{peer['last_seen_s_ago']:.0f} s ago"]
        for bucket in result["buckets"]
        for peer in bucket["peers"]
    ]
    title = f"{len(rows)} peer(s) in {len(result['buckets'])} bucket(s)"
    print_table(title, ["bucket", "peer id", "addresses", "last seen"], rows)


@app.command(
    epilog=_example("lattica dht bootstrap PEERID@203.0.113.7:4001", "lattica dht bootstrap   # the configured peers")
)
def bootstrap(
    peer: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="PEER",
            callback=check_dial_strings, help="PEERID@HOST:PORT to join through.", show_default="configured peers"
        ),
    ] = None,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Join the DHT now (through the given or configured peers); waits until the lookup of
    this node's own id finishes and reports how many peers the routing table holds."""
    result = call_daemon(home, "dht.bootstrap", {"peers": peer or []})
    if json:
        print_json(result)
        return
    print_line(f"routing table holds {result['peers']} peer(s) ({result['answered']} bootstrap peer(s) answered)")

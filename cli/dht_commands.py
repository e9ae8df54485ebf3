"""``lattica dht ...``: signed records and provider records through the daemon's DHT."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.daemon_client import HomeOption, JsonOption, call_daemon
from cli.durations import parse_duration_s
from cli.output import console, fail, print_json, print_table

app = typer.Typer(help="The Kademlia DHT: signed records and provider records.", no_args_is_help=True)


def _ttl(text: str) -> float:
    try:
        return parse_duration_s(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ttl") from None


@app.command()
def put(
    key: Annotated[str, typer.Argument(help="Record key (in your own namespace).")],
    value: Annotated[str, typer.Argument(help="Value (UTF-8 text, at most 64 KiB).")],
    ttl: Annotated[str, typer.Option("--ttl", help="How long the record lives: 90s, 30m, 24h, 2d.")] = "24h",
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Store a record signed by this node; reports how many replicas acknowledged."""
    ttl_s = _ttl(ttl)
    result = call_daemon(home, "dht.put", {"key": key, "value": value, "ttl_s": ttl_s})
    if json:
        print_json(result)
        return
    console.print(f"stored {key!r} (seq {result['seq']}) on {result['acks']} peer(s)", highlight=False)


@app.command()
def get(
    key: Annotated[str, typer.Argument(help="Record key.")],
    peer: Annotated[str | None, typer.Option("--peer", help="Writer's peer id [default: this node].")] = None,
    local: Annotated[bool, typer.Option("--local", help="Only look in this node's own store.")] = False,
    quorum: Annotated[
        int | None,
        typer.Option(
            "--quorum",
            min=1,
            max=32,
            help="Answer with the newest of this many copies (more is fresher, slower) [default: 1].",
        ),
    ] = None,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Fetch the newest valid record; exit 1 with 'not found' when there is none."""
    params: dict[str, str | bool | int] = {"key": key, "local": local}
    if peer:
        params["peer"] = peer
    if quorum is not None:
        params["quorum"] = quorum
    result = call_daemon(home, "dht.get", params)
    if result is None:
        fail(f"not found: {key!r}" + (f" from {peer}" if peer else ""))
    if json:
        print_json(result)
        return
    console.print(result["value"], highlight=False, markup=False)


@app.command()
def provide(
    cid: Annotated[str, typer.Argument(help="Content id this node can serve.")],
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Announce that this node provides CID (republished while the daemon runs)."""
    result = call_daemon(home, "dht.provide", {"cid": cid})
    if json:
        print_json(result)
        return
    console.print(f"providing {cid} (announced to {result['acks']} peer(s))", highlight=False)


@app.command()
def providers(
    cid: Annotated[str, typer.Argument(help="Content id.")],
    count: Annotated[int, typer.Option("--count", min=1, max=100, help="How many to find.")] = 20,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Find peers that provide CID, with their dialable addresses."""
    result = call_daemon(home, "dht.providers", {"cid": cid, "count": count})
    if json:
        print_json(result)
        return
    if not result:
        fail(f"no providers found for {cid}")
    print_table(
        f"{len(result)} provider(s)",
        ["peer id", "addresses"],
        [[r["peer_id"], ", ".join(r["addrs"])] for r in result],
    )


@app.command()
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


@app.command()
def bootstrap(
    peer: Annotated[
        list[str] | None, typer.Argument(help="PEERID@HOST:PORT to join through [default: configured peers].")
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
    console.print(f"routing table holds {result['peers']} peer(s)", highlight=False)

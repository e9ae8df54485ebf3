"""The ``lattica`` command: ``init``, ``daemon``, and client commands that talk to the daemon.

Exit codes: 0 ok, 1 the operation failed, 2 usage error. Expected failures print one line;
``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import trio
import typer

from cli import dht_commands
from cli.daemon_client import HomeOption, JsonOption, call_daemon, flags, guard, resolve_home
from cli.output import console, print_fields, print_json, print_table
from lattica import __version__
from lattica.config import CONTROL_SOCKET
from lattica.home import init_home
from lattica.net.address import InvalidAddressError, PeerAddr

app = typer.Typer(
    name="lattica",
    help="Lattica: a peer-to-peer node for distributed AI work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for failures.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    flags.debug = debug
    if version:
        console.print(__version__)
        raise typer.Exit(0)


app.add_typer(dht_commands.app, name="dht")


@app.command()
def init(home: HomeOption = None, json: JsonOption = False) -> None:
    """Create the node's identity and config.toml (keeps existing ones); print the peer id."""
    path = resolve_home(home)
    identity, created = guard(lambda: init_home(path))
    if json:
        print_json({"peer_id": str(identity.peer_id), "home": str(path), "created": created})
        return
    verb = "created" if created else "already initialised"
    console.print(f"{path}: {verb}", highlight=False)
    console.print(str(identity.peer_id), highlight=False)


@app.command()
def daemon(
    home: HomeOption = None,
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT to listen on (UDP).")] = None,
    bootstrap: Annotated[
        list[str] | None, typer.Option("--bootstrap", help="PEERID@HOST:PORT to join through (repeatable).")
    ] = None,
) -> None:
    """Run the node until SIGINT/SIGTERM."""
    # Imported here so client commands don't pay for the node's imports.
    from lattica.daemon import run_daemon

    path = resolve_home(home)

    def ready(node: Any) -> None:
        console.print(f"lattica {__version__} peer {node.peer_id}", highlight=False)
        for addr in node.dial_strings():
            console.print(f"listening on {addr}", highlight=False)
        # Printed last: scripts wait for this line to know the CLI can talk to the daemon.
        console.print(f"control socket {path / CONTROL_SOCKET}", highlight=False)
        console.file.flush()

    guard(lambda: trio.run(lambda: run_daemon(path, listen=listen, bootstrap=bootstrap, on_ready=ready)))


@app.command("id")
def identify(home: HomeOption = None, json: JsonOption = False) -> None:
    """Print this node's peer id and dialable addresses."""
    result = call_daemon(home, "id")
    if json:
        print_json(result)
        return
    console.print(result["peer_id"], highlight=False)
    for addr in result["addrs"]:
        console.print(f"  {addr}", highlight=False)


@app.command()
def status(home: HomeOption = None, json: JsonOption = False) -> None:
    """Uptime, listen addresses, connected peers, version."""
    result = call_daemon(home, "status")
    if json:
        print_json(result)
        return
    print_fields(
        [
            ("peer id", result["peer_id"]),
            ("version", result["version"]),
            ("uptime", f"{result['uptime_s']:.0f} s"),
            ("connected peers", result["connected_peers"]),
            *[("listening", a) for a in result["listen_addrs"]],
        ]
    )


@app.command()
def peers(home: HomeOption = None, json: JsonOption = False) -> None:
    """One row per open connection."""
    result = call_daemon(home, "peers")
    if json:
        print_json(result)
        return
    print_table(
        f"{len(result)} connection(s)",
        ["peer id", "remote address", "rtt (ms)", "direction"],
        [[r["peer_id"], r["remote_addr"], r["rtt_ms"], r["direction"]] for r in result],
    )


@app.command()
def ping(
    addr: Annotated[str, typer.Argument(help='"PEERID@HOST:PORT" (peer id checked) or "HOST:PORT"')],
    count: Annotated[int, typer.Option("--count", "-c", min=1, max=10_000, help="Pings to send.")] = 4,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Measure round-trip time to a peer through the daemon."""
    try:
        PeerAddr.parse(addr)
    except InvalidAddressError as exc:
        raise typer.BadParameter(str(exc), param_hint="ADDR") from None
    results = []
    for _ in range(count):
        result = call_daemon(home, "ping", {"addr": addr})
        results.append(result)
        if not json:
            console.print(f"pong from {result['peer_id'][:12]}… rtt={result['rtt_ms']:.3f} ms", highlight=False)
    if json:
        print_json({"peer_id": results[-1]["peer_id"], "rtt_ms": [r["rtt_ms"] for r in results]})


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()

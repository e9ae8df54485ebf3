"""The ``lattica`` command: ``init``, ``daemon``, and client commands that talk to the daemon.

Exit codes (one place, :mod:`cli.exit_codes`): 0 ok, 1 the operation failed, 2 usage error.
Expected failures print one line (and a hint) on stderr, plus a JSON error document on stdout
with ``--json``; ``--debug`` (anywhere on the line) shows tracebacks.

Start-up cost matters: client commands import typer, msgspec and the control client only (no
trio, aioquic, cryptography, pynacl, rich); ``init`` and ``daemon`` import what they need inside
their functions. ``tests/unit/test_cli_imports.py`` and ``bench/cli.py`` keep it that way.
"""

# No `from __future__ import annotations`: typer would eval every annotation string at start-up
# (typing.get_type_hints, ~25 ms per command on this machine).
import gc
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import content_commands, dht_commands, relay_commands, state_commands
from cli.arguments import check_dial_string, check_ping_target
from cli.daemon_client import HomeOption, JsonOption, call_daemon, resolve_home
from cli.exit_codes import FAILURE, OK, USAGE, exit_code_for
from cli.output import print_error, print_fields, print_json, print_line, print_table
from lattica import __version__
from lattica.control.errors import FAILED, INVALID_PARAMS, ControlError
from lattica.control.limits import MAX_PING_COUNT
from lattica.errors import LatticaError
from lattica.home_layout import CONTROL_SOCKET

app = typer.Typer(
    name="lattica",
    help="Lattica: a peer-to-peer node for distributed AI work.\n\n"
    "Start a node with `lattica daemon`; the other commands talk to it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(dht_commands.app, name="dht")
app.add_typer(relay_commands.app, name="relay")
app.add_typer(state_commands.app, name="state")


def _show_version(value: bool) -> None:
    if value:
        print_line(f"lattica {__version__}")
        raise typer.Exit(OK)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_show_version, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for failures (anywhere on the line).")] = (
        False
    ),
) -> None:
    """Lattica: a peer-to-peer node for distributed AI work."""


def _example(*lines: str) -> str:
    # \b keeps click from re-wrapping the example lines into one paragraph.
    return "Example:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


@app.command(epilog=_example("lattica init", "lattica init --home /srv/lattica --json"))
def init(home: HomeOption = None, json: JsonOption = False) -> None:
    """Create the node's identity and config.toml (keeps existing ones); print the peer id."""
    from lattica.home import init_home
    from lattica.home_warnings import identity_warnings

    path = resolve_home(home)
    identity, created = init_home(path)
    warnings = identity_warnings(path, created)
    for warning in warnings:
        sys.stderr.write(f"warning: {warning}\n")
    if json:
        print_json({"peer_id": str(identity.peer_id), "home": str(path), "created": created, "warnings": warnings})
        return
    print_line(f"{path}: {'created' if created else 'already initialised'}")
    print_line(str(identity.peer_id))


def _check_listen(text: str | None) -> str | None:
    if text is None:
        return None
    from lattica.net.address import InvalidAddressError, parse_host_port

    try:
        parse_host_port(text)
    except InvalidAddressError as exc:
        raise typer.BadParameter(str(exc)) from None
    return text


def _check_bootstrap(texts: list[str] | None) -> list[str] | None:
    from lattica.net.address import InvalidAddressError, PeerAddr

    for text in texts or []:
        try:
            PeerAddr.parse(text)
        except InvalidAddressError as exc:
            raise typer.BadParameter(str(exc)) from None
    return texts


def _lattica_command() -> str:
    """How the user can run this CLI again: ``lattica`` if it is on PATH, else its full path."""
    import shutil

    installed = Path(sys.executable).parent / "lattica"
    on_path = shutil.which("lattica")
    if on_path and Path(on_path).resolve() == installed.resolve():
        return "lattica"
    return str(installed) if installed.exists() else f"{sys.executable} -m cli.main"


def _next_steps(addrs: list[str], command: str, home_flag: str) -> list[str]:
    """What a new user does next: the address to share, where the command is, the next commands."""
    loopback = ("@127.", "@[::1]")
    share = [a for a in addrs if not a.startswith(loopback, a.index("@"))] or addrs
    lines = ["", "Share this address with other nodes (they join with --bootstrap ADDRESS):"]
    lines += [f"  {a}" for a in share[:3]]
    if command != "lattica":
        bin_dir = Path(command).parent
        lines.append(f"The lattica command is {command} (not on PATH; `source {bin_dir}/activate` puts it there).")
    examples = [
        (f"{command} status{home_flag}", "is it running, how many peers"),
        (f"{command} ping PEERID@HOST:PORT{home_flag}", "reach another node"),
        (f"{command} dht bootstrap PEERID@HOST:PORT{home_flag}", "join a network through it"),
        (f"{command} --help", "everything else"),
    ]
    width = max(len(c) for c, _ in examples)
    lines.append("Next, in another terminal:")
    lines += [f"  {c:<{width}}  # {why}" for c, why in examples]
    lines += ["Stop with Ctrl-C.", ""]
    return lines


@app.command(
    epilog=_example(
        "lattica daemon --listen 0.0.0.0:4001",
        "lattica daemon --home /tmp/b --listen 127.0.0.1:4002 --bootstrap PEERID@127.0.0.1:4001",
        "lattica daemon --listen 0.0.0.0:4001 --relay-service",
    )
)
def daemon(
    home: HomeOption = None,
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            callback=_check_listen,
            help="HOST:PORT to listen on (UDP).",
            show_default="config.toml's listen",
        ),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", callback=_check_bootstrap, help="PEERID@HOST:PORT to join through (repeatable)."),
    ] = None,
    relay_service: Annotated[
        bool,
        typer.Option(
            "--relay-service",
            help="Offer relay reservations and circuits to other nodes (nat.relay.service).",
        ),
    ] = False,
) -> None:
    """Run the node until SIGINT/SIGTERM (Ctrl-C); prints its addresses and what to do next."""
    # Imported here so client commands don't pay for the node's imports.
    import trio

    from lattica.daemon import run_daemon

    path = resolve_home(home)
    command = _lattica_command()
    home_flag = "" if home is None else f" --home {path}"

    def ready(node: Any) -> None:
        addrs = node.dial_strings()
        print_line(f"lattica {__version__} peer {node.peer_id}")
        for addr in addrs:
            print_line(f"listening on {addr}")
        for line in _next_steps(addrs, command, home_flag):
            print_line(line)
        # Printed last: scripts wait for this line to know the CLI can talk to the daemon.
        print_line(f"control socket {path / CONTROL_SOCKET}")
        sys.stdout.flush()

    trio.run(
        lambda: run_daemon(path, listen=listen, bootstrap=bootstrap, relay_service=relay_service, on_ready=ready)
    )


@app.command("id", epilog=_example("lattica id", "lattica id --json"))
def identify(home: HomeOption = None, json: JsonOption = False) -> None:
    """Print this node's peer id and dialable addresses (PEERID@HOST:PORT)."""
    result = call_daemon(home, "id")
    if json:
        print_json(result)
        return
    print_line(result["peer_id"])
    for addr in result["addrs"]:
        print_line(f"  {addr}")


@app.command(epilog=_example("lattica status", "lattica status --home /tmp/b --json"))
def status(home: HomeOption = None, json: JsonOption = False) -> None:
    """Uptime, listen addresses, connected peers, version, and warnings about the home."""
    result = call_daemon(home, "status")
    if json:
        print_json(result)
        return
    print_fields(
        [
            ("peer id", result["peer_id"]),
            ("version", result["version"]),
            ("uptime", f"{result['uptime_s']:.0f} s"),
            ("connected peers", _peer_count(result)),
            *[("listening", a) for a in result["listen_addrs"]],
            *[("listening (tcp)", a) for a in result.get("tcp_listen_addrs", [])],
            *_upload_fields(result),
            *[("warning", w) for w in result.get("warnings", [])],
        ]
    )


def _upload_fields(status: dict[str, Any]) -> list[tuple[str, str]]:
    uploads = status.get("uploads") or {}
    if "held" not in uploads:
        return []
    preempted = uploads.get("preempted", 0)
    note = f" ({preempted} preempted since start)" if preempted else ""
    return [("uploads", f"{uploads['held']} of {uploads.get('max', '?')}{note}")]


def _peer_count(status: dict[str, Any]) -> str:
    relayed = status.get("relayed_only_peers", 0)
    return f"{status['connected_peers']}" + (f" ({relayed} through a relay only)" if relayed else "")


@app.command(epilog=_example("lattica peers", "lattica peers --json"))
def peers(home: HomeOption = None, json: JsonOption = False) -> None:
    """One row per open connection: peer id, transport (QUIC, or TLS-over-TCP for bulk
    transfers), remote address, round-trip time, direction, path (direct, or relayed via a
    relay's peer id; how long hole punching took when it made a direct path) and for how long."""
    result = call_daemon(home, "peers")
    if json:
        print_json(result)
        return
    print_table(
        f"{len(result)} connection(s)",
        ["peer id", "transport", "remote address", "rtt (ms)", "direction", "path", "connected (s)"],
        [
            [
                r["peer_id"],
                r.get("transport", "quic"),
                r["remote_addr"],
                r["rtt_ms"],
                r["direction"],
                _path_text(r),
                r.get("connected_s"),
            ]
            for r in result
        ],
    )


def _path_text(row: dict[str, Any]) -> str:
    if row.get("via"):
        return f"relayed via {row['via']}"
    if row.get("direct_after_s") is not None:
        return f"direct (hole punched after {row['direct_after_s']} s)"
    return str(row.get("path", "direct"))


def _ping_line(result: dict[str, Any]) -> str:
    # "via" names the address the ping travelled over; the node reports whether the connection
    # already existed once it tracks that (None until then: nothing is claimed).
    via = f" via {result['addr']}" if result.get("addr") else ""
    if result.get("via"):
        via = f" relayed via {result['via'][:12]}… at {result['addr']}"
    reused = result.get("reused_connection")
    how = "" if reused is None else (" (existing connection)" if reused else " (new connection)")
    return f"pong from {result['peer_id'][:12]}…{via} rtt={result['rtt_ms']:.3f} ms{how}"


@app.command(
    epilog=_example(
        "lattica ping 127.0.0.1:4001",
        "lattica ping PEERID@203.0.113.7:4001 --count 10 --json",
        "lattica ping PEERID   # an open connection, the DHT, or the peer's relays",
    )
)
def ping(
    addr: Annotated[
        str,
        typer.Argument(
            metavar="ADDR",
            callback=check_ping_target,
            help="PEERID@HOST:PORT (the peer's identity is checked), HOST:PORT (learned from the handshake), "
            "RELAYPEERID@HOST:PORT/relay/PEERID (through that relay), or PEERID (an open connection, "
            "its addresses in the DHT, or the relays it published).",
        ),
    ],
    count: Annotated[int, typer.Option("--count", "-c", min=1, max=MAX_PING_COUNT, help="Pings to send.")] = 4,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Measure the round-trip time to a peer through the daemon; shows the address used."""
    results = []
    for _ in range(count):
        result = call_daemon(home, "ping", {"addr": addr})
        results.append(result)
        if not json:
            print_line(_ping_line(result))
            sys.stdout.flush()
    if json:
        last = results[-1]
        print_json(
            {
                "peer_id": last["peer_id"],
                "addr": last.get("addr"),
                "via": last.get("via"),
                "reused_connection": [r.get("reused_connection") for r in results],
                "rtt_ms": [r["rtt_ms"] for r in results],
            }
        )


@app.command(
    epilog=_example(
        "lattica nat",
        "lattica nat --json",
        "lattica nat 198.51.100.7:4001",
        "lattica nat 198.51.100.7:4001 --json",
    )
)
def nat(
    addr: Annotated[
        str | None,
        typer.Argument(
            metavar="ADDR",
            callback=lambda text: None if text is None else check_dial_string(text),
            help="A peer's IP:PORT to ask for our address (STUN); without it, show reachability.",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=300.0, help="Seconds to wait for the answer.")
    ] = 10.0,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Reachability (public / private / unknown), observed addresses, NAT mapping; or, given
    IP:PORT, ask that peer which address this node's packets come from."""
    if addr is None:
        _nat_status(home, json)
        return
    result = call_daemon(home, "nat.observed", {"addr": addr, "timeout_s": timeout})
    if json:
        print_json(result)
    else:
        print_line(f"observed address: {result['observed_addr']} (as seen by {result['asked']})")


def _nat_status(home: Path | None, json: bool) -> None:
    result = call_daemon(home, "nat.status")
    if json:
        print_json(result)
        return
    observed = [f"{row['addr']} ({row['observers']} observers agree)" for row in result["observed_addrs"]]
    print_fields(
        [
            ("reachability", f"{result['reachability']} (confidence {result['confidence']})"),
            *[("observed address", line) for line in observed or ["none agreed yet"]],
            ("observers", result["observers"]),
            ("mapping", result["mapping"]),
            ("dht mode", result["dht_mode"]),
            ("relay wanted", "yes" if result["relay_reservation_wanted"] else "no"),
            *[("relay reservation", r) for r in result["relay_reservations"]],
            *_hole_punch_fields(result.get("hole_punch")),
        ]
    )


def _hole_punch_fields(row: dict[str, Any] | None) -> list[tuple[str, Any]]:
    if not row:
        return []
    if not row["enabled"]:
        return [("hole punching", "off")]
    return [
        (
            "hole punching",
            f"{row['succeeded']} direct, {row['failed']} failed of {row['attempts']} attempt(s), "
            f"{row['active']} running, {row['refused']} refused",
        )
    ]


def _take_debug_flag(args: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` from anywhere before ``--`` (it is global, so its place must not matter)."""
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    return [a for i, a in enumerate(args) if not (i < end and a == "--debug")], debug


def _check_utf8(args: list[str]) -> None:
    """Arguments whose bytes are not UTF-8 reach Python as lone surrogates; say so plainly."""
    for position, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
            raise ControlError(
                INVALID_PARAMS,
                f"argument {position} ({shown}) is not valid UTF-8",
                hint="keys and values on the command line are UTF-8 text; binary values go through "
                "`lattica dht put KEY --file PATH` (or - for stdin)",
            ) from None


content_commands.register(app)


def _print_traceback() -> None:
    import traceback  # only --debug pays for it

    traceback.print_exc()


def run(args: list[str]) -> int:
    """Run the CLI on ``args`` (without the program name); returns the exit code."""
    # typer vendors click; ClickException (whose show() prints usage) is not re-exported.
    from typer._click.exceptions import ClickException

    args, debug = _take_debug_flag(args)
    json_mode = "--json" in args[: args.index("--") if "--" in args else len(args)]
    try:
        _check_utf8(args)
        result = app(args=args, prog_name="lattica", standalone_mode=False)
        return result if isinstance(result, int) else OK
    except ClickException as exc:  # usage errors (click's own exit code is 2 for these)
        if json_mode:
            print_json({"ok": False, "error": {"code": INVALID_PARAMS, "message": exc.format_message(), "hint": None}})
        exc.show()
        return USAGE if exc.exit_code == 2 else FAILURE
    except ControlError as exc:
        if debug:
            _print_traceback()
        print_error(exc.code, exc.message, exc.hint, json_mode=json_mode)
        return exit_code_for(exc.code)
    except (LatticaError, OSError, ValueError) as exc:
        if debug:
            _print_traceback()
        print_error(FAILED, str(exc) or type(exc).__name__, json_mode=json_mode)
        return FAILURE
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return 130


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    code = run(sys.argv[1:])
    # The process ends now: objects moved to the permanent generation are not walked by the
    # interpreter's last collections (what typer, msgspec and the rest imported: ~10 ms of
    # every command, measured 94 -> 83 ms for `--help`).
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()

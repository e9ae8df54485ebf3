"""``lattica relay ...``: reservations on relays and this node's relay service."""

# No `from __future__ import annotations`: typer would eval every annotation string at start-up.
from typing import Annotated

import typer

from cli.arguments import check_dial_string
from cli.daemon_client import HomeOption, JsonOption, call_daemon
from cli.output import print_fields, print_json, print_line
from lattica.control.limits import MAX_PING_TIMEOUT_S

app = typer.Typer(
    help="Circuit relay: reservations this node holds, and its relay service.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _example(*lines: str) -> str:
    # \b keeps click from re-wrapping the example lines into one paragraph.
    return "Example:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


@app.command(epilog=_example("lattica relay status", "lattica relay status --json"))
def status(home: HomeOption = None, json: JsonOption = False) -> None:
    """Reservations held (and the relayed addresses they give), circuits, and the relay service."""
    result = call_daemon(home, "relay.status")
    if json:
        print_json(result)
        return
    service = result["service"]
    rows: list[tuple[str, object]] = [
        ("relay service", "on" if service["enabled"] else "off"),
    ]
    if service["enabled"]:
        rows += [
            ("  reservations", service["reservations"]),
            ("  circuits", service["circuits"]),
            ("  bytes forwarded", service["bytes_forwarded"]),
            *[(f"  refused ({code})", n) for code, n in sorted(service["refusals"].items())],
        ]
    rows += [("reserved on", f"{r['relay']} (expires in {r['expires_in_s']:.0f} s)") for r in result["reservations"]]
    rows += [("relayed address", a) for a in result["relayed_addrs"]]
    rows.append(("circuits", result["circuits"]))
    print_fields(rows)


@app.command(epilog=_example("lattica relay reserve PEERID@198.51.100.7:4001"))
def reserve(
    addr: Annotated[str, typer.Argument(
        metavar="ADDR",
        callback=check_dial_string,
        help="The relay, PEERID@HOST:PORT.",
    )],
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=MAX_PING_TIMEOUT_S, help="Seconds to wait for the relay.")
    ] = 10.0,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Hold a reservation on a relay (renewed until the daemon stops); prints the relayed address."""
    if "@" not in addr:
        raise typer.BadParameter("the relay's peer id is needed: PEERID@HOST:PORT", param_hint="ADDR")
    result = call_daemon(home, "relay.reserve", {"addr": addr, "timeout_s": timeout}, timeout_s=timeout + 5)
    if json:
        print_json(result)
        return
    print_line(result["relayed_addr"])

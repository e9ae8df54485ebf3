"""``lattica state ...``: replicated spaces (signed, access-controlled key/value documents).

SPACE is a space id (52 lowercase base32 characters, as ``state create`` prints it) or the local
name of a space held by this node. Values are text unless ``--json-value`` says they are JSON;
``get`` and ``watch`` hand back what ``set`` stored (``2`` stays ``2``, see lattica.crdt.values).
"""

# No `from __future__ import annotations`: typer would eval every annotation string at start-up
# (typing.get_type_hints, ~25 ms per command on this machine).
import json as json_module
import os
import sys
from typing import Annotated, Any

import typer

from cli.arguments import check_peer_id, check_space_id, check_space_ref, check_state_key, parse_json_value
from cli.daemon_client import HomeOption, JsonOption, call_daemon, resolve_home
from cli.output import print_json, print_line, print_table
from lattica.control.client import subscribe
from lattica.control.limits import MAX_SPACE_NAME_CHARS, MAX_SPACE_WRITERS
from lattica.home_layout import CONTROL_SOCKET

app = typer.Typer(
    help="Replicated spaces: signed key/value documents shared by several nodes (CRDT).",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SpaceArgument = Annotated[
    str, typer.Argument(
        metavar="SPACE",
        callback=check_space_ref,
        help="Space id, or the local name of a space held here.",
    )
]


def _example(*lines: str) -> str:
    # \b keeps click from re-wrapping the example lines into one paragraph.
    return "Example:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _check_name(text: str) -> str:
    if not text or len(text) > MAX_SPACE_NAME_CHARS:
        raise typer.BadParameter(f"a space name is 1 to {MAX_SPACE_NAME_CHARS} characters")
    return text


def _check_writers(texts: list[str] | None) -> list[str] | None:
    if texts and len(texts) > MAX_SPACE_WRITERS:
        raise typer.BadParameter(f"at most {MAX_SPACE_WRITERS} writers at creation; grant more later")
    return None if texts is None else [check_peer_id(t) for t in texts]


def _shown(value: Any) -> str:
    """A value for people: text as it is, everything else as JSON."""
    return value if isinstance(value, str) else json_module.dumps(value, ensure_ascii=False, sort_keys=True)


@app.command(
    epilog=_example(
        "lattica state create catalog",
        "lattica state create shards --writer PEERID --writer PEERID2 --json",
    )
)
def create(
    name: Annotated[str, typer.Argument(
        metavar="NAME",
        callback=_check_name,
        help="Local name of the space (an alias here).",
    )],
    writer: Annotated[
        list[str] | None,
        typer.Option("--writer", callback=_check_writers, help="Peer id allowed to write (repeatable)."),
    ] = None,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Create a space owned by this node; prints its id (share it: others `state join` it)."""
    result = call_daemon(home, "state.create", {"name": name, "writers": writer or []})
    if json:
        print_json(result)
        return
    print_line(result["space_id"])


def _access(method: str, verb: str, space: str, peer: str, home: Any, json: bool) -> None:
    result = call_daemon(home, method, {"space": space, "peer": peer})
    if json:
        print_json(result)
        return
    print_line(f"{peer} {verb} {result['name']} ({result['space_id']}); {len(result['writers'])} writer(s)")


@app.command(epilog=_example("lattica state grant catalog PEERID"))
def grant(
    space: SpaceArgument,
    peer: Annotated[str, typer.Argument(metavar="PEER", callback=check_peer_id, help="Peer id to let write.")],
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Let PEER write to SPACE (owner only; replicas learn it from the owner's signed update)."""
    _access("state.grant", "may write to", space, peer, home, json)


@app.command(epilog=_example("lattica state revoke catalog PEERID"))
def revoke(
    space: SpaceArgument,
    peer: Annotated[str, typer.Argument(metavar="PEER", callback=check_peer_id, help="Peer id to stop.")],
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Stop PEER writing to SPACE (owner only): its updates after the last one accepted here are
    refused by every replica."""
    _access("state.revoke", "may no longer write to", space, peer, home, json)


@app.command("set", epilog=_example(
    "lattica state set catalog model/latest llama-3-8b",
    "lattica state set catalog shards '{\"count\": 4, \"peers\": [\"a\", \"b\"]}' --json-value",
))  # fmt: skip
def set_value(
    space: SpaceArgument,
    key: Annotated[str, typer.Argument(metavar="KEY", callback=check_state_key, help="Key in the space.")],
    value: Annotated[str, typer.Argument(metavar="VALUE", help="The value: text, or JSON with --json-value.")],
    json_value: Annotated[
        bool, typer.Option("--json-value", help="VALUE is JSON (number, bool, null, list, object).")
    ] = False,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Store VALUE at KEY; returns once the signed update is durable in this node's log (it then
    replicates to the space's other nodes)."""
    stored = parse_json_value(value) if json_value else value
    result = call_daemon(home, "state.set", {"space": space, "key": key, "value": stored})
    if json:
        print_json(result)
        return
    print_line(f"stored {key!r} (seq {result['seq']}, {result['update_bytes']} bytes): durable")


@app.command(
    epilog=_example(
        "lattica state get catalog model/latest",
        "lattica state get catalog --json       # every key",
    )
)
def get(
    space: SpaceArgument,
    key: Annotated[
        str | None, typer.Argument(
            metavar="KEY",
            callback=lambda v: None if v is None else check_state_key(v),
            help="Key.",
        )
    ] = None,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Print the value at KEY (text as is, other values as JSON), or every key with its value;
    exit 1 with 'not found' when KEY is absent."""
    params: dict[str, str] = {"space": space}
    if key is not None:
        params["key"] = key
    result = call_daemon(home, "state.get", params)
    if json:
        print_json(result)
        return
    if key is not None:
        print_line(_shown(result["value"]))
        return
    for name, value in sorted(result["values"].items()):
        print_line(f"{name} = {_shown(value)}")


def _change_line(change: dict[str, Any]) -> str:
    author = change["author"][:12] + "…" if change["author"] else "a revoke"
    if change["deleted"]:
        return f"{change['key']} deleted (by {author})"
    return f"{change['key']} = {_shown(change['value'])}  (by {author}, seq {change['seq']})"


@app.command(
    epilog=_example(
        "lattica state watch catalog",
        "lattica state watch catalog --json | jq .key",
    )
)
def watch(space: SpaceArgument, home: HomeOption = None, json: JsonOption = False) -> None:
    """Print every change to SPACE as it arrives (with --json: one JSON object per line) until
    Ctrl-C, which exits 0."""
    try:
        with subscribe(resolve_home(home) / CONTROL_SOCKET, "state.watch", {"space": space}) as subscription:
            started = subscription.started
            # On stderr, so stdout holds only changes; scripts wait for this line.
            sys.stderr.write(f"watching {started['name']} ({started['space_id']}); Ctrl-C stops\n")
            sys.stderr.flush()
            for change in subscription:
                if json:
                    sys.stdout.write(json_module.dumps(change, sort_keys=True) + "\n")
                else:
                    print_line(_change_line(change))
                sys.stdout.flush()
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends: not a failure
    except BrokenPipeError:
        # The reader went away (`... | head -1`): done. Point stdout at /dev/null so the
        # interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@app.command(
    epilog=_example(
        "lattica state join SPACE_ID",
        "lattica state join SPACE_ID --peer OWNER_PEER_ID",
    )
)
def join(
    space_id: Annotated[str, typer.Argument(
        metavar="SPACE_ID",
        callback=check_space_id,
        help="The space id (from `state create`).",
    )],
    peer: Annotated[
        list[str] | None,
        typer.Option(
            "--peer",
            callback=lambda v: None if v is None else [check_peer_id(p) for p in v],
            help="A peer that holds the space, asked first (repeatable; connected or in the DHT).",
            show_default="replicas found in the DHT",
        ),
    ] = None,
    home: HomeOption = None,
    json: JsonOption = False,
) -> None:
    """Replicate a space someone else created: find its replicas, fetch its history, keep it
    in sync from now on."""
    result = call_daemon(home, "state.join", {"space_id": space_id, "peers": peer or []})
    if json:
        print_json(result)
        return
    access = "you may write" if result["can_write"] else "read-only here"
    print_line(f"joined {result['name']} ({result['space_id']}), owner {result['owner'][:12]}…; {access}")


@app.command("ls", epilog=_example("lattica state ls", "lattica state ls --json"))
def list_spaces(home: HomeOption = None, json: JsonOption = False) -> None:
    """Spaces held here: id, name, owner, writers, size, replicas seen."""
    result = call_daemon(home, "state.ls")
    if json:
        print_json(result)
        return
    print_table(
        f"{len(result)} space(s)",
        ["space id", "name", "owner", "writers", "size (bytes)", "replicas seen"],
        [
            [s["space_id"], s["name"], s["owner"], len(s["writers"]), s["size_bytes"], s["replicas_seen"]]
            for s in result
        ],
    )

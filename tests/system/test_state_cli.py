"""Replicated spaces through the CLI on real daemons: a write on one node reaches a watcher on
another, acknowledged writes survive ``kill -9``, a node that was offline catches up, and a node
that may not write is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest

from .conftest import _env, lattica, lattica_json

pytestmark = pytest.mark.system

WAIT_S = 60.0
"""Longest wait for a change to reach a watcher (anti-entropy runs every ~10 s by default)."""


class Watch:
    """A running ``lattica state watch --json``: its change lines arrive on a queue."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: Queue[str | None] = Queue()
        self.started = process.stderr.readline() if process.stderr else ""
        assert self.started.startswith("watching "), self.started
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_change(self) -> dict[str, Any]:
        """The next change line (fails the test after :data:`WAIT_S`)."""
        try:
            line = self.lines.get(timeout=WAIT_S)
        except Empty:
            pytest.fail(f"no change reached the watcher within {WAIT_S:g} s")
        assert line is not None, "the watch ended"
        change: dict[str, Any] = json.loads(line)
        return change

    def wait_for(self, key: str) -> dict[str, Any]:
        """Changes until the one of ``key``."""
        while (change := self.next_change())["key"] != key:
            pass
        return change


@contextmanager
def watching(home: Path, space: str) -> Iterator[Watch]:
    """``lattica state watch SPACE --json``, subscribed when this yields; interrupted on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "state", "watch", space, "--json", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        yield Watch(process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _two_nodes(start_daemon: Any) -> tuple[Any, Any, str]:
    """A owns a space "catalog" in which B may write; B has joined it."""
    a = start_daemon("a")
    b = start_daemon("b", "--bootstrap", a.addr)
    space = lattica_json("state", "create", "catalog", "--writer", b.peer_id, home=a.home)["space_id"]
    joined = lattica_json("state", "join", space, "--peer", a.peer_id, home=b.home)
    assert joined["space_id"] == space and joined["name"] == "catalog" and joined["can_write"]
    return a, b, space


def test_a_set_on_one_node_reaches_a_watch_on_another_and_ctrl_c_ends_it(start_daemon: Any) -> None:
    a, b, space = _two_nodes(start_daemon)
    with watching(b.home, space) as watch:
        assert space in watch.started
        set_out = lattica("state", "set", "catalog", "model/latest", "llama-3-8b", home=a.home)
        assert set_out.returncode == 0 and "durable" in set_out.stdout, set_out.stderr
        lattica_json("state", "set", space, "shards", '{"count": 4, "ratio": 0.5}', "--json-value", home=a.home)
        change = watch.wait_for("model/latest")
        assert (change["value"], change["author"], change["deleted"]) == ("llama-3-8b", a.peer_id, False)
        # What was stored comes back as stored: 4 stays an integer on the other node.
        assert watch.wait_for("shards")["value"] == {"count": 4, "ratio": 0.5}
        watch.process.send_signal(signal.SIGINT)
        assert watch.process.wait(timeout=10) == 0
        assert watch.process.stderr is not None and "Traceback" not in watch.process.stderr.read()
    got = lattica_json("state", "get", space, "shards", home=b.home)
    assert got["value"] == {"count": 4, "ratio": 0.5} and isinstance(got["value"]["count"], int)
    assert lattica("state", "get", space, "model/latest", home=b.home).stdout == "llama-3-8b\n"
    listed = lattica_json("state", "ls", home=b.home)
    assert [(s["space_id"], s["owner"], s["writers"]) for s in listed] == [(space, a.peer_id, [a.peer_id, b.peer_id])]


def test_an_acknowledged_set_survives_kill_9(start_daemon: Any) -> None:
    a = start_daemon("a")
    space = lattica_json("state", "create", "jobs", home=a.home)["space_id"]
    for n in range(5):
        lattica_json("state", "set", "jobs", f"job/{n}", str(n), home=a.home)
    a.stop(signal.SIGKILL)  # right after the last set returned: no clean shutdown
    restarted = start_daemon("a")
    values = lattica_json("state", "get", space, home=restarted.home)["values"]
    assert values == {f"job/{n}": str(n) for n in range(5)}
    assert lattica_json("state", "get", "jobs", "job/4", home=restarted.home)["value"] == "4"  # the name too


def test_a_node_that_was_offline_catches_up(start_daemon: Any) -> None:
    a, b, space = _two_nodes(start_daemon)
    lattica_json("state", "set", space, "before", "1", home=a.home)
    assert b.stop() == 0
    for n in range(10):
        lattica_json("state", "set", space, f"while-offline/{n}", str(n), "--json-value", home=a.home)
    b = start_daemon("b", "--bootstrap", a.addr)
    with watching(b.home, space) as watch:
        # A new write after B is back: B applies each writer's updates in order, so once it shows
        # this one it holds everything written while it was away.
        lattica_json("state", "set", space, "after", "done", home=a.home)
        watch.wait_for("after")
    values = lattica_json("state", "get", space, home=b.home)["values"]
    assert values == {"before": "1", "after": "done", **{f"while-offline/{n}": n for n in range(10)}}


def test_a_node_that_may_not_write_is_refused(start_daemon: Any) -> None:
    a, b, space = _two_nodes(start_daemon)
    c = start_daemon("c", "--bootstrap", a.addr)
    lattica_json("state", "join", space, "--peer", a.peer_id, home=c.home)
    refused = lattica("state", "set", space, "owner", "me", home=c.home)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "may not write" in refused.stderr and "lattica state grant" in refused.stderr
    document = json.loads(lattica("state", "set", space, "owner", "me", "--json", home=c.home).stdout)
    assert document["error"]["code"] == "forbidden"
    # Only the owner changes the writer list.
    not_owner = lattica("state", "grant", space, c.peer_id, home=b.home)
    assert not_owner.returncode == 1 and "only the owner" in not_owner.stderr
    # Granted by the owner, C may write, and the others take its update. C learns of the grant
    # from A; A's writes are applied in A's order, so once C shows A's next write it holds the
    # grant too.
    with watching(c.home, space) as c_watch:
        lattica_json("state", "grant", space, c.peer_id, home=a.home)
        lattica_json("state", "set", space, "granted", "c", home=a.home)
        c_watch.wait_for("granted")
    with watching(b.home, space) as b_watch:
        assert lattica_json("state", "set", space, "from-c", "hello", home=c.home)["author"] == c.peer_id
        assert b_watch.wait_for("from-c")["author"] == c.peer_id
    lattica_json("state", "revoke", space, c.peer_id, home=a.home)
    assert lattica_json("state", "get", space, "from-c", home=a.home)["value"] == "hello"
    assert c.peer_id not in lattica_json("state", "ls", home=a.home)[0]["writers"]


def test_usage_errors_of_state_commands_exit_2(tmp_path: Path) -> None:
    for args in (
        ["state", "join", "not-a-space-id"],
        ["state", "grant", "catalog", "not-a-peer-id"],
        ["state", "create", "catalog", "--writer", "nope"],
        ["state", "create", "n" * 129],
        ["state", "set", "catalog", "k", "{not json", "--json-value"],
        ["state", "set", "catalog", "k", "NaN", "--json-value"],
        ["state", "set", "catalog", "k", "[" * 40 + "]" * 40, "--json-value"],
        ["state", "get", "catalog", "k" * 513],
        ["state", "get", "s" * 129],
    ):
        result = lattica(*args, home=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []  # refused before anything touched the home


def test_every_state_command_has_help_with_an_example() -> None:
    for command in ("create", "grant", "revoke", "set", "get", "watch", "join", "ls"):
        text = lattica("state", command, "--help").stdout
        assert "Example:" in text and "$LATTICA_HOME" in text, command

"""The CLI as a new user meets it: consistent exit codes, help, JSON errors, safe output
(issue 8 C13, C14), and a control socket no client can use to stop the daemon (A2)."""

from __future__ import annotations

import base64
import errno
import json
import os
import pty
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lattica.control import ControlError, call

from .conftest import _env, lattica, lattica_json

pytestmark = pytest.mark.system

COMMANDS = [
    ["init"], ["daemon"], ["id"], ["status"], ["peers"], ["ping"],
    ["dht", "put"], ["dht", "get"], ["dht", "provide"], ["dht", "providers"], ["dht", "routing"],
    ["dht", "bootstrap"],
]  # fmt: skip


def _run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], input=stdin, capture_output=True, timeout=60, env=_env()
    )


def _on_terminal(*args: str) -> bytes:
    """Run a CLI command with stdout on a pseudo-terminal; returns what the terminal received."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args], stdout=terminal, stderr=subprocess.DEVNULL, env=_env()
    )
    os.close(terminal)
    received = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError as exc:  # EIO: the child closed the terminal
            assert exc.errno == errno.EIO
            break
        if not chunk:
            break
        received += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0
    return received


def test_version_alone_and_debug_anywhere(tmp_path: Path) -> None:
    version = lattica("--version")
    assert version.returncode == 0 and version.stdout.startswith("lattica ")
    for args in (["--debug", "id"], ["id", "--debug"]):
        result = lattica(*args, home=tmp_path)
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "no daemon is running" in result.stderr


def test_help_keeps_bracketed_text_and_shows_an_example_everywhere() -> None:
    for command in COMMANDS:
        text = lattica(*command, "--help").stdout
        assert "Example:" in text, command
        assert "$LATTICA_HOME" in text, command
    assert "this node" in lattica("dht", "get", "--help").stdout
    assert "7d" in lattica("dht", "put", "--help").stdout  # the TTL cap


def test_usage_errors_exit_2_everywhere(tmp_path: Path) -> None:
    peer = "a" * 52
    for args in (
        ["dht", "bootstrap", "not-an-address"],
        ["daemon", "--listen", "nowhere"],
        ["daemon", "--bootstrap", "127.0.0.1"],
        ["dht", "get", "key", "--peer", "not-a-peer-id"],
        ["dht", "put", "key", "value", "--ttl", "0.5s"],
        ["dht", "put", "key", "value", "--ttl", "8d"],
        ["dht", "put", "key"],
        ["ping", f"{peer}x@127.0.0.1:1"],
        ["ping", "127.0.0.1:1", "--count", "0"],
        ["dht", "get", "key", "--quorum", "33"],
        ["dht", "get", "k" * 513],
        ["dht", "providers", "c" * 129],
    ):
        result = lattica(*args, home=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_non_utf8_arguments_are_named_as_such(tmp_path: Path) -> None:
    result = _run("dht", "get", os.fsdecode(b"key\xff"), "--home", str(tmp_path))
    assert result.returncode == 2
    assert b"not valid UTF-8" in result.stderr and b"surrogate" not in result.stderr


def test_errors_under_json_are_a_json_document(tmp_path: Path) -> None:
    failed = lattica("status", "--json", home=tmp_path / "nothing")
    assert failed.returncode == 1
    document = json.loads(failed.stdout)
    assert document["ok"] is False and document["error"]["code"] == "daemon-not-running"
    assert document["error"]["hint"]
    usage = lattica("ping", "nowhere", "--json", home=tmp_path)
    assert usage.returncode == 2
    assert json.loads(usage.stdout)["error"]["code"] == "invalid-params"


def test_records_hints_exit_codes_and_values_from_files(start_daemon: Any, tmp_path: Path) -> None:
    seed = start_daemon("a")
    other = start_daemon("b", "--bootstrap", seed.addr)
    lattica_json("dht", "bootstrap", home=other.home)

    # A binary value (not UTF-8) from a file, and a text value from stdin.
    blob = bytes(range(256)) * 200
    (tmp_path / "blob").write_bytes(blob)
    put = lattica_json("dht", "put", "blob", "--file", str(tmp_path / "blob"), home=seed.home)
    assert put["acks"] >= 1
    got = lattica_json("dht", "get", "blob", "--peer", seed.peer_id, home=other.home)
    assert got["encoding"] == "base64" and base64.b64decode(got["value"]) == blob
    redirected = _run("dht", "get", "blob", "--peer", seed.peer_id, "--home", str(other.home))
    assert redirected.returncode == 0 and redirected.stdout == blob
    piped = _run("dht", "put", "text", "-", "--home", str(seed.home), stdin="from stdin ✓".encode())
    assert piped.returncode == 0, piped.stderr
    assert lattica_json("dht", "get", "text", home=seed.home)["value"] == "from stdin ✓"
    too_big = _run("dht", "put", "big", "-", "--home", str(seed.home), stdin=b"x" * (64 * 1024 + 1))
    assert too_big.returncode == 2

    # Another node's record without --peer: not found, and the hint says what to add.
    missing = lattica("dht", "get", "blob", home=other.home)
    assert missing.returncode == 1
    assert "not found" in missing.stderr and "--peer" in missing.stderr

    # No providers: exit 1 with or without --json.
    assert lattica("dht", "providers", "nobody-has-this", home=other.home).returncode == 1
    as_json = lattica("dht", "providers", "nobody-has-this", "--json", home=other.home)
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["error"]["code"] == "not-found"


def test_values_with_escape_sequences_are_shown_escaped_on_a_terminal(start_daemon: Any) -> None:
    writer = start_daemon("a")
    lattica_json("dht", "bootstrap", home=start_daemon("b", "--bootstrap", writer.addr).home)
    hostile = "\x1b]0;owned\x07\x1b[2Jvisible"
    put = _run("dht", "put", "title", "-", "--home", str(writer.home), stdin=hostile.encode())
    assert put.returncode == 0, put.stderr
    shown = _on_terminal("dht", "get", "title", "--home", str(writer.home))
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert b"\\x1b]0;owned\\x07\\x1b[2Jvisible" in shown
    assert lattica_json("dht", "get", "title", home=writer.home)["value"] == hostile  # --json is exact


def test_a_client_that_leaves_before_its_reply_does_not_stop_the_daemon(start_daemon: Any) -> None:
    a = start_daemon("a")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as quitter:  # asks and leaves at once
        quitter.connect(str(a.home / "control.sock"))
        quitter.sendall(b'{"method": "status"}\n')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as quitter:  # leaves while the daemon works
        quitter.connect(str(a.home / "control.sock"))
        quitter.sendall(b'{"method": "ping", "params": {"addr": "127.0.0.1:9", "timeout_s": 0.5}}\n')
    # This ping starts later and waits longer, so the first one's reply has failed by its end.
    with pytest.raises(ControlError) as info:
        call(a.home / "control.sock", "ping", {"addr": "127.0.0.1:9", "timeout_s": 1.0})
    assert info.value.code == "timeout"
    assert a.process.poll() is None
    assert lattica_json("status", home=a.home)["peer_id"] == a.peer_id


def test_a_recreated_identity_over_an_old_database_is_reported(start_daemon: Any) -> None:
    first = start_daemon("a")
    assert first.stop(signal.SIGTERM) == 0
    assert (first.home / "lattica.db").exists()
    (first.home / "identity.key").unlink()
    second = start_daemon("a")
    assert second.peer_id != first.peer_id
    status = lattica_json("status", home=second.home)
    assert any("identity.key was missing" in w for w in status["warnings"])
    assert "identity.key was missing" in lattica("status", home=second.home).stdout


def test_the_daemon_says_what_to_do_next_and_its_commands_work_as_printed(start_daemon: Any) -> None:
    a = start_daemon("a")
    text = "\n".join(a.started.announced)
    assert "Share this address" in text
    assert any(line.strip() == a.addrs[0] for line in a.started.announced)
    status_line = next(line for line in a.started.announced if " status " in line)
    command = status_line.split("#")[0].split()
    assert command[-2:] == ["--home", str(a.home)]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=60, env=_env())
    assert printed.returncode == 0, printed.stderr
    assert a.peer_id in printed.stdout


def test_ping_dials_an_explicit_address_and_says_which_connection_it_used(start_daemon: Any) -> None:
    # Issue 8 B8: with a connection to B open, pinging B's id at a closed port said "pong".
    a = start_daemon("a")
    b = start_daemon("b")
    b_port = int(b.addr.rsplit(":", 1)[1])
    first = lattica("ping", b.addr, "--count", "1", home=a.home)
    assert first.returncode == 0, first.stderr
    assert f"via 127.0.0.1:{b_port}" in first.stdout and "(new connection)" in first.stdout
    again = lattica("ping", b.addr, "--count", "1", "--json", home=a.home)
    assert again.returncode == 0 and json.loads(again.stdout)["reused_connection"] == [True]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    second = lattica("ping", f"{b.peer_id}@127.0.0.1:{closed_port}", "--count", "1", "--json", home=a.home)
    assert second.returncode == 1, second.stdout
    assert json.loads(second.stdout)["error"]["code"] in ("timeout", "failed")

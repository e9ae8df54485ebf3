"""What the CLI prints and how it exits, without a daemon."""

from __future__ import annotations

import pytest
import typer

from cli.arguments import check_dial_string, check_peer_id, parse_duration_s, record_ttl_s
from cli.exit_codes import FAILURE, USAGE, exit_code_for
from cli.output import terminal_safe
from lattica.identity import Identity


def test_terminal_safe_escapes_what_a_terminal_would_interpret() -> None:
    hostile = "ok\x1b]0;pwned\x07\x1b[2J\r\x9b31m\u202egnp.exe\u2066"
    shown = terminal_safe(hostile)
    assert shown == "ok\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x9b31m\\u202egnp.exe\\u2066"
    assert all(ch == "\\" or ch.isprintable() for ch in shown)
    assert terminal_safe("line one\n\tindented, ünïcödé, 模型") == "line one\n\tindented, ünïcödé, 模型"


def test_usage_codes_exit_2_and_everything_else_1() -> None:
    assert exit_code_for("invalid-params") == USAGE
    assert exit_code_for("too-large") == USAGE
    for code in ("not-found", "failed", "timeout", "daemon-not-running", "internal", "something-new"):
        assert exit_code_for(code) == FAILURE


def test_ttl_bounds_are_checked_at_parse() -> None:
    assert parse_duration_s("90s") == 90
    assert record_ttl_s("2d") == 2 * 86400
    for bad in ("0.5s", "0", "8d", "soon"):
        with pytest.raises(typer.BadParameter):
            record_ttl_s(bad)


def test_dial_strings_and_peer_ids_agree_with_the_real_parser() -> None:
    peer = str(Identity.from_seed(b"\x01" * 32).peer_id)
    for good in (f"{peer}@127.0.0.1:4001", "127.0.0.1:4001", "[::1]:4001", "node.example:1"):
        assert check_dial_string(good) == good
    assert check_peer_id(peer) == peer
    non_canonical = peer[:-1] + ("b" if peer[-1] != "b" else "c")
    for bad in ("127.0.0.1", "127.0.0.1:99999", f"{peer.upper()}@127.0.0.1:1", "a b:1", f"{peer[:-1]}@h:1"):
        with pytest.raises(typer.BadParameter):
            check_dial_string(bad)
    with pytest.raises(typer.BadParameter):
        check_peer_id(non_canonical)

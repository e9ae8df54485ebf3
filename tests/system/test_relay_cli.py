"""Three real daemons on loopback: a relay (``--relay-service``), a node that reserves on it, and
a node that pings through it -- only through the ``lattica`` CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import lattica, lattica_json

pytestmark = pytest.mark.system


def without_hole_punching(home: Path) -> None:
    """Initialise ``home`` with ``[nat.hole_punch] enabled = false``: on loopback nothing stops a
    hole punch, which would move the pair off the relay before ``peers`` is read."""
    assert lattica("init", home=home).returncode == 0
    config = home / "config.toml"
    head, section, tail = config.read_text().partition("[nat.hole_punch]\n")
    assert section and "# enabled = true" in tail
    config.write_text(head + section + tail.replace("# enabled = true", "enabled = false", 1))


def test_ping_through_a_relay_and_peers_shows_the_relayed_path(start_daemon: Any, tmp_path: Path) -> None:
    relay = start_daemon("relay", "--relay-service")
    without_hole_punching(tmp_path / "b")
    b = start_daemon("b")
    a = start_daemon("a")

    reserved = lattica_json("relay", "reserve", relay.addr, home=b.home)
    relayed = reserved["relayed_addr"]
    assert relayed == f"{relay.addr}/relay/{b.peer_id}"
    assert relayed in lattica_json("id", home=b.home)["addrs"]
    assert lattica_json("nat", home=b.home)["relay_reservations"] == [relayed]

    result = lattica("ping", relayed, "--count", "2", home=a.home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("relayed via") == 2

    peers = {p["peer_id"]: p for p in lattica_json("peers", home=a.home)}
    assert peers[b.peer_id]["path"] == "relayed" and peers[b.peer_id]["via"] == relay.peer_id
    assert peers[relay.peer_id]["path"] == "direct" and peers[relay.peer_id]["via"] is None
    assert peers[b.peer_id]["connected_s"] >= 0
    status = lattica_json("status", home=a.home)
    assert status["connected_peers"] == 2 and status["relayed_only_peers"] == 1
    assert "1 through a relay only" in lattica("status", home=a.home).stdout

    status = lattica_json("relay", "status", home=relay.home)
    assert status["service"]["enabled"] is True
    assert status["service"]["reservations"] == 1 and status["service"]["circuits_opened"] == 1
    assert status["service"]["bytes_forwarded"] > 0


def test_relay_refusals_are_one_line_failures(start_daemon: Any) -> None:
    plain = start_daemon("plain")  # no --relay-service
    b = start_daemon("b")
    a = start_daemon("a")
    refused = lattica("relay", "reserve", plain.addr, "--timeout", "2", home=b.home)
    assert refused.returncode == 1 and "no reservation" in refused.stderr
    # b holds no reservation on plain: the circuit request gets a typed refusal.
    ping = lattica("ping", f"{plain.addr}/relay/{b.peer_id}", "--count", "1", home=a.home)
    assert ping.returncode == 1
    error, hint = ping.stderr.strip().splitlines()
    assert error.startswith("error: could not reach") and "service-disabled" in error
    assert "--relay-service" in hint
    usage = lattica("ping", f"{plain.addr}/relay/nonsense", home=a.home)
    assert usage.returncode == 2

"""Three real daemons on loopback: a relay (``--relay-service``), a node that reserves on it, and
a node that pings through it -- only through the ``lattica`` CLI."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import lattica, lattica_json

pytestmark = pytest.mark.system


def test_ping_through_a_relay_and_peers_shows_the_relayed_path(start_daemon: Any) -> None:
    relay = start_daemon("relay", "--relay-service")
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

"""Two real daemons on loopback, started and queried only through the ``lattica`` CLI."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from lattica.identity import Identity
from lattica.net.address import PeerAddr

from .conftest import lattica, lattica_json

pytestmark = pytest.mark.system


def test_ping_and_peers_between_two_daemons(start_daemon: Any) -> None:
    a = start_daemon("a")
    b = start_daemon("b")

    result = lattica("ping", b.addr, "--count", "3", home=a.home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("rtt=") == 3

    peers_a = lattica_json("peers", home=a.home)
    peers_b = lattica_json("peers", home=b.home)
    assert [(p["peer_id"], p["direction"]) for p in peers_a] == [(b.peer_id, "outbound")]
    assert [(p["peer_id"], p["direction"]) for p in peers_b] == [(a.peer_id, "inbound")]
    assert peers_a[0]["rtt_ms"] is not None and peers_a[0]["rtt_ms"] > 0

    status = lattica_json("status", home=a.home)
    assert status["connected_peers"] == 1
    assert status["peer_id"] == a.peer_id
    assert status["uploads"] == {"held": 0, "max": 32, "preempted": 0}
    text = lattica("status", home=a.home)
    assert text.returncode == 0 and "uploads" in text.stdout and "0 of 32" in text.stdout


def test_id_reports_dialable_addresses(start_daemon: Any) -> None:
    a = start_daemon("a")
    ident = lattica_json("id", home=a.home)
    assert ident["peer_id"] == a.peer_id
    parsed = [PeerAddr.parse(s) for s in ident["addrs"]]
    assert parsed and all(str(p.peer_id) == a.peer_id for p in parsed)
    assert ("127.0.0.1", parsed[0].address[1]) in [p.address for p in parsed]


def test_ping_with_wrong_peer_id_fails_clearly(start_daemon: Any) -> None:
    a = start_daemon("a")
    b = start_daemon("b")
    impostor = Identity.from_seed(b"\x07" * 32).peer_id
    port = PeerAddr.parse(b.addr).address[1]
    result = lattica("ping", f"{impostor}@127.0.0.1:{port}", "--count", "1", home=a.home)
    assert result.returncode == 1
    # One line naming both the id we asked for and the one that answered.
    assert str(impostor) in result.stderr and b.peer_id in result.stderr
    assert "Traceback" not in result.stderr


def test_ping_by_host_port_learns_the_peer_id(start_daemon: Any) -> None:
    a = start_daemon("a")
    b = start_daemon("b")
    host_port = b.addr.split("@", 1)[1]
    out = lattica_json("ping", host_port, "--count", "1", home=a.home)
    assert out["peer_id"] == b.peer_id


def test_sigterm_shuts_down_cleanly_with_a_live_connection(start_daemon: Any) -> None:
    # How long shutdown takes is measured by bench/daemon.py; the timeout is only a hang guard.
    a = start_daemon("a")
    b = start_daemon("b")
    assert lattica("ping", b.addr, "--count", "1", home=a.home).returncode == 0
    assert a.stop(signal.SIGTERM, timeout_s=60) == 0
    assert not (a.home / "control.sock").exists()


def test_client_commands_say_when_no_daemon_runs(tmp_path: Path) -> None:
    for command in (["id"], ["status"], ["peers"], ["ping", "127.0.0.1:9"]):
        result = lattica(*command, home=tmp_path / "nothing")
        assert result.returncode == 1
        assert "no daemon is running" in result.stderr


def test_second_daemon_on_same_home_is_refused(start_daemon: Any) -> None:
    a = start_daemon("a")
    result = lattica("daemon", "--listen", "127.0.0.1:0", home=a.home, timeout_s=30)
    assert result.returncode == 1
    assert "already running" in result.stderr
    # The first daemon is unharmed.
    assert lattica_json("status", home=a.home)["peer_id"] == a.peer_id


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert lattica("ping", home=tmp_path).returncode == 2
    assert lattica("ping", "not-an-address", home=tmp_path).returncode == 2
    assert lattica("ping", "127.0.0.1:9", "--count", "0", home=tmp_path).returncode == 2
    assert lattica("no-such-command").returncode == 2


def test_control_socket_and_key_are_private(start_daemon: Any) -> None:
    a = start_daemon("a")
    assert (a.home / "control.sock").stat().st_mode & 0o777 == 0o600
    assert (a.home / "identity.key").stat().st_mode & 0o777 == 0o600


def test_nat_reports_the_address_a_peer_sees(start_daemon: Any) -> None:
    a = start_daemon("a")
    b = start_daemon("b")
    b_address = PeerAddr.parse(b.addr).address
    a_port = PeerAddr.parse(a.addr).address[1]
    out = lattica_json("nat", f"127.0.0.1:{b_address[1]}", home=a.home)
    # On loopback there is no NAT: b sees a's own socket address.
    assert out["observed_addr"] == f"127.0.0.1:{a_port}"
    assert out["asked"] == f"127.0.0.1:{b_address[1]}"
    text = lattica("nat", b.addr, home=a.home)
    assert text.returncode == 0 and f"observed address: 127.0.0.1:{a_port}" in text.stdout
    bad = lattica("nat", "localhost:4001", home=a.home)
    assert bad.returncode != 0 and "IP" in bad.stderr
    # Without an address: reachability. Peers on one loopback address are one observer, so
    # nothing is believed and the node keeps serving the DHT.
    status = lattica_json("nat", home=a.home)
    assert status["reachability"] == "unknown" and status["observed_addrs"] == []
    assert status["dht_mode"] == "server" and status["relay_reservations"] == []
    assert status["mapping"] == "unknown" and status["observers"] <= 1
    text = lattica("nat", home=a.home)
    assert text.returncode == 0 and "reachability" in text.stdout and "unknown" in text.stdout

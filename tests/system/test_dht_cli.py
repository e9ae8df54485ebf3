"""Five real daemons on loopback: DHT records and provider records through the CLI, kill -9 safe."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from .conftest import lattica, lattica_json

pytestmark = pytest.mark.system


def _start_cluster(start_daemon: Any, count: int) -> list[Any]:
    seed = start_daemon("d0")
    return [seed] + [start_daemon(f"d{i}", "--bootstrap", seed.addr) for i in range(1, count)]


def _wait_until_routing_has_peers(daemon: Any, minimum: int) -> None:
    # Bootstrap is asynchronous; `dht bootstrap` blocks until the node has joined (an event).
    out = lattica_json("dht", "bootstrap", home=daemon.home)
    assert out["peers"] >= minimum, out


def test_put_on_one_get_on_another_and_survive_kill_9(start_daemon: Any) -> None:
    daemons = _start_cluster(start_daemon, 5)
    for daemon in daemons[1:]:
        _wait_until_routing_has_peers(daemon, 1)

    writer, reader = daemons[1], daemons[3]
    put = lattica_json("dht", "put", "model/latest", "sha256:abc", "--ttl", "1h", home=writer.home)
    assert put["acks"] >= 1

    got = lattica_json("dht", "get", "model/latest", "--peer", writer.peer_id, home=reader.home)
    assert got["value"] == "sha256:abc"
    assert got["writer"] == writer.peer_id

    missing = lattica("dht", "get", "no/such/key", "--peer", writer.peer_id, home=reader.home)
    assert missing.returncode == 1
    assert "not found" in missing.stderr

    # Newer sequence wins, also when the answer waits for the newest of four copies.
    lattica_json("dht", "put", "model/latest", "sha256:def", home=writer.home)
    got = lattica_json("dht", "get", "model/latest", "--peer", writer.peer_id, home=reader.home)
    assert got["value"] == "sha256:def"
    got = lattica_json("dht", "get", "model/latest", "--peer", writer.peer_id, "--quorum", "4", home=reader.home)
    assert got["value"] == "sha256:def" and got["copies_found"] >= 4
    assert lattica("dht", "get", "model/latest", "--quorum", "0", home=reader.home).returncode == 2
    # Five nodes hold at most five copies: asking for more fails and says how many were found.
    too_many = lattica("dht", "get", "model/latest", "--peer", writer.peer_id, "--quorum", "32", home=reader.home)
    assert too_many.returncode == 1 and "fewer than the 32 asked for" in too_many.stderr, too_many.stderr

    # kill -9 a node that holds the record, restart it on the same home: its records are back.
    holder = daemons[2]
    local = lattica_json("dht", "get", "model/latest", "--peer", writer.peer_id, "--local", home=holder.home)
    assert local["value"] == "sha256:def"
    holder.stop(signal.SIGKILL)
    restarted = start_daemon("d2")
    again = lattica_json("dht", "get", "model/latest", "--peer", writer.peer_id, "--local", home=restarted.home)
    assert again["value"] == "sha256:def"


def test_provide_and_find_providers(start_daemon: Any) -> None:
    daemons = _start_cluster(start_daemon, 5)
    for daemon in daemons[1:]:
        _wait_until_routing_has_peers(daemon, 1)
    provider = daemons[4]
    out = lattica_json("dht", "provide", "bafy-test-cid", home=provider.home)
    assert out["acks"] >= 1
    found = lattica_json("dht", "providers", "bafy-test-cid", home=daemons[1].home)
    assert [p["peer_id"] for p in found] == [provider.peer_id]
    assert any(a.endswith(provider.addr.split("@")[1]) for a in found[0]["addrs"])
    routing = lattica_json("dht", "routing", home=daemons[1].home)
    assert sum(len(b["peers"]) for b in routing["buckets"]) >= 1

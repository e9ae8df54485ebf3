"""Hole punching through real Linux NATs, driven only through real daemons and the CLI.

``pub1`` runs the relay service; ``cone2-pc`` and ``sym-pc`` reserve on it (``lattica relay
reserve``); ``cone1-pc`` pings each through its relayed address. The target accepted the relayed
connection, so it starts hole punching: between the two endpoint-independent NATs the pair must
end on a direct connection (``lattica peers --json`` shows ``path: direct`` and how long it
took); with the endpoint-dependent (``fully-random``) NAT on one side the pair must keep a
working connection, relayed or direct.

Daemons here are separate processes: there is no event to wait on from the test, so the one
wait below polls ``lattica peers --json`` with a deadline (the hole punch itself takes well
under a second inside the testbed).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from lattica.control.client import call
from lattica.control.errors import ControlError
from lattica.nat.relay_record import RELAYED_ADDRESSES_KEY
from tests.netns.harness import NetnsDaemon, poll_daemon, require_netns, start_daemon_in, stop_daemons

pytestmark = pytest.mark.netns

DIRECT_WITHIN_S = 20.0
RECORD_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def punch_daemons(netns_bed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NetnsDaemon]]:
    """pub1 with the relay service (and the DHT's bootstrap peer), and one daemon behind each
    NAT; stopped afterwards. cone2-pc and sym-pc join the DHT through pub1; cone1-pc does not:
    two cone hosts both in the DHT may dial each other at once during their lookups, and such a
    simultaneous open is already a (lucky) hole punch -- the first test wants ours."""
    require_netns()
    homes = tmp_path_factory.mktemp("punch-homes")
    names = ["cone1-pc", "cone2-pc", "sym-pc"]
    daemons: dict[str, NetnsDaemon] = {}
    try:
        daemons["pub1"] = start_daemon_in(netns_bed.hosts["pub1"], homes / "pub1", "--relay-service")
        extra = {name: ("--bootstrap", daemons["pub1"].dial) for name in ("cone2-pc", "sym-pc")}
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            futures = {
                name: pool.submit(start_daemon_in, netns_bed.hosts[name], homes / name, *extra.get(name, ()))
                for name in names
            }
            errors = []
            for name, future in futures.items():
                try:
                    daemons[name] = future.result()
                except Exception as exc:
                    errors.append(f"{name}: {exc}")
        if errors:
            pytest.fail(f"daemons did not start: {errors}")
        yield daemons
    finally:
        stop_daemons(list(daemons.values()))


def _rows_for(daemon: NetnsDaemon, peer_id: str) -> list[dict[str, Any]]:
    return [row for row in daemon.peer_rows() if row["peer_id"] == peer_id]


def _wait_direct(daemon: NetnsDaemon, peer_id: str) -> dict[str, Any]:
    def direct() -> dict[str, Any] | None:
        rows = [row for row in _rows_for(daemon, peer_id) if row["path"] == "direct"]
        return rows[0] if rows else None

    return poll_daemon(direct, within_s=DIRECT_WITHIN_S, what=f"a direct connection to {peer_id}")


def _relayed_address(target: NetnsDaemon, relay: NetnsDaemon) -> str:
    reserved = target.cli("relay", "reserve", relay.dial)
    relayed: str = reserved["relayed_addr"]
    assert relayed == f"{relay.dial}/relay/{target.peer_id}"
    return relayed


def test_two_cone_nats_punch_through_to_a_direct_connection(
    netns_bed: Any, punch_daemons: dict[str, NetnsDaemon]
) -> None:
    relay, a, b = punch_daemons["pub1"], punch_daemons["cone1-pc"], punch_daemons["cone2-pc"]
    relayed = _relayed_address(b, relay)
    pong = a.cli("ping", relayed, "--count", "1")
    assert pong["peer_id"] == b.peer_id
    assert pong["via"] == relay.peer_id
    row = _wait_direct(a, b.peer_id)
    # The direct connection comes from b's NAT's public address, not through the relay.
    assert row["via"] is None
    assert row["remote_addr"].startswith(netns_bed.nats["cone2"].public_ip + ":")
    # b initiated (it accepted the relayed connection) and recorded how long it took.
    b_row = _wait_direct(b, a.peer_id)
    assert b_row["direct_after_s"] is not None and 0 < b_row["direct_after_s"] < DIRECT_WITHIN_S
    assert b_row["remote_addr"].startswith(netns_bed.nats["cone1"].public_ip + ":")
    # A ping by b's direct address now goes straight there.
    again = a.cli("ping", f"{b.peer_id}@{row['remote_addr']}", "--count", "1")
    assert again["peer_id"] == b.peer_id and again.get("via") is None


def test_a_symmetric_nat_on_one_side_still_gets_a_working_connection(
    netns_bed: Any, punch_daemons: dict[str, NetnsDaemon]
) -> None:
    relay, a, s = punch_daemons["pub1"], punch_daemons["cone1-pc"], punch_daemons["sym-pc"]
    relayed = _relayed_address(s, relay)
    first = a.cli("ping", relayed, "--count", "1")
    assert first["peer_id"] == s.peer_id
    rows = _rows_for(a, s.peer_id)
    assert rows, "no connection to the peer behind the symmetric NAT"
    # Whatever the hole punch gave, the peer answers over the connection a holds.
    second = a.cli("ping", relayed, "--count", "1")
    assert second["peer_id"] == s.peer_id
    assert {row["path"] for row in _rows_for(a, s.peer_id)} <= {"direct", "relayed"}


def test_ping_by_peer_id_alone_reaches_a_nated_host_through_its_published_relay(
    netns_bed: Any, punch_daemons: dict[str, NetnsDaemon]
) -> None:
    # cone2-pc holds a reservation on pub1 since the first test and published its relayed
    # address in the DHT; sym-pc never talked to it and knows nothing but its peer id.
    s, b, relay = punch_daemons["sym-pc"], punch_daemons["cone2-pc"], punch_daemons["pub1"]
    assert b.peer_id not in {row["peer_id"] for row in s.peer_rows()}
    # Both join the DHT only once their first lookups' dials to each other's (filtered) public
    # addresses time out (~10 s; reachability is still "unknown" with one observer), and b
    # publishes after that: wait for its record to be readable from s.
    params = {"key": RELAYED_ADDRESSES_KEY.decode(), "peer": b.peer_id}

    def record_readable() -> bool | None:
        try:
            call(s.started.control_socket, "dht.get", params, timeout_s=RECORD_WITHIN_S)
        except ControlError:
            return None
        return True

    poll_daemon(
        record_readable,
        within_s=RECORD_WITHIN_S,
        what=f"{b.peer_id}'s relayed-address record in the DHT",
        every_s=0.5,
    )
    result = call(s.started.control_socket, "ping", {"addr": b.peer_id, "timeout_s": 30.0}, timeout_s=40.0)
    assert result["peer_id"] == b.peer_id
    # A symmetric NAT on the dialling side: relayed through pub1 (or direct, if punched).
    rows = _rows_for(s, b.peer_id)
    assert rows and all(row["via"] in (None, relay.peer_id) for row in rows)

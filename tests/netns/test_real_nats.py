"""Real ``lattica daemon`` processes behind real Linux NATs (nftables masquerade in namespaces).

What exists today is checked against what the kernel does: the addresses STUN observes through
an endpoint-independent and an endpoint-dependent NAT, that a NAT lets replies in and nothing
else, and that two hosts behind different NATs cannot simply dial each other (the baseline hole
punching has to beat). Topology: ``deploy/netns/testbed.py`` ``DEFAULT_TOPOLOGY``.

Which host talks to which matters, because every exchange leaves state behind: a NAT keeps a
UDP mapping for 30 s after the last packet (120 s once both sides sent several), and it lets
replies from that peer in. ``cone1-pc`` asks both public hosts (STUN only, no connection);
``cone2-pc`` talks only to ``pub1``, so ``pub2`` is an outsider to it; ``cone1-pc`` and
``cone2-pc`` meet only in the last test.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.netns.harness import DAEMON_PORT, NetnsDaemon

pytestmark = pytest.mark.netns


def _split(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    return host, int(port)


def _observed(daemon: NetnsDaemon, asked: NetnsDaemon) -> tuple[str, int]:
    """``daemon``'s address as ``asked`` sees it (``lattica nat IP:PORT --json``)."""
    result = daemon.cli("nat", asked.address)
    assert result["local_addr"] == daemon.address  # the node's own socket stays private
    return _split(result["observed_addr"])


def test_endpoint_independent_nat_shows_one_public_address_to_every_peer(
    netns_bed: Any, netns_daemons: dict[str, NetnsDaemon]
) -> None:
    pc, pub1, pub2 = netns_daemons["cone1-pc"], netns_daemons["pub1"], netns_daemons["pub2"]
    seen_by_pub1 = _observed(pc, pub1)
    seen_by_pub2 = _observed(pc, pub2)
    assert seen_by_pub1 == seen_by_pub2
    assert seen_by_pub1[0] == netns_bed.nats["cone1"].public_ip


def test_endpoint_dependent_nat_shows_a_new_port_to_each_peer(
    netns_bed: Any, netns_daemons: dict[str, NetnsDaemon]
) -> None:
    pc, pub1, pub2 = netns_daemons["sym-pc"], netns_daemons["pub1"], netns_daemons["pub2"]
    seen_by_pub1 = _observed(pc, pub1)
    seen_by_pub2 = _observed(pc, pub2)
    public_ip = netns_bed.nats["sym"].public_ip
    assert seen_by_pub1[0] == seen_by_pub2[0] == public_ip
    # fully-random draws each port from ~64,000: equal ports by chance about once in 64,000 runs.
    assert seen_by_pub1[1] != seen_by_pub2[1]
    # One mapping per destination, kept while in use (not a new port per packet).
    assert _observed(pc, pub1) == seen_by_pub1


def test_nated_node_reaches_a_public_node_but_is_unreachable_from_outside(
    netns_bed: Any, netns_daemons: dict[str, NetnsDaemon]
) -> None:
    pc, pub1, outsider = netns_daemons["cone2-pc"], netns_daemons["pub1"], netns_daemons["pub2"]
    public = f"{netns_bed.nats['cone2'].public_ip}:{_observed(pc, pub1)[1]}"

    pong = pc.cli("ping", pub1.dial, "--count", "1")
    assert pong["peer_id"] == pub1.peer_id
    assert pong["addr"] == pub1.address
    # pub1 sees the connection come from the NAT's public address, the same mapping STUN saw.
    assert [r["remote_addr"] for r in pub1.peer_rows() if r["peer_id"] == pc.peer_id] == [public]

    # The outsider never heard from pc. pc's NAT drops what it sends to pc's public address (the
    # mapping is open only toward pub1) and to pc's private address (public hosts have a route to
    # it through the NAT, so only the NAT's filter stops it). Both dials run at once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = list(pool.map(outsider.ping_error, [f"{pc.peer_id}@{public}", pc.dial]))
    assert errors == ["timeout", "timeout"]
    assert pc.peer_id not in {r["peer_id"] for r in outsider.peer_rows()}


def test_two_private_hosts_cannot_dial_each_other_until_one_opens_its_nat(
    netns_bed: Any, netns_daemons: dict[str, NetnsDaemon]
) -> None:
    a, b, pub1 = netns_daemons["cone1-pc"], netns_daemons["cone2-pc"], netns_daemons["pub1"]
    a_public = f"{_observed(a, pub1)[0]}:{_observed(a, pub1)[1]}"
    b_public = f"{_observed(b, pub1)[0]}:{_observed(b, pub1)[1]}"
    assert b_public == f"{netns_bed.nats['cone2'].public_ip}:{DAEMON_PORT}"  # masquerade kept the port

    # a dials b's public address (b's NAT drops it: nothing from b went to a) and b's private
    # address (a's NAT has no route to another private network). Both at once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = list(pool.map(a.ping_error, [f"{b.peer_id}@{b_public}", b.dial]))
    assert errors == ["timeout", "timeout"]
    assert b.peer_id not in {r["peer_id"] for r in a.peer_rows()}

    # a's failed dial opened a's NAT toward b's public address (conntrack keeps an unanswered
    # UDP mapping ~30 s). b's dial to a's public address now arrives as the reply to it: the
    # simplest hole punch, which works only because both NATs map endpoint-independently and
    # b's NAT dropped a's packets instead of recording them (FIELD-NOTES.md).
    pong = b.cli("ping", f"{a.peer_id}@{a_public}", "--count", "1")
    assert pong["peer_id"] == a.peer_id
    assert [r["remote_addr"] for r in a.peer_rows() if r["peer_id"] == b.peer_id] == [b_public]

"""The netns testbed's plan, checked without root: names, addresses, rulesets, refusals.

``plan_testbed`` is pure, so what the real-kernel tests rely on (unique names per run, nothing in
the root namespace, the filter that makes a NAT a home router) is checked here on every machine.
"""

from __future__ import annotations

import ipaddress
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.deploy_testbed import testbed as tb

PREFIX = "ltb-4242-beef"


def test_every_namespace_carries_the_run_prefix_and_two_runs_never_share_one() -> None:
    first, second = tb.plan_testbed(), tb.plan_testbed()
    assert first.prefix != second.prefix
    assert not set(first.namespaces) & set(second.namespaces)
    for bed in (first, second):
        assert all(ns.startswith(f"{bed.prefix}-") for ns in bed.namespaces)
        assert len(set(bed.namespaces)) == len(bed.namespaces)


def test_the_prefix_names_its_owner_process() -> None:
    assert re.fullmatch(r"ltb-777-[0-9a-f]{4}", tb.new_prefix(777))


def test_default_topology_addresses() -> None:
    bed = tb.plan_testbed(prefix=PREFIX)
    assert [h.ip for h in bed.public_hosts()] == ["198.18.0.11", "198.18.0.12"]
    assert {name: (n.public_ip, n.lan_subnet, n.mapping) for name, n in bed.nats.items()} == {
        "cone1": ("198.18.0.101", "10.0.1.0/24", "endpoint-independent"),
        "cone2": ("198.18.0.102", "10.0.2.0/24", "endpoint-independent"),
        "sym": ("198.18.0.103", "10.0.3.0/24", "endpoint-dependent"),
    }
    assert bed.hosts["cone1-pc"].ip == "10.0.1.11"
    assert bed.hosts["cone1-pc"].exec_prefix() == ["ip", "netns", "exec", f"{PREFIX}-cone1-pc"]


def test_public_hosts_route_to_private_subnets_so_only_the_nat_filter_keeps_them_out() -> None:
    bed = tb.plan_testbed(prefix=PREFIX)
    pub1_setup = next(s for s in bed.steps if s.description == "set up host pub1")
    for nat in bed.nats.values():
        assert f"route add {nat.lan_subnet} via {nat.public_ip}\n" in pub1_setup.stdin


def test_nothing_is_created_in_the_root_namespace() -> None:
    bed = tb.plan_testbed(prefix=PREFIX)
    assert bed.steps[0].stdin == "".join(f"netns add {ns}\n" for ns in bed.namespaces)
    veths = next(s for s in bed.steps if s.description == "create the veth pairs")
    for line in veths.stdin.splitlines():
        # both ends are created straight inside testbed namespaces
        assert re.fullmatch(rf"link add \S+ netns {PREFIX}-\S+ type veth peer name \S+ netns {PREFIX}-\S+", line)
    for step in bed.steps[2:]:
        assert step.argv[:3] in (("ip", "-n", step.argv[2]), ("ip", "netns", "exec"))
        assert f"{PREFIX}-" in step.argv[2] or f"{PREFIX}-" in step.argv[3]


@pytest.mark.parametrize("mapping", ["endpoint-independent", "endpoint-dependent"])
def test_every_nat_drops_unsolicited_inbound_like_a_home_router(mapping: str) -> None:
    rules = tb.nat_ruleset(mapping)
    for hook in ("input", "forward"):
        chain = rules.split(f"chain {hook} {{")[1].split("}")[0]
        assert f"type filter hook {hook} priority filter; policy drop;" in chain
        assert "ct state established,related accept" in chain
    assert ("masquerade fully-random" in rules) == (mapping == "endpoint-dependent")


def test_each_nat_loads_the_ruleset_of_its_mapping() -> None:
    bed = tb.plan_testbed(prefix=PREFIX)
    for nat in bed.nats.values():
        step = next(s for s in bed.steps if s.description == f"load NAT {nat.name}'s nftables rules")
        assert step.argv == ("ip", "netns", "exec", nat.netns, "nft", "-f", "-")
        assert step.stdin == tb.nat_ruleset(nat.mapping)


def test_describe_is_json() -> None:
    described = json.loads(json.dumps(tb.plan_testbed(prefix=PREFIX).describe()))
    assert described["hosts"]["sym-pc"] == {
        "name": "sym-pc",
        "netns": f"{PREFIX}-sym-pc",
        "ip": "10.0.3.11",
        "nat": "sym",
    }
    assert described["namespaces"][0] == f"{PREFIX}-sw"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (tb.TopologySpec(("pub1", "pub1"), ()), "unique"),
        (tb.TopologySpec(("Pub",), ()), "bad testbed name"),
        (tb.TopologySpec(("sw",), ()), "bad testbed name"),
        (tb.TopologySpec(("nat-x",), ()), "bad testbed name"),
        (tb.TopologySpec(("a" * 17,), ()), "bad testbed name"),
        (tb.TopologySpec((), ()), "public hosts"),
        (tb.TopologySpec(("pub1",), (tb.NatSpec("n", "endpoint-independent", ()),)), "hosts"),
        (tb.TopologySpec(("pub1",), (tb.NatSpec("n", "endpoint-independent", ("n",)),)), "unique"),
    ],
)
def test_bad_specs_are_refused(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tb.plan_testbed(spec, PREFIX)


@pytest.mark.parametrize("prefix", ["ltb-1-abc", "xyz-1-abcd", "ltb-1-abcd-", "ltb--abcd", "ltb-1-ABCD"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        tb.plan_testbed(prefix=prefix)


def test_missing_tools_name_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    assert tb.missing_tools() == [
        "`ip` not found: install the Debian package iproute2 (apt-get install -y iproute2)",
        "`nft` not found: install the Debian package nftables (apt-get install -y nftables)",
    ]
    with pytest.raises(tb.MissingToolError, match="nftables"):
        tb.build(prefix=PREFIX)


def test_teardown_of_namespaces_that_do_not_exist_does_nothing() -> None:
    tb.teardown([f"{PREFIX}-never-made"])


_names = st.text("abcdefghij", min_size=1, max_size=6)


@given(
    public=st.lists(_names, min_size=1, max_size=4, unique=True),
    nats=st.lists(
        st.tuples(st.sampled_from(["endpoint-independent", "endpoint-dependent"]), st.integers(1, 3)),
        max_size=4,
    ),
)
def test_any_valid_spec_gets_unique_names_and_addresses(public: list[str], nats: list[tuple[str, int]]) -> None:
    spec = tb.TopologySpec(
        tuple(f"p{name}" for name in public),
        tuple(
            tb.NatSpec(f"n{j}", mapping, tuple(f"h{j}x{k}" for k in range(count)))
            for j, (mapping, count) in enumerate(nats)
        ),
    )
    bed = tb.plan_testbed(spec, PREFIX)
    ips = [h.ip for h in bed.hosts.values()] + [n.public_ip for n in bed.nats.values()]
    ips += [n.lan_ip for n in bed.nats.values()]
    assert len(set(ips)) == len(ips)
    assert len(set(bed.namespaces)) == len(bed.namespaces) == 1 + len(nats) + len(public) + sum(c for _, c in nats)
    for host in bed.hosts.values():
        subnet = tb.PUBLIC_SUBNET if host.nat is None else ipaddress.ip_network(bed.nats[host.nat].lan_subnet)
        assert ipaddress.ip_address(host.ip) in subnet

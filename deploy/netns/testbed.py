#!/usr/bin/env python3
"""Real NATs in Linux network namespaces: build, describe and tear down a testbed.

Needs root and the Debian packages ``iproute2`` (``ip``) and ``nftables`` (``nft``); nothing
else (standard library only, no import of ``lattica``), so scripts, tests and benchmarks can
all use it. As a script (``deploy/netns/testbed.py --help``) it builds a testbed for a shell
session, runs one command inside a testbed's lifetime, or removes testbeds; as a module,
``with testbed() as bed: ...`` does the same for Python.

Layout of the default topology (every box is its own network namespace)::

    pub1 198.18.0.11   pub2 198.18.0.12                  the "internet": one bridge (br0)
          \\              /                              in namespace "sw", 198.18.0.0/24
           +---- sw ----+-------------+
           |            |             |
    nat-cone1 .101  nat-cone2 .102  nat-sym .103      wan side: 198.18.0.(100+j)
     masquerade      masquerade      masquerade         (cone: endpoint-independent mapping,
           |            |          fully-random          sym: endpoint-dependent mapping)
    cone1-pc 10.0.1.11  cone2-pc 10.0.2.11  sym-pc 10.0.3.11   lan side: 10.0.j.0/24

Every NAT filters like a home router (FIELD-NOTES.md, "Real NATs in network namespaces"): its
``input`` and ``forward`` chains have policy drop and accept only ``ct state
established,related`` and what comes from its LAN. Without that, an early unsolicited packet
creates a conntrack entry that clashes with a later outbound mapping and masquerade picks
another port (hole punching then fails for a reason no real router has). Public hosts get a
route to every private subnet through its NAT, like a neighbour on the ISP's segment: so a
private host is unreachable from outside because the NAT filters, not because a route is
missing.

Invariants:

* Every namespace name starts with the run's prefix ``ltb-<owner pid>-<4 hex>-``: parallel runs
  never clash, and :func:`sweep` can tell a stale testbed (owner gone) from a live one.
* Teardown deletes exactly the namespaces of its own plan (after killing whatever still runs
  inside them), is idempotent, runs on every failure of :func:`build` and at the end of
  :func:`testbed`, and raises :class:`TestbedError` if any namespace survives.
* Nothing is attached to the root namespace: no traffic leaves the testbed.
* :func:`plan_testbed` is pure (names, addresses, commands and rulesets as data, no I/O), so
  the plan is testable without root.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

Mapping = Literal["endpoint-independent", "endpoint-dependent"]
"""RFC 4787 section 4.1 mapping behaviour of a NAT: one external port per internal socket
(Linux masquerade, which also keeps the source port when it is free), or a new random port per
destination (``masquerade fully-random``)."""

PREFIX_ROOT = "ltb"
"""Every testbed namespace starts with ``ltb-``; nothing else on the machine is touched."""

NETNS_DIR = Path("/run/netns")
"""Where ``ip netns add`` keeps its named namespaces (bind mounts)."""

PUBLIC_SUBNET = ipaddress.IPv4Network("198.18.0.0/24")
"""The public segment (RFC 2544 benchmarking range: routed nowhere)."""

REQUIRED_TOOLS = {"ip": "iproute2", "nft": "nftables"}
"""Command -> the Debian package that installs it."""

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
_PREFIX_PATTERN = re.compile(rf"^{PREFIX_ROOT}-(\d+)-([0-9a-f]{{4}})$")
_MAX_PUBLIC_HOSTS = 89  # .11 .. .99
_MAX_NATS = 99  # .101 .. .199, and 10.0.1.0/24 .. 10.0.99.0/24
_MAX_HOSTS_PER_NAT = 89  # 10.0.j.11 .. 10.0.j.99
_COMMAND_TIMEOUT_S = 30.0


class TestbedError(RuntimeError):
    """Building or tearing down a testbed failed; the message names the step and what the tool said."""

    __test__ = False  # not a pytest test class, despite the name


class MissingToolError(TestbedError):
    """``ip`` or ``nft`` is not installed; the message names the Debian package to install."""


@dataclass(frozen=True)
class NatSpec:
    """One NAT to build: its name, mapping behaviour and the names of the hosts behind it."""

    name: str
    mapping: Mapping
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class TopologySpec:
    """What to build: public hosts on the shared segment and NATs with private hosts behind them."""

    public_hosts: tuple[str, ...]
    nats: tuple[NatSpec, ...]


DEFAULT_TOPOLOGY = TopologySpec(
    public_hosts=("pub1", "pub2"),
    nats=(
        NatSpec("cone1", "endpoint-independent", ("cone1-pc",)),
        NatSpec("cone2", "endpoint-independent", ("cone2-pc",)),
        NatSpec("sym", "endpoint-dependent", ("sym-pc",)),
    ),
)
"""Two public hosts (a bootstrap/relay and a second observer), two endpoint-independent NATs
(the pair hole punching must get through) and one endpoint-dependent NAT, one host behind each."""


@dataclass(frozen=True)
class Nat:
    """A built NAT: its namespace, its public (``wan``) and LAN-side (``lan`` bridge) addresses."""

    name: str
    netns: str
    mapping: Mapping
    public_ip: str
    lan_ip: str
    lan_subnet: str


@dataclass(frozen=True)
class Host:
    """A built host: its namespace, its address on ``eth0`` and the NAT it sits behind (``None``
    for a public host)."""

    name: str
    netns: str
    ip: str
    nat: str | None

    def exec_prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns]


@dataclass(frozen=True)
class Step:
    """One command of a build: a description for error messages, the argv and its stdin."""

    description: str
    argv: tuple[str, ...]
    stdin: str = ""


@dataclass(frozen=True)
class Testbed:
    """A planned (and, once :func:`build` returned it, built) testbed.

    ``namespaces`` lists every namespace the plan creates, in creation order; teardown deletes
    exactly these. ``steps`` are the commands that build it.
    """

    __test__ = False  # not a pytest test class, despite the name

    prefix: str
    switch_netns: str
    hosts: dict[str, Host]
    nats: dict[str, Nat]
    namespaces: tuple[str, ...]
    steps: tuple[Step, ...] = field(repr=False)

    def public_hosts(self) -> list[Host]:
        """The hosts on the public segment, in spec order."""
        return [h for h in self.hosts.values() if h.nat is None]

    def describe(self) -> dict[str, object]:
        """The testbed as JSON-ready data (what ``testbed.py up --json`` prints)."""
        return {
            "prefix": self.prefix,
            "switch_netns": self.switch_netns,
            "hosts": {name: asdict(host) for name, host in self.hosts.items()},
            "nats": {name: asdict(nat) for name, nat in self.nats.items()},
            "namespaces": list(self.namespaces),
        }


def new_prefix(owner_pid: int | None = None) -> str:
    """A fresh run prefix ``ltb-<owner pid>-<4 random hex>``.

    ``owner_pid`` (default: this process) is the process whose life bounds the testbed:
    :func:`sweep` removes testbeds whose owner is gone.
    """
    return f"{PREFIX_ROOT}-{os.getpid() if owner_pid is None else owner_pid}-{secrets.token_hex(2)}"


def nat_ruleset(mapping: Mapping) -> str:
    """The nftables ruleset of a NAT namespace (``nft -f`` input): masquerade out of ``wan``
    (``fully-random`` for an endpoint-dependent mapping), and home-router filtering: input and
    forward drop everything that is not a reply (``ct state established,related``) or from the
    LAN (RFC 4787 section 5: address-and-port-dependent filtering)."""
    random = " fully-random" if mapping == "endpoint-dependent" else ""
    return f"""\
table ip lattica_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade{random}
    }}
}}
table inet lattica_filter {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname {{ "lo", "lan" }} accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }}
}}
"""


def _check_spec(spec: TopologySpec) -> None:
    names = [*spec.public_hosts, *(n.name for n in spec.nats), *(h for n in spec.nats for h in n.hosts)]
    for name in names:
        if not _NAME_PATTERN.match(name) or name == "sw" or name.startswith("nat-"):
            raise ValueError(f"bad testbed name {name!r}: use 1-16 of a-z 0-9 -, not 'sw' or 'nat-*'")
    if len(set(names)) != len(names):
        raise ValueError(f"testbed names must be unique: {names}")
    if not 1 <= len(spec.public_hosts) <= _MAX_PUBLIC_HOSTS:
        raise ValueError(f"1..{_MAX_PUBLIC_HOSTS} public hosts, got {len(spec.public_hosts)}")
    if len(spec.nats) > _MAX_NATS:
        raise ValueError(f"at most {_MAX_NATS} NATs, got {len(spec.nats)}")
    for nat in spec.nats:
        if not 1 <= len(nat.hosts) <= _MAX_HOSTS_PER_NAT:
            raise ValueError(f"NAT {nat.name}: 1..{_MAX_HOSTS_PER_NAT} hosts, got {len(nat.hosts)}")


def plan_testbed(spec: TopologySpec = DEFAULT_TOPOLOGY, prefix: str | None = None) -> Testbed:
    """Names, addresses and the build commands of ``spec`` under ``prefix`` (default: a fresh
    :func:`new_prefix`). Pure: runs nothing. Raises ``ValueError`` for a bad spec or prefix."""
    prefix = new_prefix() if prefix is None else prefix
    if not _PREFIX_PATTERN.match(prefix):
        raise ValueError(f"bad testbed prefix {prefix!r}: expected {PREFIX_ROOT}-<pid>-<4 hex>")
    _check_spec(spec)
    base = PUBLIC_SUBNET.network_address
    plen = PUBLIC_SUBNET.prefixlen
    switch = f"{prefix}-sw"
    hosts: dict[str, Host] = {}
    nats: dict[str, Nat] = {}
    for i, name in enumerate(spec.public_hosts):
        hosts[name] = Host(name, f"{prefix}-{name}", str(base + 11 + i), None)
    for j, nat_spec in enumerate(spec.nats, start=1):
        lan = ipaddress.IPv4Network(f"10.0.{j}.0/24")
        nats[nat_spec.name] = Nat(
            nat_spec.name,
            f"{prefix}-nat-{nat_spec.name}",
            nat_spec.mapping,
            str(base + 100 + j),
            str(lan.network_address + 1),
            str(lan),
        )
        for k, host_name in enumerate(nat_spec.hosts):
            hosts[host_name] = Host(
                host_name, f"{prefix}-{host_name}", str(lan.network_address + 11 + k), nat_spec.name
            )

    namespaces = (switch, *(n.netns for n in nats.values()), *(h.netns for h in hosts.values()))
    steps: list[Step] = [
        Step("create the namespaces", ("ip", "-batch", "-"), "".join(f"netns add {ns}\n" for ns in namespaces))
    ]
    # veth pairs are created straight into their namespaces: no name ever exists in the root
    # namespace, so parallel testbeds can use the same interface names.
    veths: list[str] = []
    switch_ports: list[str] = []
    for host in hosts.values():
        if host.nat is None:
            port = f"port{len(switch_ports)}"
            switch_ports.append(port)
            veths.append(f"link add eth0 netns {host.netns} type veth peer name {port} netns {switch}\n")
    for nat in nats.values():
        port = f"port{len(switch_ports)}"
        switch_ports.append(port)
        veths.append(f"link add wan netns {nat.netns} type veth peer name {port} netns {switch}\n")
    lan_ports: dict[str, list[str]] = {name: [] for name in nats}
    for host in hosts.values():
        if host.nat is not None:
            port = f"lan{len(lan_ports[host.nat])}"
            lan_ports[host.nat].append(port)
            veths.append(f"link add eth0 netns {host.netns} type veth peer name {port} netns {nats[host.nat].netns}\n")
    steps.append(Step("create the veth pairs", ("ip", "-batch", "-"), "".join(veths)))

    switch_lines = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
    for port in switch_ports:
        switch_lines += [f"link set {port} master br0", f"link set {port} up"]
    steps.append(_ip_batch(switch, "set up the public switch", switch_lines))
    for nat in nats.values():
        lines = [
            "link set lo up",
            f"addr add {nat.public_ip}/{plen} dev wan",
            "link set wan up",
            "link add lan type bridge",
            f"addr add {nat.lan_ip}/24 dev lan",
            "link set lan up",
        ]
        for port in lan_ports[nat.name]:
            lines += [f"link set {port} master lan", f"link set {port} up"]
        steps.append(_ip_batch(nat.netns, f"set up NAT {nat.name}'s links", lines))
    for host in hosts.values():
        lines = ["link set lo up"]
        if host.nat is None:
            lines += [f"addr add {host.ip}/{plen} dev eth0", "link set eth0 up"]
            lines += [f"route add {n.lan_subnet} via {n.public_ip}" for n in nats.values()]
        else:
            lines += [
                f"addr add {host.ip}/24 dev eth0",
                "link set eth0 up",
                f"route add default via {nats[host.nat].lan_ip}",
            ]
        steps.append(_ip_batch(host.netns, f"set up host {host.name}", lines))
    for nat in nats.values():
        steps.append(
            Step(
                f"turn on forwarding in NAT {nat.name}",
                ("ip", "netns", "exec", nat.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"),
            )
        )
        steps.append(
            Step(
                f"load NAT {nat.name}'s nftables rules",
                ("ip", "netns", "exec", nat.netns, "nft", "-f", "-"),
                nat_ruleset(nat.mapping),
            )
        )
    return Testbed(prefix, switch, hosts, nats, namespaces, tuple(steps))


def _ip_batch(netns: str, description: str, lines: Sequence[str]) -> Step:
    return Step(description, ("ip", "-n", netns, "-batch", "-"), "".join(f"{line}\n" for line in lines))


def missing_tools() -> list[str]:
    """Human-readable lines for each required tool not on ``PATH`` (empty when all are there)."""
    return [
        f"`{tool}` not found: install the Debian package {package} (apt-get install -y {package})"
        for tool, package in REQUIRED_TOOLS.items()
        if shutil.which(tool) is None
    ]


def run_step(step: Step) -> None:
    """Run one build step. Raises :class:`MissingToolError` or :class:`TestbedError` (naming the
    step, the command and what it printed)."""
    try:
        done = subprocess.run(
            step.argv, input=step.stdin, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise MissingToolError("; ".join(missing_tools()) or f"cannot run {step.argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(
            f"{step.description}: `{' '.join(step.argv)}` did not finish in {_COMMAND_TIMEOUT_S:g} s"
        ) from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().replace("\n", " | ")
        raise TestbedError(f"{step.description}: `{' '.join(step.argv)}` failed (status {done.returncode}): {said}")


def build(spec: TopologySpec = DEFAULT_TOPOLOGY, prefix: str | None = None) -> Testbed:
    """Build ``spec`` under ``prefix`` (default: fresh); return the built :class:`Testbed`.

    On any failure (or interruption) everything made so far is torn down before the error
    propagates. Raises :class:`MissingToolError` when ``ip`` or ``nft`` is missing,
    :class:`TestbedError` when a step fails (not root, a kernel without nftables, ...).
    """
    missing = missing_tools()
    if missing:
        raise MissingToolError("; ".join(missing))
    bed = plan_testbed(spec, prefix)
    try:
        for step in bed.steps:
            run_step(step)
    except BaseException:
        teardown(bed.namespaces)
        raise
    return bed


def existing_namespaces() -> list[str]:
    """Names of the named network namespaces on this machine (``ip netns list``)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def processes_in(netns: str) -> list[int]:
    """Pids of the processes whose network namespace is ``netns`` (what ``ip netns pids`` says)."""
    try:
        target = os.stat(NETNS_DIR / netns)
    except FileNotFoundError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            info = os.stat(entry / "ns" / "net")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry.name))
    return pids


def teardown(namespaces: Sequence[str]) -> None:
    """Kill every process inside ``namespaces`` (SIGKILL) and delete those namespaces.

    Idempotent (missing ones are skipped). Raises :class:`TestbedError` naming any namespace
    that still exists afterwards.
    """
    present = set(existing_namespaces())
    doomed = [ns for ns in namespaces if ns in present]
    for ns in doomed:
        for pid in processes_in(ns):
            with suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, signal.SIGKILL)
    if doomed:
        # -force: one namespace that cannot be deleted must not keep the others alive.
        subprocess.run(
            ("ip", "-force", "-batch", "-"),
            input="".join(f"netns del {ns}\n" for ns in doomed),
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
    left = sorted(set(doomed) & set(existing_namespaces()))
    if left:
        raise TestbedError(f"namespaces left after teardown: {', '.join(left)}")


def namespaces_with_prefix(prefix: str) -> list[str]:
    """The existing namespaces of the testbed whose prefix is ``prefix``."""
    return [ns for ns in existing_namespaces() if ns.startswith(f"{prefix}-")]


def _prefix_of(netns: str) -> str | None:
    match = re.match(rf"^({PREFIX_ROOT}-\d+-[0-9a-f]{{4}})-", netns)
    return match.group(1) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def testbeds_on_machine() -> dict[str, bool]:
    """Every testbed prefix with namespaces on this machine -> whether its owner process lives."""
    prefixes = {p for p in map(_prefix_of, existing_namespaces()) if p is not None}
    return {p: _alive(int(p.split("-")[1])) for p in sorted(prefixes)}


def sweep() -> list[str]:
    """Tear down the testbeds whose owner process is gone (left by a ``kill -9``); returns their
    prefixes. Testbeds of live owners (other runs in parallel) are left alone."""
    stale = [prefix for prefix, alive in testbeds_on_machine().items() if not alive]
    for prefix in stale:
        teardown(namespaces_with_prefix(prefix))
    return stale


@contextmanager
def testbed(spec: TopologySpec = DEFAULT_TOPOLOGY, prefix: str | None = None) -> Iterator[Testbed]:
    """Build ``spec``, yield it, and tear it down afterwards, also when the body raises."""
    bed = build(spec, prefix)
    try:
        yield bed
    finally:
        teardown(bed.namespaces)


def _raise_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _command_line(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy/netns/testbed.py",
        description="Real NATs in network namespaces (root; iproute2 and nftables).",
        epilog=(
            "examples:\n"
            "  deploy/netns/testbed.py run -- sh -c 'echo \"$LATTICA_TESTBED\"'   # built, used, removed\n"
            "  deploy/netns/testbed.py up            # build; stays until `down PREFIX`\n"
            "  ip netns exec ltb-123-abcd-nat-cone1 nft list ruleset\n"
            "  deploy/netns/testbed.py down ltb-123-abcd\n"
            "  deploy/netns/testbed.py sweep         # remove testbeds whose owner process is gone"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="build the default testbed and print it as JSON; it stays until `down`")
    up.add_argument(
        "--owner",
        type=int,
        default=os.getsid(0),
        help="pid whose exit makes the testbed stale for `sweep` (default: this terminal session's leader)",
    )
    run = commands.add_parser("run", help="build, run COMMAND with $LATTICA_TESTBED set (JSON), tear down")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    down = commands.add_parser("down", help="tear down the testbed with this prefix")
    down.add_argument("prefix")
    commands.add_parser("list", help="testbeds on this machine and whether their owner lives")
    commands.add_parser("sweep", help="tear down testbeds whose owner process is gone")
    args = parser.parse_args(argv)
    # The trap: SIGTERM/SIGHUP/SIGINT become SystemExit, so a build in progress (`up`, `run`)
    # tears down what it made, and `run` tears down its testbed, before the script exits.
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _raise_on_signal)
    try:
        return _dispatch(args)
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        # Not our own pid (we exit now) nor our parent's (often a `$(...)` subshell): the session
        # leader, i.e. the terminal or CI job, so `sweep` leaves the testbed alone while it lives.
        bed = build(prefix=new_prefix(args.owner))
        print(json.dumps(bed.describe(), indent=2))
        print(f"tear down with: {sys.argv[0]} down {bed.prefix}", file=sys.stderr)
        return 0
    if args.command == "run":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not command:
            print("testbed: run needs a command after --", file=sys.stderr)
            return 2
        with testbed() as bed:
            env = {**os.environ, "LATTICA_TESTBED": json.dumps(bed.describe())}
            return subprocess.run(command, env=env, check=False).returncode
    if args.command == "down":
        if not _PREFIX_PATTERN.match(args.prefix):
            print(f"testbed: {args.prefix!r} is not a testbed prefix ({PREFIX_ROOT}-<pid>-<4 hex>)", file=sys.stderr)
            return 2
        teardown(namespaces_with_prefix(args.prefix))
        return 0
    if args.command == "list":
        for prefix, alive in testbeds_on_machine().items():
            print(f"{prefix}\t{'owner alive' if alive else 'stale (sweep removes it)'}")
        return 0
    for prefix in sweep():
        print(f"removed {prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(_command_line())

"""The simulated half of ``bench/dht.py``: real ``Node``s on sim_net, in virtual time.

Topology: every host sits on the sim_net core behind one access link of 25 ms and 0.5% loss
per direction, so a path between two hosts crosses two links: 50 ms one way, 100 ms RTT, about
1% loss per direction. Addresses come from the benchmark range 198.18.0.0/15 (not globally
routable, so the routing table's per-/24 diversity limit does not apply, as on a LAN).

Phases, each timed in virtual seconds, CPU seconds and wall seconds:

1. start: every node starts (no bootstrap peers in its config).
2. join: ``seeds`` nodes join through node 0; the others join in waves of ``wave_size``
   concurrent ``Dht.bootstrap`` calls, each through one seed (round robin), so no seed sees
   more than ``wave_size / seeds`` joins at once. A failed join is retried (3 attempts).
3. settle (``settle="self"``, the default): every node looks up its own id once more (at most
   ``concurrency`` at a time), which is how a Kademlia node's periodic refresh starts: nodes
   that joined early meet the later joiners near them. ``settle="buckets"`` runs the public
   ``Dht.refresh(all_buckets=True)`` instead (one random-id lookup per bucket, about
   log2(N/k) + 1 per node, so ~6x the CPU at 1,000 nodes); ``"none"`` skips the phase.
4. write: ``operations`` puts from distinct random writers, then ``operations`` provides
   from distinct random providers.
5. read: ``operations`` gets and ``operations`` find_providers (count 1: time to the first
   provider) with alpha=3, and as many of each with alpha=1 (the baseline), interleaved in one
   shuffled order; readers never read their own record. Then ``operations`` pings to random
   peers the pinger had no connection to (one hop with a QUIC handshake: the cost of one
   lookup step to a new peer).

Half the non-writing nodes are readers with alpha=3, the other half readers with alpha=1; the
alpha=1 nodes get their config replaced after settling (alpha only shapes lookups a node
starts, not how it serves others). A read succeeds when the exact record (or provider) written
comes back.

Connection lifetime: QUIC keepalive is off (interval above the run length) and the QUIC idle
timeout is 400 s, so the connection manager's idle rule (close after 300 s without streams)
decides when connections go, as it does with the daemon's defaults; keepalive PINGs would only
cost CPU (about one packet pair per connection per 15 s) and change no lookup.

Deterministic per seed: identities, per-node rngs, sim_net, trio's scheduler and the wall
clock (``1_800_000_000 + trio.current_time()``) all derive from it. Two more things are needed
and done here or in ``dht.py``: ``PYTHONHASHSEED=0`` (set orders of bytes) and trio's
deterministic-scheduling flag (otherwise timers due at the same instant, common with fixed link
latencies, wake in an order that depends on memory addresses, and the run diverges).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.dht import BootstrapError, DhtConfig, LookupStats
from lattica.dht.queries import ClosestQuery
from lattica.errors import LatticaError
from lattica.identity import Identity
from lattica.net.address import PeerAddr
from lattica.net.config import NetConfig
from lattica.node import Node
from sim_net import LinkConfig, Network

RTT_S = 0.1
ACCESS_LINK = LinkConfig(latency_s=0.025, loss=0.005)
PORT = 4001
EPOCH_S = 1_800_000_000
FIRST_ADDRESS = ipaddress.IPv4Address("198.18.0.0")
JOIN_ATTEMPTS = 3
NODE_CONFIG = NodeConfig(net=NetConfig(idle_timeout_s=400.0, keepalive_interval_s=24 * 3600.0))
VALUE_BYTES = 100
Outcome = tuple[bool, int | None, LookupStats | None]
"""What a timed operation reports: correct?, acknowledgements, its lookup's stats (None: none ran)."""


@dataclass(frozen=True)
class SimParams:
    """What to simulate; see the module docstring."""

    nodes: int
    seed: int
    seeds: int = 8
    wave_size: int = 50
    operations: int = 200
    concurrency: int = 50
    alpha: int = 3
    baseline_alpha: int = 1
    settle: str = "self"


@dataclass(frozen=True)
class OpSample:
    """One operation: ``kind`` is put, provide, get, find_providers or ping."""

    kind: str
    alpha: int
    ok: bool
    seconds: float
    hops: int | None = None
    first_value_hops: int | None = None
    queries: int | None = None
    new_connections: int | None = None
    acks: int | None = None
    error: str | None = None


@dataclass
class Phase:
    """Cost of one phase: virtual seconds, CPU seconds of this process, wall seconds."""

    name: str
    virtual_s: float
    cpu_s: float
    wall_s: float
    note: str = ""


@dataclass
class SimResult:
    """Everything the simulation measured."""

    params: SimParams
    phases: list[Phase] = field(default_factory=list)
    samples: list[OpSample] = field(default_factory=list)
    join_failures: int = 0
    join_retries: int = 0
    routing_table_sizes: list[int] = field(default_factory=list)
    connections_per_node: list[int] = field(default_factory=list)
    network: dict[str, Any] = field(default_factory=dict)


def host_ip(index: int) -> str:
    """The address of host ``index``: 250 hosts per /24 of 198.18.0.0/15, from .1."""
    return str(FIRST_ADDRESS + (index // 250) * 256 + index % 250 + 1)


def node_identity(seed: int, index: int) -> Identity:
    """A deterministic identity per (seed, node)."""
    return Identity.from_seed(hashlib.sha256(b"bench-dht/%d/%d" % (seed, index)).digest())


def _wall_clock() -> float:
    return EPOCH_S + trio.current_time()


def _connected_peers(node: Node) -> set[Any]:
    return {c.peer_id for c in node.connections.connections()}


def _dialled_since(node: Node, connected_before: set[Any]) -> int:
    return len({c.peer_id for c in node.connections.connections() if c.direction == "outbound"} - connected_before)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


class _PhaseTimer:
    def __init__(self, result: SimResult, progress: Callable[[str], None]) -> None:
        self._result = result
        self._progress = progress

    async def run(self, name: str, body: Callable[[], Awaitable[str | None]]) -> None:
        virtual0, cpu0, wall0 = trio.current_time(), time.process_time(), time.perf_counter()
        note = await body() or ""
        phase = Phase(
            name,
            virtual_s=trio.current_time() - virtual0,
            cpu_s=time.process_time() - cpu0,
            wall_s=time.perf_counter() - wall0,
            note=note,
        )
        self._result.phases.append(phase)
        self._progress(
            f"  {name:<8} {phase.virtual_s:8.1f} s virtual {phase.cpu_s:8.1f} s CPU {phase.wall_s:8.1f} s wall"
            + (f"  {note}" if note else "")
        )


async def simulate(params: SimParams, progress: Callable[[str], None]) -> SimResult:
    """Run the whole simulation (call inside ``trio.run`` with a ``MockClock``)."""
    result = SimResult(params)
    rng = random.Random(params.seed)
    timer = _PhaseTimer(result, progress)
    limiter = trio.CapacityLimiter(params.concurrency)
    async with Network(seed=params.seed) as net, AsyncExitStack() as stack:
        hosts = [net.add_host(host_ip(i), ACCESS_LINK) for i in range(params.nodes)]
        nodes: list[Node] = []

        async def start() -> str:
            for i, host in enumerate(hosts):
                node = Node(
                    node_identity(params.seed, i),
                    host.bind(PORT),
                    replace(NODE_CONFIG, dht=DhtConfig(alpha=params.alpha)),
                    wall_clock=_wall_clock,
                    rng=random.Random(f"{params.seed}/{i}"),
                )
                nodes.append(await stack.enter_async_context(node))
            return f"{len(nodes)} nodes"

        await timer.run("start", start)
        addrs = [PeerAddr(n.listen_addresses()[0], n.peer_id) for n in nodes]
        seeds = min(params.seeds, params.nodes - 1)

        async def join_one(i: int, via: PeerAddr) -> None:
            for attempt in range(JOIN_ATTEMPTS):
                if attempt:
                    result.join_retries += 1
                    await trio.sleep(1.0)
                try:
                    await nodes[i].dht.bootstrap([via])
                except BootstrapError:
                    continue
                return
            result.join_failures += 1

        async def join() -> str:
            async with trio.open_nursery() as nursery:
                for i in range(1, seeds + 1):
                    nursery.start_soon(join_one, i, addrs[0])
            rest = list(range(seeds + 1, params.nodes))
            for start_at in range(0, len(rest), params.wave_size):
                async with trio.open_nursery() as nursery:
                    for position, i in enumerate(rest[start_at : start_at + params.wave_size]):
                        nursery.start_soon(join_one, i, addrs[(start_at + position) % (seeds + 1)])
            return f"{seeds + 1} seeds, waves of {params.wave_size}, {result.join_failures} failed"

        await timer.run("join", join)

        async def settle() -> str:
            lookups = 0

            async def refresh(node: Node) -> None:
                nonlocal lookups
                async with limiter:
                    if params.settle == "buckets":
                        ran = await node.dht.refresh(all_buckets=True)
                    else:
                        # The self-lookup has no public entry point of its own; bootstrap()
                        # would also re-contact the seeds.
                        await node.dht._run_query(ClosestQuery(node.dht.own_key))
                        ran = 1
                lookups += ran

            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(refresh, node)
            return f"{lookups} {'bucket refresh' if params.settle == 'buckets' else 'self'} lookups"

        if params.settle != "none":
            await timer.run("settle", settle)

        order = list(range(params.nodes))
        rng.shuffle(order)
        count = min(params.operations, params.nodes // 4)
        writers, providers = order[:count], order[count : 2 * count]
        readers = order[2 * count :]
        baseline_readers = readers[len(readers) // 2 :]
        readers = readers[: len(readers) // 2]
        for i in baseline_readers:
            # Only lookups this node starts change; it serves others exactly as before.
            nodes[i].dht.config = dataclasses.replace(nodes[i].dht.config, alpha=params.baseline_alpha)
        alpha_of = {i: params.baseline_alpha for i in baseline_readers}

        def key_of(j: int) -> bytes:
            return b"bench/key/%d" % j

        def value_of(j: int) -> bytes:
            return hashlib.sha256(b"value/%d" % j).digest() * (VALUE_BYTES // 32) + b"v" * (VALUE_BYTES % 32)

        def cid_of(j: int) -> bytes:
            return b"bench/cid/%d" % j

        async def timed(kind: str, i: int, operation: Callable[[Node], Awaitable[Outcome]]) -> None:
            node = nodes[i]
            async with limiter:
                before_connected = _connected_peers(node)
                started = trio.current_time()
                acks: int | None = None
                stats: LookupStats | None = None
                error = None
                try:
                    ok, acks, stats = await operation(node)
                except (LatticaError, trio.BrokenResourceError, OSError) as exc:
                    ok, error = False, _error_text(exc)
                seconds = trio.current_time() - started
                local = stats is None and error is None  # answered from the local store, no lookup
                if kind == "ping":
                    local = False
                result.samples.append(
                    OpSample(
                        kind,
                        alpha_of.get(i, params.alpha),
                        ok,
                        seconds,
                        hops=0 if local else None if stats is None else stats.hops,
                        first_value_hops=None if stats is None else stats.first_value_hops,
                        queries=0 if local else None if stats is None else stats.queries,
                        new_connections=_dialled_since(node, before_connected),
                        acks=acks,
                        error=error if error is not None or ok else "wrong or missing result",
                    )
                )

        def put(j: int) -> Callable[[Node], Awaitable[Outcome]]:
            async def run(node: Node) -> Outcome:
                result = await node.dht.put(key_of(j), value_of(j))
                return True, result.acks, result.stats

            return run

        def provide(j: int) -> Callable[[Node], Awaitable[Outcome]]:
            async def run(node: Node) -> Outcome:
                result = await node.dht.provide(cid_of(j))
                return True, result.acks, result.stats

            return run

        def get(j: int) -> Callable[[Node], Awaitable[Outcome]]:
            async def run(node: Node) -> Outcome:
                result = await node.dht.get(key_of(j), nodes[writers[j]].peer_id)
                record = result.record
                return record is not None and record.value == value_of(j), None, result.stats

            return run

        def find_providers(j: int) -> Callable[[Node], Awaitable[Outcome]]:
            async def run(node: Node) -> Outcome:
                result = await node.dht.find_providers(cid_of(j), count=1)
                return any(r.provider_id == nodes[providers[j]].peer_id for r in result.providers), None, result.stats

            return run

        async def write() -> str:
            async with trio.open_nursery() as nursery:
                for j, i in enumerate(writers):
                    nursery.start_soon(timed, "put", i, put(j))
            async with trio.open_nursery() as nursery:
                for j, i in enumerate(providers):
                    nursery.start_soon(timed, "provide", i, provide(j))
            return f"{count} puts, {count} provides"

        await timer.run("write", write)

        async def read() -> str:
            jobs: list[tuple[str, int, Callable[[Node], Awaitable[Outcome]]]] = []
            for group in (readers, baseline_readers):
                for _ in range(count):
                    jobs.append(("get", rng.choice(group), get(rng.randrange(count))))
                    jobs.append(("find_providers", rng.choice(group), find_providers(rng.randrange(count))))
            rng.shuffle(jobs)
            locks = {i: trio.Lock() for _kind, i, _op in jobs}

            async def one_at_a_time(kind: str, i: int, operation: Any) -> None:
                # A node runs one read at a time: the workload the published figures measured
                # (each call has its own stats now, so this is no longer needed for them).
                async with locks[i]:
                    await timed(kind, i, operation)

            async with trio.open_nursery() as nursery:
                for kind, i, operation in jobs:
                    nursery.start_soon(one_at_a_time, kind, i, operation)
            return f"{len(jobs)} reads"

        await timer.run("read", read)

        async def ping() -> str:
            async def ping_new_peer(i: int) -> None:
                node = nodes[i]
                connected = _connected_peers(node)
                candidates = [t for t in range(params.nodes) if t != i and nodes[t].peer_id not in connected]
                if not candidates:
                    return
                target = rng.choice(candidates)

                async def run(node: Node) -> Outcome:
                    await node.ping(addrs[target])
                    return True, None, None

                await timed("ping", i, run)

            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(ping_new_peer, rng.choice(readers))
            return f"{count} pings to unconnected peers"

        await timer.run("ping", ping)

        result.routing_table_sizes = [len(n.dht.routing_table) for n in nodes]
        result.connections_per_node = [len(n.connections.connections()) for n in nodes]
        counters = net.counters()
        result.network = {
            "datagrams_sent": counters.sent,
            "datagrams_delivered": counters.delivered,
            "dropped": dict(counters.dropped),
        }
    return result


def innermost(exc: BaseException) -> BaseException:
    """The first leaf of nested exception groups (a thousand nodes nest a thousand deep)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def run_simulation(params: SimParams, progress: Callable[[str], None]) -> SimResult:
    """Run :func:`simulate` under trio's ``MockClock`` with trio's scheduler seeded.

    An error inside is re-raised as its innermost exception (the groups around it say nothing).
    """
    # trio shuffles runnable batches with this Random; with the flag (what trio's Hypothesis
    # plugin sets) it first sorts each batch by task creation, so a batch's order no longer
    # depends on how it was filled (deadline ties are broken by id(), i.e. memory addresses).
    trio._core._run._r.seed(params.seed)
    trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    clock = trio.testing.MockClock(autojump_threshold=0)
    try:
        return trio.run(simulate, params, progress, clock=clock)
    except BaseExceptionGroup as group:
        raise innermost(group) from None

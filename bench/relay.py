"""Relay benchmark: one large stream through a relay circuit against the direct path, on
127.0.0.1, in the same run.

Three processes, each one real ``Node`` on a kernel UDP socket bound to 127.0.0.1:

* ``relay``     runs the relay service (circuit limits raised so the transfer fits),
* ``receiver``  reserves on the relay and sinks a stream protocol (``/bench/sink/1``): it reads
  to EOF and answers one byte,
* ``sender``    one per run: connects (directly, or through a circuit on the relay; the
  handshake is not timed), opens a sink stream, and times writing the payload, half-closing
  and receiving the acknowledgement.

Modes are interleaved run by run (direct, relayed, direct, ...) so machine noise hits both
alike. Through the relay every byte crosses two QUIC connections and the relay's process, and
the end-to-end QUIC packets travel as circuit frames inside the relay connections' streams.
The table shows median / min / max MB/s (1 MB = 10**6 bytes) and the relayed/direct ratio;
every sample goes to ``bench/results/relay-<UTC timestamp>.json``.

A second part (``--parts sim``) runs the same two transfers in one process on ``sim_net`` in
virtual time (three hosts, 100 Mbit/s links with 10 ms one-way latency): there CPU costs
nothing, so the ratio shows what the circuit costs as a protocol (windows, the doubled path),
separate from the CPU cost of QUIC inside QUIC that dominates on loopback.

Usage::

    .venv/bin/python bench/relay.py              # 64 MiB, 3 runs per mode
    .venv/bin/python bench/relay.py --quick      # 8 MiB, 1 run: smoke test
    .venv/bin/python bench/relay.py --mib 64 --runs 5
    .venv/bin/python bench/relay.py --parts sim --sim-mib 16

Exit status: 0 when every run succeeded, 1 otherwise, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
import trio.testing
from _harness import Child, ChildFailed, Spread, die_after, machine_info, report, utc_now, write_results

from lattica.config import NodeConfig
from lattica.identity import Identity
from lattica.nat.config import NatConfig
from lattica.nat.relay_address import RelayedAddr
from lattica.nat.relay_config import RelayConfig
from lattica.net.address import PeerAddr
from lattica.net.datagram import UdpSocket
from lattica.net.stream import QuicStream
from lattica.node import Node
from sim_net import LinkConfig, Network

SIM_LINK = LinkConfig(latency_s=0.010, bandwidth_bps=100e6)

SINK_PROTOCOL = "/bench/sink/1"
MODES = ("direct", "relayed")
CHUNK_BYTES = 64 * 1024
SCRIPT = str(Path(__file__).resolve())


def _config(**relay: Any) -> NodeConfig:
    base = NodeConfig()
    # A quiet node: no bootstrap, DHT idle; circuits big and long enough for the payload.
    relay_config = RelayConfig(circuit_bytes=1 << 40, circuit_duration_s=3600.0, **relay)
    return replace(base, nat=NatConfig(relay=relay_config))


def _node(config: NodeConfig) -> Node:
    return Node(Identity.generate(), UdpSocket.bind("127.0.0.1", 0), config, advertise_hosts=["127.0.0.1"])


async def run_relay(timeout_s: float) -> None:
    node = _node(_config(service=True))
    async with node:
        report({"addr": node.dial_strings()[0]})
        await trio.sleep(timeout_s)


async def run_receiver(relay: str, timeout_s: float) -> None:
    node = _node(_config())
    node.rpc.add_stream_handler(SINK_PROTOCOL, _sink)
    async with node:
        with trio.fail_after(30):
            await node.relay_client.reserve(PeerAddr.parse(relay))
        report({"direct": node.dial_strings()[0], "relayed": node.relay_client.relayed_addresses()[0]})
        await trio.sleep(timeout_s)


async def run_sender(target: str, total_bytes: int) -> None:
    node = _node(_config())
    async with node:
        parsed = RelayedAddr.parse(target) if RelayedAddr.looks_relayed(target) else PeerAddr.parse(target)
        cpu_started = time.process_time()
        seconds, relayed_via = await _timed_transfer(node, parsed, total_bytes)
        report(
            {
                "seconds": seconds,
                "bytes": total_bytes,
                "sender_cpu_share": (time.process_time() - cpu_started) / seconds,
                "relayed_via": relayed_via,
                "circuit_datagrams_dropped": node.relay_client.stats.circuit_datagrams_dropped,
            }
        )


async def _sink(stream: QuicStream, _peer: object) -> None:
    while await stream.receive_some():
        pass
    await stream.send_all(b"\x01")
    await stream.send_eof()


async def _timed_transfer(node: Node, target: PeerAddr | RelayedAddr, total_bytes: int) -> tuple[float, str | None]:
    """Seconds (``trio.current_time()``: wall time, or virtual time on sim_net) to send
    ``total_bytes`` to the sink and get its acknowledgement (the handshake is not timed), and
    the relay's peer id if the connection was relayed."""
    connection = await node.connect(target, timeout_s=30)
    stream = await node.rpc.open_stream(connection, SINK_PROTOCOL)
    payload = bytes(CHUNK_BYTES)
    started = trio.current_time()
    sent = 0
    while sent < total_bytes:
        await stream.send_all(payload[: min(CHUNK_BYTES, total_bytes - sent)])
        sent += min(CHUNK_BYTES, total_bytes - sent)
    await stream.send_eof()
    if await stream.receive_some(1) != b"\x01":
        raise RuntimeError("the sink did not acknowledge")
    return trio.current_time() - started, None if connection.relayed_via is None else str(connection.relayed_via)


async def run_sim(total_bytes: int) -> dict[str, float]:
    """MB/s of virtual time, direct and relayed, on sim_net (seeded, deterministic)."""
    async with Network(seed=1) as net:
        hosts = [net.add_host(f"198.51.100.{i}", SIM_LINK) for i in (1, 2, 3)]
        relay_node = Node(Identity.generate(), hosts[0].bind(4001), _config(service=True))
        sender = Node(Identity.generate(), hosts[1].bind(4001), _config())
        receiver = Node(Identity.generate(), hosts[2].bind(4001), _config())
        receiver.rpc.add_stream_handler(SINK_PROTOCOL, _sink)
        async with relay_node, sender, receiver:
            await receiver.relay_client.reserve(PeerAddr(relay_node.socket.local_address, relay_node.peer_id))
            targets: dict[str, PeerAddr | RelayedAddr] = {
                "direct": PeerAddr(receiver.socket.local_address, receiver.peer_id),
                "relayed": RelayedAddr.parse(receiver.relay_client.relayed_addresses()[0]),
            }
            rates = {}
            for mode in MODES:
                seconds, _ = await _timed_transfer(sender, targets[mode], total_bytes)
                rates[mode] = total_bytes / 1e6 / seconds
            return rates


async def _child(*args: str) -> Child:
    return await Child.start([sys.executable, SCRIPT, *args])


async def run_loopback(args: argparse.Namespace, failures: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The three-process part: samples per mode; failures are appended to ``failures``."""
    total_bytes = args.mib << 20
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    children: list[Child] = []
    lifetime_s = args.timeout * (2 * args.runs + 2)
    try:
        relay = await _child("--role", "relay", "--timeout", str(lifetime_s))
        children.append(relay)
        relay_addr = (await relay.read_message())["addr"]
        receiver = await _child("--role", "receiver", "--relay", relay_addr, "--timeout", str(lifetime_s))
        children.append(receiver)
        targets = await receiver.read_message()
        for _ in range(args.runs):
            for mode in MODES:
                sender = await _child("--role", "sender", "--target", targets[mode], "--bytes", str(total_bytes))
                try:
                    with trio.fail_after(args.timeout):
                        samples[mode].append(await sender.read_message())
                except (ChildFailed, trio.TooSlowError) as exc:
                    failures.append(f"{mode}: {exc} {sender.failure_text()}")
                finally:
                    await sender.kill()
    except ChildFailed as exc:
        failures.append(f"setup: {exc}")
    finally:
        for child in children:
            await child.kill()
    return samples


def _print_table(title: str, rates: dict[str, list[float]]) -> None:
    print(title)
    print(f"{'path':<8} {'median MB/s':>12} {'min':>8} {'max':>8} {'vs direct':>10}")
    spreads = {mode: Spread.of(rates[mode]) for mode in MODES}
    direct = spreads["direct"]
    for mode in MODES:
        spread = spreads[mode]
        if spread is None:
            print(f"{mode:<8} {'failed':>12}")
            continue
        ratio = f"{spread.median / direct.median:.2f}x" if direct else "-"
        print(f"{mode:<8} {spread.median:>12.1f} {spread.minimum:>8.1f} {spread.maximum:>8.1f} {ratio:>10}")


async def run_parent(args: argparse.Namespace) -> int:
    started_at = utc_now()
    failures: list[str] = []
    document: dict[str, Any] = {
        "benchmark": "relay",
        "started_at": started_at.isoformat(),
        "parameters": {"mib": args.mib, "runs": args.runs, "sim_mib": args.sim_mib, "chunk_bytes": CHUNK_BYTES},
        "machine": machine_info(["aioquic", "trio", "msgspec"]),
    }
    if "loopback" in args.parts:
        samples = await run_loopback(args, failures)
        rates = {mode: [s["bytes"] / 1e6 / s["seconds"] for s in samples[mode]] for mode in MODES}
        _print_table(
            f"relay benchmark, loopback: {args.mib} MiB per transfer, {args.runs} run(s) per mode, 127.0.0.1, "
            "3 processes",
            rates,
        )
        document["loopback"] = {"samples": samples, "mb_per_s": rates}
    if "sim" in args.parts:
        sim = await _child("--role", "sim", "--bytes", str(args.sim_mib << 20), "--timeout", str(args.timeout * 4))
        try:
            with trio.fail_after(args.timeout * 4):
                sim_rates = await sim.read_message()
        except (ChildFailed, trio.TooSlowError) as exc:
            failures.append(f"sim: {exc} {sim.failure_text()}")
            sim_rates = {}
        finally:
            await sim.kill()
        _print_table(
            f"relay benchmark, sim_net (virtual time, 100 Mbit/s links, 10 ms one way): {args.sim_mib} MiB",
            {mode: [sim_rates[mode]] if mode in sim_rates else [] for mode in MODES},
        )
        document["sim"] = {"mb_per_s_virtual": sim_rates, "link": {"latency_s": 0.010, "bandwidth_bps": 100e6}}
    for failure in failures:
        print(f"failure: {failure}")
    document["failures"] = failures
    print(f"results: {write_results('relay', started_at, document)}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the parent or one child role."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("parent", "relay", "receiver", "sender", "sim"), default="parent")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="loopback,sim", help="loopback, sim, or both (comma-separated)")
    parser.add_argument("--sim-mib", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--relay")
    parser.add_argument("--target")
    parser.add_argument("--bytes", type=int)
    args = parser.parse_args(argv)
    if args.quick:
        args.mib, args.runs, args.sim_mib = 8, 1, 2
    if args.mib < 1 or args.runs < 1 or args.sim_mib < 1:
        parser.error("--mib, --runs and --sim-mib must be at least 1")
    args.parts = set(args.parts.split(","))
    if not args.parts or not args.parts <= {"loopback", "sim"}:
        parser.error("--parts is loopback, sim or loopback,sim")
    if args.role == "parent":
        return trio.run(run_parent, args)
    die_after(args.timeout + 5)
    if args.role == "relay":
        trio.run(run_relay, args.timeout)
    elif args.role == "sim":
        # Virtual time: MockClock jumps to the next deadline whenever every task waits.
        report(trio.run(run_sim, args.bytes, clock=trio.testing.MockClock(autojump_threshold=0)))
    elif args.role == "receiver":
        trio.run(run_receiver, args.relay, args.timeout)
    else:
        trio.run(run_sender, args.target, args.bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The emulated network: topology (hosts, NAT boxes, links), routing and delivery.

Topology is a tree of *realms*. The root realm is the public internet core; each NAT owns one
inside realm. Every host and NAT is a member of exactly one realm, where it has one IPv4
address and an :class:`~sim_net.link.AccessLink` to that realm (NATs use their public IP).

A datagram from a socket travels hop by hop, each hop a scheduled event:

1. up the sender's access link into its realm;
2. in a realm, if a member owns the destination IP it goes down that member's access link;
   otherwise, in a NAT's inside realm, the NAT translates it outbound and sends it up its own
   access link into the parent realm (repeat); in the core, it is dropped (``no_route``);
3. arriving at a NAT, it is translated inbound and goes down the inside host's access link;
   arriving at a host, it is queued on the socket bound to the destination port.

So the one-way delay between two hosts is the sum of the link delays on the path: for two core
hosts, the sender's ``up`` plus the receiver's ``down``. ``Network.set_path`` replaces that pair
by one dedicated link for two members of the same realm. A datagram an inside host sends to its
own NAT's public IP is hairpinned by the NAT (or dropped when hairpinning is off).

Partitions are checked whenever a datagram arrives at a host or NAT: one from a sender on one
side to a node on the other side is dropped, also if it was already in flight when the
partition was made. A NAT in a partition group stands for every node behind it.

Everything random draws from sub-streams of one ``random.Random(seed)``, handed out in the order
hosts, NATs and paths are created; the only clock is trio's.
"""

from __future__ import annotations

import errno
import ipaddress
import random
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType

import trio

from sim_net.counters import (
    Address,
    DropCause,
    HostCounters,
    NatCounters,
    NetworkCounters,
    TraceEvent,
    TraceKind,
)
from sim_net.link import UDP_IPV4_OVERHEAD_BYTES, AccessLink, LinkConfig, LinkDirection
from sim_net.nat import NatConfig, NatMapping, NatTable
from sim_net.scheduler import EventScheduler
from sim_net.sockets import DEFAULT_RECEIVE_BUFFER_BYTES, SimSocket

_EPHEMERAL_PORTS = (49152, 65535)


@dataclass
class _Packet:
    packet_id: int
    data: bytes
    src: Address
    dst: Address
    origin: Host

    @property
    def wire_bytes(self) -> int:
        return len(self.data) + UDP_IPV4_OVERHEAD_BYTES

    def copy(self) -> _Packet:
        return _Packet(self.packet_id, self.data, self.src, self.dst, self.origin)


class _Realm:
    """One addressing domain: the core (``owner is None``) or the inside of a NAT."""

    def __init__(self, owner: Nat | None) -> None:
        self.owner = owner
        self.members: dict[str, Host | Nat] = {}


def _checked_ipv4(ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise ValueError(f"not an IPv4 address: {ip!r}") from None


class _Node:
    """What hosts and NATs share: an address in a parent realm and an access link to it."""

    def __init__(self, network: Network, ip: str, realm: _Realm, link: AccessLink) -> None:
        self._network = network
        self._ip = ip
        self._realm = realm
        self._link = link
        self.parent: Nat | None = realm.owner

    @property
    def link(self) -> AccessLink:
        """The access link to the parent network (``up`` leaves this node, ``down`` reaches
        it); read its ``counters`` or assign a new ``config`` to either direction."""
        return self._link

    def set_link(
        self,
        link: LinkConfig,
        *,
        up: LinkConfig | None = None,
        down: LinkConfig | None = None,
    ) -> None:
        """Change the access link's impairments now; ``up``/``down`` override one direction."""
        self._link.up.config = link if up is None else up
        self._link.down.config = link if down is None else down

    def ancestors(self) -> Iterator[_Node]:
        """This node, then each NAT above it up to the core."""
        node: _Node | None = self
        while node is not None:
            yield node
            node = node.parent


class Host(_Node):
    """An emulated machine with one IPv4 address, on the core or behind a NAT.

    Made by :meth:`Network.add_host` or :meth:`Nat.add_host`.
    """

    def __init__(
        self, network: Network, ip: str, realm: _Realm, link: AccessLink, rng: random.Random
    ) -> None:
        super().__init__(network, ip, realm, link)
        self._rng = rng
        self._sockets: dict[int, SimSocket] = {}
        self._counters = HostCounters()

    def __repr__(self) -> str:
        return f"<Host {self._ip}>"

    @property
    def ip(self) -> str:
        """This host's IPv4 address in its own realm (private if it is behind a NAT)."""
        return self._ip

    @property
    def counters(self) -> HostCounters:
        """A snapshot of this host's counters."""
        return self._counters.copy()

    def bind(
        self, port: int = 0, *, receive_buffer_bytes: int = DEFAULT_RECEIVE_BUFFER_BYTES
    ) -> SimSocket:
        """Bind a datagram socket on ``port`` (0 picks a free ephemeral port, 49152-65535).

        ``receive_buffer_bytes`` bounds the payload bytes queued for the reader. Raises
        ``OSError(EADDRINUSE)`` if the port is taken, ``ValueError`` if out of range.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port!r}")
        if port == 0:
            port = self._free_ephemeral_port()
        elif port in self._sockets:
            raise OSError(errno.EADDRINUSE, f"address already in use: {self._ip}:{port}")
        sock = SimSocket(
            (self._ip, port),
            receive_buffer_bytes=receive_buffer_bytes,
            send=self._send,
            on_close=self._forget_socket,
        )
        self._sockets[port] = sock
        return sock

    def _free_ephemeral_port(self) -> int:
        low, high = _EPHEMERAL_PORTS
        if len(self._sockets) > high - low:
            free = [p for p in range(low, high + 1) if p not in self._sockets]
            if not free:
                raise OSError(errno.EADDRINUSE, f"no free ephemeral port on {self._ip}")
            return self._rng.choice(free)
        while True:
            port = self._rng.randint(low, high)
            if port not in self._sockets:
                return port

    def _send(self, sock: SimSocket, data: bytes, dst: Address) -> None:
        self._network._send_from_host(self, sock.local_address, data, dst)

    def _forget_socket(self, sock: SimSocket) -> None:
        port = sock.local_address[1]
        if self._sockets.get(port) is sock:
            del self._sockets[port]


class Nat(_Node):
    """A NAT box: a public IP in its parent network and an inside network of its own.

    Made by :meth:`Network.add_nat` or, for carrier-grade NAT, :meth:`Nat.add_nat`.
    """

    def __init__(
        self,
        network: Network,
        public_ip: str,
        realm: _Realm,
        link: AccessLink,
        config: NatConfig,
        rng: random.Random,
    ) -> None:
        super().__init__(network, public_ip, realm, link)
        self.table = NatTable(public_ip, config, rng)
        self.inside = _Realm(self)

    def __repr__(self) -> str:
        return f"<Nat {self._ip}>"

    @property
    def public_ip(self) -> str:
        """The NAT's address in its parent network; inside hosts appear to come from it."""
        return self._ip

    @property
    def config(self) -> NatConfig:
        """The NAT's behaviour."""
        return self.table.config

    @property
    def counters(self) -> NatCounters:
        """A snapshot of this NAT's counters."""
        return self.table.counters

    def mappings(self) -> list[NatMapping]:
        """The mappings live now (trio clock), ordered by external port."""
        return self.table.mappings(trio.current_time())

    def add_host(
        self,
        ip: str,
        link: LinkConfig | None = None,
        *,
        up: LinkConfig | None = None,
        down: LinkConfig | None = None,
    ) -> Host:
        """Add a host with private address ``ip`` behind this NAT (see ``Network.add_host``)."""
        return self._network._add_host(self.inside, ip, link, up, down)

    def add_nat(
        self,
        public_ip: str,
        config: NatConfig | None = None,
        link: LinkConfig | None = None,
        *,
        up: LinkConfig | None = None,
        down: LinkConfig | None = None,
    ) -> Nat:
        """Add a NAT behind this one (this one then acts as a carrier-grade NAT);
        ``public_ip`` is its address inside this NAT's network."""
        return self._network._add_nat(self.inside, public_ip, config, link, up, down)


class Partition:
    """An active cut between two groups of nodes; pass it to ``Network.heal`` to end it."""

    def __init__(self, group_a: frozenset[_Node], group_b: frozenset[_Node]) -> None:
        self.group_a = group_a
        self.group_b = group_b

    def separates(self, sender: _Node, receiver: _Node) -> bool:
        """Whether traffic from ``sender`` to ``receiver`` crosses this cut."""
        sender_side = self._side(sender)
        receiver_side = self._side(receiver)
        return sender_side is not None and receiver_side is not None and (
            sender_side != receiver_side
        )

    def _side(self, node: _Node) -> str | None:
        for ancestor in node.ancestors():
            if ancestor in self.group_a:
                return "a"
            if ancestor in self.group_b:
                return "b"
        return None


class Network:
    """An emulated IPv4 network on trio's clock, deterministic for a given ``seed``.

    Build the topology with :meth:`add_host` and :meth:`add_nat` (before or while it runs), and
    run it with ``async with Network(seed=1) as net:`` (or ``async with net.run():``); sockets
    can send only while it runs. Leaving the block closes every socket. ``trace=True`` records
    a :class:`TraceEvent` per send, delivery and drop in :attr:`trace`.
    """

    def __init__(self, seed: int = 0, *, trace: bool = False) -> None:
        self._rng = random.Random(seed)
        self._core = _Realm(None)
        self._scheduler = EventScheduler()
        self._running = False
        self._paths: dict[tuple[_Node, _Node], LinkDirection] = {}
        self._partitions: list[Partition] = []
        self._hosts: list[Host] = []
        self._counters = NetworkCounters()
        self._record_trace = trace
        self._trace: list[TraceEvent] = []
        self._next_packet_id = 0
        self._exit_stack: AsyncExitStack | None = None

    # --- running -------------------------------------------------------------------------

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Network]:
        """Run the delivery task for the duration of the block."""
        if self._running:
            raise RuntimeError("network is already running")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._scheduler.run)
            self._running = True
            try:
                yield self
            finally:
                self._running = False
                for host in self._hosts:
                    for sock in list(host._sockets.values()):
                        sock.close()
                nursery.cancel_scope.cancel()

    async def __aenter__(self) -> Network:
        stack = AsyncExitStack()
        await stack.enter_async_context(self.run())
        self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        stack, self._exit_stack = self._exit_stack, None
        assert stack is not None, "__aexit__ without __aenter__"
        return await stack.__aexit__(exc_type, exc, traceback)

    # --- topology ------------------------------------------------------------------------

    def add_host(
        self,
        ip: str,
        link: LinkConfig | None = None,
        *,
        up: LinkConfig | None = None,
        down: LinkConfig | None = None,
    ) -> Host:
        """Add a host with public address ``ip`` on the internet core.

        ``link`` configures both directions of its access link (default: a perfect link);
        ``up`` (leaving the host) or ``down`` (reaching it) override one direction. Raises
        ``ValueError`` if the address is malformed or already used in the core.
        """
        return self._add_host(self._core, ip, link, up, down)

    def add_nat(
        self,
        public_ip: str,
        config: NatConfig | None = None,
        link: LinkConfig | None = None,
        *,
        up: LinkConfig | None = None,
        down: LinkConfig | None = None,
    ) -> Nat:
        """Add a NAT box with address ``public_ip`` on the internet core; add hosts behind it
        with :meth:`Nat.add_host`. ``link`` is its access link as in :meth:`add_host`."""
        return self._add_nat(self._core, public_ip, config, link, up, down)

    def set_path(
        self,
        a: Host | Nat,
        b: Host | Nat,
        link: LinkConfig,
        *,
        a_to_b: LinkConfig | None = None,
        b_to_a: LinkConfig | None = None,
    ) -> None:
        """Route traffic between ``a`` and ``b`` over a dedicated link instead of their access
        links (replacing, not adding to, ``a.up`` + ``b.down``). Both must be in the same
        network (both on the core, or behind the same NAT). Calling it again reconfigures the
        path and keeps its state."""
        if a._realm is not b._realm or a is b:
            raise ValueError("set_path needs two different nodes in the same network")
        forward = link if a_to_b is None else a_to_b
        backward = link if b_to_a is None else b_to_a
        for sender, receiver, config in ((a, b, forward), (b, a, backward)):
            existing = self._paths.get((sender, receiver))
            if existing is None:
                self._paths[(sender, receiver)] = LinkDirection(config, self._substream())
            else:
                existing.config = config

    def path_link(self, sender: Host | Nat, receiver: Host | Nat) -> LinkDirection | None:
        """The dedicated link direction from ``sender`` to ``receiver``, if one was set."""
        return self._paths.get((sender, receiver))

    def partition(self, group_a: Iterable[Host | Nat], group_b: Iterable[Host | Nat]) -> Partition:
        """Drop all traffic between the two groups until healed; a NAT stands for every node
        behind it. Raises ``ValueError`` if the groups overlap."""
        a, b = frozenset(group_a), frozenset(group_b)
        if a & b:
            raise ValueError("partition groups overlap")
        cut = Partition(a, b)
        self._partitions.append(cut)
        return cut

    def heal(self, partition: Partition | None = None) -> None:
        """End one partition, or all of them when ``partition`` is None."""
        if partition is None:
            self._partitions.clear()
        elif partition in self._partitions:
            self._partitions.remove(partition)

    # --- observation ---------------------------------------------------------------------

    def counters(self) -> NetworkCounters:
        """A snapshot of the network-wide counters."""
        return self._counters.copy()

    @property
    def trace(self) -> list[TraceEvent]:
        """A copy of the recorded events (empty unless built with ``trace=True``)."""
        return list(self._trace)

    # --- internals -----------------------------------------------------------------------

    def _substream(self) -> random.Random:
        return random.Random(self._rng.getrandbits(64))

    def _access_link(
        self, link: LinkConfig | None, up: LinkConfig | None, down: LinkConfig | None
    ) -> AccessLink:
        base = LinkConfig() if link is None else link
        return AccessLink(
            up=LinkDirection(base if up is None else up, self._substream()),
            down=LinkDirection(base if down is None else down, self._substream()),
        )

    def _claim_address(self, realm: _Realm, ip: str) -> str:
        ip = _checked_ipv4(ip)
        if ip in realm.members:
            raise ValueError(f"address {ip} is already used in this network")
        return ip

    def _add_host(
        self,
        realm: _Realm,
        ip: str,
        link: LinkConfig | None,
        up: LinkConfig | None,
        down: LinkConfig | None,
    ) -> Host:
        ip = self._claim_address(realm, ip)
        host = Host(self, ip, realm, self._access_link(link, up, down), self._substream())
        realm.members[ip] = host
        self._hosts.append(host)
        return host

    def _add_nat(
        self,
        realm: _Realm,
        public_ip: str,
        config: NatConfig | None,
        link: LinkConfig | None,
        up: LinkConfig | None,
        down: LinkConfig | None,
    ) -> Nat:
        public_ip = self._claim_address(realm, public_ip)
        access = self._access_link(link, up, down)
        nat_config = NatConfig() if config is None else config
        nat = Nat(self, public_ip, realm, access, nat_config, self._substream())
        realm.members[public_ip] = nat
        return nat

    def _send_from_host(self, host: Host, src: Address, data: bytes, dst: Address) -> None:
        if not self._running:
            raise RuntimeError("the network is not running (use `async with network:`)")
        now = trio.current_time()
        packet = _Packet(self._next_packet_id, data, src, dst, host)
        self._next_packet_id += 1
        self._counters.sent += 1
        host._counters.sent += 1
        host._counters.sent_bytes += len(data)
        self._record(now, TraceKind.SEND, packet)
        if dst[0] == host.ip:
            # Loopback never touches a link.
            self._scheduler.schedule(now, partial(self._deliver, host, packet, now))
        else:
            self._leave(host, packet, now)

    def _cross(
        self,
        direction: LinkDirection,
        packet: _Packet,
        now: float,
        on_arrival: Callable[[_Packet, float], None],
    ) -> None:
        transmission = direction.transmit(packet.wire_bytes, now)
        if transmission.dropped is not None:
            self._drop(packet, transmission.dropped, now)
            return
        for index, at in enumerate(transmission.arrival_times):
            # Copies must not share a packet: NATs rewrite addresses in place.
            copy = packet if index == 0 else packet.copy()
            if index > 0:
                self._counters.duplicated += 1
            self._scheduler.schedule(at, partial(on_arrival, copy, at))

    def _leave(self, node: Host | Nat, packet: _Packet, now: float) -> None:
        """``packet`` leaves ``node`` into the realm ``node`` belongs to."""
        realm = node._realm
        target = realm.members.get(packet.dst[0])
        if target is not None:
            path = self._paths.get((node, target))
            if path is not None:
                self._cross(path, packet, now, partial(self._arrive_at, target))
                return
        self._cross(node.link.up, packet, now, partial(self._route, realm))

    def _route(self, realm: _Realm, packet: _Packet, now: float) -> None:
        target = realm.members.get(packet.dst[0])
        if target is not None:
            self._cross(target.link.down, packet, now, partial(self._arrive_at, target))
        elif realm.owner is not None:
            self._nat_outbound(realm.owner, packet, now)
        else:
            self._drop(packet, DropCause.NO_ROUTE, now)

    def _nat_outbound(self, nat: Nat, packet: _Packet, now: float) -> None:
        result = nat.table.outbound(packet.src, packet.dst, now)
        if isinstance(result, DropCause):
            self._drop(packet, result, now)
            return
        packet.src = (nat.public_ip, result)
        if packet.dst[0] != nat.public_ip:
            self._leave(nat, packet, now)
        elif nat.config.hairpinning:
            nat.table.count_hairpin()
            self._nat_inbound(nat, packet, now)
        else:
            nat.table.count_drop(DropCause.HAIRPIN)
            self._drop(packet, DropCause.HAIRPIN, now)

    def _arrive_at(self, target: Host | Nat, packet: _Packet, now: float) -> None:
        if any(cut.separates(packet.origin, target) for cut in self._partitions):
            self._drop(packet, DropCause.PARTITION, now)
        elif isinstance(target, Nat):
            self._nat_inbound(target, packet, now)
        else:
            self._deliver(target, packet, now)

    def _nat_inbound(self, nat: Nat, packet: _Packet, now: float) -> None:
        result = nat.table.inbound(packet.src, packet.dst[1], now)
        if isinstance(result, DropCause):
            self._drop(packet, result, now)
            return
        packet.dst = result
        target = nat.inside.members.get(result[0])
        if target is None:
            self._drop(packet, DropCause.NO_ROUTE, now)
            return
        self._cross(target.link.down, packet, now, partial(self._arrive_at, target))

    def _deliver(self, host: Host, packet: _Packet, now: float) -> None:
        sock = host._sockets.get(packet.dst[1])
        if sock is None:
            self._drop(packet, DropCause.NO_SOCKET, now)
            return
        if not sock._enqueue(packet.data, packet.src):
            self._drop(packet, DropCause.SOCKET_BUFFER, now)
            return
        self._counters.delivered += 1
        host._counters.received += 1
        host._counters.received_bytes += len(packet.data)
        self._record(now, TraceKind.DELIVER, packet)

    def _drop(self, packet: _Packet, cause: DropCause, now: float) -> None:
        self._counters.dropped[cause.value] += 1
        packet.origin._counters.dropped[cause.value] += 1
        self._record(now, TraceKind.DROP, packet, cause)

    def _record(
        self, now: float, kind: TraceKind, packet: _Packet, cause: DropCause | None = None
    ) -> None:
        if self._record_trace:
            event = TraceEvent(
                now, kind, packet.packet_id, packet.src, packet.dst, len(packet.data), cause
            )
            self._trace.append(event)


__all__ = ["Host", "Nat", "Network", "Partition"]

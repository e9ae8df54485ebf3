"""Link impairments: what one direction of a link does to each datagram crossing it.

A :class:`LinkDirection` is pure state with no trio in it: ``transmit(wire_bytes, now)`` says
when the copies of a datagram reach the far end, or why it was dropped. The network calls it
and schedules the arrivals.

Rules, in the order they are applied to each datagram:

1. MTU: a datagram larger than ``mtu_bytes`` (payload plus 28 bytes of IPv4/UDP headers) is
   dropped.
2. Queue: with a bandwidth limit, one transmitter drains a FIFO queue at ``bandwidth_bps``. A
   datagram that does not fit in the ``queue_bytes`` still waiting (the one being serialised
   included) is tail-dropped. Without a limit, datagrams leave at once and the queue is unused.
3. Loss: after serialisation (a lost packet still used the wire), Bernoulli ``loss`` and, if
   set, Gilbert-Elliott ``burst_loss``; either one loses the packet.
4. Delay: ``latency_s`` plus a uniform draw from ``[0, jitter_s]``. Jitter never reorders:
   an ordinary datagram arrives no earlier than the previous ordinary one (a FIFO wire).
   With probability ``reorder`` a datagram instead gets ``reorder_delay_s`` extra and stays out
   of that FIFO order, so later datagrams overtake it.
5. Duplication: with probability ``duplicate`` a second copy arrives at the same moment.

All randomness comes from the ``random.Random`` given to the direction, so one direction's
traffic never perturbs another's draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sim_net.counters import DropCause, LinkCounters

UDP_IPV4_OVERHEAD_BYTES = 28
"""IPv4 (20) plus UDP (8) header bytes added to every payload for MTU and bandwidth."""


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state Markov (Gilbert-Elliott) burst-loss model.

    For each datagram the state first moves (good to bad with ``p_good_to_bad``, bad to good with
    ``p_bad_to_good``), then the datagram is lost with the new state's loss probability. Bursts in
    the bad state last ``1 / p_bad_to_good`` datagrams on average.
    """

    p_good_to_bad: float
    p_bad_to_good: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        _check_probability("p_good_to_bad", self.p_good_to_bad)
        _check_probability("p_bad_to_good", self.p_bad_to_good)
        _check_probability("loss_good", self.loss_good)
        _check_probability("loss_bad", self.loss_bad)
        if self.p_good_to_bad + self.p_bad_to_good == 0.0:
            raise ValueError("p_good_to_bad and p_bad_to_good cannot both be 0")

    @property
    def mean_loss(self) -> float:
        """Long-run fraction of datagrams lost (stationary distribution of the chain)."""
        bad_share = self.p_good_to_bad / (self.p_good_to_bad + self.p_bad_to_good)
        return bad_share * self.loss_bad + (1.0 - bad_share) * self.loss_good


@dataclass(frozen=True)
class LinkConfig:
    """Impairments of one link direction. The defaults are a perfect 1500-byte-MTU wire.

    Units: seconds for times, probabilities in ``[0, 1]`` per datagram, bits per second for
    ``bandwidth_bps`` (``None`` = unlimited), bytes for ``queue_bytes`` and ``mtu_bytes``.
    """

    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    burst_loss: GilbertElliott | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay_s: float = 0.01
    bandwidth_bps: float | None = None
    queue_bytes: int = 256 * 1024
    mtu_bytes: int = 1500

    def __post_init__(self) -> None:
        for name in ("latency_s", "jitter_s", "reorder_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        _check_probability("loss", self.loss)
        _check_probability("duplicate", self.duplicate)
        _check_probability("reorder", self.reorder)
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ValueError(f"bandwidth_bps must be > 0 or None, got {self.bandwidth_bps!r}")
        if self.queue_bytes < 0:
            raise ValueError(f"queue_bytes must be >= 0, got {self.queue_bytes!r}")
        if self.mtu_bytes <= UDP_IPV4_OVERHEAD_BYTES:
            raise ValueError(f"mtu_bytes must exceed {UDP_IPV4_OVERHEAD_BYTES}")


@dataclass(frozen=True)
class Transmission:
    """The result of offering one datagram to a link direction.

    ``arrival_times`` are the moments (trio clock, seconds) its copies reach the far end: empty if
    it was dropped (``dropped`` says why), two entries if it was duplicated.
    """

    arrival_times: tuple[float, ...]
    dropped: DropCause | None = None


# The queue test compares float byte counts derived from times; allow rounding noise.
_QUEUE_EPSILON_BYTES = 1e-6


class LinkDirection:
    """The state of one direction of a link: its queue, its loss state and its counters."""

    def __init__(self, config: LinkConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self._counters = LinkCounters()
        self._busy_until = float("-inf")
        self._last_in_order_arrival = float("-inf")
        self._burst_bad = False

    @property
    def config(self) -> LinkConfig:
        """The impairments now in force."""
        return self._config

    @config.setter
    def config(self, config: LinkConfig) -> None:
        # Queue and burst state carry over, as on a real link whose settings change.
        self._config = config

    @property
    def counters(self) -> LinkCounters:
        """A snapshot of this direction's counters."""
        return self._counters.copy()

    def transmit(self, wire_bytes: int, now: float) -> Transmission:
        """Offer a datagram of ``wire_bytes`` (headers included) at time ``now`` (seconds)."""
        config = self._config
        counters = self._counters
        counters.packets_in += 1
        counters.bytes_in += wire_bytes
        if wire_bytes > config.mtu_bytes:
            return self._drop(DropCause.MTU)

        departure = now
        if config.bandwidth_bps is not None:
            backlog_bytes = max(0.0, self._busy_until - now) * config.bandwidth_bps / 8.0
            if backlog_bytes + wire_bytes > config.queue_bytes + _QUEUE_EPSILON_BYTES:
                return self._drop(DropCause.QUEUE)
            start = max(now, self._busy_until)
            self._busy_until = start + wire_bytes * 8.0 / config.bandwidth_bps
            departure = self._busy_until

        if self._lost(config):
            return self._drop(DropCause.LOSS)

        arrival = departure + config.latency_s
        if config.jitter_s > 0.0:
            arrival += self._rng.uniform(0.0, config.jitter_s)
        if config.reorder > 0.0 and self._rng.random() < config.reorder:
            arrival += config.reorder_delay_s
            counters.reordered += 1
        else:
            arrival = max(arrival, self._last_in_order_arrival)
            self._last_in_order_arrival = arrival

        arrivals: tuple[float, ...] = (arrival,)
        if config.duplicate > 0.0 and self._rng.random() < config.duplicate:
            arrivals = (arrival, arrival)
            counters.duplicated += 1
        counters.packets_out += len(arrivals)
        return Transmission(arrivals)

    def _lost(self, config: LinkConfig) -> bool:
        lost = False
        burst = config.burst_loss
        if burst is not None:
            if self._burst_bad:
                if self._rng.random() < burst.p_bad_to_good:
                    self._burst_bad = False
            elif self._rng.random() < burst.p_good_to_bad:
                self._burst_bad = True
            loss = burst.loss_bad if self._burst_bad else burst.loss_good
            lost = self._rng.random() < loss
        if config.loss > 0.0 and self._rng.random() < config.loss:
            lost = True
        return lost

    def _drop(self, cause: DropCause) -> Transmission:
        self._counters.dropped[cause.value] += 1
        return Transmission((), cause)


@dataclass(frozen=True)
class AccessLink:
    """The link between a host (or NAT) and its parent network: ``up`` leaves it, ``down``
    reaches it. Each direction has its own queue, loss state and counters."""

    up: LinkDirection
    down: LinkDirection

"""QUIC congestion control on a link whose buffer is smaller than its bandwidth-delay product.

Home uplinks often queue less than one round trip of data. After a loss, a controller that
halves its window (NewReno) then leaves such a link partly idle for many round trips; CUBIC
(RFC 9438) keeps 70% and stays at the link's rate. Virtual time; the real ``Node`` and streams.
"""

from __future__ import annotations

import hashlib
import math
import random
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trio.testing

from lattica.config import NodeConfig
from lattica.identity import Identity, PeerId
from lattica.net.address import PeerAddr
from lattica.net.config import NetConfig
from lattica.net.stream import QuicStream
from lattica.node import Node
from sim_net import LinkConfig, Network

PROTOCOL = "/lattica-test/bulk/1"
RATE_BYTES_PER_S = 1_000_000
# 10 ms per access link: 40 ms round trips, so one round trip of data is 40 KB; the queue
# holds 16 KiB of it.
UPLINK = LinkConfig(latency_s=0.01, bandwidth_bps=8 * RATE_BYTES_PER_S, queue_bytes=16 * 1024)
QUIET = LinkConfig(latency_s=0.01)
SIZE = 8 << 20
# IP, UDP and QUIC headers plus the AEAD tag take ~5% of each 1228-byte datagram on the wire.
FRAMING = 1228 / 1165


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_bulk_stream_keeps_a_shallow_buffered_link_busy_after_losses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = NodeConfig(net=NetConfig(keepalive_interval_s=math.inf))
    payload = random.Random(5).randbytes(SIZE)
    async with Network(seed=1) as net, AsyncExitStack() as stack:
        sender_host = net.add_host("10.0.0.1", up=UPLINK, down=QUIET)
        receiver_host = net.add_host("10.0.0.2", up=QUIET, down=QUIET)
        nodes = []
        for i, host in enumerate((sender_host, receiver_host)):
            identity = Identity.from_seed(hashlib.sha256(b"congestion-%d" % i).digest())
            node = Node(identity, host.bind(4001), config, blocks_dir=tmp_path / f"n{i}", rng=random.Random(i))
            nodes.append(await stack.enter_async_context(node))
        sender, receiver = nodes

        async def serve(stream: QuicStream, _peer: PeerId) -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        sender.rpc.add_stream_handler(PROTOCOL, serve)
        await receiver.connect(PeerAddr(sender.listen_addresses()[0], sender.peer_id))
        began = trio.current_time()
        stream = await receiver.rpc.open_stream(sender.peer_id, PROTOCOL)
        received = 0
        async with stream:
            while data := await stream.receive_some(1 << 20):
                received += len(data)
        elapsed = trio.current_time() - began
        assert received == SIZE
        # The queue overflowed (the losses this is about), yet the link stayed busy: NewReno
        # took 1.09x the time the payload needs on the wire here, CUBIC 1.03x.
        assert sender_host.counters.dropped["queue"] > 0
        assert elapsed <= 1.06 * FRAMING * SIZE / RATE_BYTES_PER_S

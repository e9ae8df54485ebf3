"""Peers that hold a seeder's upload slots without fetching anything useful (test helpers)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import trio

from lattica.content.exchange_messages import PROTOCOL_ID
from lattica.content.exchange_protocol import ExchangeClient
from lattica.content.manifest import ChunkRef
from lattica.identity import PeerId
from lattica.node import Node
from tests.unit.content_samples import KIB


async def trickle(node: Node, seeder: PeerId, chunks: Sequence[ChunkRef], stop: trio.Event) -> None:
    """Open an exchange stream from ``node`` to ``seeder``, ask for every one of ``chunks`` and
    read 1 KiB a second until ``stop`` or the seeder ends the stream: active by the idle rule
    for as long as it likes (a review's trickling reader). A reset by the seeder ends it."""
    stream = await node.rpc.open_stream(seeder, PROTOCOL_ID)
    client = ExchangeClient()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            await stream.send_all(b"".join(client.want(chunk.digest, chunk.length)[1] for chunk in chunks))
            for _ in range(10_000):  # bounded: ~10,000 virtual seconds
                if stop.is_set() or not await stream.receive_some(KIB):
                    return
                await trio.sleep(1)

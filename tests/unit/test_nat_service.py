"""``NatService`` on a zero-latency sim_net host: limits on what it answers."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from lattica.nat import NatService
from lattica.nat.stun import encode_binding_request
from sim_net import SimSocket

from .conftest import MakeEndpoint, MakeSocket


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def _answers_within(sock: SimSocket, seconds: float) -> int:
    count = 0
    with trio.move_on_after(seconds):
        while True:
            count += len(await sock.receive_batch())
    return count


async def test_answers_to_all_sources_together_are_capped(
    make_endpoint: MakeEndpoint,
    make_socket: MakeSocket,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint = await make_endpoint()
    nat = NatService(endpoint, responses_per_second=10, response_burst=5, total_responses_per_second=8)
    await nursery.start(nat.run)
    senders = [make_socket() for _ in range(4)]
    for sender in senders:
        for i in range(5):
            await sender.send_to(encode_binding_request(i.to_bytes(12)), endpoint.local_address)
    # Each source is within its own burst of 5, but all four together get 8 answers, not 20.
    answered = [await _answers_within(sender, 0.01) for sender in senders]
    assert sum(answered) == 8
    assert nat.stats.requests_answered == 8 and nat.stats.rate_limited_dropped == 12

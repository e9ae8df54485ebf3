"""The NAT traversal matrix (issue 9): every ordered pair of {public, full cone, address-
restricted, port-restricted, symmetric, symmetric with random ports}, one public relay, 50 ms
latency and 2% loss, in virtual time. Every pair connects; every pair without an
endpoint-dependent mapping on either side ends on a direct path."""

from __future__ import annotations

import pytest
import trio.testing

from tests.sim.nat_matrix import NAT_TYPES, run_matrix


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_every_pair_connects_and_every_pair_without_a_symmetric_nat_goes_direct(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await run_matrix(seed=9)
    assert len(run.pairs) == len(NAT_TYPES) ** 2
    failed = [(p.dialler, p.target, p.error) for p in run.pairs if p.outcome == "failed"]
    assert failed == []
    not_direct = [(p.dialler, p.target, p.outcome) for p in run.pairs if p.direct_expected and p.outcome != "direct"]
    assert not_direct == []
    # Time to direct is recorded for every direct pair, and hole punching took a relay first.
    for pair in run.pairs:
        if pair.outcome == "direct":
            assert pair.time_to_direct_s is not None
            assert pair.time_to_direct_s > 0 or pair.target == "public"
    assert run.relay_circuits_opened == sum(p.target != "public" for p in run.pairs)

"""Fixtures every test shares."""

from __future__ import annotations

import pytest
import trio


@pytest.fixture(autouse=True)
def _seeded_trio_scheduler() -> None:
    # trio shuffles each batch of runnable tasks with this private Random; seeding it makes a
    # test's task interleaving (and so any virtual-time test or recorded sim_net trace)
    # identical from run to run.
    trio._core._run._r.seed(0)

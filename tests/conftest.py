"""Fixtures every test shares."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

# Why this touches trio's private state, and why nothing public does the job (trio 0.25-0.35):
#
# trio picks the order of each batch of runnable tasks with one module-level
# ``random.Random`` (``trio._core._run._r``), and MockClock draws its start offset from it too.
# A test whose outcome depends on task interleaving or on virtual time (every sim_net test,
# any recorded trace) is reproducible only if that generator starts from the same state.
#
# * ``trio.run`` and ``trio.testing.MockClock`` take no seed or random source.
# * ``trio.testing`` has no scheduler hook; ``trio.abc.Instrument`` observes tasks but cannot
#   reorder them.
# * trio's public route is Hypothesis: its entry point calls ``hypothesis.register_random(_r)``
#   (and turns on sorted-then-shuffled "deterministic scheduling") once Hypothesis is imported,
#   so Hypothesis re-seeds ``_r`` -- but only inside ``@given`` tests. Hypothesis offers no
#   public call to seed registered generators outside ``@given``.
# * Seeding the global ``random`` module does not reach ``_r``: it is a separate instance.
#
# So the seed is set here, in one place, and fails loudly (instead of silently losing
# determinism) if a trio release renames the attribute.
_TRIO_SCHEDULER_RANDOM = getattr(getattr(trio._core, "_run", None), "_r", None)


@pytest.fixture(autouse=True)
def _seeded_trio_scheduler() -> None:
    if not isinstance(_TRIO_SCHEDULER_RANDOM, random.Random):
        pytest.fail(f"trio {trio.__version__} moved its scheduler's Random; update tests/conftest.py")
    _TRIO_SCHEDULER_RANDOM.seed(0)


MakeTmpfs = Callable[[int], Path]


@pytest.fixture
def make_tmpfs(tmp_path: Path) -> Iterator[MakeTmpfs]:
    """``make_tmpfs(size_mib)``: a fresh tmpfs of that size (a real disk that fills up), unmounted
    after the test. Needs root, which CI has; elsewhere the test is skipped."""
    mounts: list[Path] = []

    def make(size_mib: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        mount = tmp_path / f"tmpfs{len(mounts)}"
        mount.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount)]
        done = subprocess.run(command, capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(mount)
        return mount

    try:
        yield make
    finally:
        for mount in mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)

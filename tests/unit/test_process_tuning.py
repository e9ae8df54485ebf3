"""glibc malloc thresholds fixed at daemon start (lattica.process_tuning), each case in a
fresh interpreter so this test process keeps its allocator as it is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
from lattica.process_tuning import tune_malloc
print(tune_malloc())
"""


def run_probe(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(extra_env)
    command = [sys.executable, "-c", PROBE]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True, timeout=60)
    return result.stdout.strip()


def test_the_thresholds_are_set_on_glibc() -> None:
    assert "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")  # this project's machines run glibc
    assert run_probe({}) == "True"


@pytest.mark.parametrize("setting", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_a_threshold_the_user_set_is_left_alone(setting: str) -> None:
    assert run_probe({setting: str(1 << 20)}) == "False"

"""The testbed leaves nothing behind: not after success, not after a failing test or build, not
after its script is killed, and stale testbeds of dead runs are swept without touching live ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.deploy_testbed import TESTBED_SCRIPT
from tests.deploy_testbed import testbed as tb
from tests.netns.harness import require_netns

pytestmark = pytest.mark.netns

REPO_ROOT = TESTBED_SCRIPT.parents[2]
SMALL = tb.TopologySpec(public_hosts=("pub1",), nats=(tb.NatSpec("cone1", "endpoint-independent", ("cone1-pc",)),))


@pytest.fixture(autouse=True)
def _netns_allowed() -> None:
    require_netns()


def _left(namespaces: tuple[str, ...] | list[str]) -> list[str]:
    return sorted(set(namespaces) & set(tb.existing_namespaces()))


def test_teardown_deletes_every_namespace_and_kills_what_runs_inside() -> None:
    with tb.testbed(SMALL) as bed:
        assert _left(bed.namespaces) == sorted(bed.namespaces)
        host = bed.hosts["cone1-pc"]
        inside = subprocess.Popen(
            [*host.exec_prefix(), "sh", "-c", "echo inside; exec sleep 300"], stdout=subprocess.PIPE, text=True
        )
        assert inside.stdout is not None
        assert inside.stdout.readline() == "inside\n"
        assert tb.processes_in(host.netns) == [inside.pid]  # `ip netns exec` and sh exec'd: one process
    assert _left(bed.namespaces) == []
    assert inside.wait(timeout=10) == -signal.SIGKILL
    inside.stdout.close()


def test_a_failing_body_still_tears_down() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), tb.testbed(SMALL) as bed:
        raise RuntimeError("the test failed")
    assert _left(bed.namespaces) == []


def test_a_failed_build_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last steps load the NAT rules: by then every namespace and link exists.
    monkeypatch.setattr(tb, "nat_ruleset", lambda mapping: "this is not an nftables ruleset\n")
    prefix = tb.new_prefix()
    with pytest.raises(tb.TestbedError, match="load NAT cone1's nftables rules"):
        tb.build(SMALL, prefix)
    assert tb.namespaces_with_prefix(prefix) == []


def test_a_failing_pytest_test_tears_down_its_testbed(tmp_path: Path) -> None:
    prefix_file = tmp_path / "prefix"
    (tmp_path / "test_fails.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from tests.netns.harness import netns_bed

            def test_fails(netns_bed):
                Path({str(prefix_file)!r}).write_text(netns_bed.prefix)
                assert False, "a failing test"
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fails.py"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # the inner test failed, as written
    assert "a failing test" in done.stdout
    prefix = prefix_file.read_text()
    assert prefix.startswith("ltb-")
    assert tb.namespaces_with_prefix(prefix) == []


def test_killed_script_tears_down_and_sweep_removes_only_dead_owners_testbeds() -> None:
    # `run` prints the testbed, then waits; SIGTERM goes to the script (the trap tears down).
    script = subprocess.Popen(
        [sys.executable, str(TESTBED_SCRIPT), "run", "--", "sh", "-c", 'echo "$LATTICA_TESTBED"; exec sleep 300'],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert script.stdout is not None
    described = json.loads(script.stdout.readline())
    assert _left(described["namespaces"]) == sorted(described["namespaces"])
    script.send_signal(signal.SIGTERM)
    assert script.wait(timeout=30) == 128 + signal.SIGTERM
    script.stdout.close()
    assert _left(described["namespaces"]) == []

    # kill -9 leaves a testbed behind; sweep removes it because its owner is gone, and leaves
    # a live owner's testbed (this process's) alone.
    builder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import testbed; "
            "print(testbed.build().prefix, flush=True); sys.stdin.read()",
            str(TESTBED_SCRIPT.parent),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert builder.stdout is not None and builder.stdin is not None
    stale = builder.stdout.readline().strip()
    builder.kill()
    builder.wait()
    builder.stdin.close()
    builder.stdout.close()
    assert tb.namespaces_with_prefix(stale) != []
    with tb.testbed(SMALL) as live:
        assert stale in tb.sweep()
        assert tb.namespaces_with_prefix(stale) == []
        assert _left(live.namespaces) == sorted(live.namespaces)


def test_up_and_down_from_the_command_line() -> None:
    up = subprocess.run([sys.executable, str(TESTBED_SCRIPT), "up"], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    described = json.loads(up.stdout)
    try:
        assert _left(described["namespaces"]) == sorted(described["namespaces"])
        # `up` is owned by the session leader (the terminal or CI job), so sweep leaves it alone.
        assert described["prefix"].startswith(f"ltb-{os.getsid(0)}-")
        assert described["prefix"] not in tb.sweep()
    finally:
        down = subprocess.run(
            [sys.executable, str(TESTBED_SCRIPT), "down", described["prefix"]], capture_output=True, text=True
        )
    assert down.returncode == 0, down.stderr
    assert _left(described["namespaces"]) == []

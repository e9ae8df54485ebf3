"""Fixtures and helpers for real kernel NATs: the testbed and ``lattica daemon`` processes in it.

The daemons run inside the testbed's namespaces (``ip netns exec NS ... daemon``); the CLI runs
in the root namespace and reaches each daemon through its control socket, which is a file (Unix
sockets bound to a path are not network-namespaced). Nothing here talks to the network itself.

Skip rule (issue 9): these tests skip only when not root *and* not in CI (``CI`` unset). In CI
or as root they run, and a missing ``ip``/``nft`` is a failure naming the package to install.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lattica.control.client import call
from lattica.control.errors import ControlError
from lattica.daemon_process import DaemonProcess, start_daemon_process
from tests.deploy_testbed import testbed as tb

DAEMON_PORT = 4001
START_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 60.0

UNREACHABLE_AFTER_S = 3.0
"""How long a dial that must not get through is given (the point of several tests). Inside the
testbed a handshake that can get through takes a few round trips of well under a millisecond;
3 s covers several QUIC Initial retransmissions. ``lattica ping`` has no ``--timeout`` (it waits
10 s), so these dials use the same control method with its ``timeout_s``."""


def require_netns() -> None:
    """Skip when neither root nor CI; fail (naming the package) when a tool is missing."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("tests/netns need root (network namespaces, nftables); CI must run them as root")
        pytest.skip("tests/netns need root (network namespaces, nftables); CI runs them")
    missing = tb.missing_tools()
    if missing:
        pytest.fail("; ".join(missing))


@dataclass
class NetnsDaemon:
    """A ``lattica daemon`` running inside one testbed host's namespace."""

    host: Any  # testbed.Host
    started: DaemonProcess

    @property
    def peer_id(self) -> str:
        return self.started.peer_id

    @property
    def address(self) -> str:
        """``IP:PORT`` the daemon listens on, inside its namespace."""
        return f"{self.host.ip}:{DAEMON_PORT}"

    @property
    def dial(self) -> str:
        """``PEERID@IP:PORT`` of the daemon's own (for a private host: private) address."""
        return f"{self.peer_id}@{self.address}"

    def cli(self, *args: str) -> Any:
        """Run ``lattica ARGS --json --home HOME`` in the root namespace against this daemon;
        assert it succeeded and return its JSON document."""
        command = [sys.executable, "-m", "cli.main", *args, "--json", "--home", str(self.started.home)]
        env = {k: v for k, v in os.environ.items() if k != "LATTICA_HOME"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def peer_rows(self) -> list[dict[str, Any]]:
        """``lattica peers --json``: one row per open connection."""
        rows: list[dict[str, Any]] = self.cli("peers")
        return rows

    def ping_error(self, addr: str, timeout_s: float = UNREACHABLE_AFTER_S) -> str | None:
        """The control ``ping`` to ``addr`` with a ``timeout_s`` deadline: the error code it failed
        with (``"timeout"`` for a dial nobody answered), ``None`` if it succeeded."""
        try:
            call(self.started.control_socket, "ping", {"addr": addr, "timeout_s": timeout_s})
        except ControlError as exc:
            return exc.code
        return None


def stop_daemons(daemons: list[NetnsDaemon], timeout_s: float = 10.0) -> None:
    """SIGTERM all at once, then wait for each; SIGKILL those not gone after ``timeout_s``."""
    processes = [d.started.process for d in daemons]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def start_daemon_in(host: Any, home: Path, *extra: str) -> NetnsDaemon:
    """Start ``lattica daemon`` inside ``host``'s namespace on ``host.ip:4001`` (``extra``:
    more daemon options); wait until ready."""
    env = {k: v for k, v in os.environ.items() if k != "LATTICA_HOME"}
    started = start_daemon_process(
        home,
        "--listen",
        f"{host.ip}:{DAEMON_PORT}",
        *extra,
        env=env,
        timeout_s=START_TIMEOUT_S,
        command_prefix=host.exec_prefix(),
    )
    return NetnsDaemon(host, started)


@pytest.fixture(scope="module")
def netns_bed() -> Iterator[Any]:
    """The default testbed (``testbed.DEFAULT_TOPOLOGY``), torn down after the module, also when
    a test failed. Stale testbeds of dead runs are swept first."""
    require_netns()
    tb.sweep()
    with tb.testbed() as bed:
        yield bed


@pytest.fixture(scope="module")
def netns_daemons(netns_bed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NetnsDaemon]]:
    """One daemon per testbed host (started in parallel), keyed by host name; stopped afterwards."""
    homes = tmp_path_factory.mktemp("netns-homes")
    hosts = list(netns_bed.hosts.values())
    daemons: dict[str, NetnsDaemon] = {}
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        futures = {host.name: pool.submit(start_daemon_in, host, homes / host.name) for host in hosts}
        errors = []
        for name, future in futures.items():
            try:
                daemons[name] = future.result()
            except Exception as exc:  # collect all, stop the ones that started, then fail
                errors.append(f"{name}: {exc}")
    try:
        if errors:
            pytest.fail(f"daemons did not start: {errors}")
        yield daemons
    finally:
        stop_daemons(list(daemons.values()))


T = TypeVar("T")


def poll_daemon(check: Callable[[], T | None], *, within_s: float, what: str, every_s: float = 0.2) -> T:
    """Ask a daemon in another namespace (through its control socket) until ``check`` returns a
    value, or fail the test after ``within_s`` saying ``what`` did not happen.

    A poll, not an event: the daemon is another process and its control API has no
    subscription for connection paths or DHT records, so the test re-asks at ``every_s``
    (bounded by ``within_s``; a real-time testbed has no virtual clock)."""
    deadline = time.monotonic() + within_s
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {within_s:g} s")
        time.sleep(every_s)

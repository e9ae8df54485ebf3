"""Client commands start cheaply: they load the control client, not the node (issue 8 C15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("trio", "aioquic", "cryptography", "nacl", "rich", "pydantic")

_PROBE = """
import json, sys
from cli.main import run
code = run(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["id"],
        ["status", "--json"],
        ["peers"],
        ["ping", "127.0.0.1:9", "-c", "1"],
        ["dht", "get", "some/key"],
        ["dht", "put", "some/key", "value"],
        ["dht", "providers", "cid"],
        ["dht", "routing"],
        ["dht", "bootstrap"],
        ["state", "ls"],
        ["state", "get", "catalog", "key"],
        ["state", "set", "catalog", "key", "[1, 2]", "--json-value"],
        ["state", "watch", "catalog"],
    ],
)
def test_client_commands_do_not_import_the_node(args: list[str], tmp_path: Path) -> None:
    # No daemon runs in tmp_path: the command goes as far as the socket and fails there.
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LATTICA_HOME": str(tmp_path)},
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["code"] in (0, 1), completed.stderr
    assert not set(HEAVY) & set(report["modules"]), sorted(set(HEAVY) & set(report["modules"]))

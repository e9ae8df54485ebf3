"""Names of the files in a node's home and where the home is (DESIGN.md "Data on disk").

Kept free of heavy imports: client commands of the CLI need the control socket's path and
nothing of the node (``tests/unit/test_cli_startup.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.toml"
IDENTITY_FILE = "identity.key"
CONTROL_SOCKET = "control.sock"
DATABASE_FILE = "lattica.db"
BLOCKS_DIR = "blocks"


def default_home() -> Path:
    """``$LATTICA_HOME`` if set, else ``~/.local/share/lattica``."""
    env = os.environ.get("LATTICA_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "lattica"

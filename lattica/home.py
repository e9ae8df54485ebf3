"""The node's home directory: what lives there and how it is created.

Layout (DESIGN.md "Data on disk"): ``identity.key`` (0600), ``config.toml``, ``lattica.db``,
``blocks/``, ``control.sock`` (0600), ``logs/``. The home itself is 0700.
"""

from __future__ import annotations

import os
from pathlib import Path

from lattica.config import CONFIG_FILE, IDENTITY_FILE, NodeConfig, render_config
from lattica.identity import Identity, load_or_create_identity


def init_home(home: Path) -> tuple[Identity, bool]:
    """Create the home, identity and ``config.toml`` if missing; returns (identity, created).

    Existing files are never overwritten.
    """
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    identity, created = load_or_create_identity(home / IDENTITY_FILE)
    config_path = home / CONFIG_FILE
    if not config_path.exists():
        config_path.write_text(render_config(NodeConfig()), encoding="utf-8")
    (home / "logs").mkdir(exist_ok=True)
    return identity, created

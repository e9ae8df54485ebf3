"""The node's home directory: what lives there and how it is created.

Layout (DESIGN.md "Data on disk"): ``identity.key`` (0600), ``config.toml``, ``lattica.db``,
``blocks/``, ``control.sock`` (0600), ``logs/``.

Invariants:

* Only directories the node creates get their mode set (0700). An existing directory keeps its
  mode: ``--home /tmp`` must never lock other users out of ``/tmp``.
* An existing home that another user could tamper with -- writable by group or others, or
  owned by someone else -- is refused with a hint, never "fixed" silently. Files in it (the key,
  the control socket) would otherwise be replaceable by those users.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lattica.config import CONFIG_FILE, IDENTITY_FILE, NodeConfig, render_config
from lattica.errors import LatticaError
from lattica.identity import Identity, load_or_create_identity

PRIVATE_DIR_MODE = 0o700


class UnsafeHomeError(LatticaError):
    """An existing home directory could be changed by other users (or is not a directory)."""


def check_home_is_safe(home: Path) -> None:
    """Refuse an existing ``home`` that is not a directory, is not owned by this user, or is
    writable by group or others. Raises :class:`UnsafeHomeError` whose message says what to do."""
    info = home.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeHomeError(f"{home} is not a directory; choose another --home")
    if info.st_uid != os.geteuid():
        raise UnsafeHomeError(
            f"refusing to use {home} as a Lattica home: it is owned by uid {info.st_uid}, not by you "
            f"(uid {os.geteuid()}); use a directory of your own (--home)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(info.st_mode)
        raise UnsafeHomeError(
            f"refusing to use {home} as a Lattica home: other users can write to it (mode {mode:04o}); "
            f"use a directory of your own (e.g. --home {home / 'lattica'}), or run `chmod go-w {home}` "
            "if it is yours alone"
        )


def _make_private_dir(path: Path) -> bool:
    """Create ``path`` (and missing parents) with mode 0700 for ``path`` itself; returns
    whether it was created. An existing directory is left exactly as it is."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    except FileExistsError:
        return False
    # mkdir's mode is filtered by the umask; set it exactly on what we created.
    os.chmod(path, PRIVATE_DIR_MODE)
    return True


def init_home(home: Path) -> tuple[Identity, bool]:
    """Create the home, identity and ``config.toml`` if missing; returns (identity, created).

    Existing files are never overwritten and an existing home's mode is never changed.
    Raises :class:`UnsafeHomeError` for an existing home other users could write to.
    """
    if not _make_private_dir(home):
        check_home_is_safe(home)
    identity, created = load_or_create_identity(home / IDENTITY_FILE)
    config_path = home / CONFIG_FILE
    if not config_path.exists():
        config_path.write_text(render_config(NodeConfig()), encoding="utf-8")
    _make_private_dir(home / "logs")
    return identity, created

"""Checks of a node's home that the owner must hear about (printed by ``lattica init``, logged
by the daemon, listed by ``lattica status``)."""

from __future__ import annotations

from pathlib import Path

from lattica.home_layout import DATABASE_FILE, IDENTITY_FILE


def identity_warnings(home: Path, identity_created: bool) -> list[str]:
    """What the owner must know about the home's identity (empty when all is well).

    A missing ``identity.key`` next to an existing database means a new identity now runs over
    data written by the old one: its DHT records stay signed by the old key and peers know the
    old peer id. That must never be silent.
    """
    if identity_created and (home / DATABASE_FILE).exists():
        return [
            f"{IDENTITY_FILE} was missing, so a new identity was created over an existing "
            f"{DATABASE_FILE}; records written by the old identity are not this node's any more "
            f"(restore the old {IDENTITY_FILE} from a backup to get the old peer id back)"
        ]
    return []

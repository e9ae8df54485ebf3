"""Node configuration: ``config.toml`` in the node's home, overridden by command-line flags.

The file is written by ``lattica init`` with every setting spelled out, so a user sees what the
node listens on before it starts. Unknown keys are an error (a typo must not silently fall back
to a default).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lattica.errors import LatticaError

DEFAULT_PORT = 4001
CONFIG_FILE = "config.toml"
IDENTITY_FILE = "identity.key"
CONTROL_SOCKET = "control.sock"
DATABASE_FILE = "lattica.db"


class ConfigError(LatticaError):
    """``config.toml`` is unreadable or holds an invalid setting."""


def default_home() -> Path:
    """``$LATTICA_HOME`` if set, else ``~/.local/share/lattica``."""
    env = os.environ.get("LATTICA_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "lattica"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs besides its identity and socket. Times are in seconds."""

    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    bootstrap: tuple[str, ...] = ()
    idle_timeout_s: float = 60.0
    keepalive_interval_s: float = 15.0
    handshake_timeout_s: float = 10.0
    max_connections: int = 1024
    max_incoming_streams: int = 128
    dht_client_mode: bool = False
    dht_k: int = 20
    dht_alpha: int = 3
    log_level: str = "info"

    def with_overrides(self, **overrides: Any) -> NodeConfig:
        """A copy with the given non-``None`` settings replaced (CLI flags win over the file)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_SETTINGS = {f.name: f for f in fields(NodeConfig)}


def load_config(path: Path) -> NodeConfig:
    """Read ``config.toml``; a missing file gives the defaults. Raises :class:`ConfigError`."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return NodeConfig()
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _SETTINGS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        default = getattr(NodeConfig(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: {key} must be a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {key} must be true or false")
        elif isinstance(default, float):
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{path}: {key} must be a positive number")
            value = float(value)
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{path}: {key} must be a positive integer")
        elif not isinstance(value, type(default)):
            raise ConfigError(f"{path}: {key} must be a {type(default).__name__}")
        values[key] = value
    return NodeConfig(**values)


def render_config(config: NodeConfig) -> str:
    """The TOML text of ``config`` with a comment per setting, as ``lattica init`` writes it."""
    comments = {
        "listen": "UDP address the node listens on (QUIC and NAT traversal share it)",
        "bootstrap": 'peers to join through, as "PEERID@HOST:PORT"',
        "dht_client_mode": "true keeps this node out of other nodes' routing tables",
    }
    lines = ["# Lattica node configuration. Command-line flags override these.", ""]
    for name in _SETTINGS:
        value = getattr(config, name)
        if name in comments:
            lines.append(f"# {comments[name]}")
        if isinstance(value, tuple):
            rendered = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        elif isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, str):
            rendered = f'"{value}"'
        else:
            rendered = repr(value)
        lines.append(f"{name} = {rendered}")
    return "\n".join(lines) + "\n"

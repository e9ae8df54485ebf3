"""Node configuration: one tree of settings, read from ``config.toml`` and overridden by flags.

``NodeConfig`` has a few top-level settings (``listen``, ``bootstrap``, ``log_level``) and one
section per layer: ``net`` (:class:`~lattica.net.config.NetConfig`), ``dht``
(:class:`~lattica.dht.config.DhtConfig`), ``content``
(:class:`~lattica.content.config.ContentConfig`), ``nat`` (:class:`~lattica.nat.config.NatConfig`)
and ``crdt`` (:class:`~lattica.crdt.config.CrdtConfig`).
Each setting has exactly one default, in its section's class. In ``config.toml`` a section is a
TOML table (``[net]``, ``[dht]``, ``[nat.relay]``, ...). ``docs/config.md`` is generated from these classes
(``python -m lattica.config_docs``).

Loading (:func:`load_config`) is strict: an unknown key, a wrong type, a value out of bounds
(``nan`` and ``inf`` included) or an unparsable address is a :class:`ConfigError` that names the
file and the dotted key. Old flat files (``lattica init`` before the tree: ``idle_timeout_s``,
``dht_k``, ... at top level) still load: each old key is read into its new place with a
deprecation warning naming the new key; giving both spellings is an error.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import msgspec

from lattica.config_schema import iter_settings, toml_value, unknown_keys
from lattica.content.config import ContentConfig
from lattica.crdt.config import CrdtConfig
from lattica.dht.config import DhtConfig
from lattica.errors import LatticaError
from lattica.home_layout import CONFIG_FILE, CONTROL_SOCKET, DATABASE_FILE, IDENTITY_FILE, default_home
from lattica.nat.config import NatConfig
from lattica.net.address import InvalidAddressError, PeerAddr, network_address, parse_host_port
from lattica.net.config import NetConfig

log = logging.getLogger("lattica.config")

DEFAULT_PORT = 4001

LogLevel = Literal["debug", "info", "warning", "error"]

FILE_EXCLUDED_KEYS = frozenset({"dht.bootstrap_peers"})
"""Settings that exist in code but not in the file: ``bootstrap`` is the file's single list of
bootstrap peers (``Node`` appends it to ``dht.bootstrap_peers``)."""

RENAMED_KEYS: dict[str, str] = {
    "nat.autonat_dial_backs_per_peer_per_minute": "nat.autonat_dial_backs_per_address_per_minute",
}
"""Settings renamed because their meaning changed (so not read under the new name): an old key
is refused with the new name as the hint."""
LEGACY_FLAT_KEYS: dict[str, str] = {
    "idle_timeout_s": "net.idle_timeout_s",
    "keepalive_interval_s": "net.keepalive_interval_s",
    "handshake_timeout_s": "net.handshake_timeout_s",
    "max_connections": "net.max_connections",
    "max_incoming_streams": "net.max_incoming_streams",
    "dht_client_mode": "dht.client_mode",
    "dht_k": "dht.k",
    "dht_alpha": "dht.alpha",
}
"""Top-level keys written by ``lattica init`` before the config tree, and where they moved."""


class ConfigError(LatticaError):
    """``config.toml`` is unreadable or holds an invalid setting (the message names the key)."""


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Everything a node needs besides its identity and socket: a tree with one section per
    layer. Times are in seconds, sizes in bytes."""

    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    """UDP address the node listens on, HOST:PORT (QUIC and NAT traversal share it)."""
    bootstrap: tuple[str, ...] = ()
    """Peers to join the DHT through, as "PEERID@HOST:PORT" (or "HOST:PORT")."""
    log_level: LogLevel = "info"
    """Least severe log messages written to stderr and logs/lattica.log."""
    net: NetConfig = field(default_factory=NetConfig)
    """Transport, connection and RPC settings."""
    dht: DhtConfig = field(default_factory=DhtConfig)
    """DHT settings."""
    content: ContentConfig = field(default_factory=ContentConfig)
    """Content settings: chunk size and the bounds on manifests."""
    nat: NatConfig = field(default_factory=NatConfig)
    """NAT traversal: observed addresses, reachability (AutoNAT) and the relay (``[nat.relay]``)."""
    crdt: CrdtConfig = field(default_factory=CrdtConfig)
    """Replicated spaces (CRDT) settings."""

    def with_overrides(self, **overrides: Any) -> NodeConfig:
        """A copy with the given non-``None`` top-level settings replaced (CLI flags win over
        the file)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def bootstrap_peers(self) -> tuple[PeerAddr, ...]:
        """``dht.bootstrap_peers`` followed by the parsed ``bootstrap`` entries.

        Raises :class:`ConfigError` naming the entry that does not parse."""
        parsed = []
        for index, entry in enumerate(self.bootstrap):
            try:
                parsed.append(PeerAddr.parse(entry))
            except InvalidAddressError as exc:
                raise ConfigError(f"bootstrap[{index}]: {exc}") from None
        return self.dht.bootstrap_peers + tuple(parsed)


def load_config(path: Path) -> NodeConfig:
    """Read and validate ``config.toml``; a missing file gives the defaults.

    Raises :class:`ConfigError` whose message starts with the file and the dotted key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return NodeConfig()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    return config_from_mapping(raw, source=str(path))


def config_from_mapping(raw: dict[str, Any], *, source: str) -> NodeConfig:
    """Validate parsed TOML (``raw``) into a :class:`NodeConfig`; errors start with ``source``.

    Raises :class:`ConfigError`.
    """
    raw, moved = _move_legacy_keys(raw, source)
    unknown = unknown_keys(raw, NodeConfig, excluded=FILE_EXCLUDED_KEYS)
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{source}: {key}: unknown setting{_unknown_key_hint(key)}; see docs/config.md")
    try:
        config = msgspec.convert(raw, NodeConfig)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).rpartition(" - at `$")
        key = where.rstrip("`").lstrip(".") if message else ""
        if not message:
            message = str(exc)
        if key in moved:
            key = f"{key} (written as top-level `{moved[key]}`)"
        raise ConfigError(f"{source}: {key or 'top level'}: {message}") from None
    except LatticaError as exc:  # a section's own consistency check (__post_init__)
        raise ConfigError(f"{source}: {exc}") from None
    except RecursionError:  # a value nested hundreds of levels deep
        raise ConfigError(f"{source}: a value is nested too deeply") from None
    try:
        parse_host_port(config.listen)
    except InvalidAddressError as exc:
        raise ConfigError(f"{source}: listen: {exc}") from None
    try:
        config.bootstrap_peers()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    for index, entry in enumerate(config.nat.stun_servers):
        try:
            network_address(*parse_host_port(entry))
        except InvalidAddressError as exc:
            raise ConfigError(f"{source}: nat.stun_servers[{index}]: {exc}") from None
    net = config.net
    if net.keepalive_interval_s >= net.idle_timeout_s:
        # The peer would close the connection as idle before our keepalive kept it open.
        raise ConfigError(
            f"{source}: net.keepalive_interval_s: {net.keepalive_interval_s:g} s must be shorter than "
            f"net.idle_timeout_s ({net.idle_timeout_s:g} s)"
        )
    return config


def _unknown_key_hint(key: str) -> str:
    """What the user probably meant by an unknown dotted ``key``, as a parenthesised hint."""
    if key in FILE_EXCLUDED_KEYS:
        return " (list bootstrap peers in the top-level `bootstrap`)"
    if key in RENAMED_KEYS:
        return f" (renamed to `{RENAMED_KEYS[key]}`; see CHANGELOG.md)"
    name = key.rpartition(".")[2]
    known = [s.key for s in iter_settings(NodeConfig, excluded=FILE_EXCLUDED_KEYS)]
    meant = LEGACY_FLAT_KEYS.get(name) or next((k for k in known if k.rpartition(".")[2] == name), None)
    if meant is None or meant == key:
        return ""
    where = "after a [table] header, keys belong to that table; " if "." in key else ""
    return f" ({where}did you mean `{meant}`?)"


def _move_legacy_keys(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Read old flat keys into their sections; returns the new mapping and {new: old} keys."""
    if not any(key in raw for key in LEGACY_FLAT_KEYS):
        return raw, {}
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    moved: dict[str, str] = {}
    for old, new in LEGACY_FLAT_KEYS.items():
        if old not in raw:
            continue
        section, name = new.split(".")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            continue  # msgspec reports the section's type
        if name in table:
            raise ConfigError(f"{source}: {old}: also given as {new}; delete the top-level `{old}`")
        table[name] = raw.pop(old)
        moved[new] = old
        log.warning(
            "%s: top-level `%s` is deprecated; write it as `%s = ...` under [%s] (read as %s)",
            source,
            old,
            name,
            section,
            new,
        )
    return raw, moved


def render_config(config: NodeConfig) -> str:
    """The TOML text of ``config`` as ``lattica init`` writes it: every setting with its
    documentation as a comment; settings at their default are commented out (so a later
    release's better default applies), others are written as values."""
    defaults = NodeConfig()
    lines = [
        "# Lattica node configuration. Command-line flags override these; every key is described",
        "# in docs/config.md. A commented-out setting is at its default.",
    ]
    current_section = ""
    for setting in iter_settings(NodeConfig, excluded=FILE_EXCLUDED_KEYS):
        section, _, name = setting.key.rpartition(".")
        if section != current_section:
            lines += ["", f"[{section}]"]
            current_section = section
        value = _lookup(config, setting.key)
        lines.append("")
        lines += [f"# {line}" for line in _wrap(setting.doc)]
        always_written = not section  # top-level settings are what a user edits first
        prefix = "" if always_written or value != _lookup(defaults, setting.key) else "# "
        lines.append(f"{prefix}{name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def _lookup(config: NodeConfig, dotted_key: str) -> Any:
    value: Any = config
    for part in dotted_key.split("."):
        value = getattr(value, part)
    return value


def _wrap(text: str, width: int = 96) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


__all__ = [
    "CONFIG_FILE",
    "CONTROL_SOCKET",
    "DATABASE_FILE",
    "DEFAULT_PORT",
    "IDENTITY_FILE",
    "LEGACY_FLAT_KEYS",
    "ConfigError",
    "NodeConfig",
    "config_from_mapping",
    "default_home",
    "load_config",
    "render_config",
]

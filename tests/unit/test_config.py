"""config.toml: what init writes loads back; typos and bad values are refused, not defaulted."""

from __future__ import annotations

from pathlib import Path

import pytest

from lattica.config import ConfigError, NodeConfig, load_config, render_config
from lattica.home import init_home


def test_rendered_config_loads_back_identically(tmp_path: Path) -> None:
    config = NodeConfig(listen="127.0.0.1:5000", bootstrap=("a@127.0.0.1:1",), dht_client_mode=True)
    path = tmp_path / "config.toml"
    path.write_text(render_config(config))
    assert load_config(path) == config


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.toml") == NodeConfig()


@pytest.mark.parametrize(
    "text",
    [
        'lisen = "0.0.0.0:1"',  # typo
        "listen = 5",
        'bootstrap = "x"',
        "idle_timeout_s = -1",
        "max_connections = 1.5",
        "dht_client_mode = 1",
        "not toml at all [",
    ],
)
def test_invalid_settings_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


def test_flags_override_file_values() -> None:
    config = NodeConfig(listen="0.0.0.0:1").with_overrides(listen="127.0.0.1:2", bootstrap=None)
    assert config.listen == "127.0.0.1:2"
    assert config.bootstrap == ()


def test_init_home_is_private_and_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first, created = init_home(home)
    again, created_again = init_home(home)
    assert created and not created_again
    assert first.peer_id == again.peer_id
    assert home.stat().st_mode & 0o777 == 0o700
    assert (home / "identity.key").stat().st_mode & 0o777 == 0o600
    assert load_config(home / "config.toml") == NodeConfig()

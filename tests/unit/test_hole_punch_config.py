"""``[nat.hole_punch]`` in config.toml: defaults, loading, bounds named by key."""

from __future__ import annotations

import tomllib

import pytest

from lattica.config import ConfigError, NodeConfig, config_from_mapping, render_config


def test_defaults_round_trip_through_the_rendered_file() -> None:
    config = NodeConfig()
    assert config.nat.hole_punch.enabled is True and config.nat.hole_punch.rounds == 3
    text = render_config(config)
    assert "[nat.hole_punch]" in text
    assert config_from_mapping(tomllib.loads(text), source="config.toml") == config


def test_settings_load() -> None:
    table = {"enabled": False, "rounds": 5, "round_timeout_s": 2.5, "retry_after_s": 60, "max_concurrent": 4}
    loaded = config_from_mapping({"nat": {"hole_punch": table}}, source="config.toml").nat.hole_punch
    assert (loaded.enabled, loaded.rounds, loaded.round_timeout_s, loaded.retry_after_s, loaded.max_concurrent) == (
        False,
        5,
        2.5,
        60.0,
        4,
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rounds": 0}, "nat.hole_punch.rounds: Expected `int` >= 1"),
        ({"rounds": 11}, "nat.hole_punch.rounds: Expected `int` <= 10"),
        ({"round_timeout_s": 0.5}, "nat.hole_punch.round_timeout_s"),
        ({"max_concurrent": 0}, "nat.hole_punch.max_concurrent"),
        ({"bogus": 1}, "nat.hole_punch.bogus: unknown setting"),
    ],
)
def test_bad_settings_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="^config.toml: " + message.replace("[", r"\[").replace("]", r"\]")):
        config_from_mapping({"nat": {"hole_punch": table}}, source="config.toml")

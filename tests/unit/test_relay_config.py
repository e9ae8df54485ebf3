"""``[nat.relay]`` in config.toml: defaults, bounds, relays that must name their peer id."""

from __future__ import annotations

import tomllib

import pytest

from lattica.config import ConfigError, NodeConfig, config_from_mapping, render_config
from lattica.identity import Identity

RELAY = Identity.generate().peer_id


def test_defaults_are_off_and_init_writes_the_section_commented_out() -> None:
    config = NodeConfig()
    assert config.nat.relay.service is False and config.nat.relay.relays == ()
    text = render_config(config)
    assert "[nat.relay]" in text and "# service = false" in text
    assert config_from_mapping(tomllib.loads(text), source="config.toml") == config


def test_a_relay_list_and_service_load() -> None:
    config = config_from_mapping(
        {"nat": {"relay": {"service": True, "relays": [f"{RELAY}@198.51.100.7:4001"], "reservations": 1}}},
        source="config.toml",
    )
    assert config.nat.relay.service is True
    [relay] = config.nat.relay.relay_addresses()
    assert relay.peer_id == RELAY and relay.address == ("198.51.100.7", 4001)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"relays": ["198.51.100.7:4001"]}, "nat.relay: relays[0]: '198.51.100.7:4001' needs a peer id"),
        ({"relays": ["not an address"]}, "nat.relay"),
        ({"max_circuits": 0}, "nat.relay.max_circuits: Expected `int` >= 1"),
        ({"reservations": 9}, "nat.relay.reservations: Expected `int` <= 8"),
        ({"circuit_duration_s": float("inf")}, "nat.relay.circuit_duration_s"),
        ({"bogus": 1}, "nat.relay.bogus: unknown setting"),
    ],
)
def test_bad_relay_settings_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="^config.toml: " + message.replace("[", r"\[").replace("]", r"\]")):
        config_from_mapping({"nat": {"relay": table}}, source="config.toml")

"""config.toml: one settings tree; what init writes loads back; every bad value is refused
with the file and the dotted key named; old flat files still load (with a warning)."""

from __future__ import annotations

import inspect
import logging
import math
import os
import stat
from pathlib import Path

import pytest

from lattica.config import LEGACY_FLAT_KEYS, ConfigError, NodeConfig, load_config, render_config
from lattica.config_docs import DOCS_PATH, render_config_docs
from lattica.dht import DhtConfig
from lattica.home import UnsafeHomeError, init_home
from lattica.identity import Identity
from lattica.net.config import EndpointConfig, NetConfig
from lattica.net.datagram import UdpSocket
from lattica.net.manager import ConnectionManager
from lattica.net.rpc import Rpc
from lattica.node import Node

PEER = Identity.from_seed(bytes(32)).peer_id


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_rendered_config_loads_back_identically(tmp_path: Path) -> None:
    config = NodeConfig(
        listen="127.0.0.1:5000",
        bootstrap=(f"{PEER}@127.0.0.1:1", "127.0.0.1:2"),
        log_level="debug",
        net=NetConfig(idle_timeout_s=90.0, max_connections=7, rpc_max_request_bytes=4096),
        dht=DhtConfig(k=8, client_mode=True, maintenance_interval_s=30.0),
    )
    assert load_config(write(tmp_path, render_config(config))) == config


def test_rendered_defaults_are_commented_out_and_load_as_defaults(tmp_path: Path) -> None:
    text = render_config(NodeConfig())
    assert "# idle_timeout_s = 60.0" in text
    assert "\n[net]\n" in text and "\n[dht]\n" in text
    assert "bootstrap_peers" not in text
    assert load_config(write(tmp_path, text)) == NodeConfig()


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.toml") == NodeConfig()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('lisen = "0.0.0.0:1"', "lisen"),
        ("listen = 5", "listen"),
        ('listen = "nowhere"', "listen"),
        ('bootstrap = "x"', "bootstrap"),
        ('bootstrap = ["127.0.0.1:1", "nobody@127.0.0.1:2"]', "bootstrap[1]"),
        ('log_level = "loud"', "log_level"),
        ("net = 5", "net"),
        ("[net]\nidle_timeout_s = -1", "net.idle_timeout_s"),
        ("[net]\nidle_timeout_s = nan", "net.idle_timeout_s"),
        ("[net]\nkeepalive_interval_s = inf", "net.keepalive_interval_s"),
        ('[net]\nhandshake_timeout_s = "10"', "net.handshake_timeout_s"),
        ("[net]\nmax_connections = 1.5", "net.max_connections"),
        ("[net]\nkeepalive_interval_s = 60.0\nidle_timeout_s = 30.0", "net.keepalive_interval_s"),
        ("[net]\nrpc_max_request_bytes = 0", "net.rpc_max_request_bytes"),
        ("[net]\nidle_timeuot_s = 1", "net.idle_timeuot_s"),
        ("[dht]\nk = 33", "dht.k"),
        ("[dht]\nk = 0", "dht.k"),
        ("[dht]\nclient_mode = 1", "dht.client_mode"),
        ("[dht]\nquery_timeout_s = inf", "dht.query_timeout_s"),
        ('[dht]\nbootstrap_peers = ["127.0.0.1:1"]', "dht.bootstrap_peers"),
        ("dht_k = 0", "dht.k (written as top-level `dht_k`)"),
    ],
)
def test_invalid_settings_are_refused_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize("text", ["not toml at all [", "a = " + "[" * 5000, "a = " + "{b = " * 5000])
def test_unparsable_files_are_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


OLD_INIT_FILE = """\
# Lattica node configuration. Command-line flags override these.

# UDP address the node listens on (QUIC and NAT traversal share it)
listen = "0.0.0.0:4001"
bootstrap = []
idle_timeout_s = 45.0
keepalive_interval_s = 15.0
handshake_timeout_s = 10.0
max_connections = 1024
max_incoming_streams = 128
dht_client_mode = true
dht_k = 16
dht_alpha = 3
log_level = "info"
"""


def test_old_flat_file_loads_into_the_tree_with_a_warning_per_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lattica.config"):
        config = load_config(write(tmp_path, OLD_INIT_FILE))
    assert config.net.idle_timeout_s == 45.0
    assert config.dht.client_mode is True
    assert config.dht.k == 16
    assert len(caplog.records) == len(LEGACY_FLAT_KEYS)
    assert "write it as `k = ...` under [dht]" in caplog.text


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        ("[dht]\nk = 8\ndht_k = 16\n", "dht.k"),  # a flat key appended below a table
        ("[dht]\nidle_timeout_s = 5\n", "net.idle_timeout_s"),
        ('[net]\nlisten = "127.0.0.1:1"\n', "listen"),
    ],
)
def test_a_key_in_the_wrong_table_gets_a_hint(tmp_path: Path, text: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean `{meant}`"):
        load_config(write(tmp_path, text))


def test_old_and_new_spelling_of_one_setting_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "dht_k = 16\n[dht]\nk = 8\n")
    with pytest.raises(ConfigError, match=r"dht_k: also given as dht.k"):
        load_config(path)


def test_flags_override_file_values() -> None:
    config = NodeConfig(listen="0.0.0.0:1").with_overrides(listen="127.0.0.1:2", bootstrap=None)
    assert config.listen == "127.0.0.1:2"
    assert config.bootstrap == ()


def test_net_defaults_are_the_ones_rpc_and_manager_use_when_built_without_config() -> None:
    # One default per setting: Rpc and ConnectionManager still have keyword defaults of their
    # own; they must say what NetConfig says.
    net = NetConfig()
    rpc = inspect.signature(Rpc).parameters
    assert rpc["max_concurrent_inbound_per_peer"].default == net.rpc_max_concurrent_inbound_per_peer
    assert rpc["max_request_bytes"].default == net.rpc_max_request_bytes
    assert rpc["max_response_bytes"].default == net.rpc_max_response_bytes
    assert rpc["header_timeout_s"].default == net.rpc_header_timeout_s
    assert inspect.signature(ConnectionManager).parameters["idle_close_s"].default == net.idle_close_s
    assert isinstance(net, EndpointConfig)


def test_node_uses_every_section_of_the_tree() -> None:
    config = NodeConfig(
        bootstrap=(f"{PEER}@127.0.0.1:9",),
        net=NetConfig(idle_timeout_s=5.0, idle_close_s=7.0, rpc_max_request_bytes=1234, rpc_header_timeout_s=3.0),
        dht=DhtConfig(k=5, client_mode=True, bootstrap_peers=()),
    )
    sock = UdpSocket.bind("127.0.0.1", 0)
    try:
        node = Node(Identity.generate(), sock, config)
        assert node.endpoint.config is config.net
        assert node.connections.idle_close_s == 7.0
        assert (node.rpc.max_request_bytes, node.rpc.header_timeout_s) == (1234, 3.0)
        assert node.dht.config.k == 5 and node.dht.config.client_mode
        assert [str(p) for p in node.dht.config.bootstrap_peers] == [f"{PEER}@127.0.0.1:9"]
    finally:
        sock.close()


def test_node_refuses_a_bad_bootstrap_entry_naming_it() -> None:
    sock = UdpSocket.bind("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=r"bootstrap\[0\]"):
            Node(Identity.generate(), sock, NodeConfig(bootstrap=("x@127.0.0.1:1",)))
    finally:
        sock.close()


def test_docs_config_md_is_current() -> None:
    assert DOCS_PATH.read_text(encoding="utf-8") == render_config_docs(), (
        "docs/config.md is stale: run `python -m lattica.config_docs`"
    )


def test_config_docs_list_every_file_setting() -> None:
    docs = render_config_docs()
    for key in ("listen", "bootstrap", "log_level", "net.idle_close_s", "net.rpc_max_request_bytes", "dht.k"):
        assert f"`{key}`" in docs
    assert "bootstrap_peers" not in docs


# -- the home directory -----------------------------------------------------------------------


def test_init_home_is_private_and_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first, created = init_home(home)
    again, created_again = init_home(home)
    assert created and not created_again
    assert first.peer_id == again.peer_id
    assert home.stat().st_mode & 0o777 == 0o700
    assert (home / "logs").stat().st_mode & 0o777 == 0o700
    assert (home / "identity.key").stat().st_mode & 0o777 == 0o600
    assert load_config(home / "config.toml") == NodeConfig()


def test_existing_private_home_keeps_its_mode(tmp_path: Path) -> None:
    home = tmp_path / "mine"
    home.mkdir()
    os.chmod(home, 0o750)
    init_home(home)
    assert stat.S_IMODE(home.stat().st_mode) == 0o750


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770, 0o702])
def test_home_writable_by_others_is_refused_and_left_alone(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    with pytest.raises(UnsafeHomeError, match="other users can write to it"):
        init_home(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == mode
    assert list(shared.iterdir()) == []


def test_home_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "theirs"
    home.mkdir(mode=0o700)
    other_uid = os.geteuid() + 1
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    os.chown(home, other_uid, -1)
    with pytest.raises(UnsafeHomeError, match=f"owned by uid {other_uid}"):
        init_home(home)


def test_a_new_home_under_a_shared_directory_is_created_private(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    home = shared / "lattica"
    init_home(home)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_timeouts_in_code_may_be_infinite() -> None:
    # Only files are bounded; tests switch keepalives off with inf.
    assert math.isinf(NetConfig(keepalive_interval_s=math.inf).keepalive_interval_s)


def test_a_renamed_setting_is_refused_with_its_new_name(tmp_path: Path) -> None:
    # Its meaning changed (per address, not per peer id): not read silently under the new name.
    with pytest.raises(ConfigError, match=r"renamed to `nat\.autonat_dial_backs_per_address_per_minute`"):
        load_config(write(tmp_path, "[nat]\nautonat_dial_backs_per_peer_per_minute = 6\n"))

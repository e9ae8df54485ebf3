"""The ``state.*`` control methods on two sim_net nodes: typed params, one error shape, and a
watch stream that carries a write made on the other node."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
import trio
import trio.testing

from lattica.control import ControlError, MethodRegistry, Stream, limits
from lattica.control.crdt_methods import (
    AccessParams,
    ChangeResult,
    CreateParams,
    GetParams,
    JoinParams,
    SetParams,
    SpaceResult,
    ValueResult,
    ValuesResult,
    WatchParams,
    WatchStarted,
    WriteResultOut,
    register_crdt_methods,
)
from lattica.control.messages import NoParams
from lattica.crdt.space_id import MAX_NAME_CHARS
from lattica.identity import Identity
from lattica.net.address import PeerAddr
from lattica.node import Node
from sim_net import LinkConfig, Network

from ..sim.crdt_cluster import NODE_CONFIG


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Methods:
    """Call a node's registered methods by name, as the server would after decoding."""

    def __init__(self, node: Node) -> None:
        self.registry = MethodRegistry()
        register_crdt_methods(self.registry, node)

    async def __call__(self, name: str, params: object) -> Any:
        method = self.registry.get(name)
        assert method is not None, name
        return await method.handler(params)

    async def error(self, name: str, params: object) -> tuple[str, str]:
        with pytest.raises(ControlError) as info:
            await self(name, params)
        return info.value.code, info.value.message


async def test_state_methods_from_create_to_watch(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=31) as net:
        hosts = [net.add_host(f"198.51.100.{i + 1}", LinkConfig(latency_s=0.01)) for i in range(3)]
        ids = [Identity.from_seed(hashlib.sha256(b"ctl-crdt-%d" % i).digest()) for i in range(3)]
        async with (
            Node(ids[0], hosts[0].bind(4001), NODE_CONFIG, rng=random.Random(1)) as a,
            Node(ids[1], hosts[1].bind(4001), NODE_CONFIG, rng=random.Random(2)) as b,
            Node(ids[2], hosts[2].bind(4001), NODE_CONFIG, rng=random.Random(3)) as c,
        ):
            for other in (b, c):
                await other.connect(PeerAddr(a.listen_addresses()[0], a.peer_id))
            on_a, on_b, on_c = Methods(a), Methods(b), Methods(c)

            created = await on_a("state.create", CreateParams(name="catalog", writers=[str(b.peer_id)]))
            assert isinstance(created, SpaceResult)
            assert created.owner == str(a.peer_id) and created.writers == [str(a.peer_id), str(b.peer_id)]
            space = created.space_id

            # The local name is an alias of the id on the node that holds the space.
            written = await on_a("state.set", SetParams(space="catalog", key="shards", value=4))
            assert isinstance(written, WriteResultOut) and written.durable and written.seq >= 1
            got = await on_a("state.get", GetParams(space=space, key="shards"))
            assert isinstance(got, ValueResult) and got.value == 4 and type(got.value) is int

            joined = await on_b("state.join", JoinParams(space_id=space, peers=[str(a.peer_id)]))
            assert joined.space_id == space and joined.can_write
            assert (await on_b("state.get", GetParams(space=space))).values == {"shards": 4}

            stream = await on_b("state.watch", WatchParams(space=space))
            assert isinstance(stream, Stream) and stream.started == WatchStarted(space_id=space, name="catalog")
            value = {"assignments": {"peer-a": [0, 1]}, "ratio": 0.5, "ok": True, "note": None}
            await on_a("state.set", SetParams(space=space, key="plan", value=value))
            change = await stream.items.__anext__()
            assert change == ChangeResult(
                space_id=space, key="plan", value=value, author=str(a.peer_id), seq=change.seq, deleted=False
            )
            await stream.items.aclose()  # type: ignore[attr-defined]

            # B writes as a granted writer; C joins but may not write; only the owner grants.
            await on_b("state.set", SetParams(space=space, key="from-b", value="hi"))
            await on_c("state.join", JoinParams(space_id=space, peers=[str(a.peer_id)]))
            assert (await on_c("state.get", GetParams(space=space, key="plan"))).value == value
            assert (await on_c.error("state.set", SetParams(space=space, key="x", value=1)))[0] == "forbidden"
            code, _ = await on_b.error("state.grant", AccessParams(space=space, peer=str(c.peer_id)))
            assert code == "forbidden"
            granted = await on_a("state.grant", AccessParams(space=space, peer=str(c.peer_id)))
            assert str(c.peer_id) in granted.writers
            revoked = await on_a("state.revoke", AccessParams(space=space, peer=str(b.peer_id)))
            assert str(b.peer_id) not in revoked.writers

            listed = await on_a("state.ls", NoParams())
            assert [s.space_id for s in listed] == [space] and listed[0].name == "catalog"
            all_values = await on_a("state.get", GetParams(space=space))
            assert isinstance(all_values, ValuesResult) and all_values.values["plan"] == value


async def test_state_methods_refuse_with_one_error_shape(autojump_clock: trio.testing.MockClock) -> None:
    async with Network(seed=32) as net:
        host = net.add_host("198.51.100.1")
        async with Node(Identity.from_seed(b"\x07" * 32), host.bind(4001), NODE_CONFIG, rng=random.Random(1)) as a:
            on_a = Methods(a)
            space = (await on_a("state.create", CreateParams(name="s"))).space_id
            unknown = "a" * 52
            assert (await on_a.error("state.get", GetParams(space="nope")))[0] == "not-found"
            assert (await on_a.error("state.get", GetParams(space=unknown)))[0] == "not-found"
            assert (await on_a.error("state.get", GetParams(space=space, key="missing")))[0] == "not-found"
            assert (await on_a.error("state.watch", WatchParams(space="nope")))[0] == "not-found"
            assert (await on_a.error("state.set", SetParams(space=space, key="k", value=2**70)))[0] == "invalid-params"
            big = "x" * (NODE_CONFIG.crdt.max_update_bytes + 1)
            assert (await on_a.error("state.set", SetParams(space=space, key="k", value=big)))[0] == "too-large"
            assert (await on_a.error("state.create", CreateParams(name="w", writers=["not-a-peer"])))[0] == (
                "invalid-params"
            )
            assert (await on_a.error("state.join", JoinParams(space_id="not-an-id")))[0] == "invalid-params"
            code, message = await on_a.error("state.join", JoinParams(space_id=unknown))
            assert code == "failed" and "cannot join" in message
            # The rejected writes changed nothing.
            assert (await on_a("state.get", GetParams(space=space))).values == {}


def test_space_limits_agree_with_the_crdt_layer() -> None:
    assert limits.MAX_SPACE_NAME_CHARS == MAX_NAME_CHARS

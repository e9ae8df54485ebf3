"""``content.fetch_status`` with ``wait_s``: the reply comes when the fetch ends, not a poll later."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import msgspec
import pytest
import trio
import trio.testing

from lattica.content import Cid
from lattica.content.exchange_fetch import FetchProgress
from lattica.content.exchange_service import FetchJob
from lattica.control.content_methods import (
    MAX_WAITING_STATUS_CALLS,
    FetchStatus,
    FetchStatusParams,
    register_content_methods,
)
from lattica.control.registry import MethodRegistry
from lattica.node import Node

CID = Cid.parse("bagaybqabdyqgb552kcuesdoyapfiresidpui7pfyuby7hlh5xd2mkk6rcao5say")


def status_method(job: FetchJob):  # type: ignore[no-untyped-def]
    content = SimpleNamespace(store=None, jobs={job.id: job})
    registry = MethodRegistry()
    register_content_methods(registry, cast(Node, SimpleNamespace(content=content)))
    method = registry.get("content.fetch_status")
    assert method is not None
    return method.handler


async def test_a_waiting_status_call_returns_as_soon_as_the_fetch_ends(autojump_clock: trio.testing.MockClock) -> None:
    job = FetchJob(1, CID, None, FetchProgress(str(CID), state="fetching"))
    status = status_method(job)

    async def finish_later() -> None:
        await trio.sleep(0.1)
        job.progress.state = "done"
        job.finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_later)
        began = trio.current_time()
        reply = await status(FetchStatusParams(1, wait_s=5.0))
    assert isinstance(reply, FetchStatus) and reply.state == "done"
    assert trio.current_time() - began == pytest.approx(0.1)  # virtual time: at the end, not after 5 s


async def test_a_waiting_status_call_returns_after_wait_s_while_the_fetch_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = FetchJob(1, CID, None, FetchProgress(str(CID), state="fetching"))
    status = status_method(job)
    began = trio.current_time()
    reply = await status(FetchStatusParams(1, wait_s=0.25))
    assert reply.state == "fetching"
    assert trio.current_time() - began == pytest.approx(0.25)
    assert (await status(FetchStatusParams(1))).state == "fetching"  # no wait_s: at once


def test_wait_s_is_bounded() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"fetch_id": 1, "wait_s": 3600}, FetchStatusParams)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"fetch_id": 1, "wait_s": -1}, FetchStatusParams)


async def test_waiting_calls_are_capped_so_they_cannot_hold_every_control_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = FetchJob(1, CID, None, FetchProgress(str(CID), state="fetching"))
    status = status_method(job)
    returned: list[float] = []

    async def ask() -> None:
        await status(FetchStatusParams(1, wait_s=5.0))
        returned.append(trio.current_time())

    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(MAX_WAITING_STATUS_CALLS + 3):
            nursery.start_soon(ask)
    assert sorted(t - began for t in returned) == [0.0] * 3 + [5.0] * MAX_WAITING_STATUS_CALLS

"""Upload slots: caps, and which holder a newcomer takes a slot from (lattica/content/upload_slots.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.content.upload_slots import Upload, UploadSlots

KIB = 1024


def slots(**overrides: float) -> UploadSlots:
    settings_ = {
        "max_uploads": 3,
        "max_per_peer": 2,
        "max_per_source": 2,
        "grace_s": 10.0,
        "min_rate_bytes_per_s": 64 * KIB,
        "window_s": 10.0,
        "interval_s": 5.0,
    }
    settings_.update(overrides)
    return UploadSlots(**settings_)  # type: ignore[arg-type]


def fill(s: UploadSlots, now: float = 0.0) -> list[Upload]:
    held = []
    for n in range(s.max_uploads):
        admission = s.admit(f"p{n}", f"10.0.0.{n}", now, {})
        assert admission.upload is not None
        held.append(admission.upload)
    return held


def test_caps_per_peer_and_per_source_refuse_without_preempting_anyone() -> None:
    s = slots(max_uploads=10)
    for _ in range(2):
        assert s.admit("a", "10.0.0.1", 0.0, {}).upload is not None
    assert s.admit("a", "10.0.0.9", 100.0, {}).upload is None  # peer at its share
    assert s.admit("b", "10.0.0.1", 100.0, {}).upload is None  # host at its share
    assert s.admit("c", None, 100.0, {}).upload is not None  # through a relay: by peer only
    assert s.held == 3 and s.preemptions == 0


def test_a_full_node_refuses_when_every_holder_is_young_or_fast() -> None:
    s = slots()
    young = fill(s, now=0.0)
    # At 5 s every holder is inside its grace, however little it moved.
    assert s.admit("new", "10.9.9.9", 5.0, {u: 0 for u in young}).upload is None
    # At 20 s every holder moved 64 KiB/s or more: all keep their slots.
    fast = {u: 20 * 64 * KIB for u in young}
    assert s.admit("new", "10.9.9.9", 20.0, fast).upload is None
    assert s.held == 3 and s.preemptions == 0


def test_the_slowest_holder_below_the_floor_loses_its_slot_to_a_newcomer() -> None:
    s = slots()
    a, b, c = fill(s)
    rates = {a: 100 * KIB, b: 1 * KIB, c: 10 * KIB}  # bytes per second each moves

    def taken(now: float) -> dict[Upload, int]:
        return {u: int(now * rates.get(u, 100 * KIB)) for u in s.holders()}  # newcomers: fast

    admission = s.admit("new", "10.9.9.9", 20.0, taken(20.0))
    assert admission.upload is not None and admission.preempted is b
    assert b.preempted and s.held == 3 and s.preemptions == 1
    assert s.held_by("p1") == 0
    # One preemption per interval_s: the next newcomer waits for it ...
    assert s.admit("newer", "10.9.9.8", 24.0, taken(24.0)).upload is None
    # ... then takes the other slow one; the fast one is never chosen.
    second = s.admit("newer", "10.9.9.8", 25.0, taken(25.0))
    assert second.preempted is c
    later = s.admit("newest", "10.9.9.7", 40.0, taken(40.0))  # the rest are young or fast
    assert later.upload is None and not a.preempted


def test_the_host_holding_the_most_slots_loses_one_first() -> None:
    s = slots(max_uploads=4, max_per_source=3)
    crowd = [s.admit(f"x{n}", "10.0.0.1", 0.0, {}).upload for n in range(3)]  # one host, 3 slots
    (single,) = [s.admit("y", "10.0.0.2", 0.0, {}).upload]
    assert None not in crowd and single is not None
    taken = {u: 20 * 10 * KIB for u in crowd if u is not None}  # 10 KiB/s each
    taken[single] = 0  # slower, but its host holds one slot
    admission = s.admit("new", "10.9.9.9", 20.0, taken)
    assert admission.preempted in crowd and not single.preempted


def test_the_rate_is_measured_over_the_recent_window_not_the_whole_life() -> None:
    s = slots(max_uploads=1)
    (fast_then_idle,) = fill(s)
    moved = 10 * 1024 * KIB  # 10 MiB in its first seconds ...
    assert s.admit("new", "10.9.9.9", 20.0, {fast_then_idle: moved}).upload is None  # ~512 KiB/s over its life
    # ... and nothing since: 30 s later its last 10 s moved nothing.
    admission = s.admit("new", "10.9.9.9", 50.0, {fast_then_idle: moved})
    assert admission.preempted is fast_then_idle


def test_release_is_idempotent_and_a_preempted_slot_is_not_freed_twice() -> None:
    s = slots(max_uploads=1)
    (old,) = fill(s)
    admission = s.admit("new", "10.9.9.9", 30.0, {old: 0})
    assert admission.preempted is old
    s.release(old)  # the preempted stream's own cleanup, later
    s.release(old)
    assert s.held == 1 and s.held_by("new") == 1
    assert admission.upload is not None
    s.release(admission.upload)
    assert s.held == 0 and s.holders() == []


def test_holders_without_a_measurement_are_never_preempted() -> None:
    s = slots(max_uploads=1)
    fill(s)
    assert s.admit("new", "10.9.9.9", 100.0, {}).upload is None


def test_an_infinite_grace_turns_preemption_off() -> None:
    s = slots(max_uploads=1, grace_s=math.inf)
    (old,) = fill(s)
    assert s.admit("new", "10.9.9.9", 1e6, {old: 0}).upload is None


@pytest.mark.parametrize(
    "bad",
    [{"max_uploads": 0}, {"grace_s": 0.0}, {"window_s": -1.0}, {"interval_s": 0.0}, {"min_rate_bytes_per_s": -1}],
)
def test_nonsense_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        slots(**bad)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "release"]),
            st.integers(0, 5),  # peer
            st.integers(0, 3),  # source (3: through a relay)
            st.floats(0, 5),  # seconds since the last step
            st.integers(0, 1 << 20),  # bytes every holder moved in that step
        ),
        max_size=60,
    )
)
def test_counts_never_exceed_the_caps_and_match_the_holders(steps: list[tuple[str, int, int, float, int]]) -> None:
    s = slots(max_uploads=4, max_per_peer=2, max_per_source=3, grace_s=2.0, window_s=3.0, interval_s=1.0)
    now = 0.0
    taken: dict[Upload, int] = {}
    for action, peer, source, dt, moved in steps:
        now += dt
        for upload in taken:
            taken[upload] += moved
        if action == "admit":
            admission = s.admit(peer, None if source == 3 else f"10.0.0.{source}", now, taken)
            if admission.preempted is not None:
                assert admission.preempted.released and admission.upload is not None
                del taken[admission.preempted]
            if admission.upload is not None:
                taken[admission.upload] = 0
        elif taken:
            victim = next(iter(taken))
            s.release(victim)
            del taken[victim]
        holders = s.holders()
        assert set(holders) == set(taken) and s.held == len(holders) <= 4
        for p in {u.peer for u in holders}:
            assert s.held_by(p) == sum(u.peer == p for u in holders) <= 2
        for src in {u.source for u in holders if u.source is not None}:
            assert sum(u.source == src for u in holders) <= 3

"""Upload slots: caps, and the fair share by host when all are held (lattica/content/upload_slots.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.content.upload_slots import Upload, UploadSlots

KIB = 1024


def slots(max_uploads: int = 4, max_per_peer: int = 4, max_per_source: int = 4) -> UploadSlots:
    return UploadSlots(max_uploads=max_uploads, max_per_peer=max_per_peer, max_per_source=max_per_source)


def take(s: UploadSlots, peer: str, host: str, now: float = 0.0) -> Upload:
    admission = s.admit(peer, host, host, now, {})
    assert admission.upload is not None and admission.preempted is None
    return admission.upload


def test_caps_per_peer_and_per_source_refuse_without_preempting_anyone() -> None:
    s = slots(max_uploads=10, max_per_peer=2, max_per_source=2)
    take(s, "a", "10.0.0.1")
    take(s, "a", "10.0.0.1")
    assert s.admit("a", "10.0.0.9", "10.0.0.9", 1.0, {}).upload is None  # peer at its share
    assert s.admit("b", "10.0.0.1", "10.0.0.1", 1.0, {}).upload is None  # host at its share
    relayed = s.admit("c", ("relay", "10.0.0.7"), None, 1.0, {})  # no per-address cap through a relay
    assert relayed.upload is not None
    assert s.held == 3 and s.preemptions == 0


def test_a_newcomer_takes_a_slot_from_the_host_holding_the_most() -> None:
    s = slots(max_uploads=4)
    crowd = [take(s, f"x{n}", "10.0.0.1") for n in range(3)]
    single = take(s, "y", "10.0.0.2")
    moved = {crowd[0]: 300 * KIB, crowd[1]: 10 * KIB, crowd[2]: 200 * KIB, single: 0}
    admission = s.admit("new", "10.0.0.3", "10.0.0.3", 10.0, moved)
    # The host with 3 loses the stream that moved the least; the idler on a host with 1 is safe.
    assert admission.upload is not None and admission.preempted is crowd[1]
    assert crowd[1].preempted and crowd[1].released and not single.preempted
    assert (s.held, s.held_by_host("10.0.0.1"), s.held_by_host("10.0.0.3"), s.preemptions) == (4, 2, 1, 1)


def test_among_hosts_tied_for_the_most_the_slowest_stream_goes_whoever_came_first() -> None:
    s = slots(max_uploads=4)
    honest = [take(s, f"h{n}", "10.0.0.1") for n in range(2)]  # came first, downloading fast
    hog = [take(s, f"x{n}", "10.0.0.2", now=1.0) for n in range(2)]  # trickling
    moved = {honest[0]: 10 << 20, honest[1]: 10 << 20, hog[0]: 2 * KIB, hog[1]: 1 * KIB}
    admission = s.admit("new", "10.0.0.3", "10.0.0.3", 11.0, moved)
    assert admission.preempted is hog[1]


def test_equal_hosts_never_take_from_each_other() -> None:
    # Honest fetchers hold one stream each per seeder: a full seeder refuses the next one
    # instead of preempting a peer that is slow only because the seeder's uplink is shared.
    s = slots(max_uploads=2)
    a = take(s, "a", "10.0.0.1")
    b = take(s, "b", "10.0.0.2")
    assert s.admit("c", "10.0.0.3", "10.0.0.3", 100.0, {a: 0, b: 0}).upload is None
    # A host that holds one already gets nothing from a host holding two (the shares would not
    # become more even), only from one holding three or more.
    s = slots(max_uploads=3)
    take(s, "a1", "10.0.0.1")
    take(s, "a2", "10.0.0.1")
    take(s, "b1", "10.0.0.2")
    assert s.admit("b2", "10.0.0.2", "10.0.0.2", 1.0, {}).upload is None
    assert s.admit("c", "10.0.0.3", "10.0.0.3", 1.0, {}).upload is not None


def test_reopening_streams_does_not_keep_a_host_above_its_share() -> None:
    # Review finding: with a grace period per stream, closing and reopening each stream before
    # it ended kept every slot. Holdings are counted per host: a host that reopens still holds
    # as many, and a newcomer takes one from it at once.
    s = slots(max_uploads=4, max_per_source=4)
    streams = [take(s, f"x{n}", "10.0.0.1") for n in range(4)]
    for step in range(20):  # the attacker rotates a stream every step
        s.release(streams.pop(0))
        streams.append(take(s, f"x{step % 4}", "10.0.0.1", now=float(step)))
    admission = s.admit("honest", "10.0.0.9", "10.0.0.9", 20.0, {u: 0 for u in streams})
    assert admission.upload is not None and admission.preempted in streams


def test_release_is_idempotent_and_a_preempted_slot_is_not_freed_twice() -> None:
    s = slots(max_uploads=2)
    first = take(s, "a", "10.0.0.1")
    second = take(s, "a2", "10.0.0.1")
    admission = s.admit("new", "10.0.0.9", "10.0.0.9", 30.0, {})
    assert admission.preempted in (first, second) and admission.upload is not None
    s.release(admission.preempted)  # the preempted stream's own cleanup, later
    s.release(admission.preempted)
    assert s.held == 2 and s.held_by("new") == 1 and s.held_by_host("10.0.0.1") == 1
    for upload in (first, second, admission.upload):
        s.release(upload)
    assert s.held == 0 and s.holders() == [] and s.held_by_host("10.0.0.1") == 0


def test_nonsense_caps_are_refused() -> None:
    with pytest.raises(ValueError):
        slots(max_uploads=0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "release"]),
            st.integers(0, 5),  # peer
            st.integers(0, 3),  # host (3: through a relay, no per-address cap)
            st.integers(0, 1 << 20),  # bytes every holder moved since the last step
        ),
        max_size=60,
    )
)
def test_counts_never_exceed_the_caps_and_a_preemption_evens_the_shares(
    steps: list[tuple[str, int, int, int]],
) -> None:
    s = slots(max_uploads=4, max_per_peer=2, max_per_source=3)
    taken: dict[Upload, int] = {}
    for now, (action, peer, host_n, moved) in enumerate(steps):
        for upload in taken:
            taken[upload] += moved
        host = f"10.0.0.{host_n}" if host_n < 3 else ("relay", "10.0.0.3")
        if action == "admit":
            before = s.held_by_host(host)
            heaviest = max((s.held_by_host(u.host) for u in s.holders()), default=0)
            admission = s.admit(peer, host, host if host_n < 3 else None, float(now), taken)
            if admission.preempted is not None:
                assert admission.preempted.released and admission.upload is not None
                assert s.held_by_host(admission.preempted.host) + 1 == heaviest >= before + 2
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

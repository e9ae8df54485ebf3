"""``CrdtConfig``: the limits and timers of replicated spaces (the ``[crdt]`` table).

Field types carry their bounds (:mod:`lattica.setting_types`, checked when a file is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

from lattica.crdt.envelope import MAX_BODY_BYTES
from lattica.setting_types import Count, Seconds


@dataclass(frozen=True, kw_only=True)
class CrdtConfig:
    """Limits and timers of replicated spaces. Times are seconds, sizes bytes."""

    max_update_bytes: Annotated[int, msgspec.Meta(ge=64, le=MAX_BODY_BYTES)] = 256 * 1024
    """Largest single update (one ``set``) a replica accepts or makes."""
    max_space_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 34)] = 64 << 20
    """Largest total of envelopes one space may hold here; beyond it updates are refused."""
    max_updates_per_s: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] = 50.0
    """Sustained updates per second per writer and space (local writes, and pushes received)."""
    update_burst: Count = 500
    """Updates a writer may make in a burst above ``max_updates_per_s``."""
    max_spaces: Count = 64
    """Spaces this node holds at most (created plus joined)."""
    max_pending: Count = 1024
    """Out-of-order envelopes buffered per space until the missing ones arrive."""
    max_pending_per_author: Count = 256
    """Out-of-order envelopes of one author buffered per space (one writer cannot fill the
    buffer that the other writers' out-of-order envelopes need)."""
    max_pending_bytes: Annotated[int, msgspec.Meta(ge=MAX_BODY_BYTES * 2, le=1 << 32)] = 8 << 20
    """Bytes of out-of-order envelopes buffered per space at most (the memory a peer can make
    a space hold beyond what it accepted)."""
    batch_envelopes: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    """Envelopes in one sync reply or push at most."""
    batch_bytes: Annotated[int, msgspec.Meta(ge=4096, le=16 << 20)] = 128 * 1024
    """Bytes of envelopes in one sync reply or push at most (one envelope always fits). Keep a
    batch well within ``request_timeout_s`` on a lossy path (10% loss, 100 ms RTT: ~40 KB/s)."""
    fanout: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    """Replicas a new update is pushed to by each replica that accepts it."""
    push_delay_s: Annotated[float, msgspec.Meta(ge=0.0, le=60.0)] = 0.05
    """How long new envelopes wait to be pushed together (one message per replica per batch)."""
    max_replicas: Count = 64
    """Replicas remembered per space (from the DHT, from peers that contacted us)."""
    anti_entropy_interval_s: Seconds = 10.0
    """Each replica syncs version vectors with one random replica this often."""
    discovery_interval_s: Seconds = 300.0
    """How often a space's replicas are looked up in the DHT again."""
    request_timeout_s: Seconds = 10.0
    """Deadline of one sync or push request to one replica."""
    compact_every_updates: Count = 1000
    """Accepted updates after which a space's snapshot is written again (compaction)."""

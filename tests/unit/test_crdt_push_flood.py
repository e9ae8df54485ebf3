"""The service under the pending-buffer flood of a revoked writer (review finding: a revoked
writer made the owner hold ~1 GiB of never-applicable envelopes, and PushReply said nothing)."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from lattica.crdt import CrdtConfig, CrdtService, EnvelopeKind, sign_envelope
from lattica.crdt.sync import PROTOCOL_ID, Push, decode_reply, encode_message
from lattica.identity import Identity

OWNER = Identity.from_seed(hashlib.sha256(b"owner").digest())
REVOKED = Identity.from_seed(hashlib.sha256(b"revoked").digest())
HONEST = Identity.from_seed(hashlib.sha256(b"honest").digest())


class LoopbackRpc:
    """No network: keeps the registered handler so a test can call it as a peer would."""

    def add_handler(self, protocol_id: str, handler: Any) -> None:
        assert protocol_id == PROTOCOL_ID
        self.handler = handler


async def test_a_revoked_writers_flood_leaves_the_owner_holding_nothing_and_is_told_why() -> None:
    rpc = LoopbackRpc()
    crdt = CrdtService(OWNER, rpc, None, None, CrdtConfig(anti_entropy_interval_s=math.inf))  # type: ignore[arg-type]
    space = (await crdt.create_space("flood", writers=[REVOKED.peer_id, HONEST.peer_id])).space_id
    await crdt.revoke(space, REVOKED.peer_id)
    body = bytes(1_000_000)  # above crdt.max_update_bytes, within the envelope codec's limit
    reasons: set[str] = set()
    for seq in range(10, 60):
        push = Push(space.key, [sign_envelope(REVOKED, space, seq, EnvelopeKind.UPDATE, body)])
        reply = decode_reply(await rpc.handler(REVOKED.peer_id, encode_message(push)))
        assert reply.applied == 0 and len(reply.refused) == 1  # type: ignore[union-attr]
        reasons.update(reply.refused)  # type: ignore[union-attr]
    assert reasons == {"revoked"}
    replica = crdt.replica(space)
    assert replica.pending_count == 0 and replica.pending_bytes == 0

    # An honest writer's out-of-order envelope still waits for its predecessor.
    later = sign_envelope(HONEST, space, 2, EnvelopeKind.UPDATE, b"")
    reply = decode_reply(await rpc.handler(HONEST.peer_id, encode_message(Push(space.key, [later]))))
    assert reply.applied == 0 and reply.refused == []  # type: ignore[union-attr]
    assert replica.pending_count == 1

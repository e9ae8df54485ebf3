"""QUIC Stateless Reset (RFC 9000 section 10.3), sans-I/O: tokens, the reset packet, detection.

Why: a node that restarts has lost every connection's keys. Without a reset its peers keep
sending on the dead connection, and every request waits out its timeout before the connection
is given up (a fetch from a seeder that restarted stalled ~10 s). With one, the restarted node
answers the first packet of a connection it does not know with a Stateless Reset, which the peer
recognises by a token the node gave it for that connection id, and the peer drops the connection
within one round trip.

* **Tokens survive a restart.** Each connection id's token is a keyed BLAKE2b of the id
  (RFC 9000 section 10.3.2's construction, a MAC of the id under a static key); the key is
  derived from the node's identity seed, so the node that comes back computes the same token
  from nothing but the packet. The key reveals nothing of the seed (a one-way derivation with its
  own label) and nothing else uses it. Connection ids are random, so tokens do not link them.
* **Never more than was received, never a loop.** A reset is sent only for a short-header
  packet of at least :data:`MIN_TRIGGER_BYTES`, is one byte shorter than it (at most
  :data:`MAX_RESET_BYTES`), so two endpoints that both lost state cannot ping-pong resets
  forever (section 10.3.3), and nobody can use us to amplify. :class:`ResetLimiter` caps how
  many go out per second and to any one source, so a flood of junk costs us a bounded number of
  small sends and one address cannot use up what restarted peers need.
* **Detection in constant time.** :func:`is_stateless_reset` compares the datagram's last
  16 bytes to the token with ``hmac.compare_digest`` (section 10.3.1: without leaking the
  token).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final

from lattica.token_bucket import TokenBucket

TOKEN_BYTES: Final = 16
"""A Stateless Reset Token (RFC 9000 section 10.3)."""
MIN_RESET_BYTES: Final = 21
"""The smallest Stateless Reset: 5 bytes that look like a short header and its token."""
MIN_TRIGGER_BYTES: Final = MIN_RESET_BYTES + 1
"""Packets shorter than this get no reset: it must be shorter than what triggered it."""
MAX_RESET_BYTES: Final = 64
"""A reset is never longer than this, however large the packet that triggered it."""
_SHORT_HEADER_MASK: Final = 0xC0  # header form (0x80) and fixed bit (0x40)
_SHORT_HEADER: Final = 0x40
_KEY_LABEL: Final = b"lattica/quic-stateless-reset/v1"


def reset_key(identity_seed: bytes) -> bytes:
    """The static key of a node's tokens (32 bytes), derived from its 32-byte identity seed with
    a label of its own (BLAKE2b, keyed): the same node computes the same key after a restart."""
    return hashlib.blake2b(_KEY_LABEL, key=identity_seed, digest_size=32).digest()


def reset_token(key: bytes, connection_id: bytes) -> bytes:
    """The :data:`TOKEN_BYTES` token of ``connection_id`` under ``key`` (:func:`reset_key`)."""
    return hashlib.blake2b(connection_id, key=key, digest_size=TOKEN_BYTES).digest()


CID_TAG_BYTES: Final = 3
"""Bytes of a connection id that are a MAC of the rest (:func:`tagged_connection_id`)."""
_CID_PERSON: Final = b"lattica/cid-tag"


def tagged_connection_id(key: bytes, random_part: bytes) -> bytes:
    """A connection id made of ``random_part`` and :data:`CID_TAG_BYTES` of a keyed BLAKE2b of it
    under ``key`` (:func:`reset_key`): the node that issued it recognises it after a restart
    (:func:`is_our_connection_id`), so a Stateless Reset answers only ids it really issued and
    junk costs nothing of the reset budget (review finding: spoofed junk from many addresses
    used it all up). To anyone else the id is as random as before."""
    tag = hashlib.blake2b(random_part, key=key, digest_size=CID_TAG_BYTES, person=_CID_PERSON).digest()
    return random_part + tag


def is_our_connection_id(key: bytes, connection_id: bytes) -> bool:
    """Whether ``connection_id`` carries the tag :func:`tagged_connection_id` gives under ``key``
    (constant-time comparison)."""
    if len(connection_id) <= CID_TAG_BYTES:
        return False
    random_part = connection_id[:-CID_TAG_BYTES]
    return hmac.compare_digest(tagged_connection_id(key, random_part), connection_id)


def build_stateless_reset(token: bytes, trigger_bytes: int, unpredictable: bytes | None = None) -> bytes | None:
    """The Stateless Reset answering a packet of ``trigger_bytes`` (RFC 9000 section 10.3): a
    short-header first byte, unpredictable bits, then ``token``; one byte shorter than the
    trigger and at most :data:`MAX_RESET_BYTES`. None when the trigger is shorter than
    :data:`MIN_TRIGGER_BYTES` (no reset can be smaller than it). ``unpredictable`` supplies the
    random bytes (tests); by default they come from ``os.urandom``."""
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"a stateless reset token has {TOKEN_BYTES} bytes, not {len(token)}")
    if trigger_bytes < MIN_TRIGGER_BYTES:
        return None
    size = min(trigger_bytes - 1, MAX_RESET_BYTES)
    filler = unpredictable if unpredictable is not None else os.urandom(size - TOKEN_BYTES)
    if len(filler) != size - TOKEN_BYTES:
        raise ValueError(f"{size - TOKEN_BYTES} unpredictable bytes needed, got {len(filler)}")
    first = _SHORT_HEADER | (filler[0] & 0x3F)
    return bytes([first]) + filler[1:] + token


def is_stateless_reset(datagram: bytes, token: bytes) -> bool:
    """Whether ``datagram`` ends with ``token`` and could be a Stateless Reset (a short header,
    at least :data:`MIN_RESET_BYTES`); compared in constant time (RFC 9000 section 10.3.1)."""
    if len(datagram) < MIN_RESET_BYTES or (datagram[0] & _SHORT_HEADER_MASK) != _SHORT_HEADER:
        return False
    return hmac.compare_digest(datagram[-TOKEN_BYTES:], token)


class ResetLimiter:
    """How many Stateless Resets may go out: a token bucket of ``rate_per_s`` per second and
    ``burst`` at once for all sources, and at most one per ``per_source_interval_s`` to any one
    source, so junk from one address (or a ping-pong of resets with another node that lost its
    state too) cannot use up the budget that restarted peers' packets need. At most
    ``max_sources`` sources are remembered (the oldest are forgotten first). Sans-I/O:
    :meth:`allow` takes ``now`` (seconds, any monotonic clock) and the source (any hashable)."""

    def __init__(
        self,
        *,
        rate_per_s: float = 100.0,
        burst: int = 100,
        per_source_interval_s: float = 1.0,
        max_sources: int = 4096,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or per_source_interval_s < 0 or max_sources < 1:
            raise ValueError("a reset limiter needs a positive rate, a burst and a source cap of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.per_source_interval_s = per_source_interval_s
        self.max_sources = max_sources
        self._bucket: TokenBucket | None = None  # full at the first reset
        self._last_by_source: OrderedDict[Hashable, float] = OrderedDict()

    def allow(self, now: float, source: Hashable = None) -> bool:
        """Take one reset for ``source`` at ``now``; False when that source had one within
        ``per_source_interval_s`` or the shared bucket is empty."""
        last = self._last_by_source.get(source)
        if last is not None and 0.0 <= now - last < self.per_source_interval_s:
            return False
        if self._bucket is None:
            self._bucket = TokenBucket.full(self.rate_per_s, self.burst, now)
        if not self._bucket.take(now):
            return False
        self._last_by_source[source] = now
        self._last_by_source.move_to_end(source)
        while len(self._last_by_source) > self.max_sources:
            self._last_by_source.popitem(last=False)
        return True

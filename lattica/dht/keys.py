"""The 256-bit Kademlia key space.

Invariants:

* Every DHT id is 32 bytes (256 bits). A node's id is ``sha256(peer_id.key)``
  (:meth:`lattica.identity.PeerId.dht_key`), so nobody can choose where they sit.
* Distance is XOR of the ids read as big-endian unsigned integers.
* Record and provider keys are domain-separated sha256 digests, so a record key can never
  collide with a provider key or with a node id chosen on purpose.
"""

from __future__ import annotations

import hashlib
import random

from lattica.errors import LocalProtocolError
from lattica.identity import PeerId

KEY_BITS = 256
KEY_BYTES = KEY_BITS // 8
MAX_KEY_INT = (1 << KEY_BITS) - 1

_RECORD_DOMAIN = b"lattica/record/"
_PROVIDER_DOMAIN = b"lattica/provider/"


def key_to_int(key: bytes) -> int:
    """The big-endian integer value of a 32-byte id; raises :class:`LocalProtocolError` otherwise."""
    if len(key) != KEY_BYTES:
        raise LocalProtocolError(f"a DHT key is {KEY_BYTES} bytes, got {len(key)}")
    return int.from_bytes(key, "big")


def int_to_key(value: int) -> bytes:
    """The 32-byte big-endian form of an id in ``[0, 2**256)``."""
    if not 0 <= value <= MAX_KEY_INT:
        raise LocalProtocolError("a DHT key is a 256-bit unsigned integer")
    return value.to_bytes(KEY_BYTES, "big")


def xor_distance(a: bytes, b: bytes) -> int:
    """The Kademlia distance between two 32-byte ids."""
    return key_to_int(a) ^ key_to_int(b)


def common_prefix_bits(a: bytes, b: bytes) -> int:
    """How many leading bits two ids share (256 when they are equal)."""
    return KEY_BITS - xor_distance(a, b).bit_length()


def bucket_index(own: bytes, other: bytes) -> int:
    """Index of the fixed-size bucket ``other`` falls into, seen from ``own``.

    Bucket ``i`` holds ids at distance ``[2**i, 2**(i+1))``, so 255 is the farthest half of the
    space and 0 the closest neighbour. Raises :class:`LocalProtocolError` when ``own == other``.
    """
    distance = xor_distance(own, other)
    if distance == 0:
        raise LocalProtocolError("an id has no bucket relative to itself")
    return distance.bit_length() - 1


def node_key(peer: PeerId) -> bytes:
    """The DHT id of a peer (sha256 of its public key)."""
    return peer.dht_key()


def record_key(writer: PeerId | bytes, user_key: bytes) -> bytes:
    """The DHT key of the record ``user_key`` in ``writer``'s namespace.

    ``sha256(b"lattica/record/" + writer_public_key + user_key)``: only the writer can sign a
    record that lands under this key, so namespaces cannot be squatted.
    """
    writer_key = writer.key if isinstance(writer, PeerId) else writer
    return hashlib.sha256(_RECORD_DOMAIN + writer_key + user_key).digest()


def provider_key(cid: bytes) -> bytes:
    """The DHT key under which providers of content id ``cid`` are stored."""
    return hashlib.sha256(_PROVIDER_DOMAIN + cid).digest()


def random_key_between(low: int, high: int, rng: random.Random) -> bytes:
    """A uniformly random id in the inclusive integer range ``[low, high]`` (bucket refresh)."""
    return int_to_key(rng.randint(low, high))

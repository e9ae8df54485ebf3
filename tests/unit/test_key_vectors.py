"""Known-answer vectors for every key Lattica derives: fixed seeds give fixed strings.

Any change to these values changes peer ids on disk and where records live in the DHT, so it
must be deliberate. The first seed is RFC 8032 section 7.1 "TEST 1", so the public key and the
signature are also checked against the RFC, not only against ourselves.

Derivations (docs/decisions.md): peer id text = lowercase unpadded RFC 4648 base32 of the
32-byte Ed25519 public key; node id = sha256(public key); record key =
sha256("lattica/record/" || writer public key || user key); provider key =
sha256("lattica/provider/" || cid).
"""

from __future__ import annotations

import pytest

from lattica.dht.keys import node_key, provider_key, record_key
from lattica.identity import Identity, PeerId

RFC8032_TEST1_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
USER_KEY = b"model/llama-3-8b"

# seed hex, public key hex, peer id text, node id hex, record key of USER_KEY hex
VECTORS = [
    (
        RFC8032_TEST1_SEED,
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena",
        "21fe31dfa154a261626bf854046fd2271b7bed4b6abe45aa58877ef47f9721b9",
        "6b7519d667cb01b0252c1c3dfc1066f012a6481a74c9f8c0fc11f549f0e9098a",
    ),
    (
        "00" * 32,
        "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
        "hnvcppgow2sc2yvdvdicu3ynonsteflxdxrehjr2ybekdc2z3iuq",
        "139e3940e64b5491722088d9a0d741628fc826e09475d341a780acde3c4b8070",
        "0db1f1239e93ef82b8dc895356521fbd007032bca42c6eb3a5fad11e3838be3f",
    ),
    (
        bytes(range(32)).hex(),
        "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8",
        "aoqqpp7tzyil4hlq3umoos6atft6jvrqtosq2xy53sdgiesvgg4a",
        "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c",
        "c05a004107c6a35a3c25fde31ac5d0b5e9c4c69fd9835fb72ce5204c8241ef98",
    ),
]


@pytest.mark.parametrize(("seed", "public_key", "peer_id_text", "node_id", "record"), VECTORS)
def test_keys_derived_from_a_seed(seed: str, public_key: str, peer_id_text: str, node_id: str, record: str) -> None:
    peer = Identity.from_seed(bytes.fromhex(seed)).peer_id
    assert peer.key.hex() == public_key
    assert str(peer) == peer_id_text
    assert PeerId.parse(peer_id_text) == peer
    assert node_key(peer).hex() == node_id
    assert peer.dht_key().hex() == node_id
    assert record_key(peer, USER_KEY).hex() == record


@pytest.mark.parametrize(
    ("cid", "key"),
    [
        (b"bafy-example-cid", "8964f3a040a254b3a0253b3cae9ac277cb9c2ae3f72a5a00c9335e42f3326b24"),
        (b"", "5c38c77345c02a37bcd5152dd1abf41649a5a9304cc294ec56056339437756aa"),
    ],
)
def test_provider_keys(cid: bytes, key: str) -> None:
    assert provider_key(cid).hex() == key


def test_signature_matches_rfc8032_test1() -> None:
    identity = Identity.from_seed(bytes.fromhex(RFC8032_TEST1_SEED))
    assert identity.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )

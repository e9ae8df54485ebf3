"""Specification of lattica.identity: peer ids, signatures and key files."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.errors import InsecureKeyFileError, InvalidPeerIdError
from lattica.identity import (
    PEER_ID_BYTES,
    Identity,
    PeerId,
    load_identity,
    load_or_create_identity,
    save_identity,
)

deterministic = settings(derandomize=True, max_examples=200, deadline=None, database=None)

keys = st.binary(min_size=PEER_ID_BYTES, max_size=PEER_ID_BYTES)
BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"

SEED_A = bytes(range(32))
SEED_B = bytes(range(1, 33))


def _a_peer_id() -> PeerId:
    return Identity.from_seed(SEED_A).peer_id


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Run with umask 0, so only the code itself can keep a key file private."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- PeerId text form -------------------------------------------------------------------------


@deterministic
@given(keys)
def test_peer_id_text_round_trips(key: bytes) -> None:
    peer = PeerId(key)
    assert PeerId.parse(str(peer)) == peer


@deterministic
@given(keys)
def test_peer_id_text_is_52_lowercase_base32_characters(key: bytes) -> None:
    text = str(PeerId(key))
    assert len(text) == 52
    assert set(text) <= set(BASE32_ALPHABET)


def test_peer_id_text_is_unpadded_rfc4648_base32_of_the_key() -> None:
    key = bytes(range(32))
    expected = base64.b32encode(key).decode("ascii").rstrip("=").lower()
    assert str(PeerId(key)) == expected


@pytest.mark.parametrize("length", [0, 1, 51, 53, 56, 104])
def test_parse_rejects_wrong_length(length: int) -> None:
    text = (str(_a_peer_id()) * 3)[:length]
    with pytest.raises(InvalidPeerIdError):
        PeerId.parse(text)


def test_parse_rejects_uppercase() -> None:
    text = str(_a_peer_id())
    with pytest.raises(InvalidPeerIdError):
        PeerId.parse(text.upper())


def test_parse_rejects_a_single_uppercase_character() -> None:
    text = str(_a_peer_id())
    index = next(i for i, c in enumerate(text) if c.isalpha())
    mixed = text[:index] + text[index].upper() + text[index + 1 :]
    with pytest.raises(InvalidPeerIdError):
        PeerId.parse(mixed)


@pytest.mark.parametrize("bad_char", ["0", "1", "8", "9", "=", "!", " ", "-", "é", "\x00"])
def test_parse_rejects_characters_outside_the_base32_alphabet(bad_char: str) -> None:
    text = str(_a_peer_id())
    with pytest.raises(InvalidPeerIdError):
        PeerId.parse(bad_char + text[1:])
    with pytest.raises(InvalidPeerIdError):
        PeerId.parse(text[:20] + bad_char + text[21:])


@pytest.mark.parametrize("last_char", BASE32_ALPHABET)
def test_parse_accepts_only_the_canonical_trailing_bits(last_char: str) -> None:
    # 52 characters carry 260 bits; the key has 256, so the last character's low 4 bits must be 0.
    text = str(_a_peer_id())[:-1] + last_char
    if BASE32_ALPHABET.index(last_char) & 0b01111 == 0:
        assert str(PeerId.parse(text)) == text
    else:
        with pytest.raises(InvalidPeerIdError):
            PeerId.parse(text)


def test_parse_rejects_non_text() -> None:
    text = str(_a_peer_id())
    with pytest.raises(InvalidPeerIdError):
        PeerId.parse(text.encode("ascii"))  # type: ignore[arg-type]


def test_invalid_peer_id_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        PeerId.parse("not a peer id")


@deterministic
@given(st.text(max_size=60) | st.text(alphabet=BASE32_ALPHABET + "ABC01=", min_size=52, max_size=52))
def test_parse_returns_a_round_tripping_peer_id_or_raises_invalid_peer_id(text: str) -> None:
    try:
        peer = PeerId.parse(text)
    except InvalidPeerIdError:
        return
    assert str(peer) == text


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33), bytearray(32), "a" * 32])
def test_peer_id_must_be_exactly_32_bytes(key: object) -> None:
    with pytest.raises(InvalidPeerIdError):
        PeerId(key)  # type: ignore[arg-type]


def test_peer_ids_are_values_usable_as_keys() -> None:
    a1, a2 = PeerId(bytes(32)), PeerId(bytes(32))
    b = PeerId(b"\x01" * 32)
    assert a1 == a2
    assert a1 != b
    assert {a1: "x"}[a2] == "x"
    assert sorted([b, a1]) == [a1, b]


def test_short_form_is_a_prefix_of_the_text_form() -> None:
    peer = _a_peer_id()
    assert str(peer).startswith(peer.short())
    assert len(peer.short()) < len(str(peer))


def test_dht_key_is_the_sha256_of_the_public_key() -> None:
    peer = _a_peer_id()
    assert peer.dht_key() == hashlib.sha256(peer.key).digest()


# --- Signatures -------------------------------------------------------------------------------


def test_signature_verifies_under_the_signers_peer_id() -> None:
    identity = Identity.from_seed(SEED_A)
    signature = identity.sign(b"record")
    assert len(signature) == 64
    assert identity.peer_id.verify(b"record", signature)


@deterministic
@given(st.binary(max_size=256))
def test_any_message_signature_verifies(message: bytes) -> None:
    identity = Identity.from_seed(SEED_A)
    assert identity.peer_id.verify(message, identity.sign(message))


def test_verify_rejects_a_tampered_message() -> None:
    identity = Identity.from_seed(SEED_A)
    signature = identity.sign(b"record")
    assert not identity.peer_id.verify(b"recorD", signature)
    assert not identity.peer_id.verify(b"record ", signature)
    assert not identity.peer_id.verify(b"", signature)


def test_verify_rejects_another_peers_signature() -> None:
    signer, other = Identity.from_seed(SEED_A), Identity.from_seed(SEED_B)
    assert not other.peer_id.verify(b"record", signer.sign(b"record"))


def test_verify_rejects_a_signature_with_one_flipped_bit() -> None:
    identity = Identity.from_seed(SEED_A)
    signature = bytearray(identity.sign(b"record"))
    signature[10] ^= 0x01
    assert not identity.peer_id.verify(b"record", bytes(signature))


@pytest.mark.parametrize("garbage", [b"", b"\x00", bytes(63), bytes(64), b"\xff" * 64, bytes(65), b"x" * 200])
def test_verify_rejects_garbage_signatures_without_raising(garbage: bytes) -> None:
    assert not _a_peer_id().verify(b"record", garbage)


def test_verify_rejects_non_bytes_without_raising() -> None:
    identity = Identity.from_seed(SEED_A)
    signature = identity.sign(b"record")
    assert not identity.peer_id.verify("record", signature)  # type: ignore[arg-type]
    assert not identity.peer_id.verify(b"record", "signature")  # type: ignore[arg-type]


# --- Deterministic and random identities ------------------------------------------------------


def test_from_seed_is_deterministic() -> None:
    first, second = Identity.from_seed(SEED_A), Identity.from_seed(SEED_A)
    assert first.peer_id == second.peer_id
    assert first.seed == second.seed == SEED_A
    assert first.sign(b"m") == second.sign(b"m")


def test_different_seeds_give_different_peer_ids() -> None:
    assert Identity.from_seed(SEED_A).peer_id != Identity.from_seed(SEED_B).peer_id


def test_generate_gives_fresh_identities() -> None:
    assert Identity.generate().peer_id != Identity.generate().peer_id


def test_identity_repr_does_not_reveal_the_seed() -> None:
    identity = Identity.from_seed(SEED_A)
    assert SEED_A.hex() not in repr(identity)
    assert SEED_A.hex()[:16] not in repr(identity)


# --- Key files --------------------------------------------------------------------------------


def test_saved_identity_loads_back(tmp_path: Path) -> None:
    identity = Identity.from_seed(SEED_A)
    path = tmp_path / "key"
    save_identity(identity, path)
    loaded = load_identity(path)
    assert loaded.peer_id == identity.peer_id
    assert loaded.seed == identity.seed


def test_save_creates_the_file_with_mode_0600(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "key"
    save_identity(Identity.from_seed(SEED_A), path)
    assert _mode(path) == 0o600


def test_save_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "key"
    save_identity(Identity.from_seed(SEED_A), path)
    assert load_identity(path).peer_id == Identity.from_seed(SEED_A).peer_id


def test_save_refuses_to_overwrite_an_existing_identity(tmp_path: Path) -> None:
    path = tmp_path / "key"
    save_identity(Identity.from_seed(SEED_A), path)
    with pytest.raises(FileExistsError):
        save_identity(Identity.from_seed(SEED_B), path)
    assert load_identity(path).peer_id == Identity.from_seed(SEED_A).peer_id


def test_save_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    path = tmp_path / "key"
    save_identity(Identity.from_seed(SEED_A), path)
    with pytest.raises(FileExistsError):
        save_identity(Identity.from_seed(SEED_B), path)
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620, 0o602, 0o610, 0o601, 0o666])
def test_load_refuses_a_key_file_other_users_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "key"
    save_identity(Identity.from_seed(SEED_A), path)
    path.chmod(mode)
    with pytest.raises(InsecureKeyFileError) as excinfo:
        load_identity(path)
    assert "chmod 600" in str(excinfo.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_a_key_file_only_its_owner_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "key"
    save_identity(Identity.from_seed(SEED_A), path)
    path.chmod(mode)
    assert load_identity(path).peer_id == Identity.from_seed(SEED_A).peer_id


def test_load_of_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_identity(tmp_path / "absent")


HEADER = b"lattica-ed25519-seed-v1\n"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(SEED_A.hex().encode() + b"\n", id="no-header"),
        pytest.param(b"lattica-ed25519-seed-v2\n" + SEED_A.hex().encode(), id="other-header"),
        pytest.param(HEADER, id="header-only"),
        pytest.param(HEADER + b"zz" * 32 + b"\n", id="not-hex"),
        pytest.param(HEADER + SEED_A.hex().encode()[:-2] + b"\n", id="short-seed"),
        pytest.param(HEADER + SEED_A.hex().encode() + b"00\n", id="long-seed"),
        pytest.param(HEADER + SEED_A.hex().encode()[:-1] + b"\n", id="odd-hex"),
        pytest.param(HEADER + SEED_A.hex().encode() * 2 + b"\n", id="two-seeds"),
        pytest.param(HEADER + "é".encode() * 32 + b"\n", id="non-ascii"),
        pytest.param(HEADER + b"\xff\xfe" * 32, id="binary"),
    ],
)
def test_load_of_a_damaged_key_file_raises_value_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ValueError):
        load_identity(path)


def test_load_or_create_creates_then_loads_the_same_identity(tmp_path: Path) -> None:
    path = tmp_path / "state" / "key"
    created, was_created = load_or_create_identity(path)
    assert was_created
    assert path.exists()
    loaded, was_created_again = load_or_create_identity(path)
    assert not was_created_again
    assert loaded.peer_id == created.peer_id
    assert loaded.seed == created.seed


def test_load_or_create_creates_a_private_file(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "key"
    load_or_create_identity(path)
    assert _mode(path) == 0o600


def test_load_or_create_does_not_replace_an_insecure_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    save_identity(Identity.from_seed(SEED_A), path)
    path.chmod(0o644)
    with pytest.raises(InsecureKeyFileError):
        load_or_create_identity(path)
    path.chmod(0o600)
    assert load_identity(path).peer_id == Identity.from_seed(SEED_A).peer_id

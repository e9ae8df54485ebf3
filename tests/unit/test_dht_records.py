"""Signed records and provider records: signing, verification, ordering, bad input."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattica.dht.errors import InvalidRecordError, RecordTooLargeError, StaleRecordError
from lattica.dht.keys import provider_key, record_key
from lattica.dht.records import (
    MAX_VALUE_BYTES,
    ProviderRecord,
    SignedRecord,
    check_not_stale,
    decode_provider_record,
    decode_record,
    encode_record,
    sign_provider_record,
    sign_record,
    validate_provider_record,
    validate_record,
)
from lattica.identity import Identity

WRITER = Identity.from_seed(bytes([1]) * 32)
OTHER = Identity.from_seed(bytes([2]) * 32)
NOW = 1_750_000_000
TTL = 7 * 24 * 3600


def good_record(**changes: object) -> SignedRecord:
    record = sign_record(WRITER, b"key", b"value", seq=5, expires_at=NOW + 3600)
    return msgspec.structs.replace(record, **changes)


def test_valid_record_round_trips_and_verifies() -> None:
    record = good_record()
    assert record.dht_key == record_key(WRITER.peer_id, b"key")
    decoded = decode_record(encode_record(record))
    assert decoded == record
    validate_record(decoded, now=NOW, max_ttl_s=TTL, expected_dht_key=record.dht_key)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"value": b"other"}, "bad signature"),
        ({"seq": 6}, "bad signature"),
        ({"expires_at": NOW + 7200}, "bad signature"),
        ({"key": b"kez"}, "bad signature"),
        ({"writer": OTHER.peer_id.key}, "bad signature"),
        ({"signature": bytes(64)}, "bad signature"),
        ({"signature": b"short"}, "signature length"),
        ({"expires_at": NOW - 1}, "expired"),
    ],
)
def test_tampered_records_are_rejected(changes: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRecordError, match=match):
        validate_record(good_record(**changes), now=NOW, max_ttl_s=TTL)


def test_record_under_the_wrong_key_is_rejected() -> None:
    record = good_record()
    with pytest.raises(InvalidRecordError, match="does not belong"):
        validate_record(record, now=NOW, max_ttl_s=TTL, expected_dht_key=record_key(OTHER.peer_id, b"key"))


def test_record_signed_by_someone_else_for_the_writer_namespace_is_forged() -> None:
    forged = sign_record(OTHER, b"key", b"evil", seq=99, expires_at=NOW + 60)
    forged = msgspec.structs.replace(forged, writer=WRITER.peer_id.key)
    with pytest.raises(InvalidRecordError, match="bad signature"):
        validate_record(forged, now=NOW, max_ttl_s=TTL)


def test_too_far_future_expiry_is_rejected() -> None:
    record = sign_record(WRITER, b"key", b"v", seq=1, expires_at=NOW + TTL + 1)
    with pytest.raises(InvalidRecordError, match="future"):
        validate_record(record, now=NOW, max_ttl_s=TTL)


def test_oversize_value_is_refused_not_truncated() -> None:
    with pytest.raises(RecordTooLargeError, match="65537 bytes"):
        sign_record(WRITER, b"key", b"x" * (MAX_VALUE_BYTES + 1), seq=1, expires_at=NOW + 60)
    exact = sign_record(WRITER, b"key", b"x" * MAX_VALUE_BYTES, seq=1, expires_at=NOW + 60)
    validate_record(exact, now=NOW, max_ttl_s=TTL)
    # Received from the network: the decoder refuses it outright.
    raw = msgspec.msgpack.encode(
        {
            "writer": WRITER.peer_id.key,
            "key": b"key",
            "value": b"x" * (MAX_VALUE_BYTES + 1),
            "seq": 1,
            "expires_at": NOW + 60,
            "signature": bytes(64),
        }
    )
    with pytest.raises(InvalidRecordError):
        decode_record(raw)
    # Built locally and bypassing the decoder: validation still refuses it.
    big = msgspec.structs.replace(exact, value=b"x" * (MAX_VALUE_BYTES + 1))
    with pytest.raises(InvalidRecordError, match="larger"):
        validate_record(big, now=NOW, max_ttl_s=TTL)


def test_newest_sequence_wins_and_stale_is_rejected() -> None:
    v5 = good_record()
    v6 = sign_record(WRITER, b"key", b"new", seq=6, expires_at=NOW + 3600)
    v5_later = sign_record(WRITER, b"key", b"value", seq=5, expires_at=NOW + 7200)
    assert check_not_stale(v5, None)
    assert check_not_stale(v6, v5)
    assert check_not_stale(v5_later, v5)  # same version re-signed to live longer
    assert not check_not_stale(v5, v5)  # idempotent re-put
    with pytest.raises(StaleRecordError):
        check_not_stale(v5, v6)
    conflicting = sign_record(WRITER, b"key", b"other", seq=5, expires_at=NOW + 3600)
    with pytest.raises(StaleRecordError):
        check_not_stale(conflicting, v5)


def test_provider_record_signs_addresses() -> None:
    cid = b"\x01" * 34
    record = sign_provider_record(WRITER, cid, [("198.51.100.7", 4001)], expires_at=NOW + 60)
    assert record.dht_key == provider_key(cid)
    validate_provider_record(
        decode_provider_record(encode_record(record)),
        now=NOW,
        max_ttl_s=TTL,
        expected_dht_key=provider_key(cid),
    )
    moved = msgspec.structs.replace(record, addresses=[("203.0.113.66", 4001)])
    with pytest.raises(InvalidRecordError, match="bad signature"):
        validate_provider_record(moved, now=NOW, max_ttl_s=TTL)
    other_cid = msgspec.structs.replace(record, cid=b"\x02" * 34)
    with pytest.raises(InvalidRecordError):
        validate_provider_record(other_cid, now=NOW, max_ttl_s=TTL, expected_dht_key=provider_key(cid))


# -- bad input: a typed error or a valid value, never anything else -----------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_to_error_or_record(data: bytes) -> None:
    try:
        record = decode_record(data)
    except InvalidRecordError:
        return
    # Decoded (shape and bounds checked): a fixed point of encode/decode within the size bounds.
    assert decode_record(encode_record(record)) == record
    assert len(record.value) <= MAX_VALUE_BYTES
    try:
        validate_record(record, now=NOW, max_ttl_s=TTL)
    except InvalidRecordError:
        return
    # Validated: signed by its writer and unexpired (random bytes essentially never get here).
    assert NOW < record.expires_at <= NOW + TTL


_VALID = encode_record(good_record())
_VALID_PROVIDER = encode_record(sign_provider_record(WRITER, b"cid", [("198.51.100.7", 4001)], expires_at=NOW + 60))


@settings(max_examples=400)
@given(st.data())
def test_mutated_records_are_rejected_or_unchanged(data: st.DataObject) -> None:
    for raw, decode, validate in (
        (_VALID, decode_record, validate_record),
        (_VALID_PROVIDER, decode_provider_record, validate_provider_record),
    ):
        buf = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] = data.draw(st.integers(0, 255))
        try:
            record = decode(bytes(buf))  # type: ignore[operator]
            validate(record, now=NOW, max_ttl_s=TTL)  # type: ignore[operator]
        except InvalidRecordError:
            continue
        # Anything that still validates must be semantically the original record.
        assert record == decode(raw)  # type: ignore[operator]


field_values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.binary(max_size=80),
    st.text(max_size=10),
    st.lists(st.tuples(st.text(max_size=5), st.integers(-5, 70000)), max_size=10),
)


@settings(max_examples=300)
@given(st.sampled_from(["writer", "key", "value", "seq", "expires_at", "signature"]), field_values)
def test_records_with_any_field_value_give_typed_errors(name: str, value: object) -> None:
    record = msgspec.structs.replace(good_record(), **{name: value})
    try:
        validate_record(record, now=NOW, max_ttl_s=TTL)
    except InvalidRecordError:
        return
    assert record == good_record()


@settings(max_examples=300)
@given(st.sampled_from(["cid", "provider", "addresses", "expires_at", "signature"]), field_values)
def test_provider_records_with_any_field_value_give_typed_errors(name: str, value: object) -> None:
    base = sign_provider_record(WRITER, b"cid", [("198.51.100.7", 4001)], expires_at=NOW + 60)
    record: ProviderRecord = msgspec.structs.replace(base, **{name: value})
    try:
        validate_provider_record(record, now=NOW, max_ttl_s=TTL)
    except InvalidRecordError:
        return
    assert record == base

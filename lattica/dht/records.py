"""Signed DHT records and provider records: construction, signing, validation (sans-I/O).

Invariants:

* A :class:`SignedRecord` lives at ``record_key(writer, key)``: only the holder of ``writer``'s
  Ed25519 key can produce a record that validates there.
* A value is at most :data:`MAX_VALUE_BYTES` (64 KiB). Larger values are refused with
  :class:`RecordTooLargeError` when signing and :class:`InvalidRecordError` when received;
  nothing is ever truncated.
* Validation returns normally or raises :class:`InvalidRecordError` (or its subclass
  :class:`StaleRecordError`); it never raises anything else, whatever the record holds.
* Ordering: a record replaces another for the same key iff ``(seq, expires_at)`` is greater,
  so a writer can extend a record's life by re-signing it with the same sequence number.
* Times (``expires_at``) are unix seconds (wall clock), since they must mean the same on
  every node.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from typing import Annotated

import msgspec

from lattica.dht.errors import InvalidRecordError, RecordTooLargeError, StaleRecordError
from lattica.dht.keys import KEY_BYTES, provider_key, record_key
from lattica.errors import LocalProtocolError
from lattica.identity import Identity, PeerId
from lattica.net.datagram import Address

MAX_VALUE_BYTES = 64 * 1024
MAX_USER_KEY_BYTES = 512
MAX_CID_BYTES = 128
MAX_ADDRESSES_PER_PEER = 8
MAX_HOST_CHARS = 253
MAX_SEQ = (1 << 63) - 1  # sqlite INTEGER is signed 64-bit
SIGNATURE_BYTES = 64

Key32 = Annotated[bytes, msgspec.Meta(min_length=KEY_BYTES, max_length=KEY_BYTES)]
Signature = Annotated[bytes, msgspec.Meta(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_HOST_CHARS)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
WireAddress = tuple[Host, Port]
AddressList = Annotated[list[WireAddress], msgspec.Meta(max_length=MAX_ADDRESSES_PER_PEER)]
UnixSeconds = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]

_RECORD_DOMAIN = b"lattica/dht-record/v1\x00"
_PROVIDER_DOMAIN = b"lattica/dht-provider/v1\x00"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class SignedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A value ``writer`` published under its own namespace key ``key``.

    ``seq`` orders versions (newest wins), ``expires_at`` is unix seconds, ``signature`` is the
    writer's Ed25519 signature over all other fields (see :func:`record_signing_bytes`).
    """

    writer: Key32
    key: Annotated[bytes, msgspec.Meta(max_length=MAX_USER_KEY_BYTES)]
    value: Annotated[bytes, msgspec.Meta(max_length=MAX_VALUE_BYTES)]
    seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    expires_at: UnixSeconds
    signature: Signature

    @property
    def writer_id(self) -> PeerId:
        """The writer as a :class:`PeerId` (raises ``InvalidPeerIdError`` if malformed)."""
        return PeerId(self.writer)

    @property
    def dht_key(self) -> bytes:
        """Where this record lives in the DHT."""
        return record_key(self.writer, self.key)

    def supersedes(self, other: SignedRecord) -> bool:
        """True when this record should replace ``other`` (same key, newer version)."""
        return (self.seq, self.expires_at) > (other.seq, other.expires_at)


class ProviderRecord(msgspec.Struct, frozen=True, kw_only=True):
    """``provider`` announces that it serves content ``cid`` at ``addresses`` until ``expires_at``."""

    cid: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_CID_BYTES)]
    provider: Key32
    addresses: AddressList
    expires_at: UnixSeconds
    signature: Signature

    @property
    def provider_id(self) -> PeerId:
        """The provider as a :class:`PeerId`."""
        return PeerId(self.provider)

    @property
    def dht_key(self) -> bytes:
        """Where this provider record lives in the DHT."""
        return provider_key(self.cid)

    def address_list(self) -> list[Address]:
        """The addresses as ``(host, port)`` tuples."""
        return [(host, port) for host, port in self.addresses]


def record_signing_bytes(writer: bytes, key: bytes, value: bytes, seq: int, expires_at: int) -> bytes:
    """The exact bytes a record's signature covers (domain-separated, length-prefixed)."""
    return b"".join(
        (
            _RECORD_DOMAIN,
            writer,
            _U32.pack(len(key)),
            key,
            _U32.pack(len(value)),
            value,
            _U64.pack(seq),
            _U64.pack(expires_at),
        )
    )


def provider_signing_bytes(cid: bytes, provider: bytes, addresses: list[tuple[str, int]], expires_at: int) -> bytes:
    """The exact bytes a provider record's signature covers."""
    parts = [_PROVIDER_DOMAIN, _U32.pack(len(cid)), cid, provider, _U64.pack(expires_at)]
    parts.append(_U32.pack(len(addresses)))
    for host, port in addresses:
        encoded = host.encode("utf-8", "surrogatepass")
        parts += [_U32.pack(len(encoded)), encoded, _U16.pack(port)]
    return b"".join(parts)


def sign_record(identity: Identity, key: bytes, value: bytes, *, seq: int, expires_at: int) -> SignedRecord:
    """Sign ``value`` under ``key`` in ``identity``'s namespace.

    Raises :class:`RecordTooLargeError` when ``value`` exceeds :data:`MAX_VALUE_BYTES` or ``key``
    exceeds :data:`MAX_USER_KEY_BYTES`, and :class:`LocalProtocolError` for an out-of-range
    ``seq`` or ``expires_at``.
    """
    if len(value) > MAX_VALUE_BYTES:
        raise RecordTooLargeError(
            f"value is {len(value)} bytes; the DHT limit is {MAX_VALUE_BYTES} bytes "
            "(publish large data as content and put its id in the DHT)"
        )
    if len(key) > MAX_USER_KEY_BYTES:
        raise RecordTooLargeError(f"key is {len(key)} bytes; the limit is {MAX_USER_KEY_BYTES}")
    if not 0 <= seq <= MAX_SEQ or not 0 <= expires_at <= MAX_SEQ:
        raise LocalProtocolError("seq and expires_at must be in [0, 2**63)")
    writer = identity.peer_id.key
    signature = identity.sign(record_signing_bytes(writer, key, value, seq, expires_at))
    return SignedRecord(writer=writer, key=key, value=value, seq=seq, expires_at=expires_at, signature=signature)


def sign_provider_record(
    identity: Identity, cid: bytes, addresses: list[Address], *, expires_at: int
) -> ProviderRecord:
    """Sign an announcement that ``identity`` provides ``cid`` at ``addresses``.

    At most :data:`MAX_ADDRESSES_PER_PEER` addresses are kept (the first IP-literal ones; see
    :func:`is_dialable_address`). Raises :class:`LocalProtocolError` for an empty or oversize
    ``cid``.
    """
    if not 1 <= len(cid) <= MAX_CID_BYTES:
        raise LocalProtocolError(f"a content id is 1..{MAX_CID_BYTES} bytes, got {len(cid)}")
    valid = [(str(h), int(p)) for h, p in addresses if is_dialable_address(str(h), int(p))]
    kept = valid[:MAX_ADDRESSES_PER_PEER]
    provider = identity.peer_id.key
    signature = identity.sign(provider_signing_bytes(cid, provider, kept, expires_at))
    return ProviderRecord(cid=cid, provider=provider, addresses=kept, expires_at=expires_at, signature=signature)


def is_dialable_address(host: object, port: object) -> bool:
    """True when ``(host, port)`` is an IP literal (v4 or v6, no zone id) and a port in 1..65535.

    Addresses in DHT messages and records are claims of remote peers that end up in the
    transport's address book and so in ``sendto``; a name would be resolved synchronously by
    the system resolver and a host with a NUL byte makes ``sendto`` raise ``TypeError``
    (FIELD-NOTES "Measured by attacking the daemon"). So only numeric addresses are accepted.
    """
    if not isinstance(host, str) or type(port) is not int or not 1 <= port <= 65535:
        return False
    if not 1 <= len(host) <= MAX_HOST_CHARS or "%" in host:
        return False  # a zone id means nothing on another host (and may hold any character)
    return _is_ip_literal(host)


@functools.lru_cache(maxsize=4096)
def _is_ip_literal(host: str) -> bool:
    # Every DHT message names a few peers, mostly the same ones: parsing each was most of a
    # lookup's CPU. A hostile peer can only make the cache miss, which costs one parse.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_addresses(addresses: object) -> None:
    if not isinstance(addresses, list) or len(addresses) > MAX_ADDRESSES_PER_PEER:
        raise InvalidRecordError(f"at most {MAX_ADDRESSES_PER_PEER} addresses")
    for entry in addresses:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise InvalidRecordError("an address is (host, port)")
        host, port = entry
        if not is_dialable_address(host, port):
            raise InvalidRecordError(f"bad address {str(host)[:64]!r}:{port!r} (an IP literal and a port 1..65535)")


def _check_expiry(expires_at: object, now: float, max_ttl_s: float) -> None:
    if type(expires_at) is not int or not 0 <= expires_at <= MAX_SEQ:
        raise InvalidRecordError("expires_at out of range")
    if expires_at <= now:
        raise InvalidRecordError("record has expired")
    if expires_at > now + max_ttl_s:
        raise InvalidRecordError(f"record expires more than {max_ttl_s:.0f} s in the future")


def validate_record(
    record: SignedRecord,
    *,
    now: float,
    max_ttl_s: float,
    expected_dht_key: bytes | None = None,
) -> None:
    """Check a received record: shape, size, key, expiry and the writer's signature.

    ``now`` is unix seconds. Raises :class:`InvalidRecordError` and nothing else.
    """
    if not isinstance(record, SignedRecord):
        raise InvalidRecordError("not a record")
    writer, key, value = record.writer, record.key, record.value
    if not isinstance(writer, bytes) or len(writer) != KEY_BYTES:
        raise InvalidRecordError("bad writer id")
    if not isinstance(key, bytes) or len(key) > MAX_USER_KEY_BYTES:
        raise InvalidRecordError("bad record key")
    if not isinstance(value, bytes) or len(value) > MAX_VALUE_BYTES:
        raise InvalidRecordError(f"value larger than {MAX_VALUE_BYTES} bytes")
    if type(record.seq) is not int or not 0 <= record.seq <= MAX_SEQ:
        raise InvalidRecordError("seq out of range")
    _check_expiry(record.expires_at, now, max_ttl_s)
    check_record_signature(record, expected_dht_key=expected_dht_key)


def check_record_signature(record: SignedRecord, *, expected_dht_key: bytes | None = None) -> None:
    """Check that ``record`` was signed by its writer (and lives at ``expected_dht_key``), and
    nothing about its age: for a record that only proves which version its writer once signed
    (a holder's refusal quoting what it holds). Raises :class:`InvalidRecordError`."""
    if not isinstance(record.signature, bytes) or len(record.signature) != SIGNATURE_BYTES:
        raise InvalidRecordError("bad signature length")
    if expected_dht_key is not None and record.dht_key != expected_dht_key:
        raise InvalidRecordError("record does not belong under the requested key")
    message = record_signing_bytes(record.writer, record.key, record.value, record.seq, record.expires_at)
    try:
        genuine = PeerId(record.writer).verify(message, record.signature)
    except ValueError as exc:  # a writer id that is not a valid key
        raise InvalidRecordError(f"bad writer id: {exc}") from exc
    if not genuine:
        raise InvalidRecordError("bad signature: record was not signed by its writer")


def validate_provider_record(
    record: ProviderRecord,
    *,
    now: float,
    max_ttl_s: float,
    expected_dht_key: bytes | None = None,
) -> None:
    """Check a received provider record; raises :class:`InvalidRecordError` and nothing else."""
    if not isinstance(record, ProviderRecord):
        raise InvalidRecordError("not a provider record")
    cid, provider = record.cid, record.provider
    if not isinstance(cid, bytes) or not 1 <= len(cid) <= MAX_CID_BYTES:
        raise InvalidRecordError("bad content id")
    if not isinstance(provider, bytes) or len(provider) != KEY_BYTES:
        raise InvalidRecordError("bad provider id")
    _check_addresses(record.addresses)
    _check_expiry(record.expires_at, now, max_ttl_s)
    if not isinstance(record.signature, bytes) or len(record.signature) != SIGNATURE_BYTES:
        raise InvalidRecordError("bad signature length")
    if expected_dht_key is not None and record.dht_key != expected_dht_key:
        raise InvalidRecordError("provider record does not belong under the requested key")
    message = provider_signing_bytes(cid, provider, list(record.addresses), record.expires_at)
    if not PeerId(provider).verify(message, record.signature):
        raise InvalidRecordError("bad signature: provider record was not signed by its provider")


def check_not_stale(incoming: SignedRecord, held: SignedRecord | None) -> bool:
    """Decide whether ``incoming`` may replace ``held`` for the same key.

    Returns True when it is newer, False when it is the same version (an idempotent re-put),
    and raises :class:`StaleRecordError` when it is older or a conflicting same-version record.
    """
    if held is None or incoming.supersedes(held):
        return True
    if incoming == held:
        return False
    raise StaleRecordError(
        f"held record has seq {held.seq} (expires {held.expires_at}); "
        f"offered seq {incoming.seq} (expires {incoming.expires_at}) is not newer"
    )


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(SignedRecord)
_provider_decoder = msgspec.msgpack.Decoder(ProviderRecord)


def encode_record(record: SignedRecord | ProviderRecord) -> bytes:
    """The msgpack encoding of a record (for storage)."""
    return _record_encoder.encode(record)


def decode_record(data: bytes) -> SignedRecord:
    """Decode a :class:`SignedRecord`; raises :class:`InvalidRecordError` on malformed input.

    Decoding checks shape and bounds only; call :func:`validate_record` before trusting it.
    """
    try:
        return _record_decoder.decode(data)
    # msgspec errors, the UnicodeDecodeError it leaks, and RecursionError for deep nesting.
    except (ValueError, RecursionError) as exc:
        raise InvalidRecordError(f"malformed record: {exc}") from exc


def decode_provider_record(data: bytes) -> ProviderRecord:
    """Decode a :class:`ProviderRecord`; raises :class:`InvalidRecordError` on malformed input."""
    try:
        return _provider_decoder.decode(data)
    # msgspec errors, the UnicodeDecodeError it leaks, and RecursionError for deep nesting.
    except (ValueError, RecursionError) as exc:
        raise InvalidRecordError(f"malformed provider record: {exc}") from exc

"""The sans-I/O TLS channel: two channels pumped in memory prove each other's peer ids."""

from __future__ import annotations

import contextlib
import os
import random
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lattica.errors import LocalProtocolError, RemoteProtocolError
from lattica.identity import Identity
from lattica.net import tls_channel
from lattica.net.tls_channel import TlsChannel
from tests.unit.tls_records import RecordCrafter, client_recording_secrets

CLIENT = Identity.from_seed(b"c" * 32)
SERVER = Identity.from_seed(b"s" * 32)


def handshake(client: TlsChannel, server: TlsChannel) -> None:
    """Pump handshake bytes until neither side has anything to send."""
    client.start()
    server.start()
    for _ in range(10):
        to_server = client.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            return
        server.receive_data(to_server)
        client.receive_data(to_client)


def test_both_sides_prove_their_peer_ids() -> None:
    client = TlsChannel(CLIENT, is_client=True)
    server = TlsChannel(SERVER, is_client=False)
    handshake(client, server)
    assert client.handshake_complete and server.handshake_complete
    assert client.peer_id == SERVER.peer_id
    assert server.peer_id == CLIENT.peer_id


def test_application_bytes_round_trip_encrypted() -> None:
    client = TlsChannel(CLIENT, is_client=True)
    server = TlsChannel(SERVER, is_client=False)
    handshake(client, server)
    secret = b"model weights " * 1000
    client.send(secret)
    wire = client.data_to_send()
    assert b"model weights" not in wire
    assert server.receive_data(wire) == secret


def test_a_client_without_a_certificate_is_refused_by_the_server() -> None:
    client = TlsChannel(CLIENT, is_client=True, present_certificate=False)
    server = TlsChannel(SERVER, is_client=False)
    with pytest.raises(RemoteProtocolError, match="certificate"):
        handshake(client, server)
    assert server.peer_id is None
    # The client finished first (TLS 1.3); the server's alert then breaks it.
    with pytest.raises(RemoteProtocolError):
        client.receive_data(server.data_to_send())


def test_a_tampered_record_is_a_remote_protocol_error() -> None:
    client = TlsChannel(CLIENT, is_client=True)
    server = TlsChannel(SERVER, is_client=False)
    handshake(client, server)
    client.send(b"pay 10 to alice")
    wire = bytearray(client.data_to_send())
    wire[-3] ^= 0x01
    with pytest.raises(RemoteProtocolError):
        server.receive_data(bytes(wire))


def test_a_relay_that_forwards_bytes_learns_nothing_and_changes_no_identity() -> None:
    """A man in the middle that relays the handshake cannot make either side see another id:
    CertificateVerify signs this handshake's transcript with the certificate's key."""
    client = TlsChannel(CLIENT, is_client=True)
    server = TlsChannel(SERVER, is_client=False)
    relayed: list[bytes] = []
    client.start()
    for _ in range(10):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        relayed += [to_server, to_client]
        if not to_server and not to_client:
            break
        server.receive_data(to_server)
        client.receive_data(to_client)
    assert (client.peer_id, server.peer_id) == (SERVER.peer_id, CLIENT.peer_id)
    client.send(b"the secret")
    wire = client.data_to_send()
    assert b"the secret" not in b"".join([*relayed, wire])


def test_a_man_in_the_middle_with_its_own_key_is_seen_as_itself() -> None:
    mitm = Identity.from_seed(b"m" * 32)
    client = TlsChannel(CLIENT, is_client=True)
    impostor = TlsChannel(mitm, is_client=False)
    handshake(client, impostor)
    assert client.peer_id == mitm.peer_id != SERVER.peer_id


def test_sending_before_the_handshake_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        TlsChannel(CLIENT, is_client=True).send(b"early")


def test_garbage_instead_of_a_handshake_is_a_remote_protocol_error() -> None:
    server = TlsChannel(SERVER, is_client=False)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"GET / HTTP/1.1\r\n\r\n")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6), st.booleans())
def test_any_bytes_give_application_bytes_or_a_remote_protocol_error(chunks: list[bytes], is_client: bool) -> None:
    channel = TlsChannel(SERVER, is_client=is_client)
    channel.start()
    try:
        for chunk in chunks:
            assert isinstance(channel.receive_data(chunk), bytes)
    except RemoteProtocolError:
        return
    assert channel.peer_id is None or channel.handshake_complete


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_a_corrupted_handshake_flight_is_a_remote_protocol_error_or_harmless(position: int, flip: int) -> None:
    client = TlsChannel(CLIENT, is_client=True)
    server = TlsChannel(SERVER, is_client=False)
    client.start()
    hello = bytearray(client.data_to_send())
    hello[position % len(hello)] ^= flip
    try:
        server.receive_data(bytes(hello))
    except RemoteProtocolError:
        return
    assert server.peer_id is None  # one flight cannot authenticate anyone


# Records are decrypted straight through OpenSSL's binding where pyOpenSSL exposes it, and
# through pyOpenSSL's own recv otherwise: both paths must give the same bytes and errors.
@pytest.fixture(params=["direct", "pyopenssl"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pyopenssl":
        monkeypatch.setattr(tls_channel._DirectCalls, "create", classmethod(lambda cls, connection: None))
    return str(request.param)


def _pair() -> tuple[TlsChannel, TlsChannel]:
    client = TlsChannel(CLIENT, is_client=True)
    server = TlsChannel(SERVER, is_client=False)
    handshake(client, server)
    return client, server


def test_megabytes_fed_at_once_or_in_odd_slices_come_back_whole_and_in_order(read_path: str) -> None:
    payload = random.Random(11).randbytes(3 * 1024 * 1024 + 123)  # more than one plaintext buffer
    client, server = _pair()
    client.send(payload)
    wire = client.data_to_send()
    assert server.receive_data(wire) == payload
    client.send(payload)
    wire = client.data_to_send()
    got = b"".join(server.receive_data(wire[at : at + 7777]) for at in range(0, len(wire), 7777))
    assert got == payload


def test_data_and_close_notify_in_one_feed_give_the_data_then_the_close(read_path: str) -> None:
    client, server = _pair()
    client.send(b"last words")
    client.close()
    assert server.receive_data(client.data_to_send()) == b"last words"
    assert server.peer_closed


def test_a_tampered_record_behind_good_ones_is_a_remote_protocol_error(read_path: str) -> None:
    client, server = _pair()
    client.send(b"x" * 100_000)
    wire = bytearray(client.data_to_send())
    wire[-3] ^= 0x01
    with pytest.raises(RemoteProtocolError):
        server.receive_data(bytes(wire))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_many_connections_do_not_each_hold_a_receive_buffer() -> None:
    # A peer that opens connections must not make the node keep, per connection, what only one
    # read at a time uses: the 512 KiB plaintext buffer was per connection, and each full read
    # (256 KiB, the TCP driver's) touched its pages for good: 300 connections, +75 MiB.
    servers = []
    for _ in range(4):  # warm up: contexts, the first buffer
        client, server = _pair()
        client.send(b"x")
        server.receive_data(client.data_to_send())
    before = _rss_bytes()
    read = b"y" * (240 * 1024)
    for _ in range(300):
        client, server = _pair()
        client.send(read)
        assert len(server.receive_data(client.data_to_send())) == len(read)
        servers.append(server)  # the node's side stays; the peer's goes
    # What each server still holds: its context (~60 KiB) and its read BIO, grown to one read.
    assert _rss_bytes() - before < 110 * 1024 * 1024


def test_without_the_bio_length_handle_output_is_still_drained_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback where this pyOpenSSL cannot say how much is waiting (review finding: it
    # read application data instead of draining, so no handshake could start).
    monkeypatch.setattr(tls_channel, "_mem_bio_length", lambda connection: None)
    client, server = _pair()
    assert client.handshake_complete and server.handshake_complete
    payload = random.Random(3).randbytes(700_000)  # more than one drain step
    client.send(payload)
    assert server.receive_data(client.data_to_send()) == payload
    assert client.pending_output_bytes == 0


@pytest.mark.parametrize("handles", ["binding", "no-binding", "no-bio-length"])
def test_output_read_into_a_reused_buffer_is_the_whole_output_in_order(
    monkeypatch: pytest.MonkeyPatch, handles: str
) -> None:
    # What a lane sends from: every byte data_to_send would give, a buffer at a time, also
    # where pyOpenSSL lacks the private handles (and moved output aside to count it).
    if handles == "no-binding":
        monkeypatch.setattr(tls_channel, "_output_bio", lambda connection: None)
    if handles == "no-bio-length":
        monkeypatch.setattr(tls_channel, "_mem_bio_length", lambda connection: None)
    client, server = _pair()
    payload = random.Random(4).randbytes(1_000_003)
    client.send(payload[:600_000])
    assert client.pending_output_bytes > 600_000  # (the fallback moves it aside here)
    client.send(payload[600_000:])
    buffer = bytearray(100_000)
    received = []
    while n := client.read_output_into(buffer):
        received.append(server.receive_data(bytes(buffer[:n])))
    assert b"".join(received) == payload
    assert client.pending_output_bytes == 0 and client.data_to_send() == b""


class OddSink:
    """A PlaintextSink whose buffers have seeded odd sizes (as a frame receiver's would)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self.received = bytearray()
        self._buffer = bytearray()

    def get_buffer(self) -> memoryview:
        self._buffer = bytearray(self._random.randint(1, 40_000))
        return memoryview(self._buffer)

    def buffer_updated(self, n_bytes: int) -> None:
        assert 1 <= n_bytes <= len(self._buffer)
        self.received += self._buffer[:n_bytes]


def _outcome(
    sizes: list[int], cut: int, close: bool, flip_at: int | None, *, direct: bool, into: bool = False
) -> tuple[object, ...]:
    """What a server makes of one client's records, fed in slices of ``cut`` bytes
    (``into``: decrypted into an :class:`OddSink`'s buffers)."""
    pyopenssl_only = mock.patch.object(tls_channel._DirectCalls, "create", classmethod(lambda cls, connection: None))
    with contextlib.nullcontext() if direct else pyopenssl_only:
        client, server = _pair()
    payload = random.Random(len(sizes)).randbytes(sum(sizes))
    at = 0
    for size in sizes:
        client.send(payload[at : at + size])
        at += size
    if close:
        client.close()
    wire = bytearray(client.data_to_send())
    if flip_at is not None and wire:
        wire[flip_at % len(wire)] ^= 0x40
    got = bytearray()
    sink = OddSink(cut)
    try:
        for start in range(0, len(wire), cut):
            if into:
                placed = len(sink.received)
                assert server.receive_into(bytes(wire[start : start + cut]), sink) == len(sink.received) - placed
            else:
                got += server.receive_data(bytes(wire[start : start + cut]))
    except RemoteProtocolError:
        return ("error", flip_at is not None)
    return (bytes(sink.received if into else got) == payload, server.peer_closed)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 70_000), min_size=1, max_size=5),
    st.integers(1, 300_000),
    st.booleans(),
    st.none() | st.integers(0, 1 << 20),
)
def test_both_read_paths_give_the_same_bytes_closes_and_errors(
    sizes: list[int], cut: int, close: bool, flip_at: int | None
) -> None:
    direct = _outcome(sizes, cut, close, flip_at, direct=True)
    assert direct == _outcome(sizes, cut, close, flip_at, direct=False)
    # Decrypted straight into a receiver's buffers (a framed lane), by either path: the same.
    assert direct == _outcome(sizes, cut, close, flip_at, direct=True, into=True)
    assert direct == _outcome(sizes, cut, close, flip_at, direct=False, into=True)
    if flip_at is None:
        assert direct == (True, close)  # untouched: every byte, in order, and the close seen


@pytest.mark.parametrize("into", [False, True])
def test_a_flood_of_key_updates_is_refused_after_a_bounded_amount_of_work(into: bool) -> None:
    # Each requested KeyUpdate costs a key derivation and an answer: ~1.6 MB/s of them kept a
    # daemon's main thread busy, and OpenSSL sets no limit (review finding).
    client, secrets = client_recording_secrets(CLIENT)
    server = TlsChannel(SERVER, is_client=False)
    handshake(client, server)
    crafter = RecordCrafter(client, secrets)
    flood = b"".join(crafter.key_update(requested=True) for _ in range(20_000))  # 540 KB
    answered_before = 0
    with pytest.raises(RemoteProtocolError, match="post-handshake"):
        for at in range(0, len(flood), 256 * 1024):
            if into:  # the framed lane's read path checks the same budget
                server.receive_into(flood[at : at + 256 * 1024], OddSink(1))
            else:
                server.receive_data(flood[at : at + 256 * 1024])
            answered_before = server.pending_output_bytes
    # Refused within the first few slices of the first read, not after all 20,000.
    assert answered_before == 0
    assert server.pending_output_bytes < 27 * 5_000


def test_an_honest_key_update_now_and_then_is_accepted() -> None:
    client, secrets = client_recording_secrets(CLIENT)
    server = TlsChannel(SERVER, is_client=False)
    handshake(client, server)
    crafter = RecordCrafter(client, secrets)
    for round_ in range(20):
        wire = crafter.key_update(requested=round_ % 2 == 0) + crafter.record(b"after %d" % round_)
        assert server.receive_data(wire) == b"after %d" % round_

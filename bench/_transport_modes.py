"""The two sides of one transfer, for each transport that ``bench/transport.py`` compares.

Each side runs in its own process (see ``_harness``) and speaks this protocol on one stream:

* The sender connects (handshake not timed), then starts its clock, writes ``total_bytes`` in
  ``chunk_bytes`` writes, half-closes, and stops its clock when it reads the receiver's one-byte
  acknowledgement. That interval is the measurement.
* The receiver counts bytes until EOF, reports, then writes the acknowledgement. It also times
  first byte to EOF, as a cross-check.
* Both report CPU seconds spent in that interval (``time.process_time``): QUIC in Python is
  CPU-bound, so CPU per byte explains most differences.
* Only ``127.0.0.1`` is ever bound or dialled.

A QUIC receiver keeps running for ``LINGER_S`` after it reports, so a lost acknowledgement can
still be retransmitted; the parent kills it as soon as the sender has reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import trio
from _harness import report
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.stream import QuicStreamSender
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
ACK = b"\x01"
RECEIVE_BYTES = 256 * 1024
LINGER_S = 10.0

# Flow-control windows for the aioquic asyncio mode (aioquic's defaults are 1 MiB each, which
# caps one stream at 1 MiB per round trip). Lattica's endpoint has its own configuration.
QUIC_MAX_DATA_BYTES = 8 * 1024 * 1024
QUIC_MAX_STREAM_DATA_BYTES = 4 * 1024 * 1024
# aioquic's StreamWriter never pushes back (drain() returns at once), so the asyncio sender
# bounds the bytes its stream holds (unsent + unacknowledged) itself, like a socket send buffer.
ASYNCIO_SEND_BUFFER_BYTES = 2 * QUIC_MAX_STREAM_DATA_BYTES
ALPN = "lattica-bench"


@dataclass(frozen=True)
class Transfer:
    """What one run moves: ``total_bytes`` written ``chunk_bytes`` at a time."""

    total_bytes: int
    chunk_bytes: int

    def chunks(self) -> Iterator[bytes]:
        """The payload, as the sender writes it (random bytes, so nothing compresses)."""
        block = os.urandom(self.chunk_bytes)
        full, rest = divmod(self.total_bytes, self.chunk_bytes)
        for _ in range(full):
            yield block
        if rest:
            yield block[:rest]


class _Clock:
    """Wall and CPU time over one interval."""

    def __init__(self) -> None:
        self._wall_start = time.perf_counter()
        self._cpu_start = time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self._wall_start, time.process_time() - self._cpu_start


class _ReceiveTally:
    """Counts received bytes and times first byte to EOF."""

    def __init__(self) -> None:
        self.received_bytes = 0
        self._clock: _Clock | None = None

    def add(self, data: bytes | bytearray) -> None:
        if self._clock is None:
            self._clock = _Clock()
        self.received_bytes += len(data)

    def report(self) -> None:
        seconds, cpu_seconds = self._clock.elapsed() if self._clock else (0.0, 0.0)
        report(
            {
                "event": "received",
                "bytes": self.received_bytes,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
            }
        )


def _report_sent(transfer: Transfer, clock: _Clock) -> None:
    seconds, cpu_seconds = clock.elapsed()
    report(
        {
            "event": "sent",
            "bytes": transfer.total_bytes,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
        }
    )


def _check_ack(data: bytes) -> None:
    if data != ACK:
        raise ConnectionError(f"expected the one-byte acknowledgement, got {data!r}")


async def receive_payload(stream: trio.abc.Stream) -> None:
    """The receiver's side on a trio stream: count bytes to EOF, report, acknowledge."""
    tally = _ReceiveTally()
    while data := await stream.receive_some(RECEIVE_BYTES):
        tally.add(data)
    tally.report()
    await stream.send_all(ACK)


async def send_payload(stream: trio.abc.HalfCloseableStream, transfer: Transfer) -> None:
    """The sender's side of the protocol on a trio stream: time the writes, the half-close and
    the receiver's acknowledgement, then report."""
    clock = _Clock()
    for chunk in transfer.chunks():
        await stream.send_all(chunk)
    await stream.send_eof()
    _check_ack(await stream.receive_some(1))
    _report_sent(transfer, clock)


# --- plain trio TCP: the ceiling -------------------------------------------------------------


async def tcp_receiver(port: int) -> None:
    """Accept one TCP connection on loopback, count bytes to EOF, acknowledge, report."""
    listeners = await trio.open_tcp_listeners(port, host=LOOPBACK)
    listener = listeners[0]
    report({"event": "ready", "port": listener.socket.getsockname()[1], "peer": None})
    async with listener:
        stream = await listener.accept()
    async with stream:
        await receive_payload(stream)


async def tcp_sender(port: int, transfer: Transfer) -> None:
    """Send ``transfer`` over one TCP connection to the loopback receiver and report."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await send_payload(stream, transfer)


# --- aioquic's own asyncio API ---------------------------------------------------------------


def _quic_configuration(*, is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_data=QUIC_MAX_DATA_BYTES,
        max_stream_data=QUIC_MAX_STREAM_DATA_BYTES,
        verify_mode=ssl.CERT_NONE if is_client else None,
    )


def _self_signed_certificate() -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """An Ed25519 key and a self-signed certificate for it, made in-process."""
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lattica-bench")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None)
    )
    return key, certificate


async def _asyncio_receive(
    tally: _ReceiveTally, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, done: asyncio.Event
) -> None:
    while data := await reader.read(RECEIVE_BYTES):
        tally.add(data)
    tally.report()
    writer.write(ACK)
    writer.write_eof()
    done.set()


async def asyncio_receiver(port: int) -> None:
    """Serve one aioquic stream on loopback, count bytes to EOF, acknowledge, report."""
    configuration = _quic_configuration(is_client=False)
    configuration.private_key, configuration.certificate = _self_signed_certificate()
    done = asyncio.Event()
    tally = _ReceiveTally()
    handlers: set[asyncio.Task[None]] = set()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(_asyncio_receive(tally, reader, writer, done))
        handlers.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(handlers.discard)

    server = await serve(LOOPBACK, port, configuration=configuration, stream_handler=on_stream)
    try:
        assert server._transport is not None  # serve() returns the bound endpoint
        report({"event": "ready", "port": server._transport.get_extra_info("sockname")[1], "peer": None})
        await done.wait()
        await asyncio.sleep(LINGER_S)
    finally:
        server.close()


class _ProgressProtocol(QuicConnectionProtocol):
    """aioquic's protocol, plus ``progress``: set on every datagram received (ACKs included)."""

    def __init__(self, quic: QuicConnection, stream_handler: QuicStreamHandler | None = None):
        super().__init__(quic, stream_handler)
        self.progress = asyncio.Event()

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        super().datagram_received(data, addr)
        self.progress.set()


async def asyncio_sender(port: int, transfer: Transfer) -> None:
    """Send ``transfer`` on one aioquic stream to the loopback receiver and report."""
    async with connect(
        LOOPBACK,
        port,
        configuration=_quic_configuration(is_client=True),
        create_protocol=_ProgressProtocol,
    ) as connection:
        protocol = cast(_ProgressProtocol, connection)
        reader, writer = await protocol.create_stream()
        stream_id = writer.get_extra_info("stream_id")
        clock = _Clock()
        stream_sender: QuicStreamSender | None = None
        for chunk in transfer.chunks():
            writer.write(chunk)
            if stream_sender is None:  # aioquic creates the stream on its first write
                stream_sender = protocol._quic._streams[stream_id].sender
            # Private fields: aioquic has no public "send buffer low" signal (FIELD-NOTES).
            while stream_sender._buffer_stop - stream_sender._buffer_start > ASYNCIO_SEND_BUFFER_BYTES:
                protocol.progress.clear()
                await protocol.progress.wait()
        writer.write_eof()
        _check_ack(await reader.read(1))
        _report_sent(transfer, clock)


# --- Lattica's QUIC endpoint -----------------------------------------------------------------


async def _lattica_receive(conn: Any, tally: _ReceiveTally, done: trio.Event) -> None:
    stream = await conn.accept_stream()
    async with stream:
        while data := await stream.receive_some(RECEIVE_BYTES):
            tally.add(data)
        tally.report()
        await stream.send_all(ACK)
        # The sender may tear the connection down as soon as it has the acknowledgement.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_eof()
        done.set()
        await trio.sleep(LINGER_S)


async def lattica_receiver(port: int) -> None:
    """Accept one Lattica connection and stream on loopback, count to EOF, acknowledge, report."""
    from lattica.identity import Identity
    from lattica.net import Endpoint
    from lattica.net.datagram import UdpSocket

    identity = Identity.generate()
    endpoint = Endpoint(identity, UdpSocket.bind(LOOPBACK, port))
    tally = _ReceiveTally()
    done = trio.Event()
    async with trio.open_nursery() as nursery:

        def on_connection(conn: Any) -> None:
            nursery.start_soon(_lattica_receive, conn, tally, done)

        endpoint.set_connection_handler(on_connection)
        await nursery.start(endpoint.run)
        report({"event": "ready", "port": endpoint.local_address[1], "peer": str(identity.peer_id)})
        await done.wait()
        await trio.sleep(LINGER_S)
        nursery.cancel_scope.cancel()


async def lattica_sender(port: int, peer: str, transfer: Transfer) -> None:
    """Send ``transfer`` on one Lattica stream to the loopback receiver ``peer`` and report."""
    from lattica.identity import Identity, PeerId
    from lattica.net import Endpoint
    from lattica.net.datagram import UdpSocket

    endpoint = Endpoint(Identity.generate(), UdpSocket.bind(LOOPBACK, 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        conn = await endpoint.connect((LOOPBACK, port), expected_peer=PeerId.parse(peer))
        stream = await conn.open_stream()
        async with stream:
            await send_payload(stream, transfer)
        nursery.cancel_scope.cancel()


def lattica_configuration() -> dict[str, Any]:
    """The endpoint configuration the ``lattica`` mode runs with (defaults), for the results."""
    import dataclasses

    from lattica.net import config

    described: dict[str, Any] = dataclasses.asdict(config.EndpointConfig())
    for name in ("ALPN_PROTOCOL", "STREAM_SEND_BUFFER_BYTES"):
        if hasattr(config, name):
            described[name.lower()] = getattr(config, name)
    return described


def lattica_unavailable_reason() -> str | None:
    """Why Lattica's endpoint cannot be benchmarked in this tree, or ``None`` if it can."""
    try:
        from lattica.identity import Identity, PeerId  # noqa: F401
        from lattica.net import Endpoint  # noqa: F401
        from lattica.net.datagram import UdpSocket  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None

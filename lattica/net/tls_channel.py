"""TLS 1.3 with mutual peer-id authentication over any byte stream, sans-I/O (pyOpenSSL).

The same identity as QUIC (:mod:`lattica.net.tls_identity`): each side presents the self-signed
certificate of its Ed25519 node key, and the peer id of the other side *is* that certificate's
public key. TLS 1.3 CertificateVerify (RFC 8446 section 4.4.3) is a signature over the handshake
transcript with that key, so a peer proves its id by key possession, bound to this very
handshake; nothing a man in the middle relays or replays can produce it for another session.

Why pyOpenSSL: the stdlib ``ssl`` module has no certificate-verify callback, so a server that
requests a client certificate rejects every self-signed one; and Python 3.11 offers neither a
keying-material exporter nor a TLS 1.3 channel binding to bind an application-level proof to
the session. pyOpenSSL's ``set_verify`` callback lets both sides accept any certificate *chain*
(there is no CA) while OpenSSL still checks the CertificateVerify signature; its memory BIOs
make the channel sans-I/O: bytes in, bytes out, no socket, no clock (see docs/decisions.md).

Invariants:

* TLS 1.3 only; ALPN required on both sides: ``lattica-tcp/1`` (yamux follows at once, there
  is no further negotiation) or ``lattica-lane/1`` (one stream, :mod:`lattica.net.tcp_lane`);
  a client offers one, a server accepts either; no resumption: the session cache is off on both sides, so every
  connection presents and proves its certificate (OpenSSL's server still sends its two TLS
  1.3 NewSessionTicket messages; no client here keeps or offers them).
* The server requires a client certificate (``VERIFY_FAIL_IF_NO_PEER_CERT``).
* :attr:`TlsChannel.peer_id` is set only once the handshake completed with an Ed25519
  certificate; every failure the peer causes is a :class:`~lattica.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Final, Protocol

from OpenSSL import SSL

from lattica.errors import LocalProtocolError, RemoteProtocolError
from lattica.identity import Identity, PeerId
from lattica.net.tls_identity import certificate_for, peer_id_from_certificate, private_key_for

ALPN_TCP_PROTOCOL: Final = b"lattica-tcp/1"
"""ALPN id of Lattica over TLS 1.3 over TCP: yamux (:mod:`lattica.net.yamux`) inside."""
ALPN_LANE_PROTOCOL: Final = b"lattica-lane/1"
"""ALPN id of a bulk lane: one stream per connection, no multiplexer (:mod:`lattica.net.tcp_lane`)."""
_SERVED_ALPN: Final = (ALPN_TCP_PROTOCOL, ALPN_LANE_PROTOCOL)

# SSL_read returns at most one TLS record (16 KiB of plaintext) per call, and pyOpenSSL
# allocates the buffer it asks for on every call: ask for one record's worth.
_RECORD_BYTES = 16 * 1024
# Plaintext decrypted per receive_data into one reused buffer before it is copied out as bytes.
_PLAIN_BUFFER_BYTES = 512 * 1024
# Ciphertext handed to OpenSSL at once: what a flood of tiny records can make it do before the
# post-handshake budget is checked (~2,400 KeyUpdates, ~40 ms).
_FEED_BYTES = 64 * 1024
# Post-handshake state changes allowed (OpenSSL reports a few per message), and one more per
# this much application data received.
_POST_HANDSHAKE_EVENTS = 256
_BYTES_PER_POST_HANDSHAKE_EVENT = 1024 * 1024
# The write BIO is drained this much per call where its length cannot be asked.
_BIO_READ_BYTES = 256 * 1024


def _mem_bio_length(connection: SSL.Connection) -> int | None:
    """Bytes waiting in ``connection``'s outgoing memory BIO, or None where this pyOpenSSL has
    not the (private) handles to ask. Why ask: one ``bio_read`` of exactly that many bytes
    halves the cost of draining it (measured: 7 against 14 ms per 128 MiB), no join."""
    try:
        return int(SSL._lib.BIO_get_mem_data(connection._from_ssl, SSL._ffi.NULL))  # type: ignore[attr-defined]
    except AttributeError:
        return None


def _output_bio(connection: SSL.Connection) -> tuple[Any, Any, Any] | None:
    """OpenSSL's binding and ``connection``'s outgoing memory BIO (private pyOpenSSL names), or
    None where this pyOpenSSL lacks them."""
    try:
        return SSL._lib, SSL._ffi, connection._from_ssl  # type: ignore[attr-defined]
    except AttributeError:
        return None


class PlaintextSink(Protocol):
    """Where :meth:`TlsChannel.receive_into` puts decrypted bytes: the ``get_buffer`` /
    ``buffer_updated`` shape of asyncio's ``BufferedProtocol``
    (:class:`~lattica.net.frame_receiver.FrameReceiver` is one)."""

    def get_buffer(self) -> memoryview:
        """A non-empty writable view: where the next bytes go."""
        ...

    def buffer_updated(self, n_bytes: int) -> None:
        """``n_bytes`` were written at the start of the last :meth:`get_buffer`."""
        ...


def copy_into(sink: PlaintextSink, data: bytes | bytearray | memoryview) -> None:
    """Put ``data`` into ``sink`` buffer by buffer (a copy)."""
    view = memoryview(data).cast("B")
    while view:
        target = sink.get_buffer()
        n = min(len(target), len(view))
        target[:n] = view[:n]
        sink.buffer_updated(n)
        view = view[n:]


class _DirectCalls:
    """OpenSSL's ``SSL_read`` and ``SSL_get_error`` called straight through the binding
    pyOpenSSL itself calls them through, for one connection.

    Why: SSL_read yields one 16 KiB record per call, and pyOpenSSL's ``recv`` wraps each call in
    a fresh buffer, a copy out to ``bytes`` and its error machinery: 20,000 calls and two extra
    copies per 256 MiB, a fifth of the fetching daemon's main thread. Here records are decrypted
    into one reused buffer and copied out once. Anything but "needs more input" goes back to
    pyOpenSSL's own ``recv``, which raises its typed errors. ``None`` from :meth:`create` where
    this pyOpenSSL lacks the private handles (``SSL._lib``, ``SSL._ffi``, ``Connection._ssl``).

    The buffer belongs to the thread, not the connection: it holds nothing between calls (what
    a call decrypts leaves it as ``bytes``), so a thousand connections cost one buffer, not a
    thousand (a peer opening connections must not make the node allocate per connection).
    """

    _per_thread = threading.local()

    def __init__(self, lib: Any, ffi: Any, ssl: Any) -> None:
        self._lib = lib
        self._ffi = ffi
        self._ssl = ssl
        self._want_read = int(lib.SSL_ERROR_WANT_READ)

    @classmethod
    def create(cls, connection: SSL.Connection) -> _DirectCalls | None:
        try:
            lib, ffi = SSL._lib, SSL._ffi  # type: ignore[attr-defined]
            ssl = connection._ssl
            lib.SSL_read, lib.SSL_get_error, lib.SSL_ERROR_WANT_READ  # noqa: B018 - present?
        except AttributeError:
            return None
        return cls(lib, ffi, ssl)

    def _buffer(self) -> Any:
        buffer = getattr(self._per_thread, "buffer", None)
        if buffer is None:
            buffer = self._per_thread.buffer = self._ffi.new("char[]", _PLAIN_BUFFER_BYTES)
        return buffer

    def read_records(self, parts: list[bytes], filled: int) -> tuple[int, bool]:
        """Decrypt every whole record waiting into the thread's buffer after its first
        ``filled`` bytes (a full buffer is copied out into ``parts``); returns the new fill level
        and True if it stopped because it needs more input, False if the session has something
        else to say (an alert, close_notify, an error: :meth:`flush`, then ask pyOpenSSL)."""
        lib, ssl, buffer = self._lib, self._ssl, self._buffer()
        while True:
            if _PLAIN_BUFFER_BYTES - filled < _RECORD_BYTES:
                self.flush(parts, filled)
                filled = 0
            result = lib.SSL_read(ssl, buffer + filled, _PLAIN_BUFFER_BYTES - filled)
            if result > 0:
                filled += result
                continue
            return filled, bool(lib.SSL_get_error(ssl, result) == self._want_read)

    def read_into(self, sink: PlaintextSink) -> tuple[int, bool]:
        """Decrypt every whole record waiting straight into ``sink``'s buffers; returns the
        bytes placed and True if it stopped because it needs more input (else: see
        :meth:`read_records`)."""
        lib, ssl, from_buffer = self._lib, self._ssl, self._ffi.from_buffer
        placed = 0
        while True:
            # Records into one buffer until it is full or none is whole: one call of the sink
            # per buffer, not per 16 KiB record.
            target = sink.get_buffer()
            size = len(target)
            pointer = from_buffer(target)
            filled = 0
            while filled < size:
                result = lib.SSL_read(ssl, pointer + filled, size - filled)
                if result <= 0:
                    break
                filled += result
            if filled:
                sink.buffer_updated(filled)
                placed += filled
            if filled < size:
                return placed, bool(lib.SSL_get_error(ssl, result) == self._want_read)

    def flush(self, parts: list[bytes], filled: int) -> None:
        """Copy the buffer's first ``filled`` bytes out into ``parts``."""
        if filled:
            parts.append(self._ffi.buffer(self._buffer(), filled)[:])


class _PostHandshakeBudget:
    """Counts what OpenSSL does with post-handshake messages (its info callback: KeyUpdate,
    NewSessionTicket) against an allowance that grows with the application data received.

    Why: each KeyUpdate that requests one costs ~16 us (a key derivation and an answer) for 27
    bytes on the wire, so ~1.6 MB/s of them kept a daemon's main thread busy (review: a 128 MiB
    fetch beside such a peer took 17 s instead of 0.4 s), and OpenSSL sets no limit. An honest
    peer sends a handful per connection (RFC 8446 section 5.5: a key update before ~2^24 records).
    """

    def __init__(self) -> None:
        self.active = False
        self.events = 0

    def __call__(self, connection: SSL.Connection, where: int, result: int) -> None:
        if self.active and where & SSL.SSL_CB_EXIT:
            self.events += 1

    def check(self, received_bytes: int) -> None:
        """Raises :class:`RemoteProtocolError` when the peer is over its allowance."""
        if self.events > _POST_HANDSHAKE_EVENTS + received_bytes // _BYTES_PER_POST_HANDSHAKE_EVENT:
            raise RemoteProtocolError(
                f"the peer sent too many post-handshake messages (KeyUpdate flood?): {self.events} "
                f"state changes after {received_bytes} bytes of data"
            )


def _accept_any_chain(connection: SSL.Connection, certificate: object, error_number: int, depth: int, ok: int) -> bool:
    # There is no CA: the chain is not what authenticates a peer, the key is (checked after the
    # handshake by peer_id_from_certificate). OpenSSL verifies CertificateVerify regardless.
    return True


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes | SSL._NoOverlappingProtocols:
    for protocol in _SERVED_ALPN:
        if protocol in offered:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _write_whole_buffers(context: SSL.Context) -> None:
    # pyOpenSSL turns on partial writes, so SSL_write returns after every 16 KiB record and
    # sendall loops in Python once per record (8 calls per yamux frame of model data). Into a
    # memory BIO a write never blocks: without the mode one SSL_write encrypts the whole buffer.
    with contextlib.suppress(AttributeError):
        lib = SSL._lib  # type: ignore[attr-defined]
        lib.SSL_CTX_clear_mode(context._context, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


def _context(
    identity: Identity,
    *,
    is_client: bool,
    present_certificate: bool,
    budget: _PostHandshakeBudget | None = None,
    alpn: bytes = ALPN_TCP_PROTOCOL,
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if present_certificate:
        context.use_certificate(certificate_for(identity))
        context.use_privatekey(private_key_for(identity))
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _accept_any_chain)
    _write_whole_buffers(context)
    if budget is not None:
        context.set_info_callback(budget)
    if is_client:
        context.set_alpn_protos([alpn])
    else:
        context.set_alpn_select_callback(_select_alpn)
    return context


class TlsChannel:
    """One side of a TLS 1.3 session over a byte stream; authenticates the peer's id.

    Feed what the transport received to :meth:`receive_data` (it returns decrypted application
    bytes), hand application bytes to :meth:`send`, and send :meth:`data_to_send` to the
    transport. ``present_certificate=False`` exists only so tests can play a client without a
    certificate.
    """

    def __init__(
        self, identity: Identity, *, is_client: bool, present_certificate: bool = True, alpn: bytes = ALPN_TCP_PROTOCOL
    ) -> None:
        if alpn not in _SERVED_ALPN:
            raise ValueError(f"unknown ALPN id {alpn!r}")
        self.is_client = is_client
        self._offered_alpn = alpn
        self._budget = _PostHandshakeBudget()
        self._received_plain_bytes = 0
        context = _context(
            identity, is_client=is_client, present_certificate=present_certificate, budget=self._budget, alpn=alpn
        )
        self._tls = SSL.Connection(context, None)
        if is_client:
            self._tls.set_connect_state()
        else:
            self._tls.set_accept_state()
        self.peer_id: PeerId | None = None
        """The peer's proven id, once :attr:`handshake_complete`."""
        self.handshake_complete = False
        self.alpn: bytes | None = None
        """The protocol agreed in the handshake (:data:`ALPN_TCP_PROTOCOL` or
        :data:`ALPN_LANE_PROTOCOL`; a client gets only the one it offered)."""
        self.peer_closed = False
        """The peer sent close_notify: it will send no more application data."""
        self._direct = _DirectCalls.create(self._tls)
        # Output moved out of the BIO to be counted, where its length cannot be asked.
        self._drained: list[bytes] = []

    def start(self) -> None:
        """Begin the handshake (the client's ClientHello lands in :meth:`data_to_send`)."""
        self._advance_handshake()

    def _advance_handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            raise RemoteProtocolError(f"TLS handshake failed: {_describe(exc)}") from None
        agreed = self._tls.get_alpn_proto_negotiated()
        if agreed not in _SERVED_ALPN or (self.is_client and agreed != self._offered_alpn):
            raise RemoteProtocolError(f"the peer does not speak {self._offered_alpn.decode()} (ALPN)")
        self.alpn = agreed
        certificate = self._tls.get_peer_certificate(as_cryptography=True)
        self.peer_id = peer_id_from_certificate(certificate)
        self.handshake_complete = True

    def receive_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed bytes from the transport; returns the application bytes they completed.

        Raises :class:`RemoteProtocolError` if the peer's TLS is invalid or fails to
        authenticate. After the peer's close_notify (:attr:`peer_closed`) anything more it
        sends is ignored."""
        view = memoryview(data)
        if not self.handshake_complete:
            if view:
                self._tls.bio_write(view)
            view = view[:0]
            self._advance_handshake()
            if not self.handshake_complete:
                return b""
            self._budget.active = True  # what the handshake itself did is not counted
        parts: list[bytes] = []
        filled = 0
        at = 0
        while True:  # a slice at a time, so a flood is caught before it has cost much
            piece = view[at : at + _FEED_BYTES]
            at += len(piece)
            if piece:
                self._tls.bio_write(piece)
            filled = self._decrypt(parts, filled)
            self._budget.check(self._received_plain_bytes + filled + sum(map(len, parts)))
            if at >= len(view):
                break
        if self._direct is not None:
            self._direct.flush(parts, filled)
        plain = _joined(parts)
        self._received_plain_bytes += len(plain)
        return plain

    def receive_into(self, data: bytes | bytearray | memoryview, sink: PlaintextSink) -> int:
        """:meth:`receive_data`, but the application bytes are decrypted straight into the
        buffers ``sink`` gives (no copy out to ``bytes``); returns how many were placed.

        Raises what :meth:`receive_data` raises."""
        if not self.handshake_complete:
            plain = self.receive_data(data)
            copy_into(sink, plain)
            return len(plain)
        view = memoryview(data)
        placed = 0
        at = 0
        while True:  # a slice at a time, as in receive_data
            piece = view[at : at + _FEED_BYTES]
            at += len(piece)
            if piece:
                self._tls.bio_write(piece)
            placed += self._decrypt_into(sink)
            self._budget.check(self._received_plain_bytes + placed)
            if at >= len(view):
                break
        self._received_plain_bytes += placed
        return placed

    def _decrypt_into(self, sink: PlaintextSink) -> int:
        placed = 0
        if self._direct is not None:
            placed, needs_more = self._direct.read_into(sink)
            if needs_more:
                return placed
        parts: list[bytes] = []
        try:
            self._decrypt_slow(parts)  # pyOpenSSL says what else there is
        finally:
            for part in parts:
                copy_into(sink, part)
                placed += len(part)
        return placed

    def _decrypt(self, parts: list[bytes], filled: int) -> int:
        """Decrypt what is whole in the BIO (see :meth:`receive_data`); returns the direct
        path's fill level."""
        if self._direct is not None:
            filled, needs_more = self._direct.read_records(parts, filled)
            if needs_more:
                return filled
            self._direct.flush(parts, filled)  # pyOpenSSL says what else there is
            filled = 0
        self._decrypt_slow(parts)
        return filled

    def _decrypt_slow(self, parts: list[bytes]) -> None:
        # pyOpenSSL's recv: its typed errors say what the session holds besides data.
        while True:
            try:
                parts.append(self._tls.recv(_RECORD_BYTES))
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.peer_closed = True
                return
            except SSL.Error as exc:
                raise RemoteProtocolError(f"TLS error: {_describe(exc)}") from None

    def send(self, data: bytes | memoryview) -> None:
        """Encrypt application bytes (they land in :meth:`data_to_send`).

        Raises :class:`LocalProtocolError` before the handshake completed."""
        if not self.handshake_complete:
            raise LocalProtocolError("TLS application data before the handshake completed")
        if data:
            self._tls.sendall(data)

    def close(self) -> None:
        """Queue our close_notify alert (no application data may follow). Idempotent."""
        # A broken session has nothing to say goodbye on.
        with contextlib.suppress(SSL.Error):
            self._tls.shutdown()

    @property
    def pending_output_bytes(self) -> int:
        """Encrypted bytes waiting in :meth:`data_to_send`. TLS writes on its own, not only when
        asked to: each KeyUpdate a peer requests is answered, so a driver must bound this as it
        bounds its own output."""
        waiting = _mem_bio_length(self._tls)
        if waiting is not None:
            return waiting
        # This pyOpenSSL cannot say how much the BIO holds: move it out where it can be counted
        # (review finding: the bound vanished here).
        self._drain_bio()
        return sum(map(len, self._drained))

    def _drain_bio(self) -> None:
        while True:
            try:
                self._drained.append(self._tls.bio_read(_BIO_READ_BYTES))
            except SSL.WantReadError:
                return

    def read_output_into(self, buffer: bytearray) -> int:
        """Move up to ``len(buffer)`` bytes of what :meth:`data_to_send` would return into
        ``buffer``; returns how many (0: nothing waits). For a driver that sends from one
        reused buffer: ``data_to_send`` returns a fresh ``bytes`` each call, and fresh memory
        costs a page fault per 4 KiB on this machine's VMs (docs/decisions.md)."""
        if self._drained:
            head = self._drained[0]
            n = min(len(head), len(buffer))
            buffer[:n] = head[:n]
            if n == len(head):
                self._drained.pop(0)
            else:
                self._drained[0] = head[n:]
            return n
        handles = _output_bio(self._tls)
        if handles is not None:
            lib, ffi, bio = handles
            return max(0, int(lib.BIO_read(bio, ffi.from_buffer(buffer), len(buffer))))
        try:
            data = self._tls.bio_read(len(buffer))
        except SSL.WantReadError:
            return 0
        buffer[: len(data)] = data
        return len(data)

    def data_to_send(self) -> bytes:
        """Everything the TLS layer wants to send to the transport now."""
        waiting = _mem_bio_length(self._tls)
        if waiting is not None:
            return self._tls.bio_read(waiting) if waiting > 0 else b""
        self._drain_bio()
        out = b"".join(self._drained)
        self._drained.clear()
        return out


def _joined(parts: list[bytes]) -> bytes:
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def _describe(exc: SSL.Error) -> str:
    # SSL.Error args are a list of (library, function, reason) tuples; the reason is what helps.
    try:
        reasons = [str(entry[-1]) for entry in exc.args[0]]
    except (IndexError, TypeError):
        return str(exc) or type(exc).__name__
    return "; ".join(reasons) or type(exc).__name__

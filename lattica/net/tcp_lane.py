"""A bulk lane: one TLS 1.3-over-TCP connection that carries exactly one stream, its socket and
its TLS records driven by a thread of its own.

Why: a fetch over a yamux stream spends most of both daemons' main threads around the bytes,
not on them (cProfile of a 256 MiB fetch: trio's socket calls, the memory BIOs, yamux framing
and window updates, one scheduler turn per 256 KiB on each side), and that thread also runs
the fetch itself. A lane gives one exchange stream its own TCP connection; a thread moves its
bytes between the socket and TLS in a tight loop, outside trio's scheduler, and hands whole
reads to trio. No multiplexer is needed: the connection *is* the stream. Measured (256 MiB
fetches, docs/decisions.md): the main threads' CPU per fetch fell to a third; each daemon's
total did not, nor did throughput much (+3%): the cost was copies and TLS, wherever they run.

Shape (:meth:`~lattica.net.tcp_transport.TcpTransport.open_lane` dials one):

1. TCP connect and the TLS 1.3 handshake run in trio exactly as for a yamux connection (same
   identity, mutual authentication, timeouts), with ALPN ``lattica-lane/1``.
2. The server admits the lane (its lane limits) and answers one byte, :data:`LANE_ACCEPTED`,
   sent by the lane's thread as its first bytes (so only once the lane has its pipe and
   thread); a refused lane is closed instead, and the dialler falls back to a yamux stream.
3. Both sides hand the socket and the :class:`~lattica.net.tls_channel.TlsChannel` to a
   :class:`TcpLane`. Its stream is a :class:`~lattica.net.stream.QuicStream` (stream id 0; the
   lane is its :class:`~lattica.net.stream.StreamCarrier`), so RPC and the exchange run on it
   unchanged: ``rpc.open_stream(lane, protocol)`` sends the header as on any connection.

Invariants:

* **One owner per object.** After the handoff only the lane's thread touches the socket and the
  TLS session; trio touches only the queues below, under one lock. The thread reports to trio
  with ``TrioToken.run_sync_soon`` and trio wakes it through a pipe.
* **Bounded.** The thread stops reading while ``receive_window_bytes`` were delivered and not
  consumed, or while what TLS must answer (KeyUpdates) exceeds ``MAX_CONTROL_BACKLOG_BYTES``;
  writers wait while ``SEND_HIGH_WATER_BYTES`` are queued. A lane is closed after
  ``idle_timeout_s`` without receiving anything or the peer taking any of our output, or with
  output waiting and none of it taken by
  the socket for that long (a peer that reads nothing), so an abandoned lane frees its thread.
* **Whose fault.** As for every connection here: ``trio.ClosedResourceError`` after *we*
  closed, ``trio.BrokenResourceError`` after the peer or network did (a TCP close without TLS
  close_notify is a break: the stream was reset, not finished). A peer's TLS error closes this
  lane only.
* **EOF is close_notify.** ``send_eof`` sends TLS close_notify (RFC 8446 section 6.1 lets the
  other direction go on); the reader sees ``b""`` after the peer's close_notify.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from typing import Final, Literal

import trio

from lattica.errors import RemoteProtocolError
from lattica.identity import PeerId
from lattica.net.address import format_host_port
from lattica.net.datagram import Address
from lattica.net.frame_receiver import FrameReceiver
from lattica.net.stream import QuicStream
from lattica.net.tcp_connection import (
    MAX_CONTROL_BACKLOG_BYTES,
    RECEIVE_BYTES,
    SEND_HIGH_WATER_BYTES,
    CloseInitiator,
    raise_if_closed,
)
from lattica.net.tls_channel import TlsChannel, copy_into

logger = logging.getLogger("lattica.net.tcp")

LANE_ACCEPTED: Final = b"\x01"
"""The server's first application byte on a lane it admitted."""
LANE_STREAM_ID: Final = 0
"""The id of a lane's one stream."""
SEND_SLICE_BYTES: Final = 256 * 1024
"""Ciphertext handed to the socket per ``send`` call."""
_CLOSE_DRAIN_S: Final = 2.0
"""How long a lane closed cleanly keeps sending what is queued (and its close_notify)."""


class TcpLane:
    """One authenticated TLS 1.3-over-TCP connection carrying one stream (see the module
    docstring). Build it after the handshake and the admission byte, then :meth:`start` it
    from trio; :attr:`stream` is the stream (open at once on both sides).

    ``sock`` is a connected socket this lane now owns; ``receive_window_bytes`` bounds what is
    delivered to the stream and not yet read; ``idle_timeout_s``: see the invariants.
    """

    def __init__(
        self,
        sock: socket.socket,
        channel: TlsChannel,
        *,
        remote_address: Address,
        receive_window_bytes: int = 4 * 1024 * 1024,
        idle_timeout_s: float = 60.0,
        received_with_handshake: bytes = b"",
        framed_receive: bool = False,
    ) -> None:
        if channel.peer_id is None:
            raise ValueError("the TLS channel has not authenticated its peer")
        self._sock = sock
        self._channel: TlsChannel | None = channel  # dropped when the thread ends
        self._peer_id: PeerId = channel.peer_id
        self.direction: Literal["inbound", "outbound"] = "outbound" if channel.is_client else "inbound"
        self.remote_address = remote_address
        self.receive_window_bytes = receive_window_bytes
        self.idle_timeout_s = idle_timeout_s
        self.stream = QuicStream(self, LANE_STREAM_ID)
        """The lane's one stream."""
        self.close_reason: str | None = None
        """Why the lane closed, once it did."""
        self.close_initiator: CloseInitiator | None = None
        self.established_at = trio.current_time()
        """When the lane was handed over after its handshake (``trio.current_time()``)."""
        self.received_bytes = 0
        """Application bytes decrypted so far, a frame still being filled included (set by the
        thread): how a reader sees a slow peer's progress inside a large frame."""
        self._lock = threading.Lock()
        # trio -> thread (under the lock)
        self._outbox: deque[bytes | memoryview] = deque()
        self._outbox_bytes = 0  # plaintext in the outbox (trio adds, the thread takes)
        self._wire_bytes = 0  # ciphertext the socket has not taken yet (set by the thread)
        self._eof_requested = False
        self._close_requested: Literal["graceful", "abort"] | None = None
        self._window_used = 0  # delivered to the stream and not consumed
        # thread -> trio (under the lock)
        self._inbox: deque[bytes | memoryview] = deque()
        self._inbox_eof = False
        self._thread_failure: tuple[str, CloseInitiator] | None = None
        self._thread_done = False
        self._news_scheduled = False
        self._reading_paused = False
        self._progress_wanted = False
        # Whether the thread is (about to be) in poll, and for what: "input" (it must be woken
        # for anything), "output" (the socket's room will wake it: only a close or a credit
        # must), None (it is not waiting: it looks at everything before it does).
        self._thread_waiting: Literal["input", "output"] | None = "input"
        self._pending_input = received_with_handshake
        # Each large wire frame decrypted into memory of its own (see frame_receiver), for a
        # stream known to carry wire frames; None: plain reads, whatever the bytes are.
        self._frames: FrameReceiver | None = FrameReceiver() if framed_receive else None
        # os.pipe, not os.pipe2 (Linux only): its ends are not inherited by child processes.
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._progress_lot = trio.lowlevel.ParkingLot()
        self._closed_event = trio.Event()
        self._stream_taken = False

    def __repr__(self) -> str:
        where = format_host_port(self.remote_address)
        return f"<TcpLane {self.direction} {self._peer_id.short()}@{where}>"

    # -- public surface -------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        """The peer's identity, proven in the TLS handshake."""
        return self._peer_id

    @property
    def is_closed(self) -> bool:
        """True once either side closed the lane (or it failed)."""
        return self.close_reason is not None

    @property
    def open_stream_count(self) -> int:
        """1 while the stream is open, else 0."""
        return 0 if self.is_closed else 1


    def start(self) -> None:
        """Start the lane's thread; call from trio, once. Raises ``RuntimeError`` if the thread
        cannot start (the system's thread limit): the lane is closed then, its socket and pipe
        too."""
        if self._thread is not None:
            raise RuntimeError("the lane was started already")
        self._token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(target=self._run, name=f"lane {self._peer_id.short()}", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            self._release_fds()
            self._close_local("no thread for the lane", "abort")
            raise
        self._thread = thread

    async def open_stream(self) -> QuicStream:
        """The lane's stream (there is one: a second call raises ``trio.BusyResourceError``).
        Raises ``trio.ClosedResourceError`` / ``trio.BrokenResourceError`` once closed."""
        await trio.lowlevel.checkpoint()
        self.check_open()
        if self._stream_taken:
            raise trio.BusyResourceError("a lane carries one stream")
        self._stream_taken = True
        return self.stream

    def close(self, reason: str = "closed") -> None:
        """Close the lane now from trio: the thread sends close_notify and what is queued
        (briefly), then closes the socket. Idempotent; safe after the run ended."""
        self._close_local(reason, "graceful")

    async def aclose(self, reason: str = "closed") -> None:
        """:meth:`close`, as a checkpoint."""
        self.close(reason)
        await trio.lowlevel.checkpoint()

    async def wait_closed(self) -> None:
        """Wait until the lane closed, by either side."""
        await self._closed_event.wait()

    def join_thread(self, timeout_s: float | None = None) -> bool:
        """Block until the thread ended (tests, shutdown); True if it did within ``timeout_s``."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- used by the stream (StreamCarrier) -----------------------------------------------

    def check_open(self) -> None:
        """Raise ``trio.ClosedResourceError`` if we closed the lane,
        ``trio.BrokenResourceError`` if the peer or the network did; else nothing."""
        raise_if_closed(self.close_reason, self.close_initiator, what="lane")

    def stream_send_room(self, stream_id: int) -> int:
        """Bytes the stream may queue now (``SEND_HIGH_WATER_BYTES`` less what is queued)."""
        with self._lock:
            return max(0, SEND_HIGH_WATER_BYTES - self._outbox_bytes - self._wire_bytes)

    def stream_unsent_bytes(self, stream_id: int) -> int:
        """Stream bytes queued and not yet taken by the socket (plaintext queued, ciphertext
        waiting): what a clean close would still have to send."""
        with self._lock:
            return self._outbox_bytes + self._wire_bytes

    def send_stream_view(self, stream_id: int, view: memoryview) -> None:
        """Queue a view of immutable bytes as stream data, not copied: the thread encrypts it
        from where it is (a seeder's piece of a block)."""
        self._queue(view, end_stream=False)

    def send_stream_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        """Queue stream data (and close_notify after it if ``end_stream``)."""
        self._queue(data, end_stream=end_stream)

    def _queue(self, data: bytes | memoryview, *, end_stream: bool) -> None:
        with self._lock:
            if data:
                self._outbox.append(data)
                self._outbox_bytes += len(data)
            if end_stream:
                self._eof_requested = True
        # No wake-up here: the stream calls transmit() right after (one wake-up, not two).

    def stream_consumed(self, stream_id: int, n_bytes: int) -> bool:
        """Credit bytes the stream's reader took (negative: put back); never asks for a flush."""
        with self._lock:
            self._window_used -= n_bytes
            wake = self._reading_paused and self._window_used < self.receive_window_bytes
        if wake:
            self._wake_thread(force=True)  # a thread waiting to send may be what the peer waits for
        return False

    def close_stream(self, stream_id: int, *, reset_send: bool, stop_receive: bool) -> None:
        """The stream is done: the lane closes with it. If our direction finished (EOF sent),
        cleanly: what is queued goes out, then close_notify (whether we read the peer's
        direction to its end does not matter to what we sent). Else abruptly: no
        close_notify, so the peer sees a reset, not an end."""
        self._close_local("the stream was closed", "abort" if reset_send else "graceful")

    async def transmit(self) -> None:
        """Wake the thread for what is queued (a checkpoint that is never cancelled)."""
        self._wake_thread()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_progress(self) -> None:
        """Wait until the socket took queued bytes (room below ``SEND_HIGH_WATER_BYTES``) or
        the lane changed."""
        with self._lock:
            ready = self.is_closed or self._outbox_bytes + self._wire_bytes < SEND_HIGH_WATER_BYTES
            if not ready:
                self._progress_wanted = True  # the thread notifies once there is room
        if ready:
            await trio.lowlevel.checkpoint()
            return
        await self._progress_lot.park()

    # -- trio side ------------------------------------------------------------------------

    def _close_local(self, reason: str, how: Literal["graceful", "abort"]) -> None:
        with self._lock:
            if self._close_requested != "abort":
                self._close_requested = how
        self._wake_thread(force=True)
        if self.close_reason is None:
            self.close_reason = reason
            self.close_initiator = "local"
            logger.debug("%r closed (local): %s", self, reason)
            self._on_closed()

    def _on_closed(self) -> None:
        self.stream.on_connection_closed()
        self._progress_lot.unpark_all()
        self._closed_event.set()

    def _wake_thread(self, *, force: bool = False) -> None:
        # Only a thread that is (about to be) waiting in poll needs the byte: one per wait, not
        # one per call (a request frame each: measured 15 ms of syscalls per 256 MiB fetched),
        # and new data need not wake one that waits for the socket to take what it has (each
        # write also hands the GIL to the thread it wakes: 160 us per write on a seeder).
        with self._lock, contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            waiting = self._thread_waiting
            if self._wake_w >= 0 and (waiting == "input" or (force and waiting is not None)):
                self._thread_waiting = None
                os.write(self._wake_w, b"\0")

    def _on_news(self) -> None:
        """Runs in trio (``run_sync_soon``): hand what the thread received to the stream."""
        with self._lock:
            self._news_scheduled = False
            received = list(self._inbox)
            self._inbox.clear()
            eof, self._inbox_eof = self._inbox_eof, False
            failure = self._thread_failure
            done = self._thread_done
        for data in received:
            self.stream.on_data(data, False)
        if eof:
            self.stream.on_data(b"", True)
        self._progress_lot.unpark_all()
        if (failure is not None or done) and self.close_reason is None:
            reason, initiator = failure or ("the lane ended", "peer")
            self.close_reason, self.close_initiator = reason, initiator
            logger.debug("%r closed (%s): %s", self, initiator, reason)
            self._on_closed()

    # -- the thread -----------------------------------------------------------------------

    def _notify(self) -> None:
        """Schedule :meth:`_on_news` in trio, once until it ran (call under the lock)."""
        if self._news_scheduled or self._token is None:
            return
        self._news_scheduled = True
        try:
            self._token.run_sync_soon(self._on_news)
        except trio.RunFinishedError:
            self._close_requested = "abort"  # nobody is left to read: just stop

    def _run(self) -> None:
        failure: tuple[str, CloseInitiator] | None = None
        try:
            self._sock.setblocking(False)
            self._loop()
        except RemoteProtocolError as exc:
            failure = (f"protocol error: {exc}", "peer")
        except OSError as exc:
            failure = (f"connection lost: {exc!r}", "network")
        except _LaneEnded as exc:
            failure = (exc.reason, exc.initiator)
        except Exception as exc:  # a bug here must end this lane, not the daemon
            logger.exception("%r: the lane's thread failed", self)
            failure = (f"internal error: {exc!r}", "local")
        finally:
            with self._lock:
                self._thread_failure = failure
                self._thread_done = True
                self._notify()
                # A closed lane may live on (its stream refers to it, and it to the stream,
                # until the cyclic collector runs): what it buffered must not (review finding:
                # churned lanes held a daemon at 1.5 GiB). The TLS session goes with its BIOs.
                self._outbox.clear()
                self._outbox_bytes = self._wire_bytes = 0
                self._channel = None
                self._frames = None  # and a frame in progress: up to 2 MiB
            self._release_fds()

    def _release_fds(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            # Closed under the lock that _wake_thread writes under: a number closed here may be
            # reused by any file at once, and must never be written to after.
            if self._wake_w >= 0:
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._wake_w = -1

    def _loop(self) -> None:
        channel, sock = self._channel, self._sock
        assert channel is not None
        in_buffer = bytearray(RECEIVE_BYTES)
        in_view = memoryview(in_buffer)
        # Ciphertext goes from TLS's buffer to the socket through one reused buffer: a fresh
        # ``bytes`` per send faulted in a page per 4 KiB (measured: 75,000 faults per 256 MiB).
        out_buffer = bytearray(SEND_SLICE_BYTES)
        out_view = memoryview(out_buffer)
        unsent = out_view[:0]  # what the socket has not taken of the last slice
        poller = select.poll()
        now = time.monotonic()
        last_received = now
        send_progress_at = now
        eof_sent = False
        peer_closed = False
        drain_until: float | None = None
        # What the session holds before the stream's first byte (a server's admission byte)
        # goes out first, even if the stream is reset at once: without it the client takes
        # an admitted lane for a refused one.
        if n := channel.read_output_into(out_buffer):
            unsent = out_view[:n]
            with contextlib.suppress(BlockingIOError):  # a fresh socket takes a few bytes
                unsent = unsent[sock.send(unsent) :]
        if self._pending_input:
            if self._frames is not None:
                copy_into(self._frames, self._pending_input)
                self._deliver_items(self._frames.take(), peer_closed=False)
            else:
                self._deliver(channel_plain=self._pending_input, peer_closed=False)
            self._pending_input = b""
        while True:
            with self._lock:
                items = list(self._outbox)
                self._outbox.clear()
                eof = self._eof_requested
                closing = self._close_requested
                can_read = self._window_used < self.receive_window_bytes
                # Set with the test above, under the lock: a reader's credit that lands after
                # it sees the flag and wakes the poll below (no lost wake-up).
                self._reading_paused = not can_read
            if closing == "abort":
                return
            taken = 0
            for item in items:
                channel.send(item)
                taken += len(item)
            if (eof or closing) and not eof_sent:
                channel.close()
                eof_sent = True
            had_output = bool(unsent) or channel.pending_output_bytes > 0
            sent = 0
            while True:
                if not unsent:
                    n = channel.read_output_into(out_buffer)
                    if not n:
                        break
                    unsent = out_view[:n]
                try:
                    k = sock.send(unsent)
                except BlockingIOError:
                    break
                sent += k
                unsent = unsent[k:]
            wire_bytes = len(unsent) + channel.pending_output_bytes
            now = time.monotonic()
            if sent or not had_output:
                send_progress_at = now
            if sent:
                # A peer taking what we send is there, even while it has nothing to say (a
                # slow fetcher inside a 1 MiB block: review finding, cut off as "nothing heard").
                last_received = max(last_received, now)
            if not can_read:
                last_received = now  # silence while we do not read is not idleness
            with self._lock:
                self._outbox_bytes -= taken
                self._wire_bytes = wire_bytes
                if self._progress_wanted and self._outbox_bytes + wire_bytes < SEND_HIGH_WATER_BYTES:
                    self._progress_wanted = False
                    self._notify()
            if closing == "graceful":
                drain_until = drain_until or now + _CLOSE_DRAIN_S
                if not wire_bytes or now >= drain_until:
                    return
            # Read what there is, while the stream has room and TLS's answers are not piling up.
            read_now = (
                can_read and not peer_closed and closing is None and wire_bytes <= MAX_CONTROL_BACKLOG_BYTES
            )
            if read_now:
                try:
                    n = sock.recv_into(in_view)
                except BlockingIOError:
                    n = -1
                if n == 0:
                    if peer_closed:
                        raise _LaneEnded("the peer closed the lane", "peer")
                    raise _LaneEnded("the peer closed the TCP connection without close_notify", "peer")
                if n > 0:
                    last_received = now
                    if self._frames is not None:
                        self.received_bytes += channel.receive_into(in_view[:n], self._frames)
                        peer_closed = channel.peer_closed
                        done = self._frames.end() if peer_closed else self._frames.take()
                        self._deliver_items(done, peer_closed=peer_closed)
                    else:
                        plain = channel.receive_data(in_view[:n])
                        self.received_bytes += len(plain)
                        peer_closed = channel.peer_closed
                        self._deliver(channel_plain=plain, peer_closed=peer_closed)
                    continue  # more may be waiting; what TLS answered is sent first
            if peer_closed and eof_sent and not wire_bytes:
                return  # both sides said goodbye
            if not peer_closed and now >= last_received + self.idle_timeout_s:
                raise _LaneEnded(f"nothing heard for {self.idle_timeout_s:g} s", "network")
            if wire_bytes and now >= send_progress_at + self.idle_timeout_s:
                raise _LaneEnded(f"the peer read nothing for {self.idle_timeout_s:g} s", "network")
            # Wait for the socket, the trio side, or a deadline.
            deadline = wait_deadline(
                idle_timeout_s=self.idle_timeout_s,
                last_received=None if peer_closed else last_received,
                send_progress_at=send_progress_at if wire_bytes else None,
                drain_until=drain_until,
            )
            mask = select.POLLIN if read_now else 0
            if wire_bytes:
                mask |= select.POLLOUT
            with self._lock:
                # Anything trio queued since the top of this turn is looked at before sleeping;
                # what it queues from here on writes the pipe (the flag is read under the lock).
                news = bool(self._outbox) or self._eof_requested != eof or self._close_requested != closing
                if not news and self._window_used < self.receive_window_bytes and not can_read:
                    news = True  # credit arrived: read again
                self._thread_waiting = None if news else ("output" if wire_bytes else "input")
            if news:
                continue
            poller.register(sock, mask)
            poller.register(self._wake_r, select.POLLIN)
            ready = poller.poll(None if deadline is None else max(0.0, deadline - now) * 1000 + 1)
            poller.unregister(sock)
            poller.unregister(self._wake_r)
            with self._lock:
                self._thread_waiting = None
            for fd, events in ready:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif events & _SOCKET_GONE:
                    # POLLHUP/POLLERR come back at once whatever the mask asked for: a reset
                    # found while neither reading nor sending must end the lane, not spin it
                    # (review finding: a thread at 100% after close_notify and a reset).
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    raise _LaneEnded(f"connection lost: {os.strerror(error) if error else 'hung up'}", "network")

    def _deliver(self, *, channel_plain: bytes, peer_closed: bool) -> None:
        self._deliver_items([channel_plain] if channel_plain else [], peer_closed=peer_closed)

    def _deliver_items(self, items: list[bytes | memoryview], *, peer_closed: bool) -> None:
        if not items and not peer_closed:
            return
        with self._lock:
            for item in items:
                self._inbox.append(item)
                self._window_used += len(item)
            if peer_closed:
                self._inbox_eof = True
            self._notify()


_SOCKET_GONE: Final = select.POLLHUP | select.POLLERR | select.POLLNVAL


def wait_deadline(
    *,
    idle_timeout_s: float,
    last_received: float | None,
    send_progress_at: float | None,
    drain_until: float | None,
) -> float | None:
    """When a lane's thread must look again if nothing wakes it (``time.monotonic()``
    seconds), or None to wait for news alone: ``idle_timeout_s`` after ``last_received``
    while it listens (None: the peer said close_notify, nothing more is expected), after
    ``send_progress_at`` while output waits (None: none waits), and ``drain_until`` while a
    clean close drains. Every deadline that applies is a real one: a past deadline that no
    longer applies made the thread poll every millisecond (review finding)."""
    deadlines = []
    if last_received is not None:
        deadlines.append(last_received + idle_timeout_s)
    if send_progress_at is not None:
        deadlines.append(send_progress_at + idle_timeout_s)
    if drain_until is not None:
        deadlines.append(drain_until)
    return min(deadlines, default=None)


class _LaneEnded(Exception):
    def __init__(self, reason: str, initiator: CloseInitiator) -> None:
        super().__init__(reason)
        self.reason = reason
        self.initiator = initiator

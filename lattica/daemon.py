"""The long-running daemon: a :class:`Node` on a UDP socket plus the control API.

Start-up order: take the home's lock (one daemon per home), load or create the identity, bind
the socket the user asked for, start the node, then open ``control.sock`` -- so a CLI call that
gets an answer always talks to a node that is already serving. SIGINT/SIGTERM cancel everything;
the socket file is removed on the way out. The control methods come from
:func:`lattica.control.services.build_registry`: a service adds its methods there, not here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import trio

from lattica.config import CONFIG_FILE, CONTROL_SOCKET, DATABASE_FILE, load_config
from lattica.control.server import ControlServer
from lattica.control.services import build_registry
from lattica.errors import LatticaError, leaf_exceptions
from lattica.home import init_home
from lattica.home_layout import BLOCKS_DIR
from lattica.home_warnings import identity_warnings
from lattica.log_file import LogFileHandler
from lattica.net.address import InvalidAddressError, parse_host_port
from lattica.net.datagram import UdpSocket
from lattica.net.endpoint import EndpointSocketError
from lattica.node import Node
from lattica.process_tuning import tune_malloc

GIL_SWITCH_INTERVAL_S = 0.0005
"""How long the event loop's thread may hold the GIL while a worker thread waits for it
(``sys.setswitchinterval``; CPython's default is 0.005 s). A fetch's storer thread (block files,
the files being assembled, SHA-256) releases the GIL for each system call and then waits up to
this long to get it back from the busy event loop: at the default that capped a 256 MiB fetch
over TLS-over-TCP near the storer's pace, and 0.5 ms was faster in every interleaved pair of
runs (``docs/decisions.md``)."""

log = logging.getLogger("lattica.daemon")


class DaemonError(LatticaError):
    """The daemon cannot start (home locked, port taken, bad config)."""


class _KeyValueFormatter(logging.Formatter):
    """``ts level logger msg`` lines: greppable, one event per line."""

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        text = f"{when} {record.levelname.lower():7s} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(home: Path, level: str) -> None:
    """Log to stderr and to ``logs/lattica.log`` (rotated at 10 MB, 5 kept)."""
    root = logging.getLogger("lattica")
    root.setLevel(level.upper())
    formatter = _KeyValueFormatter()
    for handler in (
        logging.StreamHandler(sys.stderr),
        LogFileHandler(home / "logs" / "lattica.log", max_bytes=10_000_000, backup_count=5),
    ):
        handler.setFormatter(formatter)
        root.addHandler(handler)


def _lock_home(home: Path) -> int:
    fd = os.open(home / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonError(f"another daemon is already running for {home}") from None
    return fd


async def run_daemon(
    home: Path,
    *,
    listen: str | None = None,
    bootstrap: list[str] | None = None,
    relay_service: bool = False,
    on_ready: Callable[[Node], None] | None = None,
) -> None:
    """Run a node for ``home`` until SIGINT/SIGTERM; ``relay_service`` turns on
    ``nat.relay.service`` whatever the file says. Raises :class:`DaemonError` on bad start."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    tune_malloc()  # bulk-path buffers stay in the heaps instead of faulting in fresh pages
    identity, created = init_home(home)
    warnings = identity_warnings(home, created)
    config = load_config(home / CONFIG_FILE)
    config = config.with_overrides(listen=listen, bootstrap=tuple(config.bootstrap) + tuple(bootstrap or ()))
    if relay_service:
        config = replace(config, nat=replace(config.nat, relay=replace(config.nat.relay, service=True)))
    setup_logging(home, config.log_level)
    for warning in warnings:
        log.warning("%s", warning)
    lock_fd = _lock_home(home)
    try:
        try:
            host, port = parse_host_port(config.listen)
        except InvalidAddressError as exc:
            raise DaemonError(f"bad listen address: {exc}") from None
        try:
            follows = config.net.tcp_listen and not config.net.tcp_port  # TCP takes the UDP port number
            sock = UdpSocket.bind_with_tcp_port(host, port) if follows else UdpSocket.bind(host, port)
        except OSError as exc:
            raise DaemonError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            # AutoNAT dial-backs leave from a fresh ephemeral socket on the listen host, never
            # from the node's own port (lattica/nat/autonat.py says why).
            node = Node(
                identity,
                sock,
                config,
                database=home / DATABASE_FILE,
                blocks_dir=home / BLOCKS_DIR,
                dial_back_socket_factory=lambda: UdpSocket.bind(host, 0),
            )
            try:
                async with trio.open_nursery() as nursery, node:
                    server = ControlServer(home / CONTROL_SOCKET, build_registry(node, warnings=warnings))
                    await nursery.start(server.serve)
                    if on_ready is not None:
                        on_ready(node)
                    async for signum in signals:
                        log.info("received %s; shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break
            except BaseExceptionGroup as group:
                # The nurseries wrap it; the user needs the one line that says why the node stopped.
                failed, _rest = group.split(EndpointSocketError)
                if failed is None:
                    raise
                raise DaemonError(f"stopping: {leaf_exceptions(failed)[0]}") from group
    finally:
        os.close(lock_fd)


"""The ``ceiling`` row of ``bench/transfer.py``: how fast *any* Python program could move a file
over TLS 1.3 on this machine while doing the verification a Lattica fetch must do.

Two fresh Python processes on 127.0.0.1 and nothing else: no daemon, no CLI, no multiplexer, no
request protocol, no scheduler, no store, no progress. The server (started before the clock, as
nginx is) reads the file in 1 MiB chunks into one reused buffer, hashes each with BLAKE3 (what a
seeder checks before serving) and writes it with pyOpenSSL straight to the socket (a socket BIO:
no memory-BIO copies). The fetcher is started and its modules imported before the clock (a
daemon has started long before a fetch; curl's own few-millisecond start stays in its time),
then timed from "go" to its answer: it connects, shakes hands, reads each chunk with
``SSL_read`` straight into one of four page-aligned buffers, and a second thread
hashes it with BLAKE3 (the chunk check) and SHA-256 (the whole-file check) and writes it with
``O_DIRECT`` (page-cache writes where the file system refuses it), then syncs and renames the
file into place. So the row is the bound for the design, not a competitor: what remains between it and
``lattica fetch`` is the price of the protocol and of the daemon, and what remains between it and
nginx+curl is the price of Python and of verifying every byte twice.

Usage (by ``transfer.py``)::

    python bench/transfer_ceiling.py serve FILE [minimal]          # prints the port, serves one fetch
    python bench/transfer_ceiling.py fetch PORT SIZE OUT [minimal] # prints {"sha256": ...}

``minimal`` (the ``ceiling-min`` row) keeps only the check content addressing cannot do
without, BLAKE3 of each chunk as it arrives: the bound even if Lattica dropped its other checks.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20
BUFFERS = 4


def _context(server: bool) -> Any:
    from OpenSSL import SSL

    from lattica.identity import Identity
    from lattica.net.tls_identity import certificate_for, private_key_for

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    if server:
        identity = Identity.generate()
        context.use_certificate(certificate_for(identity))
        context.use_privatekey(private_key_for(identity))
    # One SSL_write per chunk, not one per 16 KiB record (as tls_channel does).
    SSL._lib.SSL_CTX_clear_mode(context._context, SSL._lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    return context


def serve(path: str, *, minimal: bool = False) -> None:
    """Serve ``path`` once to the first connection, hashing each chunk before sending it
    (``minimal``: not hashing it)."""
    import blake3
    from OpenSSL import SSL

    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    sock, _ = listener.accept()
    connection = SSL.Connection(_context(server=True), sock)
    connection.set_accept_state()
    connection.do_handshake()
    fd = os.open(path, os.O_RDONLY)
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    offset = 0
    while n := os.preadv(fd, [view], offset):
        if not minimal:
            blake3.blake3(view[:n]).digest()
        connection.sendall(view[:n])
        offset += n
    connection.recv(1)  # the fetcher's goodbye: everything arrived
    os.close(fd)


def fetch(port: int, size: int, out: str, *, minimal: bool = False) -> None:
    """Fetch ``size`` bytes from the server at ``port`` into ``out`` (see the module docstring),
    once a line arrives on stdin: the clock measures the fetch, not the interpreter's start (a
    daemon has started long before)."""
    import blake3
    from OpenSSL import SSL

    lib, ffi = SSL._lib, SSL._ffi
    context = _context(server=False)
    print("ready", flush=True)
    sys.stdin.readline()
    sock = socket.create_connection(("127.0.0.1", port))
    connection = SSL.Connection(context, sock)
    connection.set_connect_state()
    connection.do_handshake()
    partial = out + ".part"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(partial, flags | os.O_DIRECT, 0o644)
        direct = True
    except OSError:
        fd, direct = os.open(partial, flags, 0o644), False
    free: queue.Queue[mmap.mmap] = queue.Queue()
    filled: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
    for _ in range(BUFFERS):
        free.put(mmap.mmap(-1, CHUNK_BYTES))
    sha256 = hashlib.sha256()
    failure: list[BaseException] = []

    def store() -> None:
        try:
            while (item := filled.get()) is not None:
                buffer, n, offset = item
                view = memoryview(buffer)[:n]
                blake3.blake3(view).digest()
                if not minimal:
                    sha256.update(view)
                if direct and n % 4096 == 0:
                    os.pwrite(fd, view, offset)
                else:  # the last, partial page: through the page cache
                    with open(partial, "r+b", buffering=0) as tail:
                        tail.seek(offset)
                        tail.write(view)
                view.release()
                free.put(buffer)
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=store)
    worker.start()
    ssl = connection._ssl
    received = 0
    while received < size:
        buffer = free.get()
        target = ffi.from_buffer(buffer)
        want = min(CHUNK_BYTES, size - received)
        got = 0
        while got < want:
            n = lib.SSL_read(ssl, target + got, want - got)
            if n <= 0:
                raise SystemExit(f"SSL_read failed ({lib.SSL_get_error(ssl, n)}) after {received + got} bytes")
            got += n
        filled.put((buffer, got, received))
        received += got
    filled.put(None)
    worker.join()
    if failure:
        raise failure[0]
    os.fsync(fd)
    os.close(fd)
    os.rename(partial, out)
    connection.sendall(b"x")
    print(json.dumps({"sha256": sha256.hexdigest()}), flush=True)


def run_ceiling_minimal(tmp: Path, source: Path, expected_sha256: str) -> dict[str, Any]:
    """:func:`run_ceiling` with only the check content addressing cannot do without: BLAKE3 of
    each chunk as it arrives (no SHA-256 of the file, no re-hash by the server)."""
    return run_ceiling(tmp, source, expected_sha256, minimal=True)


def run_ceiling(tmp: Path, source: Path, expected_sha256: str, *, minimal: bool = False) -> dict[str, Any]:
    """One run of the row: the server started first, the fetcher timed from "go" to its answer."""
    from transfer_sdk import process_cpu_s

    size = source.stat().st_size
    here = str(Path(__file__).resolve())
    env = {**os.environ, "PYTHONPATH": str(Path(here).parent.parent)}
    server = subprocess.Popen(
        [sys.executable, here, "serve", str(source), *(["minimal"] if minimal else [])],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        cpu_before = process_cpu_s(server.pid)
        out = tmp / "ceiling.out"
        fetcher = subprocess.Popen([sys.executable, here, "fetch", str(port), str(size), str(out),
                                    *(["minimal"] if minimal else [])],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert fetcher.stdin is not None and fetcher.stdout is not None
        if fetcher.stdout.readline().strip() != "ready":
            raise RuntimeError("the ceiling fetcher did not start")
        fetcher_cpu_before = process_cpu_s(fetcher.pid)
        began = time.perf_counter()
        fetcher.stdin.write("go\n")
        fetcher.stdin.flush()
        reply = fetcher.stdout.readline()
        fetch_s = time.perf_counter() - began
        cpu_s = process_cpu_s(fetcher.pid) - fetcher_cpu_before + process_cpu_s(server.pid) - cpu_before
        _, status, usage = os.wait4(fetcher.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not reply:
            raise RuntimeError(f"ceiling fetcher exited with {os.waitstatus_to_exitcode(status)}")
        sha256 = json.loads(reply)["sha256"]
        return {
            "fetch_s": fetch_s,
            "mb_per_s": size / fetch_s / 1e6,
            "cpu_s": cpu_s,
            "mb_per_cpu_s": size / cpu_s / 1e6 if cpu_s > 0 else None,
            "peak_rss_bytes": usage.ru_maxrss * 1024,
            "identical": (minimal or sha256 == expected_sha256) and _file_sha256(out) == expected_sha256,
        }
    finally:
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], minimal=sys.argv[3:] == ["minimal"])
    else:
        fetch(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], minimal=sys.argv[5:] == ["minimal"])

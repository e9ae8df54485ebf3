"""Direct writes of whole pages (DirectWriter): the file holds exactly the bytes written, in
any order and alignment; the page cache stays coherent; a file system that refuses O_DIRECT
and a full disk lose nothing and raise what they raised before."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from lattica.content.direct_write import ALIGN_BYTES, MIN_DIRECT_BYTES, AlignedBuffer, DirectWriter
from lattica.wire.buffers import end_aligned
from tests.conftest import MakeTmpfs
from tests.unit.content_samples import KIB, random_bytes


@pytest.fixture
def buffer() -> Iterator[AlignedBuffer]:
    aligned = AlignedBuffer(256 * KIB)
    yield aligned
    aligned.close()


def open_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def cut(size: int, seed: int) -> list[tuple[int, int]]:
    """Random ranges covering ``0 .. size``: some far below a page, some spanning many."""
    rng = random.Random(seed)
    ranges, at = [], 0
    while at < size:
        length = min(size - at, rng.choice([1, 17, ALIGN_BYTES - 1, 70 * KIB + 3, 300 * KIB, 600 * KIB + 5]))
        ranges.append((at, length))
        at += length
    return ranges


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ranges_in_any_order_and_alignment_give_exactly_the_bytes(
    tmp_path: Path, buffer: AlignedBuffer, seed: int
) -> None:
    data = random_bytes(3 * 1024 * KIB + 123, seed)
    ranges = cut(len(data), seed)
    random.Random(seed).shuffle(ranges)
    fd = open_file(tmp_path / "out")
    writer = DirectWriter(fd, buffer)
    try:
        os.ftruncate(fd, len(data))
        for offset, length in ranges:
            writer.write(memoryview(data)[offset : offset + length], offset)
            # Read back through the page cache at once: a direct write must not leave stale pages.
            assert os.pread(fd, length, offset) == data[offset : offset + length]
    finally:
        writer.close()
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == data
    assert writer.direct_bytes > len(data) // 2  # most of it went direct (tmp_path's disk takes O_DIRECT)


def test_page_aligned_memory_is_written_from_where_it_is(tmp_path: Path, buffer: AlignedBuffer) -> None:
    # A whole-block piece as a lane received it: no copy through the bounce buffer. Bytes at an
    # unaligned address still go through it.
    data = random_bytes(1024 * KIB, seed=4)
    aligned = end_aligned(len(data))  # a whole number of pages: its start is aligned too
    aligned[:] = data
    unaligned = end_aligned(len(data) + 1)[:-1]
    unaligned[:] = data
    fd = open_file(tmp_path / "out")
    writer = DirectWriter(fd, buffer)
    try:
        writer.write(aligned.toreadonly(), 0)
        assert writer.in_place_bytes == writer.direct_bytes == len(data)
        writer.write(unaligned, len(data))
        assert writer.in_place_bytes == len(data) and writer.direct_bytes == 2 * len(data)
    finally:
        writer.close()
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == data + data


def test_cached_pages_are_replaced_by_a_direct_write(tmp_path: Path, buffer: AlignedBuffer) -> None:
    old, new = random_bytes(512 * KIB, 4), random_bytes(512 * KIB, 5)
    path = tmp_path / "out"
    path.write_bytes(old)
    fd = open_file(path)
    writer = DirectWriter(fd, buffer)
    try:
        assert os.pread(fd, len(old), 0) == old  # the old bytes are in the page cache now
        writer.write(memoryview(new), 0)
        assert os.pread(fd, len(new), 0) == new
    finally:
        writer.close()
        os.close(fd)
    assert writer.direct_bytes == len(new)


def test_small_ranges_and_no_buffer_go_through_the_page_cache(tmp_path: Path, buffer: AlignedBuffer) -> None:
    data = random_bytes(MIN_DIRECT_BYTES + ALIGN_BYTES - 2, 6)  # at offset 1: a page short of the minimum
    fd = open_file(tmp_path / "out")
    small, unbuffered = DirectWriter(fd, buffer), DirectWriter(fd, None)
    try:
        small.write(memoryview(data), 1)
        unbuffered.write(memoryview(data), 0)
    finally:
        small.close()
        os.close(fd)
    assert (small.direct_bytes, unbuffered.direct_bytes, unbuffered.direct) == (0, 0, False)
    assert (tmp_path / "out").read_bytes() == data + data[-1:]


def test_a_file_system_that_refuses_o_direct_at_open_loses_nothing(
    tmp_path: Path, buffer: AlignedBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    data = random_bytes(1024 * KIB, 7)
    fd = open_file(tmp_path / "out")
    writer = DirectWriter(fd, buffer)
    try:
        writer.write(memoryview(data), 0)
    finally:
        writer.close()
        os.close(fd)
    assert (writer.direct, writer.direct_bytes) == (False, 0)
    assert (tmp_path / "out").read_bytes() == data


def test_a_file_system_that_refuses_direct_writes_loses_nothing(
    tmp_path: Path, buffer: AlignedBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    fd = open_file(tmp_path / "out")
    writer = DirectWriter(fd, buffer)
    data = random_bytes(1024 * KIB, 8)
    writer.write(memoryview(data)[: 512 * KIB], 0)  # this one goes direct
    assert writer.direct_bytes == 512 * KIB

    def refusing_pwrite(target: int, view: memoryview, offset: int) -> int:
        if target != fd:  # the direct descriptor (as FUSE may: the open works, the write not)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(target, view, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    try:
        writer.write(memoryview(data)[512 * KIB :], 512 * KIB)
    finally:
        writer.close()
        os.close(fd)
    assert (writer.direct, writer.direct_bytes) == (False, 512 * KIB)
    assert (tmp_path / "out").read_bytes() == data


def test_a_full_disk_raises_enospc_and_keeps_what_was_written(
    make_tmpfs: MakeTmpfs, buffer: AlignedBuffer
) -> None:
    disk = make_tmpfs(1)
    data = random_bytes(2 * 1024 * KIB, 9)
    fd = open_file(disk / "out")
    writer = DirectWriter(fd, buffer)
    try:
        writer.write(memoryview(data)[: 512 * KIB], 0)
        with pytest.raises(OSError) as caught:
            writer.write(memoryview(data)[512 * KIB :], 512 * KIB)
    finally:
        writer.close()
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC
    assert (disk / "out").read_bytes()[: 512 * KIB] == data[: 512 * KIB]


def test_an_aligned_buffer_must_be_whole_pages() -> None:
    for size in (0, ALIGN_BYTES + 1, -ALIGN_BYTES):
        with pytest.raises(ValueError, match="multiple"):
            AlignedBuffer(size)

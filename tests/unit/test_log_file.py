"""The daemon's log file handler on a disk that refuses writes: one line, not tracebacks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lattica.log_file import LogFileHandler


def test_a_log_file_that_cannot_be_written_is_reported_once_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # /dev/full accepts open() and fails every write with ENOSPC, like a full disk.
    handler = LogFileHandler(Path("/dev/full"), max_bytes=0, backup_count=0)
    logger = logging.getLogger("lattica.test_log_file")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(3):
            logger.warning("line %d", i)
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            logger.exception("a record with its own traceback")
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err == (
        "lattica: cannot write the log file /dev/full (No space left on device); "
        "log lines go to stderr only until it works again\n"
    )
    assert handler.failing


def test_the_log_file_working_again_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler = LogFileHandler(tmp_path / "lattica.log", max_bytes=0, backup_count=0)
    record = logging.LogRecord("lattica", logging.INFO, __file__, 1, "hello", None, None)
    handler.failing = True  # as after an outage
    handler.emit(record)
    handler.close()
    assert not handler.failing
    assert "works again" in capsys.readouterr().err
    assert (tmp_path / "lattica.log").read_text() == "hello\n"

"""The launcher's pieces that do not need an engine: log rotation and group members."""

from __future__ import annotations

import os
from pathlib import Path

from fleetd.runtime.launcher import group_members, rotate_log


def test_rotation_copies_then_truncates_so_the_writer_keeps_its_fd(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # the engine's stdout
    try:
        os.write(fd, b"a" * 2000)
        assert rotate_log(log, max_bytes=1000)
        assert (tmp_path / "w.log.1").read_bytes() == b"a" * 2000
        assert log.stat().st_size == 0
        os.write(fd, b"after\n")  # O_APPEND: the writer goes on at the new end
        assert log.read_bytes() == b"after\n"
        assert not rotate_log(log, max_bytes=1000)  # small again: nothing to do
        os.write(fd, b"b" * 2000)
        assert rotate_log(log, max_bytes=1000, keep=3)
        assert (tmp_path / "w.log.2").read_bytes() == b"a" * 2000  # older copies shift
        assert (tmp_path / "w.log.1").read_bytes().startswith(b"after\n")
    finally:
        os.close(fd)


def test_rotation_of_a_missing_file_is_a_no_op(tmp_path: Path) -> None:
    assert not rotate_log(tmp_path / "none.log", max_bytes=1)


def test_group_members_lists_this_process_group() -> None:
    assert os.getpid() in group_members(os.getpgid(0))

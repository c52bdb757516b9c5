"""Managed processes are recognised by PID and start time, even after their binary is deleted."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdorch.devcluster.process import Managed, parse_stat, proc_stat, start, stop

pytestmark = pytest.mark.unit


@pytest.fixture
def deleted_sleep(tmp_path: Path) -> Iterator[Managed]:
    """A `sleep` started from a copy of its binary that is deleted right after (like a rebuild)."""
    binary = tmp_path / "sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", binary)
    proc = start("sleeper", [str(binary), "60"], tmp_path / "sleeper.log")
    binary.unlink()
    try:
        yield proc
    finally:
        stop(proc, grace=2)


def test_a_process_whose_binary_was_deleted_is_still_alive_and_is_stopped(deleted_sleep: Managed) -> None:
    assert os.readlink(f"/proc/{deleted_sleep.pid}/exe").endswith(" (deleted)")
    assert deleted_sleep.start_time > 0
    assert deleted_sleep.alive()
    assert stop(deleted_sleep, grace=2) is True
    assert not deleted_sleep.alive()
    assert not os.path.exists(f"/proc/{deleted_sleep.pid}")  # reaped, not leaked


def test_a_record_from_an_older_state_file_matches_a_deleted_binary(deleted_sleep: Managed) -> None:
    legacy = Managed(deleted_sleep.name, deleted_sleep.pid, deleted_sleep.binary, deleted_sleep.log)
    assert legacy.start_time == 0
    assert legacy.alive()


def test_a_reused_pid_is_not_our_process(deleted_sleep: Managed) -> None:
    other = Managed("x", deleted_sleep.pid, deleted_sleep.binary, "", start_time=deleted_sleep.start_time + 1)
    assert not other.alive()
    assert stop(other) is False
    assert deleted_sleep.alive()  # left alone


def test_stat_parsing_survives_parentheses_in_the_command_name() -> None:
    rest = " ".join(str(i) for i in range(4, 53))  # fields 4..52; field 22 is "22"
    assert parse_stat(f"123 (a) (b) c) S {rest}\n") == ("S", 22)
    assert parse_stat("garbage") is None
    assert proc_stat(os.getpid()) is not None

"""Processes the demo (and the tests) start for the controller and the proxies die with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pdorch.devcluster.process import dies_with_parent, proc_stat

pytestmark = pytest.mark.compat

PARENT = """
import subprocess, sys, time
from pdorch.devcluster.process import dies_with_parent
sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
tied = subprocess.Popen(sleep, preexec_fn=dies_with_parent())
loose = subprocess.Popen(sleep)
print(tied.pid, loose.pid, flush=True)
time.sleep(60)
"""


def _running(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def test_a_child_tied_to_its_parent_goes_when_the_parent_is_killed(tmp_path: Path) -> None:
    """`kill -9` of the demo left its controller and proxies running: the proxy kept the proxy
    pod's address and the controller reconciled the group beside the next demo's. A child started
    with `dies_with_parent` gets SIGTERM; one started without it (the control) lives on."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    tied, loose = (int(p) for p in parent.stdout.readline().split())
    try:
        assert _running(tied) and _running(loose)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _running(tied) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(tied), "the tied child outlived its killed parent"
        assert _running(loose), "the control child died too: the test shows nothing"
    finally:
        for pid in (tied, loose):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_child_started_from_a_worker_thread_is_not_tied() -> None:
    """The kernel ties the signal to the forking thread: tied from a worker thread, a child would
    be stopped when that thread ends, its parent still running. Only the main thread ties."""
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(dies_with_parent()))
    worker.start()
    worker.join()
    assert got == [None]
    assert dies_with_parent() is not None

"""Starting, probing and stopping the control-plane processes.

Processes run detached (own session) so `pdorch dev-cluster up` can return while they keep
running; `down` later stops exactly the PIDs recorded in the state file, after checking that
each PID is still the process we started, by its start time (PIDs get reused).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DELETED_SUFFIX = " (deleted)"  # what /proc/PID/exe reads once the binary was removed or replaced
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    # Resolved once here: the function runs in the forked child before exec, where it must not
    # import or allocate (another thread may have held the locks at fork time).
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def dies_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGTERM the child when the process starting it dies, by
    any means (`kill -9` included), so the demo's controller and proxies never outlive it: orphans
    kept answering on the proxy pod's address and reconciling the group beside the next demo's
    controller. None where the kernel cannot (not Linux): the caller's own cleanup still runs.

    The kernel ties the signal to the *thread* that forks, so only the main thread asks for it: a
    child started from a worker thread (`asyncio.to_thread`) would be stopped when that thread
    ends, with its parent still running; it gets None (no tie) instead."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl, parent = _PRCTL, os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) from /proc/PID/stat, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return parse_stat(text)


def parse_stat(text: str) -> tuple[str, int] | None:
    """(state, starttime) of one /proc/PID/stat line; None if it is malformed."""
    # The command name (field 2) is in parentheses and may itself contain ") ": split at the last.
    fields = text.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


@dataclass
class Managed:
    """One process the dev cluster started."""

    name: str
    pid: int
    binary: str
    log: str
    # The command line, so a fault test can restart the component as it was (see DevCluster.restart).
    argv: list[str] = field(default_factory=list)
    # Start time of the PID (field 22 of /proc/PID/stat): with the PID it names this very process,
    # even after its binary was deleted or rebuilt. 0 in state files written before it was recorded.
    start_time: int = 0

    def alive(self) -> bool:
        """True if the PID still is the process we started (not exited, not a reused PID)."""
        stat = proc_stat(self.pid)
        if stat is None:
            return False
        state, start_time = stat
        if state in ("Z", "X"):
            return False  # a zombie has exited; only its parent has not reaped it
        if self.start_time:
            return start_time == self.start_time
        # Older state: judge by the binary, which may have been deleted or rebuilt since.
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return False
        exe = exe.removesuffix(DELETED_SUFFIX)
        return os.path.realpath(exe) == os.path.realpath(self.binary)


def start(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Managed:
    """Start `argv` detached, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI; Ctrl-C in the shell does not reach it
            env={**os.environ, **(env or {})},
            close_fds=True,
        )
    # The start time is fixed at fork, so reading it now (before or after exec) gives the same value.
    stat = proc_stat(proc.pid)
    return Managed(
        name=name,
        pid=proc.pid,
        binary=argv[0],
        log=str(log_path),
        argv=list(argv),
        start_time=stat[1] if stat else 0,
    )


def stop(proc: Managed, grace: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds. Returns True if it was running."""
    if not proc.alive():
        return False
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not proc.alive():
            exited(proc.pid)
            return True
        time.sleep(0.1)
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    exited(proc.pid)
    return True


def exited(pid: int) -> bool:
    """Reap `pid` if it is our finished child; True once every thread of it has exited.

    Only our own children can be reaped; for processes started by an earlier CLI call the init
    process reaps them, and waitpid raises ChildProcessError. A multi-threaded (Go) process's main
    thread turns zombie before its other threads finish (their sockets still open), so the state
    letter is not enough: our child is reapable only once the whole group is gone, and anyone
    else's disappears from /proc only then.
    """
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        return reaped == pid
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")


def tail(path: str | Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file (empty string if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StartupError(RuntimeError):
    """A component did not become healthy; the message names it and carries its log tail."""

    def __init__(self, component: str, reason: str, log_tail: str) -> None:
        super().__init__(
            f"{component} did not become healthy: {reason}\n--- last lines of its log ---\n{log_tail}"
        )
        self.component = component


def wait_until(
    proc: Managed, probe: Callable[[], bool], timeout: float, what: str, interval: float = 0.25
) -> None:
    """Poll `probe` until it returns True; fail fast if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartupError(proc.name, "the process exited", tail(proc.log))
        try:
            if probe():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise StartupError(proc.name, f"{what} not reached within {timeout:.0f}s", tail(proc.log))

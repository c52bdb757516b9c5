"""Helpers for the compat tests: free ports, bounded polling, Prometheus samples, subprocesses, small
loopback HTTP servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from pdorch.devcluster.process import free_port as free_port  # re-exported for the tests
from pdorch.devcluster.waiting import wait_http_ok as shared_wait_http_ok


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """A loopback URL whose connections are refused for as long as the context lasts.

    The port stays bound without listening: a port from `free_port` is free only a moment, and a
    server the test starts next on port 0 can be given it (about 1 in 2500 here), turning the "dead"
    endpoint into a live one.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


# Routers must not reach a model hub: point any hub lookup at a closed loopback port.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_PROXY": "*"}


def sample(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    want = dict(labels or {})
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                total += s.value
    return total


async def wait_until(pred: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``pred`` until true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


def wait_http_ok(
    url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    """Block until GET ``url`` answers 200; fail early if ``proc`` died, or after ``timeout``."""

    def died() -> str | None:
        if proc is None or proc.poll() is None:
            return None
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        return f"process exited with {proc.returncode}:\n{tail}"

    try:
        shared_wait_http_ok(url, timeout, died)
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None


def sim_argv(*args: str) -> list[str]:
    """The command line of a `pdorch sim` on 127.0.0.1 with `args`."""
    return [sys.executable, "-m", "pdorch.cli", "sim", "--host", "127.0.0.1", *args]


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group with output to ``log``."""
    fh = log.open("wb")
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process started by `spawn` (and its group), killing it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()

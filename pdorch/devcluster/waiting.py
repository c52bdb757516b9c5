"""Bounded polling for tests that watch a real cluster converge."""

from __future__ import annotations

import asyncio
import inspect
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ProcessExited(AssertionError):
    """The process being waited for has exited: no point in polling on (the waits re-raise it)."""


def wait_for(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Call `fn` until it returns a truthy value; fail with `what` and the last error after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except ProcessExited:
            raise
        except Exception as e:  # an object that does not exist yet is "not yet", not a failure
            last_exc = e
        time.sleep(interval)
    detail = f" (last error: {last_exc!r})" if last_exc else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


async def wait_for_async(fn: Callable[[], Any], seconds: float, what: str, interval: float = 0.1) -> Any:
    """Async twin of `wait_for`: `fn` may return a value or an awaitable; polls until truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    last_exc: Exception | None = None
    while loop.time() < deadline:
        try:
            value = fn()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except ProcessExited:
            raise
        except Exception as e:
            last_exc = e
        await asyncio.sleep(interval)
    detail = f" (last error: {last_exc!r})" if last_exc else ""
    raise AssertionError(f"timed out after {seconds}s waiting for {what}{detail}")


def wait_http_ok(url: str, seconds: float, died: Callable[[], str | None] = lambda: None) -> None:
    """Block until GET `url` answers 200. `died()` returns a reason once the server's process
    has exited (checked every poll, so a crashed server fails fast); RuntimeError otherwise."""
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        reason = died()
        if reason:
            raise RuntimeError(f"{url} will not come up: {reason}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds}s ({last})")

"""A timeout block for the proxy's hot path that looks up neither the loop nor the task.

On CPython 3.11, every `asyncio.get_running_loop()` makes a getpid system call (the fork check, moved
into the thread state in 3.12), and one `async with asyncio.timeout(...)` block makes three: in
`timeout()`, in `current_task()` and in `reschedule()`. In a py-spy profile of the proxy under load
(SGLang P/D, 200 req/s) getpid was 7% of the proxy's CPU, most of it from such lookups. `Deadline`
gets the loop from its caller, who already holds it, and otherwise keeps `asyncio.timeout`'s contract:
when the delay passes, the task running the block is cancelled, and that cancellation (only this
timer's, not one from outside) leaves the block as `TimeoutError`. A `None` delay arms nothing.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """``with Deadline(loop, delay):`` inside a task, like ``async with asyncio.timeout(delay):``."""

    __slots__ = ("_cancelling", "_delay", "_fired", "_handle", "_loop", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float | None) -> None:
        self._loop = loop
        self._delay = delay
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self._fired = False
        self._cancelling = 0

    def __enter__(self) -> Deadline:
        if self._delay is not None:
            task = asyncio.current_task(self._loop)  # with the loop given: a dict lookup, no syscall
            if task is None:
                raise RuntimeError("Deadline must be used inside a task")
            self._task = task
            self._cancelling = task.cancelling()
            self._handle = self._loop.call_later(self._delay, self._expire)
        return self

    def _expire(self) -> None:
        self._handle = None
        self._fired = True
        assert self._task is not None
        self._task.cancel()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fired:
            assert self._task is not None
            # Ours only when no other cancel request arrived meanwhile (asyncio.timeout's rule).
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

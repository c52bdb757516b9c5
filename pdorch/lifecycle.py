"""Running a long-lived asyncio service until SIGINT/SIGTERM asks it to stop gracefully."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable

EVENT_LOOPS = ("uvloop", "asyncio")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop constructor for an ``--event-loop`` name: uvloop's, or None for asyncio's."""
    if name == "uvloop":
        import uvloop  # imported here: only the services that ask for it load it

        return uvloop.new_event_loop
    if name != "asyncio":
        raise ValueError(f"unknown event loop {name!r}; choose from {', '.join(EVENT_LOOPS)}")
    return None


def freeze_startup_heap() -> None:
    """Call once a service has started: collect, then move every object alive now (modules, routes,
    config) to the permanent generation, so the full collections a busy service runs scan only what
    requests create. Measured in the sims at 400 req/s: full collections over ~110k objects stalled
    the loop for 60-100 ms."""
    gc.collect()
    gc.freeze()


def run_until_signalled(
    serve: Callable[[asyncio.Event], Awaitable[None]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> None:
    """`asyncio.run(serve(stop))`, where SIGINT and SIGTERM set `stop` instead of killing the loop,
    so the service can stop accepting work and drain what is in flight. ``loop_factory`` picks the
    event loop implementation (e.g. uvloop's); None is asyncio's default."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())

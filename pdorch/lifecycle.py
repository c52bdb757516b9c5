"""Running a long-lived asyncio service until SIGINT/SIGTERM asks it to stop gracefully."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


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

"""Deadline keeps asyncio.timeout's contract without the loop lookups."""

from __future__ import annotations

import asyncio

import pytest

from pdorch.proxy.deadline import Deadline

pytestmark = pytest.mark.unit


async def test_expired_block_raises_timeout_and_the_task_goes_on() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        with Deadline(loop, 0.01):
            await asyncio.sleep(5)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the timer's cancel was taken back
    await asyncio.sleep(0)  # and the task is not cancelled later


async def test_block_that_ends_in_time_disarms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    with Deadline(loop, 0.05):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # a timer left armed would cancel this sleep


async def test_no_delay_arms_nothing() -> None:
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    with Deadline(loop, None):
        assert len(loop._scheduled) == before  # type: ignore[attr-defined]
        await asyncio.sleep(0)


async def test_cancel_from_outside_stays_a_cancel() -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def body() -> None:
        with Deadline(loop, 5.0):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_outside_cancel_after_expiry_is_not_swallowed() -> None:
    loop = asyncio.get_running_loop()

    class OutsideCancelToo(Deadline):
        """Someone else cancels the task in the same loop turn as the expiry, before it resumes."""

        def _expire(self) -> None:
            super()._expire()
            assert self._task is not None
            self._task.cancel()

    async def body() -> None:
        with OutsideCancelToo(loop, 0.0):
            await asyncio.sleep(5)

    task = asyncio.create_task(body())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_deadline_needs_a_task() -> None:
    loop = asyncio.get_running_loop()

    def outside() -> None:
        with Deadline(loop, 1.0):
            pass

    # A plain callback runs outside any task.
    fut: asyncio.Future[BaseException | None] = loop.create_future()

    def run() -> None:
        try:
            outside()
            fut.set_result(None)
        except RuntimeError as exc:
            fut.set_result(exc)

    loop.call_soon(run)
    err = await fut
    assert isinstance(err, RuntimeError) and "inside a task" in str(err)

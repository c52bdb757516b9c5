"""Workqueue semantics: dedup, no concurrent processing of a key, dirty re-queue, delays, backoff."""

from __future__ import annotations

import asyncio

import pytest

from pdorch.controller.workqueue import ExponentialBackoff, ShutDown, TokenBucket, WorkQueue

pytestmark = pytest.mark.unit


async def test_adding_a_waiting_key_twice_queues_it_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.add("b")
    q.add("a")
    assert len(q) == 2
    assert await q.get() == "a"
    assert await q.get() == "b"


async def test_key_added_while_processing_is_requeued_only_after_done() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    key = await q.get()
    q.add("a")  # an event arrives while a worker reconciles "a"
    q.add("a")
    assert len(q) == 0, "a key being processed must not be handed to a second worker"
    q.done(key)
    assert len(q) == 1
    assert await q.get() == "a"
    q.done("a")
    assert len(q) == 0


async def test_two_workers_never_hold_the_same_key() -> None:
    q: WorkQueue[int] = WorkQueue(bucket=TokenBucket(rate=1e6, burst=10**6))
    holding: set[int] = set()
    overlaps = 0
    passes = 0

    async def worker() -> None:
        nonlocal overlaps, passes
        while True:
            try:
                k = await q.get()
            except ShutDown:
                return
            if k in holding:
                overlaps += 1
            holding.add(k)
            await asyncio.sleep(0)
            q.add(k % 3)  # keep re-adding keys that may be in flight
            await asyncio.sleep(0)
            holding.discard(k)
            passes += 1
            q.done(k)
            if passes > 200:
                q.shutdown()

    for k in range(3):
        q.add(k)
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(4))), timeout=10)
    assert overlaps == 0
    assert passes > 200


async def test_add_after_delivers_later() -> None:
    q: WorkQueue[str] = WorkQueue()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    q.add_after("x", 0.05)
    assert len(q) == 0
    assert await asyncio.wait_for(q.get(), timeout=2) == "x"
    assert loop.time() - t0 >= 0.05


async def test_shutdown_wakes_waiting_workers() -> None:
    q: WorkQueue[str] = WorkQueue()
    waiter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    q.shutdown()
    with pytest.raises(ShutDown):
        await asyncio.wait_for(waiter, timeout=2)
    q.add("late")
    assert len(q) == 0


async def test_shutdown_without_drain_drops_waiting_keys() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.add("b")
    key = await q.get()
    q.add(key)  # dirty while processing: would be queued again by done()
    q.shutdown(drain=False)
    q.done(key)
    assert len(q) == 0
    with pytest.raises(ShutDown):
        await asyncio.wait_for(q.get(), timeout=2)


async def test_shutdown_drains_waiting_keys_by_default() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    q.shutdown()
    assert await q.get() == "a"
    with pytest.raises(ShutDown):
        await asyncio.wait_for(q.get(), timeout=2)


def test_backoff_survives_thousands_of_failures() -> None:
    b = ExponentialBackoff(base=0.5, cap=300.0, jitter=0.0)
    delays = [b.when("k") for _ in range(1100)]  # 2**1024 would overflow a float
    assert delays[-1] == 300.0


def test_backoff_doubles_caps_and_forgets() -> None:
    b = ExponentialBackoff(base=1.0, cap=5.0, jitter=0.0)
    assert [b.when("k") for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.failures("k") == 5
    b.forget("k")
    assert b.when("k") == 1.0
    assert b.when("other") == 1.0


def test_token_bucket_limits_rate_after_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10.0, burst=2, clock=lambda: now[0])
    assert bucket.reserve() == 0.0
    assert bucket.reserve() == 0.0
    assert bucket.reserve() == pytest.approx(0.1)
    now[0] = 1.0  # refilled
    assert bucket.reserve() == 0.0


def test_relist_diff_reports_deletions_missed_during_a_gap() -> None:
    from pdorch.controller.informer import relist_events

    def obj(name: str, rv: str) -> dict:
        return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}

    old = {"ns/a": obj("a", "1"), "ns/b": obj("b", "2"), "ns/c": obj("c", "3")}
    fresh = {"ns/b": obj("b", "2"), "ns/c": obj("c", "9"), "ns/d": obj("d", "10")}
    events = [(t, o["metadata"]["name"]) for t, o in relist_events(old, fresh)]
    assert events[0] == ("DELETED", "a")  # deletions first: handlers never see a stale object last
    assert sorted(events) == [("ADDED", "d"), ("DELETED", "a"), ("MODIFIED", "c")]
    assert relist_events(fresh, fresh) == []


async def test_a_key_asked_for_again_later_keeps_one_delayed_entry_the_earliest() -> None:
    """Every pass of a rolling group asks for a requeue; were each request a timer of its own, a
    group would be reconciled once per event it ever got, per requeue period."""
    q: WorkQueue[str] = WorkQueue()
    for delay in (0.05, 0.2, 0.3):
        q.add_after("g", delay)  # later asks keep the earlier entry
    q.add_after("h", 0.3)
    q.add_after("h", 0.05)  # an earlier ask wins
    got = {await asyncio.wait_for(q.get(), timeout=2) for _ in range(2)}
    assert got == {"g", "h"}
    q.done("g")
    q.done("h")
    await asyncio.sleep(0.35)  # past every superseded entry's time: none of them fires
    assert len(q) == 0
    q.add_after("g", 0.01)  # and the key can be delayed again after it fired
    assert await asyncio.wait_for(q.get(), timeout=2) == "g"

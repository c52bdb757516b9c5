"""The proxy's prefill queue (pdorch.proxy.prefill_queue): its order and its bookkeeping."""

from __future__ import annotations

import asyncio

import pytest

from pdorch.proxy.prefill_queue import (
    INITIAL_SECONDS_PER_TOKEN,
    MIN_RATE_TOKENS,
    PrefillQueue,
    Waiter,
    next_waiter,
    per_token_estimate,
)

pytestmark = pytest.mark.unit

RATE = 1e-3  # seconds per token
WAIT = 30.0  # seconds after which a prompt goes first


def test_the_shortest_prompt_that_can_still_make_the_target_goes_first() -> None:
    waiters = [Waiter(1000, 0.0), Waiter(10, 0.5), Waiter(200, 0.1)]
    assert next_waiter(waiters, now=1.0, ttft_s=2.0, seconds_per_token=RATE, max_wait_s=WAIT) == 1


def test_equal_lengths_go_in_arrival_order() -> None:
    waiters = [Waiter(100, 0.3), Waiter(100, 0.1), Waiter(100, 0.2)]
    assert next_waiter(waiters, now=0.5, ttft_s=2.0, seconds_per_token=RATE, max_wait_s=WAIT) == 1


def test_a_prompt_that_cannot_make_the_target_waits_for_those_that_can() -> None:
    # At t=1.9 the 10-token prompt from t=0 would get its token at 1.91, past its 1.9 s target; the
    # longer one from t=1.5 still makes it (1.9 + 0.2 <= 3.4).
    waiters = [Waiter(10, 0.0), Waiter(200, 1.5)]
    assert next_waiter(waiters, now=1.9, ttft_s=1.9, seconds_per_token=RATE, max_wait_s=WAIT) == 1


def test_when_none_can_make_the_target_the_oldest_goes_first() -> None:
    waiters = [Waiter(10, 0.2), Waiter(5000, 0.1), Waiter(20, 0.3)]
    assert next_waiter(waiters, now=10.0, ttft_s=2.0, seconds_per_token=RATE, max_wait_s=WAIT) == 1
    assert next_waiter([], now=0.0, ttft_s=2.0, seconds_per_token=RATE, max_wait_s=WAIT) == -1


def test_a_prompt_that_waited_long_enough_goes_first_whatever_its_length() -> None:
    # Sustained overload: short in-time prompts keep arriving; the long late one would wait forever.
    long_ = Waiter(5000, 0.0)
    fresh = [Waiter(10, t) for t in (29.0, 29.5)]
    assert next_waiter([long_, *fresh], now=29.9, ttft_s=2.0, seconds_per_token=RATE, max_wait_s=WAIT) == 1
    assert next_waiter([long_, *fresh], now=30.0, ttft_s=2.0, seconds_per_token=RATE, max_wait_s=WAIT) == 0


def test_the_estimate_is_the_fast_end_of_recent_legs() -> None:
    assert per_token_estimate([]) == INITIAL_SECONDS_PER_TOKEN
    # Legs that waited behind others on the engine look slower per token; the fast end is the cost.
    assert per_token_estimate([1e-4] * 2 + [5e-4] * 18) == 1e-4
    q = PrefillQueue(1000, 2.0, WAIT, lambda: 1, lambda: 0.0)
    q.measured(40, 0.3)  # a short leg: mostly per-request overhead, not read
    assert q.rate == INITIAL_SECONDS_PER_TOKEN
    q.measured(MIN_RATE_TOKENS * 4, MIN_RATE_TOKENS * 4 * 2e-4)
    assert q.rate == pytest.approx(2e-4)


async def test_two_waiters_alike_are_two_waiters() -> None:
    q = PrefillQueue(100, 2.0, WAIT, lambda: 1, lambda: 0.0)
    held = await q.acquire(100, 0.0)
    a = asyncio.ensure_future(q.acquire(50, 1.0))
    b = asyncio.ensure_future(q.acquire(50, 1.0))  # same length, same arrival
    await asyncio.sleep(0)
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    assert len(q.waiters) == 1 and q.waiters[0].future is not None and not q.waiters[0].future.done()
    held.release()
    await asyncio.sleep(0)
    assert a.done()
    (await a).release()
    assert q.inflight == 0


async def test_a_prompt_longer_than_an_engine_share_takes_one_share() -> None:
    q = PrefillQueue(1000, 2.0, WAIT, lambda: 2, lambda: 0.0)
    small = await q.acquire(800, 0.0)
    big = await q.acquire(50_000, 0.0)  # 800 + 1000 <= 2000: no need for the role to drain
    assert q.inflight == 1800 and big.tokens == 50_000
    for t in (small, big):
        t.release()
    assert q.inflight == 0


async def test_a_poke_lets_waiters_onto_engines_that_appeared() -> None:
    engines = [1]
    q = PrefillQueue(1000, 2.0, WAIT, lambda: engines[0], lambda: 0.0)
    held = await q.acquire(1000, 0.0)
    waiting = asyncio.ensure_future(q.acquire(500, 0.0))
    await asyncio.sleep(0)
    engines[0] = 2
    q.poke()
    await asyncio.sleep(0)
    assert waiting.done()
    for t in (held, await waiting):
        t.release()
    assert q.inflight == 0


async def test_room_is_capped_per_engine_and_released_in_order() -> None:
    engines = [1]
    now = [0.0]
    depths: list[int] = []
    q = PrefillQueue(1000, 2.0, WAIT, lambda: engines[0], lambda: now[0], depths.append)
    first = await q.acquire(800, 0.0)
    assert q.inflight == 800
    long_ = asyncio.ensure_future(q.acquire(900, 0.0))
    short = asyncio.ensure_future(q.acquire(100, 0.1))
    await asyncio.sleep(0)
    # The short one fits next to the first (900 <= 1000); the long one does not.
    assert short.done() and not long_.done()
    assert q.inflight == 900 and len(q.waiters) == 1 and depths[-1] == 1
    (await short).release()
    assert not long_.done()  # 800 + 900 > 1000
    first.release(prefill_s=0.8)
    await asyncio.sleep(0)
    assert long_.done() and q.inflight == 900 and depths[-1] == 0
    assert q.rate == pytest.approx(1e-3)  # 0.8 s for 800 tokens
    ticket = await long_
    ticket.release()
    ticket.release()  # only the first release counts
    assert q.inflight == 0


async def test_more_engines_make_more_room_and_an_idle_role_takes_any_prompt() -> None:
    engines = [1]
    q = PrefillQueue(1000, 2.0, WAIT, lambda: engines[0], lambda: 0.0)
    huge = await q.acquire(50_000, 0.0)  # longer than the cap: let through on an idle role
    waiting = asyncio.ensure_future(q.acquire(500, 0.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    engines[0] = 60  # scaled up: the next wake sees room
    extra = await q.acquire(10, 0.0)
    await asyncio.sleep(0)
    assert waiting.done()
    for t in (huge, extra, await waiting):
        t.release()
    assert q.inflight == 0


async def test_a_caller_that_gives_up_while_waiting_leaves_nothing_behind() -> None:
    q = PrefillQueue(100, 2.0, WAIT, lambda: 1, lambda: 0.0)
    held = await q.acquire(100, 0.0)
    gone = asyncio.ensure_future(q.acquire(50, 0.0))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert q.waiters == [] and q.inflight == 100
    # Admitted in the same loop turn as the cancel: its room is given back.
    racing = asyncio.ensure_future(q.acquire(50, 0.0))
    await asyncio.sleep(0)
    held.release()  # admits `racing` (sets its future)
    racing.cancel()  # ... before it resumed
    with pytest.raises(asyncio.CancelledError):
        await racing
    assert q.inflight == 0 and q.waiters == []


async def test_a_retry_takes_room_at_once_past_the_cap_and_gives_exactly_that_back() -> None:
    q = PrefillQueue(1000, 2.0, WAIT, lambda: 1, lambda: 0.0)
    held = await q.acquire(1000, 0.0)
    assert not q.fits_now(10)
    waiting = asyncio.ensure_future(q.acquire(10, 0.1))
    await asyncio.sleep(0)
    assert len(q.waiters) == 1
    retry = q.take(5000)  # past the cap, ahead of the waiter; charged one engine's share
    assert q.inflight == 2000 and retry.held
    held.release()
    await asyncio.sleep(0)
    assert not waiting.done()  # 1000 still in flight, the cap is 1000
    retry.release()
    retry.release()  # only the first release counts
    await asyncio.sleep(0)
    assert waiting.done() and q.inflight == 10
    (await waiting).release()
    assert q.inflight == 0 and q.fits_now(10)

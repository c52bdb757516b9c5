"""The proxy's prefill queue: prompts wait in the proxy, not in the engines' FCFS queues.

Off by default (``router.prefillQueue``). When on, the prompts on the wire to the prefill role are
capped at ``max_inflight_tokens`` estimated tokens per prefill engine; the others wait here. When a
prefill leg ends, the next prompt is chosen by `next_waiter`: first any prompt that has waited
``max_wait_s`` (oldest first), then the prompts that can still get their first token within the TTFT
target, shortest first, then the others, oldest first.

Why: an engine's queue is FCFS and is never re-routed, so during a burst every prompt behind a
backlog longer than the TTFT target misses it, and a pod that starts mid-burst gets only the
prompts that arrive after it. Held here, a new engine takes the queue at once, and when not every
prompt can make the target, serving the short ones first gets the most of them there (the long
ones miss either way). A prompt never waits behind one that arrived later while both are in time
and there is room: the order only matters when the engines are full. The wait bound keeps shortest
first from starving long prompts under sustained overload (in-time short prompts would otherwise
keep coming ahead of them): past it, the order is arrival.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Seconds of prefill per prompt token before any leg was measured (an A100 on a 13B model is
# ~0.1 ms/token); only used to tell in-time prompts from late ones until the first measurement.
INITIAL_SECONDS_PER_TOKEN = 1e-4
# Weight of the newest measurement in the moving average of seconds per token.
RATE_WEIGHT = 0.1


@dataclass
class Waiter:
    """One prompt waiting for room on the prefill role."""

    tokens: int
    arrival: float
    future: asyncio.Future[None] | None = field(default=None, compare=False)


def in_time(w: Waiter, now: float, ttft_s: float, seconds_per_token: float) -> bool:
    """Can `w` still get its first token within `ttft_s` if its prefill starts now?"""
    return now + w.tokens * seconds_per_token <= w.arrival + ttft_s


def next_waiter(
    waiters: Sequence[Waiter], now: float, ttft_s: float, seconds_per_token: float, max_wait_s: float
) -> int:
    """Index of the prompt to send next (-1: none): the oldest that waited `max_wait_s`, else the
    shortest in-time one, else the oldest."""
    best, best_key = -1, None
    oldest, oldest_at = -1, 0.0
    for i, w in enumerate(waiters):
        if oldest < 0 or w.arrival < oldest_at:
            oldest, oldest_at = i, w.arrival
        if in_time(w, now, ttft_s, seconds_per_token):
            key = (w.tokens, w.arrival)
            if best_key is None or key < best_key:
                best, best_key = i, key
    if oldest >= 0 and now - oldest_at >= max_wait_s:
        return oldest
    return best if best >= 0 else oldest


def updated_rate(rate: float, tokens: int, seconds: float) -> float:
    """The moving average of prefill seconds per token after one leg of `tokens` took `seconds`."""
    if tokens <= 0 or seconds <= 0:
        return rate
    return (1 - RATE_WEIGHT) * rate + RATE_WEIGHT * seconds / tokens


class Ticket:
    """Room for one prompt on the prefill role; `release` gives it back (only the first call counts)."""

    __slots__ = ("_queue", "tokens")

    def __init__(self, queue: PrefillQueue | None, tokens: int) -> None:
        self._queue = queue
        self.tokens = tokens

    def release(self, prefill_s: float | None = None) -> None:
        """Give the room back; `prefill_s`: how long its prefill leg took, when it succeeded."""
        q, self._queue = self._queue, None
        if q is not None:
            if prefill_s is not None:
                q.rate = updated_rate(q.rate, self.tokens, prefill_s)
            q._release(self.tokens)


NO_TICKET = Ticket(None, 0)


class PrefillQueue:
    """Caps the estimated prompt tokens in flight to the prefill role and orders the waiting ones."""

    def __init__(
        self,
        max_inflight_tokens: int,
        ttft_s: float,
        max_wait_s: float,
        engines: Callable[[], int],
        clock: Callable[[], float],
        on_depth: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.per_engine = max_inflight_tokens
        self.ttft_s = ttft_s
        self.max_wait_s = max_wait_s
        self.engines = engines
        self.clock = clock
        self.on_depth = on_depth
        self.inflight = 0
        self.rate = INITIAL_SECONDS_PER_TOKEN
        self.waiters: list[Waiter] = []

    def _fits(self, tokens: int) -> bool:
        # One prompt is always let through on an idle role, however long.
        return self.inflight == 0 or self.inflight + tokens <= self.per_engine * max(1, self.engines())

    async def acquire(self, tokens: int, arrival: float) -> Ticket:
        """Wait for room for a prompt of `tokens` that reached the proxy at `arrival`."""
        if not self.waiters and self._fits(tokens):
            self.inflight += tokens
            return Ticket(self, tokens)
        w = Waiter(tokens, arrival, asyncio.get_running_loop().create_future())
        self.waiters.append(w)
        self.on_depth(len(self.waiters))
        self._wake()
        try:
            await w.future  # type: ignore[misc]
        except BaseException:
            if w.future is not None and w.future.done() and not w.future.cancelled():
                self._release(tokens)  # admitted just as the caller gave up
            elif w in self.waiters:
                self.waiters.remove(w)
                self.on_depth(len(self.waiters))
            raise
        return Ticket(self, tokens)

    def _release(self, tokens: int) -> None:
        self.inflight = max(0, self.inflight - tokens)
        self._wake()

    def _wake(self) -> None:
        """Admit waiting prompts in order while they fit (the engine count may also have grown)."""
        woke = False
        while self.waiters:
            i = next_waiter(self.waiters, self.clock(), self.ttft_s, self.rate, self.max_wait_s)
            w = self.waiters[i]
            assert w.future is not None
            if w.future.done():  # its caller was cancelled and has not run its clean-up yet
                self.waiters.pop(i)
                woke = True
                continue
            if not self._fits(w.tokens):
                break
            self.waiters.pop(i)
            woke = True
            self.inflight += w.tokens
            w.future.set_result(None)
        if woke:
            self.on_depth(len(self.waiters))

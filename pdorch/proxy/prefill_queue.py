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
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# Seconds of prefill per prompt token before any leg was measured (an A100 on a 13B model is
# ~0.1 ms/token); only used to tell in-time prompts from late ones until the first measurement.
INITIAL_SECONDS_PER_TOKEN = 1e-4
# Legs shorter than this say more about per-request overhead than about per-token cost.
MIN_RATE_TOKENS = 256
# How many recent legs the estimate reads, and its quantile: a leg's wall time includes its wait
# behind others on the engine (the cap lets about two batches in), so the fast end of recent legs
# is the per-token cost of a prefill that starts now.
RATE_SAMPLES = 64
RATE_QUANTILE = 0.1


@dataclass(eq=False)  # identity: two waiters with the same length and arrival are two waiters
class Waiter:
    """One prompt waiting for room on the prefill role (`charge`: the room it takes)."""

    tokens: int
    arrival: float
    future: asyncio.Future[None] | None = None
    charge: int = 0


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


def per_token_estimate(samples: Iterable[float]) -> float:
    """Prefill seconds per token from recent legs' seconds per token (their low quantile)."""
    ordered = sorted(samples)
    if not ordered:
        return INITIAL_SECONDS_PER_TOKEN
    return ordered[int(RATE_QUANTILE * (len(ordered) - 1))]


class Ticket:
    """Room for one prompt on the prefill role; `release` gives it back (only the first call counts)."""

    __slots__ = ("_queue", "charge", "tokens")

    def __init__(self, queue: PrefillQueue | None, tokens: int, charge: int = 0) -> None:
        self._queue = queue
        self.tokens = tokens  # the prompt's estimated length
        self.charge = charge  # the room it takes (at most one engine's share)

    @property
    def held(self) -> bool:
        """Whether the room is still taken."""
        return self._queue is not None

    def release(self, prefill_s: float | None = None) -> None:
        """Give the room back; `prefill_s`: how long its prefill leg took, when it succeeded."""
        q, self._queue = self._queue, None
        if q is not None:
            if prefill_s is not None:
                q.measured(self.tokens, prefill_s)
            q._release(self.charge)


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
        self._samples: deque[float] = deque(maxlen=RATE_SAMPLES)
        self.waiters: list[Waiter] = []

    def _room(self) -> int:
        """Tokens allowed in flight: a share per usable engine (counting them scans the endpoints)."""
        return self.per_engine * max(1, self.engines())

    def _fits(self, charge: int, room: int) -> bool:
        # A role with nothing in flight takes any prompt.
        return self.inflight == 0 or self.inflight + charge <= room

    def _charge(self, tokens: int) -> int:
        # A prompt longer than one engine's share takes that share: it would otherwise wait for
        # the whole role to drain, which steady traffic never lets happen.
        return max(1, min(tokens, self.per_engine))

    def fits_now(self, tokens: int) -> bool:
        """Whether `acquire` would give a prompt of `tokens` room at once."""
        return self._admits(self._charge(tokens))

    def _admits(self, charge: int) -> bool:
        # Nobody waiting (a newcomer never passes them) and room for it.
        return not self.waiters and self._fits(charge, self._room())

    def take(self, tokens: int) -> Ticket:
        """Room for a prompt now, without waiting, past the cap if need be: for a retry, which took
        its turn already and holds an admission slot. Were it to queue again, the prompts holding
        the room it gave back could be the ones waiting for that slot (neither side would move)."""
        charge = self._charge(tokens)
        self.inflight += charge
        return Ticket(self, tokens, charge)

    async def acquire(self, tokens: int, arrival: float) -> Ticket:
        """Wait for room for a prompt of `tokens` that reached the proxy at `arrival`."""
        charge = self._charge(tokens)
        if self._admits(charge):
            self.inflight += charge
            return Ticket(self, tokens, charge)
        w = Waiter(tokens, arrival, asyncio.get_running_loop().create_future(), charge)
        self.waiters.append(w)
        self.on_depth(len(self.waiters))
        self._wake()
        try:
            await w.future  # type: ignore[misc]
        except BaseException:
            if w.future is not None and w.future.done() and not w.future.cancelled():
                self._release(charge)  # admitted just as the caller gave up
            elif w in self.waiters:
                self.waiters.remove(w)
                self.on_depth(len(self.waiters))
            raise
        return Ticket(self, tokens, charge)

    def measured(self, tokens: int, seconds: float) -> None:
        """A prefill leg of `tokens` estimated tokens took `seconds` (short legs are not read)."""
        if tokens >= MIN_RATE_TOKENS and seconds > 0:
            self._samples.append(seconds / tokens)
            self.rate = per_token_estimate(self._samples)

    def poke(self) -> None:
        """Admit what fits now (prefill engines may have been added or come back)."""
        self._wake()

    def _release(self, tokens: int) -> None:
        self.inflight = max(0, self.inflight - tokens)
        self._wake()

    def _wake(self) -> None:
        """Admit waiting prompts in order while they fit (the engine count may also have grown)."""
        woke = False
        room = self._room()  # once per wake: admitting a prompt does not change the engines
        while self.waiters:
            i = next_waiter(self.waiters, self.clock(), self.ttft_s, self.rate, self.max_wait_s)
            w = self.waiters[i]
            assert w.future is not None
            if w.future.done():  # its caller was cancelled and has not run its clean-up yet
                self.waiters.pop(i)
                woke = True
                continue
            if not self._fits(w.charge, room):
                break
            self.waiters.pop(i)
            woke = True
            self.inflight += w.charge
            w.future.set_result(None)
        if woke:
            self.on_depth(len(self.waiters))

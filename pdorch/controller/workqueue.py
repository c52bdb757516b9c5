"""A rate-limited, deduplicating work queue with client-go semantics, on asyncio.

- A key waiting in the queue is stored once, however often it is added (dedup).
- A key being processed is never handed to a second worker; re-adding it marks it dirty and it is
  queued again when `done` is called (bursts coalesce into one extra pass).
- `add_after` schedules a key for later; `add_rate_limited` does so with per-key exponential
  backoff, reset by `forget`.
- A global token bucket bounds how many keys per second reach the workers.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class ShutDown(Exception):
    """Raised by `get` once the queue is shut down and drained."""


class ExponentialBackoff:
    """Per-key delay doubling from `base` up to `cap`, with a little jitter."""

    def __init__(self, base: float = 0.5, cap: float = 300.0, jitter: float = 0.1) -> None:
        self.base, self.cap, self.jitter = base, cap, jitter
        self._failures: dict[Hashable, int] = {}

    def when(self, key: Hashable) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        # Exponent clamped: 2**1024 overflows a float (after 1024 failures of one key).
        delay = min(self.cap, self.base * (2 ** min(n, 64)))
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)


class TokenBucket:
    """Global rate limit: `rate` tokens per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()

    def reserve(self) -> float:
        """Take a token; return how long the caller must wait before using it."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class WorkQueue(Generic[K]):
    """See the module docstring. All methods must be called from the queue's event loop."""

    def __init__(
        self,
        backoff: ExponentialBackoff | None = None,
        bucket: TokenBucket | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []
        # Key -> when its one live delayed entry is due (client-go's waitingEntryByData): a key
        # asked for again later keeps the earlier time, or every pass's requeue would add a timer
        # and one group would be reconciled once per event it ever got, per requeue period.
        self._waiting: dict[K, float] = {}
        self._seq = itertools.count()
        self._ready = asyncio.Event()  # set whenever _queue may be non-empty or on shutdown
        self._shutting_down = False
        self._timer: asyncio.TimerHandle | None = None
        self.backoff = backoff or ExponentialBackoff()
        self.bucket = bucket or TokenBucket(rate=50.0, burst=200)
        self._on_depth = on_depth or (lambda n: None)

    # ------------------------------------------------------------------ producers
    def add(self, key: K) -> None:
        """Queue `key` unless it is already waiting; if it is being processed, mark it dirty."""
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by done()
        self._queue.append(key)
        self._on_depth(len(self._queue))
        self._notify()

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` after `delay` seconds (or sooner, if it is already due sooner)."""
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        at = asyncio.get_running_loop().time() + delay
        due = self._waiting.get(key)
        if due is not None and due <= at:
            return
        self._waiting[key] = at  # an earlier entry of this key, if any, is now stale
        heapq.heappush(self._delayed, (at, next(self._seq), key))
        self._arm_timer()

    def add_rate_limited(self, key: K) -> None:
        """Queue `key` after its per-key exponential backoff (for failed reconciles)."""
        self.add_after(key, self.backoff.when(key))

    def forget(self, key: K) -> None:
        """Reset `key`'s backoff after a successful pass."""
        self.backoff.forget(key)

    # ------------------------------------------------------------------ consumers
    async def get(self) -> K:
        """Wait for the next key (respecting the global rate limit) and mark it processing."""
        # Single-threaded loop: nothing can run between the emptiness check and wait().
        while not self._queue:
            if self._shutting_down:
                raise ShutDown
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self._on_depth(len(self._queue))
        self._processing.add(key)
        self._dirty.discard(key)
        wait = self.bucket.reserve()
        if wait > 0:
            await asyncio.sleep(wait)
        return key

    def done(self, key: K) -> None:
        """Finish processing `key`; re-queue it if it was added meanwhile."""
        self._processing.discard(key)
        if key in self._dirty and not self._shutting_down:
            self._queue.append(key)
            self._on_depth(len(self._queue))
            self._notify()

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self, *, drain: bool = True) -> None:
        """Stop accepting keys; `get` raises ShutDown once the queue is empty.

        `drain=False` drops the keys still waiting, so `get` raises at once (a replica that lost
        its Lease must not start reconciles it no longer owns).
        """
        self._shutting_down = True
        if not drain:
            self._queue.clear()
            self._dirty.clear()
            self._on_depth(0)
        if self._timer is not None:
            self._timer.cancel()
        self._delayed.clear()
        self._waiting.clear()
        self._notify()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    # ------------------------------------------------------------------ internals
    def _notify(self) -> None:
        self._ready.set()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._delayed:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._delayed[0][0], self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        while self._delayed and self._delayed[0][0] <= now:
            at, _, key = heapq.heappop(self._delayed)
            if self._waiting.get(key) == at:  # else superseded by an earlier entry of the key
                del self._waiting[key]
                self.add(key)
        self._arm_timer()

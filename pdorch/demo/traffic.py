"""Demo traffic: streaming completions whose prompt and output lengths follow a real trace.

Each simulated user sends a streamed completion, measures time to first token (TTFT) and time per
output token (TPOT) from the SSE chunks it receives, and records the outcome. `Stats` keeps a
sliding window so the live view shows current, not lifetime, numbers.
"""

from __future__ import annotations

import asyncio
import csv
import random
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources

import httpx2

from pdorch.sim.tokens import WORDS

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def trace_lengths(max_prompt: int = 4096, max_output: int = 256) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) pairs sampled from the Azure 2023 conversation trace."""
    text = resources.files("pdorch.demo").joinpath("data/azure2023_conv_lengths.csv").read_text()
    rows = csv.reader(line for line in text.splitlines() if not line.startswith("#"))
    next(rows)
    return [(min(int(a), max_prompt), max(1, min(int(b), max_output))) for a, b in rows]


def prompt_of(tokens: int, rng: random.Random) -> str:
    """A prompt of `tokens` tokens as the simulated engines count them (one short word, one token)."""
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


@dataclass
class Sample:
    at: float
    ok: bool
    ttft: float | None = None
    tpot: float | None = None


@dataclass
class Stats:
    """Recent request outcomes (a sliding window of `window` seconds)."""

    window: float = 30.0
    samples: deque[Sample] = field(default_factory=deque)
    total_ok: int = 0
    total_failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    _all_ttft: list[float] = field(default_factory=list)

    def add(self, s: Sample, error: str | None = None) -> None:
        self.samples.append(s)
        if s.ok:
            self.total_ok += 1
            if s.ttft is not None:
                self._all_ttft.append(s.ttft)
        else:
            self.total_failed += 1
            key = error or "error"
            self.errors[key] = self.errors.get(key, 0) + 1
        self._trim(s.at)

    def _trim(self, now: float) -> None:
        while self.samples and self.samples[0].at < now - self.window:
            self.samples.popleft()

    def lifetime_ttft_ms(self, q: float) -> float:
        """TTFT quantile `q` (ms) over every successful request so far."""
        return _pct(sorted(self._all_ttft), q) or 0.0

    def snapshot(self, now: float) -> dict[str, float | None]:
        """Requests/s, TTFT and TPOT p50/p99 (ms) over the window."""
        self._trim(now)
        ok = [s for s in self.samples if s.ok]
        span = min(self.window, max(1.0, now - self.samples[0].at)) if self.samples else self.window
        ttft = sorted(s.ttft for s in ok if s.ttft is not None)
        tpot = sorted(s.tpot for s in ok if s.tpot is not None)
        return {
            "rps": len(ok) / span,
            "ttft_p50_ms": _pct(ttft, 0.5),
            "ttft_p99_ms": _pct(ttft, 0.99),
            "tpot_p50_ms": _pct(tpot, 0.5),
            "tpot_p99_ms": _pct(tpot, 0.99),
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return 1000 * values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_request(
    client: httpx2.AsyncClient, url: str, prompt: str, max_tokens: int, stats: Stats
) -> float:
    """Send one streamed completion and record TTFT/TPOT or the error.

    Returns how long the user should wait before the next request: the server's Retry-After on
    429/503 (capped at 5 s), a short pause after other errors, 0 after a success.
    """
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    t0 = time.monotonic()
    first: float | None = None
    chunks = 0
    done = False
    error: str | None = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                stats.add(Sample(time.monotonic(), False), f"HTTP {r.status_code}")
                try:
                    return min(5.0, float(r.headers.get("Retry-After", "1")))
                except ValueError:
                    return 1.0
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if line.startswith('data: {"error"'):
                        error = "stream error event"  # the proxy's mid-stream failure
                    chunks += 1
                    if first is None:
                        first = time.monotonic()
    except httpx2.HTTPError as e:
        stats.add(Sample(time.monotonic(), False), type(e).__name__)
        return 1.0
    end = time.monotonic()
    # A 200 whose stream carried an error, no token, or no [DONE] is an interrupted request.
    if error is None and not chunks:
        error = "empty stream"
    elif error is None and not done:
        error = "stream cut before [DONE]"
    if error is not None:
        stats.add(Sample(end, False), error)
        return 1.0
    tpot = (end - first) / (chunks - 1) if first is not None and chunks > 1 else None
    stats.add(Sample(end, True, (first or end) - t0, tpot))
    return 0.0


async def run_users(url: str, users: int, stats: Stats, stop: asyncio.Event, seed: int = 7) -> None:
    """`users` closed-loop users sending trace-shaped requests until `stop` is set."""
    lengths = trace_lengths()

    async def user(i: int) -> None:
        rng = random.Random(seed + i)
        async with httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(120.0)) as client:
            while not stop.is_set():
                isl, osl = rng.choice(lengths)
                pause = await one_request(client, url, prompt_of(isl, rng), osl, stats)
                if pause:
                    await asyncio.sleep(pause)  # a real client honours Retry-After

    await asyncio.gather(*(user(i) for i in range(users)))

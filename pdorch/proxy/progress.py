"""Is a decode engine still working? Its token counters say so, for answers that send nothing until
they are done.

A non-streamed answer's first byte is its last, so silence on its connection says nothing about the
engine: a long generation and a wedged engine look the same. vLLM V1 moves its
`vllm:prompt_tokens_total` and `vllm:generation_tokens_total` counters on every engine step that
finishes a prefill or makes a token, and SGLang its `sglang:realtime_tokens_total` every few steps
(its `generation_tokens_total` moves only when a request ends, so it is not read). While a pending
answer is generating they move; an engine whose counters stand still has made no token at all (its
/health may still pass). That is also true
of a healthy engine before a request's first token (a KV pull, a long local prefill, a grammar
compile), so the limit is the one a stream gets before its first byte (`first_byte_timeout_s`), not
the idle limit of a stream being relayed.

`ProgressWatch` is the pure bookkeeping: the proxy registers each pending non-streamed decode answer
with its engine's URL (a draining engine leaves discovery but still serves its answers), samples the
engine's counters while some wait, and fails the waits that saw no progress for `silence_s`. Limits:
an engine that exports none of these counters (SGLang before `realtime_tokens_total`) is never
judged; the counters of data-parallel ranks are summed, so one wedged rank among working ones is not
seen. The request timeout still bounds those answers.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

# Counters that move while an engine works: vLLM V1's on every step that finishes a prefill or makes a
# token; SGLang's scheduler counter (newer releases) every few steps, by mode.
_STEP_COUNTERS = (
    b"vllm:prompt_tokens_total",
    b"vllm:generation_tokens_total",
    b"sglang:realtime_tokens_total",
)


def step_tokens(text: bytes) -> float | None:
    """The sum of an engine's progress counters (`_STEP_COUNTERS`) in its /metrics text; None when it
    exports none (an older SGLang, or not the metrics page). A line scan, not a full parse: an
    engine's page is large and this runs on the proxy's event loop."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(_STEP_COUNTERS):
            continue
        # The name ends at its labels or the value (not e.g. vllm:prompt_tokens_total_created).
        name = next(
            (n for n in _STEP_COUNTERS if line.startswith(n) and line[len(n) : len(n) + 1] in (b"{", b" ")),
            None,
        )
        if name is None:
            continue
        rest = line[len(name) :]
        if rest.startswith(b"{"):
            rest = rest[rest.rfind(b"}") + 1 :]  # label values may hold spaces
        fields = rest.split()  # the value, then an optional timestamp
        try:
            total += float(fields[0])
        except (IndexError, ValueError):
            continue
        seen = True
    return total if seen else None


@dataclass
class _Engine:
    url: str  # where its /metrics is read
    waits: dict[Hashable, float] = field(default_factory=dict)  # waiter -> when it started
    value: float | None = None  # last counter sum read
    since: float | None = None  # when the counters last moved (or were first read)


@dataclass
class ProgressWatch:
    """Pending non-streamed answers per engine, and when each engine's counters last moved."""

    silence_s: float
    engines: dict[str, _Engine] = field(default_factory=dict)

    def started(self, key: str, url: str, waiter: Hashable, now: float) -> None:
        """An answer from engine `key` (at `url`) is awaited from `now`."""
        self.engines.setdefault(key, _Engine(url)).waits[waiter] = now

    def ended(self, key: str, waiter: Hashable) -> None:
        """The answer came (or the wait was given up); an engine with no waits is forgotten, so the
        next wait measures progress afresh."""
        engine = self.engines.get(key)
        if engine is None:
            return
        engine.waits.pop(waiter, None)
        if not engine.waits:
            del self.engines[key]

    def due(self, now: float) -> list[tuple[str, str]]:
        """Engines worth sampling now, as (key, url): some answer has waited half the silence limit
        (shorter waits are the common case and need no scrape)."""
        half = self.silence_s / 2
        return [(k, e.url) for k, e in self.engines.items() if any(now - t >= half for t in e.waits.values())]

    def observe(self, key: str, value: float | None, now: float) -> list[Hashable]:
        """Record a sample of engine `key` (None: no counters read) and return the waits to fail:
        those that waited `silence_s` through which the counters did not move. They are no longer
        tracked. An engine whose counters were never read is not judged (it may not export them);
        once read, a page that stops answering is no sign of progress."""
        engine = self.engines.get(key)
        if engine is None or (value is None and engine.value is None):
            return []
        if engine.since is None or (value is not None and value != engine.value):
            engine.since = now
        if value is not None:
            engine.value = value
        if now - engine.since < self.silence_s:
            return []
        stuck = [w for w, t in engine.waits.items() if now - t >= self.silence_s]
        for w in stuck:
            del engine.waits[w]
        if not engine.waits:
            del self.engines[key]
        return stuck

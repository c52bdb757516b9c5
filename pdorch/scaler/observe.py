"""Turn engine samples of one role into the load the policies read (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdorch.scaler.scrape import EngineSample


@dataclass(frozen=True)
class RoleLoad:
    """What one role did over an observation window, summed over its ready replicas.

    Rates are per second over the window; latencies are means over requests finished in it
    (None when nothing finished). `running`, `waiting` and `kv_usage` are live values at the
    window's end.
    """

    ready_replicas: int
    window_s: float
    request_rate: float = 0.0
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # mean over replicas, 0..1
    mean_ttft_s: float | None = None
    mean_itl_s: float | None = None


def total(samples: Sequence[EngineSample]) -> EngineSample:
    """Add the samples of several replicas (KV usage is averaged, not added)."""
    if not samples:
        return EngineSample(engine="")
    n = len(samples)
    return EngineSample(
        engine=samples[0].engine,
        running=sum(s.running for s in samples),
        waiting=sum(s.waiting for s in samples),
        kv_usage=sum(s.kv_usage for s in samples) / n,
        requests_total=sum(s.requests_total for s in samples),
        prompt_tokens_total=sum(s.prompt_tokens_total for s in samples),
        generation_tokens_total=sum(s.generation_tokens_total for s in samples),
        ttft_sum_s=sum(s.ttft_sum_s for s in samples),
        ttft_count=sum(s.ttft_count for s in samples),
        itl_sum_s=sum(s.itl_sum_s for s in samples),
        itl_count=sum(s.itl_count for s in samples),
        kv_capacity_tokens=sum(s.kv_capacity_tokens for s in samples),
    )


def _delta(new: float, old: float) -> float:
    # A counter that went down means the pod restarted (or a replica left the sum): count from 0.
    return new - old if new >= old else new


def role_load(prev: Sequence[EngineSample], cur: Sequence[EngineSample], window_s: float) -> RoleLoad:
    """The load between two scrapes of the same role's replicas (`prev` may be empty)."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    a, b = total(prev), total(cur)
    reqs = _delta(b.requests_total, a.requests_total)
    # Arrivals = finished + growth of what is in the engines; completions alone would hide an
    # overload (the queue grows while the finish rate stays at capacity).
    in_flight_growth = (b.running + b.waiting) - (a.running + a.waiting) if prev else 0.0
    arrivals = max(reqs + in_flight_growth, 0.0)
    ttft_n = _delta(b.ttft_count, a.ttft_count)
    itl_n = _delta(b.itl_count, a.itl_count)
    return RoleLoad(
        ready_replicas=len(cur),
        window_s=window_s,
        request_rate=arrivals / window_s,
        mean_prompt_tokens=_delta(b.prompt_tokens_total, a.prompt_tokens_total) / reqs if reqs else 0.0,
        mean_output_tokens=_delta(b.generation_tokens_total, a.generation_tokens_total) / reqs
        if reqs
        else 0.0,
        running=b.running,
        waiting=b.waiting,
        kv_usage=b.kv_usage,
        mean_ttft_s=_delta(b.ttft_sum_s, a.ttft_sum_s) / ttft_n if ttft_n else None,
        mean_itl_s=_delta(b.itl_sum_s, a.itl_sum_s) / itl_n if itl_n else None,
    )

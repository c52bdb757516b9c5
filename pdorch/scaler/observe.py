"""Turn engine samples of one role into the load the policies read (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

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
    # KV tokens one replica holds, as the engines report it (mean over those that do; 0: none does).
    kv_capacity_tokens: float = 0.0


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
        finished_prompt_tokens=sum(s.finished_prompt_tokens for s in samples),
        finished_output_tokens=sum(s.finished_output_tokens for s in samples),
        finished_lengths_count=sum(s.finished_lengths_count for s in samples),
    )


def _restarted(old: EngineSample, new: EngineSample) -> bool:
    """Whether the engine restarted between the two samples: any of its counters went down (then
    every counter counts from 0, so a sum and its count stay in step)."""
    return any(getattr(new, f) < getattr(old, f) for f in _COUNTER_FIELDS)


_COUNTER_FIELDS = (
    "requests_total",
    "prompt_tokens_total",
    "generation_tokens_total",
    "ttft_sum_s",
    "ttft_count",
    "itl_sum_s",
    "itl_count",
    "finished_prompt_tokens",
    "finished_output_tokens",
    "finished_lengths_count",
)


def _span(old: EngineSample, new: EngineSample, window_s: float) -> float:
    """Seconds between two samples of one engine: their own scrape times where the source gave
    them (a Prometheus scrape interval is not the scaler's), else the scaler's window."""
    if old.at is not None and new.at is not None and new.at > old.at:
        return new.at - old.at
    return window_s


def role_load(prev: Sequence[EngineSample | None], cur: Sequence[EngineSample], window_s: float) -> RoleLoad:
    """The load between two scrapes of the same role's replicas.

    `prev[i]` is replica i's previous sample, or None when it has none (it just became ready, or
    its last scrape failed); an empty `prev` means no replica has one. Counters are differenced
    per replica, so one pod's restart (its counters back near 0) or a replica joining or leaving
    the set cannot be read as a burst or a lull: a replica without a baseline adds its live
    gauges (running, waiting, KV) but nothing to the rates this window. Each replica's changes
    are per second of the time between its own two samples when they carry scrape times
    (`EngineSample.at`), else of `window_s`; means are ratios of those rates, so a replica whose
    interval is longer than the others' does not weigh more in them.
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    if prev and len(prev) != len(cur):
        raise ValueError(f"prev has {len(prev)} samples for {len(cur)} replicas; pass None for a missing one")
    rates = dict.fromkeys(_COUNTER_FIELDS, 0.0)  # per second
    in_flight_growth = 0.0  # per second
    for old, new in zip(prev or [None] * len(cur), cur, strict=True):
        if old is None:
            continue
        span = _span(old, new, window_s)
        restarted = _restarted(old, new)
        for f in _COUNTER_FIELDS:
            rates[f] += (getattr(new, f) - (0 if restarted else getattr(old, f))) / span
        # Arrivals = finished + growth of what is in the engines; completions alone would hide an
        # overload (the queue grows while the finish rate stays at capacity). After a restart the
        # old in-flight requests were lost, not finished: all of today's arrived since.
        before = 0 if restarted else old.running + old.waiting
        in_flight_growth += (new.running + new.waiting - before) / span
    now = total(cur)
    reported = [s.kv_capacity_tokens for s in cur if s.kv_capacity_tokens > 0]
    reqs = rates["requests_total"]
    ttft_n, itl_n = rates["ttft_count"], rates["itl_count"]
    # Mean lengths of the requests finished in the window: from vLLM's per-request histograms when
    # it exports them, else from the token counters (SGLang counts a request's tokens at its end).
    n_len = rates["finished_lengths_count"]
    if n_len:
        prompt, output = rates["finished_prompt_tokens"] / n_len, rates["finished_output_tokens"] / n_len
    elif reqs:
        prompt, output = rates["prompt_tokens_total"] / reqs, rates["generation_tokens_total"] / reqs
    else:
        prompt = output = 0.0
    return RoleLoad(
        ready_replicas=len(cur),
        window_s=window_s,
        request_rate=max(reqs + in_flight_growth, 0.0),
        mean_prompt_tokens=prompt,
        mean_output_tokens=output,
        running=now.running,
        waiting=now.waiting,
        kv_usage=now.kv_usage,
        mean_ttft_s=rates["ttft_sum_s"] / ttft_n if ttft_n else None,
        mean_itl_s=rates["itl_sum_s"] / itl_n if itl_n else None,
        kv_capacity_tokens=sum(reported) / len(reported) if reported else 0.0,
    )


@dataclass(frozen=True)
class Scraped:
    """One tick's samples of a role, paired with the previous tick's by endpoint."""

    prev: list[EngineSample | None]  # aligned with `cur`; None: no baseline for that replica
    cur: list[EngineSample]
    by_key: dict[str, EngineSample]  # what to keep as the next tick's baseline
    unread: int  # endpoints whose metrics could not be read this tick
    # Per endpoint, the sample before its baseline (next tick's `before`): what an endpoint whose
    # source has no newer sample is paired with.
    before: dict[str, EngineSample] = field(default_factory=dict)
    repeated: int = 0  # endpoints whose source had no newer sample: their last interval, read again

    @property
    def blind(self) -> int:
        """Endpoints read this tick without a baseline: their part of the rates is unknown."""
        return sum(p is None for p in self.prev)


def pair_with_previous(
    prev: Mapping[str, EngineSample],
    keys: Sequence[str],
    samples: Sequence[EngineSample | None],
    known: Collection[str] = (),
    fresh: Collection[str] = (),
    before: Mapping[str, EngineSample] | None = None,
) -> Scraped:
    """Pair each read sample with the same endpoint's previous one (`samples[i]` is `keys[i]`'s).

    Keying by endpoint, never by position, keeps one failed scrape from shifting every replica's
    baseline onto another's. An endpoint without last tick's sample gets no baseline this tick
    (its counters span an unknown time: a failed scrape, a readiness flap, a cancelled drain, an
    engine this process never read), unless it is `fresh` (became ready since the last tick) and
    was never read (`known`): a new engine, whose counters started at 0, so a zero baseline counts
    what it did since it became ready.

    A sample no newer than the baseline (by `EngineSample.at`: Prometheus has not scraped the
    engine since the last tick) repeats the endpoint's last interval, paired with `before`, instead
    of reading as an interval without requests; the next new sample is read against the same
    baseline, over the time between the two scrapes. Without that, a scrape interval longer than
    the tick made some ticks read no load and the next ones twice as much."""
    if len(keys) != len(samples):
        raise ValueError(f"{len(samples)} samples for {len(keys)} endpoints")
    before = before or {}
    by_key: dict[str, EngineSample] = {}
    pairs: list[EngineSample | None] = []
    earlier: dict[str, EngineSample] = {}
    repeated = 0
    for k, s in zip(keys, samples, strict=True):
        if s is None:
            continue
        base = prev.get(k)
        if base is not None and s.at is not None and base.at is not None and s.at <= base.at:
            by_key[k] = base
            pairs.append(before.get(k))
            if k in before:
                earlier[k] = before[k]
                repeated += 1
            continue
        by_key[k] = s
        if base is None and k in fresh and k not in known:
            base = EngineSample(engine=s.engine)
        if base is not None:
            earlier[k] = base
        pairs.append(base)
    return Scraped(
        prev=pairs,
        cur=list(by_key.values()),
        by_key=by_key,
        unread=len(keys) - len(by_key),
        before=earlier,
        repeated=repeated,
    )


def missed_target(load: RoleLoad, ttft_s: float | None = None, tpot_s: float | None = None) -> bool:
    """Whether the window's mean TTFT or mean inter-token latency was above its target.

    A mean above the target means many requests of the window missed it: the signal
    `scale_down_after_miss_s` keys on (a single slow request does not trip it)."""
    if ttft_s is not None and load.mean_ttft_s is not None and load.mean_ttft_s > ttft_s:
        return True
    return tpot_s is not None and load.mean_itl_s is not None and load.mean_itl_s > tpot_s

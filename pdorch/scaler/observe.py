"""Turn engine samples of one role into the load the policies read (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from pdorch.scaler.scrape import COUNTER_FIELDS, EngineSample


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


# How old an engine's newest sample (its scrape time, `EngineSample.at`) may be, against the tick's
# own clock, and still be read. Prometheus answers with a target's last samples for 5 minutes after
# it stopped scraping it (its lookback) without saying so; a sample no newer than the last one is
# read as a repeat of the last interval, so without a bound a stuck Prometheus would go on sizing
# the role on the load of minutes ago. 120 s is two scrapes at Prometheus's default interval (1m)
# and four at the common 30 s: a late scrape or an ingestion lag still reads, a stopped one does
# not. An engine scraped less often gets two of its own intervals (`age_bound`), up to the lookback,
# past which Prometheus answers with nothing. Older counts as unread, which holds a scale-down.
MAX_SAMPLE_AGE_S = 120.0
PROMETHEUS_LOOKBACK_S = 300.0
# Two readings of `process_start_time_seconds` this far apart are two processes (the value is
# derived from clock ticks since boot; a restart takes far longer than this).
_START_SLACK_S = 1.0


def age_bound(base: EngineSample | None, before: EngineSample | None) -> float:
    """How old an engine's newest sample may be and still be read: MAX_SAMPLE_AGE_S, or two of the
    engine's scrape intervals (the spacing of its last two samples) where that is longer, never
    beyond Prometheus's lookback."""
    if base is None or before is None or base.at is None or before.at is None or base.at <= before.at:
        return MAX_SAMPLE_AGE_S
    return min(max(MAX_SAMPLE_AGE_S, 2 * (base.at - before.at)), PROMETHEUS_LOOKBACK_S)


def _shared(old: EngineSample, new: EngineSample) -> tuple[str, ...]:
    """The counter fields both samples hold (all when either does not say which it holds)."""
    if old.counters is None or new.counters is None:
        return COUNTER_FIELDS
    return tuple(f for f in COUNTER_FIELDS if f in old.counters and f in new.counters)


def _lost(old: EngineSample, new: EngineSample) -> bool:
    """Whether `new` lacks a counter family `old` had: an incomplete scrape (the family reads 0,
    which is neither the engine's count nor a restart)."""
    return old.counters is not None and new.counters is not None and not old.counters <= new.counters


def _gained(old: EngineSample, new: EngineSample) -> bool:
    """Whether `new` has a counter family `old` lacked: its count since `old` is unknown (the family
    may have been missing from `old`'s scrape, not 0)."""
    return old.counters is not None and new.counters is not None and not new.counters <= old.counters


def _restarted(old: EngineSample, new: EngineSample) -> bool | None:
    """Whether the engine restarted between the two samples (then every counter counts from 0, so a
    sum and its count stay in step); None when the two do not read as one engine's consecutive
    samples (a counter went down while the process did not restart: a series lost from the scrape).

    The process start time decides where both samples have it. Else any counter the two share going
    down does: a restarted engine's counters may have grown past their old values already (one
    that had run for a short time), so "all went down" would miss restarts. Families missing from a
    scrape are not counters going down (`_lost`: such a sample is not read at all)."""
    down = any(getattr(new, f) < getattr(old, f) for f in _shared(old, new))
    if old.started_at is not None and new.started_at is not None:
        if abs(new.started_at - old.started_at) > _START_SLACK_S:
            return True
        return None if down else False
    return down


def _readable(old: EngineSample, new: EngineSample) -> bool:
    """Whether `new` can be differenced against `old` at all."""
    return not _lost(old, new) and not _gained(old, new) and _restarted(old, new) is not None


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
    rates = dict.fromkeys(COUNTER_FIELDS, 0.0)  # per second
    in_flight_growth = 0.0  # per second
    for old, new in zip(prev or [None] * len(cur), cur, strict=True):
        # A pair that is not one engine's two consecutive samples (a family missing from one, a
        # counter gone down without a restart) is read as no baseline: `pair_with_previous` does
        # not pair such samples; here for callers that pair samples themselves.
        if old is None or not _readable(old, new):
            continue
        span = _span(old, new, window_s)
        restarted = _restarted(old, new)
        for f in COUNTER_FIELDS:
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
    unread: int  # endpoints whose metrics could not be read this tick (with `stale` and `broken`)
    # Per endpoint, the sample before its baseline (next tick's `before`): what an endpoint whose
    # source has no newer sample is paired with.
    before: dict[str, EngineSample] = field(default_factory=dict)
    repeated: int = 0  # endpoints whose source had no newer sample: their last interval, read again
    stale: int = 0  # of `unread`: endpoints whose newest sample is older than their `age_bound`
    # Of `unread`: endpoints whose sample does not follow their previous one (a counter family
    # missing, or a counter gone down while the process did not restart).
    broken: int = 0
    # Baselines of stale endpoints, kept so that their next new sample is read against them.
    kept: dict[str, EngineSample] = field(default_factory=dict)

    @property
    def baselines(self) -> dict[str, EngineSample]:
        """Every endpoint's baseline for the next tick (the read ones' and the stale ones' kept)."""
        return {**self.kept, **self.by_key}

    @property
    def blind(self) -> int:
        """Endpoints read this tick without a baseline: their part of the rates is unknown."""
        return sum(p is None for p in self.prev)

    def unread_why(self) -> str:
        """What is known of why endpoints were unread, for a hold's reason ("" when nothing is)."""
        parts = []
        if self.stale:
            parts.append(
                f"{self.stale} stale: newest sample older than {MAX_SAMPLE_AGE_S:.0f}s"
                " or two of the engine's scrape intervals"
            )
        if self.broken:
            parts.append(f"{self.broken} incomplete: counters missing or gone down since the last reading")
        return f" ({'; '.join(parts)})" if parts else ""


def pair_with_previous(
    prev: Mapping[str, EngineSample],
    keys: Sequence[str],
    samples: Sequence[EngineSample | None],
    known: Collection[str] = (),
    fresh: Collection[str] = (),
    before: Mapping[str, EngineSample] | None = None,
    wall: float | None = None,
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
    the tick made some ticks read no load and the next ones twice as much. A sample scraped more
    than its `age_bound` before `wall` (the tick's Unix time; None: no bound) is unread (`stale`);
    the endpoint keeps its baseline (`kept`), so the next new sample is read against it over their
    spacing: dropped, a scrape interval longer than the bound left every tick without a baseline.

    A sample that lacks a counter family its baseline had, or whose counters went down while its
    process did not restart, is unread like a failed scrape (`broken`): read, the missing counts
    would be a restart and the engine's lifetime counts one interval's work (and the next complete
    scrape a second such spike). One with a family its baseline lacked gets no baseline."""
    if len(keys) != len(samples):
        raise ValueError(f"{len(samples)} samples for {len(keys)} endpoints")
    before = before or {}
    by_key: dict[str, EngineSample] = {}
    pairs: list[EngineSample | None] = []
    earlier: dict[str, EngineSample] = {}
    kept: dict[str, EngineSample] = {}
    repeated = stale = broken = 0
    for k, s in zip(keys, samples, strict=True):
        if s is None:
            continue
        base = prev.get(k)
        if wall is not None and s.at is not None and wall - s.at > age_bound(base, before.get(k)):
            stale += 1
            if base is not None:
                kept[k] = base
                if k in before:
                    earlier[k] = before[k]
            continue
        if base is not None and s.at is not None and base.at is not None and s.at <= base.at:
            by_key[k] = base
            pairs.append(before.get(k))
            if k in before:
                earlier[k] = before[k]
                repeated += 1
            continue
        if base is not None and (_lost(base, s) or _restarted(base, s) is None):
            broken += 1
            continue
        by_key[k] = s
        if base is not None and _gained(base, s):
            base = None
        elif base is None and k in fresh and k not in known:
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
        stale=stale,
        broken=broken,
        kept=kept,
    )


def missed_target(load: RoleLoad, ttft_s: float | None = None, tpot_s: float | None = None) -> bool:
    """Whether the window's mean TTFT or mean inter-token latency was above its target.

    A mean above the target means many requests of the window missed it: the signal
    `scale_down_after_miss_s` keys on (a single slow request does not trip it)."""
    if ttft_s is not None and load.mean_ttft_s is not None and load.mean_ttft_s > ttft_s:
        return True
    return tpot_s is not None and load.mean_itl_s is not None and load.mean_itl_s > tpot_s

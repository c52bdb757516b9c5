"""Causal demand forecast over a pod start-up window (pure; the caller keeps the history).

A pod asked for now helps only after its start-up time, so a replica count should be sized for
the load of the next *lead* seconds (start-up + one controller tick), not for the last tick.
The forecast is "level + the rise the recent past showed over one lead window":

    peak(now) = level(now) + Q_q{ max(v(s) for t < s <= t + lead) - v(t) : now - horizon <= t, t + lead <= now }

that is, the `quantile` of the rises that followed every past sample whose lead window is already
fully observed (the empirical error of a "no change" forecast against the lead window's peak).
The quantile is weighted by the work each lead window carried (`weighted_quantile`): SLO attainment
counts requests, not ticks, so the rise before a burst, which carries the burst's requests, weighs
more than the rises of many quiet ticks that carry few.
This is a quantile-of-recent-peaks headroom in the spirit of predictive autoscalers (Dynamo's
planner predicts the load of its next adjustment interval; Google's Autopilot sizes from
percentiles and peaks of a moving window of usage): it learns from the workload how much it may
rise within a start-up time, it widens after bursts and narrows when the load is steady, and only
samples up to `now` are read. The rises are conditioned on the level (`from_similar_levels`). A rise is measured against the level at the time, so trends, spikes and Poisson
noise all count. Quiet series give rise 0 and the forecast is the level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Series:
    """Samples (t, value) of one signal, ascending in t."""

    samples: list[tuple[float, float]] = field(default_factory=list)


def record(series: Series, t: float, value: float, keep_s: float) -> None:
    """Append (t, value) and forget samples older than `keep_s` (updates `series` in place).

    A value that is not a finite number (a NaN gauge) is not recorded: one would poison every rise
    and work sum of the horizon.
    """
    if not math.isfinite(value):
        return
    if series.samples and t <= series.samples[-1][0]:
        series.samples[-1] = (series.samples[-1][0], value)  # same instant: last value wins
    else:
        series.samples.append((t, value))
    cut = t - keep_s
    i = 0
    while i < len(series.samples) and series.samples[i][0] < cut:
        i += 1
    if i:
        del series.samples[:i]


@dataclass(frozen=True)
class Rise:
    """What followed one past sample: its level, the rise to the lead window's peak, the window's work."""

    level: float
    rise: float
    # Sum of the samples in (t, t + lead]: the demand the window carried (prefill: replica-seconds of
    # prompts; decode: resident sequences), i.e. its requests weighted by what each asked for.
    work: float


def rises(samples: list[tuple[float, float]], now: float, lead_s: float, horizon_s: float) -> list[Rise]:
    """A `Rise` for each sample with now - horizon <= t and t + lead <= now (its lead window fully
    observed): rise = max(value over (t, t + lead]) - value(t), at least 0."""
    out: list[Rise] = []
    n = len(samples)
    for i, (t, v) in enumerate(samples):
        if t < now - horizon_s:
            continue
        if t + lead_s > now + 1e-9:
            break
        peak, work = v, 0.0
        j = i + 1
        while j < n and samples[j][0] <= t + lead_s + 1e-9:
            peak = max(peak, samples[j][1])
            work += samples[j][1]
            j += 1
        out.append(Rise(v, max(peak - v, 0.0), work))
    return out


def from_similar_levels(past: list[Rise], level: float, min_count: int = 8) -> list[Rise]:
    """The rises that followed levels at least `level` (the `min_count` highest levels if fewer did).

    A conditional sample: what followed loads at least this high. The top of a burst is followed
    by less rise than the lull before it, so sizing the top for the lull's rise would count the
    burst twice; at an all-time high the nearest (highest) levels seen stand in.
    """
    above = [r for r in past if r.level >= level]
    if len(above) >= min_count or len(past) <= min_count:
        return above if len(above) >= min_count else list(past)
    return sorted(past, key=lambda r: r.level, reverse=True)[:min_count]


def quantile(values: list[float], q: float) -> float:
    """The empirical q-quantile (nearest rank, upper), 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = min(max(math.ceil(q * len(s)) - 1, 0), len(s) - 1)
    return s[k]


def weighted_quantile(past: list[Rise], q: float) -> float:
    """The smallest rise that covers at least a q share of the work of `past` (0 when it carried none).

    A window is covered when its rise is at most the answer; windows that carried no work do not count.
    """
    total = sum(r.work for r in past)
    if total <= 0:
        return 0.0
    covered = 0.0
    for r in sorted(past, key=lambda r: r.rise):
        covered += r.work
        if covered >= q * total * (1 - 1e-12):
            return r.rise
    return max(r.rise for r in past)


@dataclass(frozen=True)
class Forecast:
    """The forecast peak over the lead window, and its parts (for reasons and tests)."""

    peak: float
    level: float
    rise: float
    samples: int


def peak_forecast(
    series: Series, now: float, lead_s: float, horizon_s: float, q: float, weighted: bool = True
) -> Forecast:
    """Level now plus the q-quantile (work-weighted unless `weighted` is False) of the rises over one
    lead window seen in the last `horizon_s` after levels at least today's (`from_similar_levels`)."""
    if not series.samples:
        return Forecast(0.0, 0.0, 0.0, 0)
    level = series.samples[-1][1]
    past = from_similar_levels(rises(series.samples, now, lead_s, horizon_s), level)
    rise = weighted_quantile(past, q) if weighted else quantile([r.rise for r in past], q)
    return Forecast(level + rise, level, rise, len(past))

"""How predictable are the Azure traces' bursts from the past alone? (causal statistics, no replay)

For each trace, on 10 s arrival counts (the raw trace, 1x):
- autocorrelation at lags 10 s .. 10 min, and the strongest periodogram period with its share of
  the variance (periodicity);
- recurrence: for a controller that must ask for a pod `lead` seconds (start-up + one tick) before
  it serves, the share of requests that arrive in a 10 s bin whose rate exceeds every rate seen in
  the `hold` seconds before the lead window (what a hold-the-recent-peak policy would lack), for
  several hold lengths, and the mean capacity (in units of the mean rate) that policy provisions.

    PYTHONPATH=$PWD python3 bench/autoscale/predictability.py [--lead 75]
"""

from __future__ import annotations

import argparse
import cmath
import math

import workloads

BIN_S = 10.0


def counts(rows: list[tuple[float, int, int]]) -> list[int]:
    n = int(rows[-1][0] // BIN_S) + 1
    out = [0] * n
    for t, _, _ in rows:
        out[int(t // BIN_S)] += 1
    return out


def acf(x: list[int], lag: int) -> float:
    n = len(x)
    m = sum(x) / n
    var = sum((v - m) ** 2 for v in x) / n
    return sum((x[i] - m) * (x[i + lag] - m) for i in range(n - lag)) / (n * var)


def strongest_period(x: list[int]) -> tuple[float, float]:
    """(period in s, share of the variance) of the largest periodogram peak (periods 30 s .. 30 min)."""
    n = len(x)
    m = sum(x) / n
    d = [v - m for v in x]
    total = sum(v * v for v in d)
    best = (0.0, 0.0)
    for k in range(1, n // 2 + 1):
        period = n * BIN_S / k
        if not 30 <= period <= 1800:
            continue
        z = sum(v * cmath.exp(-2j * math.pi * k * i / n) for i, v in enumerate(d))
        share = 2 * abs(z) ** 2 / n / total
        if share > best[1]:
            best = (period, share)
    return best


def hold_miss(x: list[int], lead_s: float, hold_s: float) -> tuple[float, float]:
    """(share of requests in bins above the peak of [t - lead - hold, t - lead], mean provisioned / mean rate)."""
    lead, hold = math.ceil(lead_s / BIN_S), max(math.ceil(hold_s / BIN_S), 1)
    short = cap_sum = 0.0
    for i, v in enumerate(x):
        past = x[max(i - lead - hold + 1, 0) : max(i - lead + 1, 0)]
        cap = max(past, default=0)
        cap_sum += cap
        if v > cap:
            short += v
    mean = sum(x) / len(x)
    return short / sum(x), cap_sum / len(x) / mean


def recurrence(x: list[int], lag_s: float, burst: int, prior: int) -> float:
    """Share of requests in burst bins (>= `burst`) with a bin >= `prior` one lag earlier (+-30 s)."""
    k = round(lag_s / BIN_S)
    tot = hit = 0
    for i in range(k + 3, len(x)):
        if x[i] >= burst:
            tot += x[i]
            if max(x[i - k - 3 : i - k + 4]) >= prior:
                hit += x[i]
    return hit / tot if tot else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lead", type=float, default=75.0, help="start-up + tick, seconds (default 75)")
    args = ap.parse_args()
    for name in ("conv", "code"):
        x = counts(workloads.load_azure(workloads.TRACE_DIR / f"azure2023_{name}.csv"))
        m = sum(x) / len(x)
        print(
            f"azure-{name}: {len(x)} bins of {BIN_S:.0f} s, mean {m:.1f}, max {max(x)}, idle bins {x.count(0) / len(x):.0%}"
        )
        lags = (1, 2, 3, 6, 12, 30, 60)
        print("  acf " + " ".join(f"{int(k * BIN_S)}s={acf(x, k):+.2f}" for k in lags))
        period, share = strongest_period(x)
        print(f"  strongest period {period:.0f} s, {share:.1%} of the variance")
        h = len(x) // 2
        p1, s1 = strongest_period(x[:h])
        p2, s2 = strongest_period(x[h:])
        print(f"  first half: {p1:.0f} s ({s1:.1%}); second half: {p2:.0f} s ({s2:.1%})")
        if name == "code":
            burst, prior = 60, 30
            lags = (200.0, 250.0, period, 350.0, 400.0)
            print(
                f"  bursts (10 s bins >= {burst} req) preceded by a bin >= {prior} one lag earlier (+-30 s): "
                + ", ".join(f"lag {lag:.0f} s {recurrence(x, lag, burst, prior):.0%}" for lag in lags)
            )
        for hold in (0, 60, 300, 900, 1800, 3600):
            miss, cap = hold_miss(x, args.lead, hold)
            print(
                f"  hold the peak of {hold:4.0f} s before a {args.lead:.0f} s lead: "
                f"{miss:.1%} of requests above it, provisioned {cap:.2f}x the mean rate"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

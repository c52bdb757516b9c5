"""Workloads for the autoscaling bench: the Azure 2023 traces and synthetic shapes.

Azure LLM inference traces 2023 (conv, code), CC-BY-4.0, from Patel et al., "Splitwise: Efficient
Generative LLM Inference Using Phase Splitting", ISCA 2024 (github.com/Azure/AzurePublicDataset).
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from dataclasses import dataclass
from pathlib import Path

TRACE_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"


@dataclass(frozen=True)
class Workload:
    name: str
    arrivals: list[tuple[float, int, int]]  # (t seconds, prompt tokens, output tokens), sorted
    note: str

    @property
    def duration(self) -> float:
        return self.arrivals[-1][0] if self.arrivals else 0.0


def load_azure(path: Path) -> list[tuple[float, int, int]]:
    """(seconds since the first request, ContextTokens, GeneratedTokens) rows of an Azure 2023 CSV."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Azure 2023 trace not found (expected under {TRACE_DIR})")
    rows: list[tuple[float, int, int]] = []
    with path.open() as f:
        for rec in csv.DictReader(f):
            ts = dt.datetime.fromisoformat(rec["TIMESTAMP"][:26])
            rows.append((ts.timestamp(), int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
    rows.sort()
    t0 = rows[0][0]
    return [(t - t0, p, o) for t, p, o in rows]


def scale_rate(rows: list[tuple[float, int, int]], k: int, seed: int) -> list[tuple[float, int, int]]:
    """k copies of every request, each shifted by U(0, 1 s): k x the rate, same burst shape."""
    rng = random.Random(seed)
    out = [(t + rng.random(), p, o) for t, p, o in rows for _ in range(k)]
    out.sort()
    return out


def _poisson(rng: random.Random, rate_fn, duration: float, peak: float) -> list[float]:
    """Arrival times of a non-homogeneous Poisson process (thinning)."""
    t, out = 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return out
        if rng.random() * peak <= rate_fn(t):
            out.append(t)


def diurnal(
    pool: list[tuple[float, int, int]], mean_rate: float, seed: int, duration: float = 3600.0
) -> list[tuple[float, int, int]]:
    """rate(t) = mean * (1 + 0.7 sin(2 pi t / 30 min)): a compressed day, twice; lengths from `pool`."""
    rng = random.Random(seed)
    fn = lambda t: mean_rate * (1 + 0.7 * math.sin(2 * math.pi * t / 1800.0))  # noqa: E731
    return [(t, *rng.choice(pool)[1:]) for t in _poisson(rng, fn, duration, mean_rate * 1.7)]


def bursty(
    pool: list[tuple[float, int, int]], base_rate: float, seed: int, duration: float = 3600.0
) -> list[tuple[float, int, int]]:
    """Base rate with 4x step spikes of 60-300 s every ~10 min; lengths from `pool`."""
    rng = random.Random(seed)
    spikes = []
    t = 300.0
    while t < duration - 300:
        spikes.append((t, t + rng.uniform(60, 300)))
        t += rng.uniform(480, 720)
    fn = lambda t: base_rate * (4.0 if any(a <= t < b for a, b in spikes) else 1.0)  # noqa: E731
    return [(t, *rng.choice(pool)[1:]) for t in _poisson(rng, fn, duration, base_rate * 4)]


def length_shift(
    conv: list[tuple[float, int, int]], code: list[tuple[float, int, int]], rate: float, seed: int
) -> list[tuple[float, int, int]]:
    """Constant rate; the length mix changes every 15 min: conv -> code -> long prompts -> conv with 4x outputs.

    Long prompts: 3k-8k tokens (uniform), outputs from conv. The fluid P:D ratio moves by an order
    of magnitude between phases (notes/autoscaling.md §5.2).
    """
    rng = random.Random(seed)
    out = []
    for t in _poisson(rng, lambda _t: rate, 3600.0, rate):
        phase = int(t // 900)
        if phase == 0:
            _, p, o = rng.choice(conv)
        elif phase == 1:
            _, p, o = rng.choice(code)
        elif phase == 2:
            p, o = rng.randint(3000, 8000), rng.choice(conv)[2]
        else:
            _, p, o = rng.choice(conv)
            o *= 4
        out.append((t, p, o))
    return out

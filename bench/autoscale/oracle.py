"""Hindsight baselines: the clairvoyant per-window oracle and the best static provisioning.

Oracle (notes/autoscaling.md §5.5): per window of `window_s`, the replicas each pool needs given
the window's actual requests; then, per replica level, the cold-start-aware keep-or-release rule
(keep a pod through an idle gap no longer than the start-up time, otherwise release it and start
it again `startup_s` before it is needed), which is the cost-optimal schedule for a known future
with linear GPU cost and a fixed start-up time. The schedule is replayed in the same fleet
simulator; its per-pool requirements are then scaled by the cheapest (1+eps_p, 1+eps_d) whose
replay meets the attainment target (eps may be negative: the fluid sizing is not trusted to be
tight, the replay is).

Window requirement: prefill = fewest replicas for which a prefill-only replay of the window's
arrivals (same batching and latency model, least-queued routing, empty start) finishes the
target share within the TTFT target; decode = fewest replicas that hold the window's peak resident
sequences within KV capacity, max_num_seqs and the TPOT target, with each sequence resident from
its arrival + prefill time for output x step time.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from pdorch.sim.latency import Coefficients, blocks_for, decode_step_time_s, prefill_time_s


def prefill_window_need(
    c: Coefficients, arrivals: Sequence[tuple[float, int]], ttft_s: float, share: float, max_n: int
) -> int:
    """Fewest prefill replicas meeting `share` of TTFT for these (arrival, prompt) requests."""
    if not arrivals:
        return 0

    def ok(n: int) -> bool:
        free = [0.0] * n  # time each replica finishes its queue (FCFS, one request per batch: safe side)
        met = 0
        for t, p in arrivals:
            i = min(range(n), key=free.__getitem__)
            start = max(free[i], t)
            free[i] = start + prefill_time_s(c, [p])
            if free[i] - t <= ttft_s:
                met += 1
        return met >= share * len(arrivals)

    lo, hi = 1, max_n
    if not ok(hi):
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def decode_need(c: Coefficients, resident: int, kv_tokens: int, ctx_tokens: int, tpot_s: float) -> int:
    """Fewest decode replicas that hold `resident` sequences (reserving `kv_tokens`) within TPOT."""
    if resident <= 0:
        return 0
    n = max(math.ceil(kv_tokens / c.kv_capacity_tokens), math.ceil(resident / c.max_num_seqs), 1)
    while decode_step_time_s(c, math.ceil(resident / n), math.ceil(ctx_tokens / n)) > tpot_s:
        n += 1
    return n


def window_requirements(
    c: Coefficients,
    arrivals: Sequence[tuple[float, int, int]],
    window_s: float,
    ttft_s: float,
    tpot_s: float,
    share: float,
    max_n: int,
) -> tuple[list[int], list[int]]:
    """Per-window prefill and decode replica needs of the workload."""
    horizon = arrivals[-1][0] + 60.0
    nw = math.ceil(horizon / window_s) + 1
    need_p = [0] * nw
    buckets: list[list[tuple[float, int]]] = [[] for _ in range(nw)]
    for t, p, _ in arrivals:
        buckets[int(t // window_s)].append((t, p))
    for w, b in enumerate(buckets):
        need_p[w] = prefill_window_need(c, b, ttft_s, share, max_n)
    # Decode residency: each sequence from arrival + its prefill time, for output tokens x step
    # time at the TPOT target (the longest it may take while meeting the SLO).
    events: list[tuple[float, int, int, int]] = []  # (t, +-1, kv, ctx)
    for t, p, o in arrivals:
        start = t + prefill_time_s(c, [p])
        end = start + max(o, 1) * tpot_s
        kv = blocks_for(c, p + o) * c.block_size
        ctx = p + o // 2
        events.append((start, 1, kv, ctx))
        events.append((end, -1, kv, ctx))
    events.sort()
    need_d = [0] * nw
    res = kv = ctx = 0
    cur_w, cur_need = 0, 0
    for t, d, k, x in events:
        w = min(int(t // window_s), nw - 1)
        while cur_w < w:  # windows entered with sequences still resident need them from the start
            cur_w += 1
            need_d[cur_w] = max(need_d[cur_w], cur_need)
        res += d
        kv += d * k
        ctx += d * x
        cur_need = decode_need(c, res, kv, ctx, tpot_s)
        need_d[w] = max(need_d[w], cur_need)
    return need_p, need_d


def keep_or_release(
    need: Sequence[int], window_s: float, startup_s: float, tick_s: float | None = None
) -> list[tuple[float, float]]:
    """Pod lifetimes (create, end) for a per-window need, per replica level, ski-rental with a known future.

    With `tick_s` (the controller tick the schedule is replayed at), a creation time is moved back to
    the tick at or before it, so the pod is ready when needed even if the start-up time is not a
    multiple of the tick (otherwise the replay creates it at the next tick, up to a tick late).
    """
    lives: list[tuple[float, float]] = []
    for level in range(1, max(need, default=0) + 1):
        spans: list[list[float]] = []
        for w, n in enumerate(need):
            if n >= level:
                a, b = w * window_s, (w + 1) * window_s
                if spans and a - spans[-1][1] <= startup_s:
                    spans[-1][1] = b  # keep through a short idle gap
                else:
                    spans.append([a, b])
        for a, b in spans:
            create = max(a - startup_s, 0.0)
            if tick_s:
                create = math.floor(create / tick_s + 1e-9) * tick_s
            lives.append((create, b))
    return lives


def schedule_targets(lives: Sequence[tuple[float, float]]):
    """A function t -> pods that should be alive at t."""
    starts = sorted(a for a, _ in lives)
    ends = sorted(b for _, b in lives)

    def at(t: float) -> int:
        return bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t)

    return at


def scaled(need: Sequence[int], factor: float) -> list[int]:
    """Requirements times `factor`, rounded up, zero stays zero."""
    return [math.ceil(n * factor - 1e-9) if n else 0 for n in need]

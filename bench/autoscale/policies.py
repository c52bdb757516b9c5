"""The policies the bench compares, as fleet callbacks (t, loads, current) -> targets.

pdorch's policy and the peers are the pure functions of `pdorch.scaler`; this module only holds
their per-run state (damping history, the planner's interval clock).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fleet import DECODE, PREFILL, PolicyFn

from pdorch.scaler import peers
from pdorch.scaler.damping import DampingConfig, DampingState, damp
from pdorch.scaler.observe import RoleLoad, missed_target
from pdorch.scaler.policy import RoleMemory, SloPolicyConfig, recommend_decode, recommend_prefill
from pdorch.sim.latency import Coefficients


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


def pdorch_policy(
    c: Coefficients, slo: Slo, damping: DampingConfig, cfg: SloPolicyConfig | None = None
) -> PolicyFn:
    """pdorch's built-in SLO policy (with its start-up-window forecast) and the ServingGroup damping fields."""
    cfg = cfg or SloPolicyConfig()
    states = {PREFILL: DampingState(), DECODE: DampingState()}
    memory = {PREFILL: RoleMemory(), DECODE: RoleMemory()}

    last_miss: list[float | None] = [None]  # the group's, as `pdorch scaler` keeps it

    def decide(t: float, loads: dict[str, RoleLoad], cur: dict[str, int]) -> dict[str, int]:
        if missed_target(loads[PREFILL], ttft_s=slo.ttft_s) or missed_target(
            loads[DECODE], tpot_s=slo.tpot_s
        ):
            last_miss[0] = t
        raw = {
            PREFILL: recommend_prefill(memory[PREFILL], t, loads[PREFILL], c, slo.ttft_s, cfg).replicas,
            DECODE: recommend_decode(memory[DECODE], t, loads[DECODE], c, slo.tpot_s, cfg).replicas,
        }
        return {r: damp(states[r], damping, t, cur[r], raw[r], last_miss[0]).replicas for r in raw}

    return decide


def hpa_damping(scale_down_s: float = 300.0, scale_up_s: float = 0.0) -> DampingConfig:
    """The HPA's behavior (defaults: up at once, down after a 300 s stabilization window, no cooldown)."""
    return DampingConfig(
        min_replicas=1,
        max_replicas=1000,
        scale_up_stabilization_s=scale_up_s,
        scale_down_stabilization_s=scale_down_s,
        cooldown_s=0,
    )


def hpa_policy(
    prefill_waiting_target: float,
    decode_kv_target: float,
    scale_down_s: float = 300.0,
    tolerance: float = 0.1,
    scale_up_s: float = 0.0,
) -> PolicyFn:
    """Two HPAs: prefill on waiting requests (AverageValue), decode on KV usage (notes §5.4 item 2).

    Behind the proxy's queue the fleet counts the prompts the proxy holds in prefill's `waiting`
    for this policy (`run.sees_queue`): an HPA there reads the proxy's queue-depth metric as an
    external metric, not only `vllm:num_requests_waiting`, which the held prompts never reach.
    """
    states = {PREFILL: DampingState(), DECODE: DampingState()}
    damping = hpa_damping(scale_down_s, scale_up_s)

    def decide(t: float, loads: dict[str, RoleLoad], cur: dict[str, int]) -> dict[str, int]:
        out = {}
        for role, total, target in (
            # Per-pod averages over every pod of the target: on scale-up the HPA counts pods that
            # are not ready yet as using nothing, which is what keeps it from compounding.
            (PREFILL, loads[PREFILL].waiting, prefill_waiting_target),
            (DECODE, loads[DECODE].kv_usage * loads[DECODE].ready_replicas, decode_kv_target),
        ):
            n = max(cur[role], 1)
            wanted = peers.hpa_desired(n, total / n, target, tolerance)
            desired = min(wanted, peers.hpa_scale_up_limit(n))
            out[role] = damp(states[role], damping, t, cur[role], desired).replicas
        return out

    return decide


def fixed_ratio_policy(
    ratio: float, tps_target_per_replica: float, scale_down_s: float = 300.0, window_s: float = 15.0
) -> PolicyFn:
    """HeteroScale-style: decode on decode tokens/s (proportional), prefill = round(ratio x decode).

    The tokens/s signal is the mean over the last `window_s` (the metric window an operator sets
    on the query; one tick when it equals the tick): a longer window smooths bursts out of it.
    """
    state = DampingState()
    damping = hpa_damping(scale_down_s)
    seen: deque[tuple[float, float]] = deque()

    def decide(t: float, loads: dict[str, RoleLoad], cur: dict[str, int]) -> dict[str, int]:
        d = loads[DECODE]
        seen.append((t, d.request_rate * d.mean_output_tokens))
        while seen and t - seen[0][0] >= window_s - 1e-6:
            seen.popleft()
        # A window shorter than a tick still holds the last sample.
        tps = sum(v for _, v in seen) / len(seen) if seen else d.request_rate * d.mean_output_tokens
        desired = peers.decode_tps_desired(max(d.ready_replicas, 1), tps, tps_target_per_replica)
        n_d = damp(state, damping, t, cur[DECODE], max(desired, 1)).replicas
        return {DECODE: n_d, PREFILL: peers.fixed_ratio(n_d, ratio)}

    return decide


class Predictor:
    """One of the Dynamo SLA planner's load predictors, for one series (requests, ISL or OSL).

    - `constant`: the next interval equals the last one (Dynamo's default before ARIMA).
    - `arima`: an ARIMA(1,1,0) refitted by least squares on the last 50 samples, the last value
      with fewer than 5 (Dynamo's ARIMA uses pmdarima's auto_arima over that window and the same
      fallback; the order search is not modelled).
    - `kalman`: a local-linear-trend Kalman filter (level + slope), predicting level + slope; the
      noise ratios (level 1, slope 0.1, observation 1) are fixed, not fitted.
    """

    def __init__(self, kind: str) -> None:
        if kind not in PREDICTORS:
            raise ValueError(f"unknown predictor {kind!r}; known: {PREDICTORS}")
        self.kind = kind
        self.history: deque[float] = deque(maxlen=50)
        self.x = [0.0, 0.0]  # kalman: level, slope
        self.p = [[1e6, 0.0], [0.0, 1e6]]  # kalman: state covariance (uninformed start)

    def observe(self, v: float) -> None:
        self.history.append(v)
        if self.kind == "kalman":
            self._kalman(v)

    def predict(self) -> float:
        h = self.history
        if not h:
            return 0.0
        if self.kind == "constant":
            return h[-1]
        if self.kind == "kalman":
            return max(self.x[0] + self.x[1], 0.0)
        if len(h) < 5:
            return h[-1]
        d = [b - a for a, b in itertools.pairwise(h)]
        den = sum(x * x for x in d[:-1])
        phi = sum(x * y for x, y in itertools.pairwise(d)) / den if den > 0 else 0.0
        phi = max(-0.99, min(phi, 0.99))  # a stationary AR(1) on the differences
        return max(h[-1] + phi * d[-1], 0.0)

    def _kalman(self, z: float) -> None:
        # Predict with F = [[1, 1], [0, 1]], Q = diag(1, 0.1) (relative to R = 1) ...
        (lvl, b), ((p00, p01), (p10, p11)) = self.x, self.p
        lvl += b
        p00, p01, p10, p11 = p00 + p01 + p10 + p11 + 1.0, p01 + p11, p10 + p11, p11 + 0.1
        # ... then update on the observed level (H = [1, 0]).
        s = p00 + 1.0
        k0, k1 = p00 / s, p10 / s
        y = z - lvl
        self.x = [lvl + k0 * y, b + k1 * y]
        self.p = [[(1 - k0) * p00, (1 - k0) * p01], [p10 - k1 * p00, p11 - k1 * p01]]


PREDICTORS = ("constant", "arima", "kalman")


def dynamo_policy(
    c: Coefficients,
    ttft_s: float,
    itl_s: float,
    interval_s: float,
    tick_s: float,
    predictor: str = "constant",
) -> PolicyFn:
    """Dynamo SLA planner acting every `interval_s` on the interval's averages, with `predictor`.

    Behind the proxy's queue the fleet counts the held prompts in prefill's load for this policy
    (`run.sees_queue`), so the interval's request count is the arrivals at the proxy, as Dynamo's
    planner reads them from its frontend, not the prompts the engines finished.
    """
    acc: list[tuple[RoleLoad, RoleLoad]] = []
    last = {"t": 0.0}
    series = {k: Predictor(predictor) for k in ("num_req", "isl", "osl")}

    def decide(t: float, loads: dict[str, RoleLoad], cur: dict[str, int]) -> dict[str, int]:
        acc.append((loads[PREFILL], loads[DECODE]))
        if t - last["t"] < interval_s - 1e-6:
            return cur
        last["t"] = t
        window = tick_s * len(acc)
        pre = _merge([a for a, _ in acc], window)
        dec = _merge([b for _, b in acc], window)
        acc.clear()
        obs = peers.load_to_dynamo(pre, dec)
        # The predictors run in requests per planner interval (a window that ran short at the
        # start is rescaled to one); an empty interval keeps the last lengths.
        series["num_req"].observe(obs.num_requests * interval_s / window)
        if obs.num_requests > 0:
            series["isl"].observe(obs.mean_isl)
            series["osl"].observe(obs.mean_osl)
        predicted = (series["num_req"].predict(), series["isl"].predict(), series["osl"].predict())
        n_p, n_d = peers.dynamo_sla_planner(obs, c, interval_s, ttft_s, itl_s, predicted)
        return {PREFILL: n_p, DECODE: n_d}

    return decide


def _merge(loads: list[RoleLoad], window: float) -> RoleLoad:
    """Combine consecutive tick loads into one interval (rates and means weighted by requests)."""
    n = sum(x.request_rate * x.window_s for x in loads)
    w = lambda f: sum(f(x) * x.request_rate * x.window_s for x in loads) / n if n else 0.0  # noqa: E731
    ttfts = [(x.mean_ttft_s, x.request_rate * x.window_s) for x in loads if x.mean_ttft_s is not None]
    itls = [(x.mean_itl_s, x.request_rate * x.window_s) for x in loads if x.mean_itl_s is not None]
    mean = lambda v: sum(a * b for a, b in v) / sum(b for _, b in v) if v and sum(b for _, b in v) else None  # noqa: E731
    last = loads[-1]
    return RoleLoad(
        ready_replicas=last.ready_replicas,
        window_s=window,
        request_rate=n / window,
        mean_prompt_tokens=w(lambda x: x.mean_prompt_tokens),
        mean_output_tokens=w(lambda x: x.mean_output_tokens),
        running=sum(x.running for x in loads) / len(loads),
        waiting=last.waiting,
        kv_usage=last.kv_usage,
        mean_ttft_s=mean(ttfts),
        mean_itl_s=mean(itls),
    )


def schedule_policy(prefill_at: Callable[[float], int], decode_at: Callable[[float], int]) -> PolicyFn:
    """Replay a precomputed schedule (the oracle's or a static one)."""

    def decide(t: float, _loads: dict[str, RoleLoad], _cur: dict[str, int]) -> dict[str, int]:
        return {PREFILL: prefill_at(t), DECODE: decode_at(t)}

    return decide


# A peer's knobs: numbers, and for dynamo-sla the predictor's name.
Knobs = dict[str, float | str]

# The peers' knobs: their documented defaults, and the values `tune.py --policy <peer>` chose on the
# tuning half with the same rule as pdorch's (notes/autoscaling.md §5.1: equal tuning, and defaults).
PEER_DEFAULTS: dict[str, Knobs] = {
    # k8s defaults: tolerance 0.1, no scale-up stabilization, 300 s down; targets from notes §5.4.
    "hpa": {
        "waiting_target": 5.0,
        "kv_target": 0.7,
        "scale_down_s": 300.0,
        "tolerance": 0.1,
        "scale_up_s": 0.0,
    },
    # tps_fraction: share of the profiled per-replica decode throughput at the TPOT target;
    # ratio_scale: multiple of the workload's static-best P:D ratio (a hindsight advantage);
    # window_s: the tokens/s metric's averaging window (one tick).
    "fixed-ratio": {"tps_fraction": 0.7, "ratio_scale": 1.0, "scale_down_s": 300.0, "window_s": 15.0},
    # Dynamo's planner defaults (adjustment_interval 180 s, ARIMA predictor) with the planner's
    # TTFT / ITL targets at the real SLO (ttft_scale, itl_scale: shares of it).
    "dynamo-sla": {"interval_s": 180.0, "ttft_scale": 1.0, "itl_scale": 1.0, "predictor": "arima"},
}
# `tune.py --policy <peer>` on 2026-12-07 (bench/results/autoscale-tuning-<peer>.{json,md}).
PEER_TUNED: dict[str, Knobs] = {
    "hpa": {
        "waiting_target": 1.0,
        "kv_target": 0.6,
        "scale_down_s": 600.0,
        "tolerance": 0.1,
        "scale_up_s": 60.0,
    },
    "fixed-ratio": {"tps_fraction": 0.6, "ratio_scale": 1.0, "scale_down_s": 600.0, "window_s": 15.0},
    "dynamo-sla": {"interval_s": 180.0, "ttft_scale": 0.1, "itl_scale": 0.5, "predictor": "kalman"},
}
# The same grids and rule behind the proxy's prefill queue: `tune.py --policy <peer> --proxy-queue`
# on 2026-12-07 (bench/results/autoscale-tuning-<peer>-proxy-queue.{json,md}); used by
# `run.py --proxy-queue`, whose pdorch row gets its queued profile the same way.
PEER_TUNED_QUEUE: dict[str, Knobs] = {
    "hpa": {
        "waiting_target": 1.0,
        "kv_target": 0.75,
        "scale_down_s": 600.0,
        "tolerance": 0.1,
        "scale_up_s": 60.0,
    },
    "fixed-ratio": {"tps_fraction": 0.8, "ratio_scale": 1.0, "scale_down_s": 600.0, "window_s": 15.0},
    "dynamo-sla": {"interval_s": 180.0, "ttft_scale": 0.1, "itl_scale": 0.5, "predictor": "kalman"},
}


def peer_policy(
    name: str,
    knobs: Knobs,
    c: Coefficients,
    slo: Slo,
    tick_s: float,
    arrivals: list[tuple[float, int, int]],
    static_ratio: float,
) -> PolicyFn:
    """A peer policy with `knobs` (keys as in PEER_DEFAULTS) for a workload (`arrivals`, its static-best P:D)."""
    k = {key: v for key, v in knobs.items() if not isinstance(v, str)}
    if name == "hpa":
        return hpa_policy(
            k["waiting_target"], k["kv_target"], k["scale_down_s"], k["tolerance"], k["scale_up_s"]
        )
    if name == "fixed-ratio":
        mean_ctx = sum(p + o / 2 for _, p, o in arrivals) / len(arrivals)
        mean_kv = sum(p + o for _, p, o in arrivals) / len(arrivals)
        tps = k["tps_fraction"] * peers.decode_throughput_at(c, slo.tpot_s, mean_ctx, mean_kv)
        return fixed_ratio_policy(static_ratio * k["ratio_scale"], tps, k["scale_down_s"], k["window_s"])
    if name == "dynamo-sla":
        return dynamo_policy(
            c,
            slo.ttft_s * k["ttft_scale"],
            slo.tpot_s * k["itl_scale"],
            k["interval_s"],
            tick_s,
            str(knobs["predictor"]),
        )
    raise ValueError(f"unknown peer {name!r}; known: {sorted(PEER_DEFAULTS)}")

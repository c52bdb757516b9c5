"""The policies the bench compares, as fleet callbacks (t, loads, current) -> targets.

pdorch's policy and the peers are the pure functions of `pdorch.scaler`; this module only holds
their per-run state (damping history, the planner's interval clock).
"""

from __future__ import annotations

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


def hpa_damping(scale_down_s: float = 300.0) -> DampingConfig:
    """The HPA's behavior defaults (up at once, down after the stabilization window, no cooldown)."""
    return DampingConfig(
        min_replicas=1,
        max_replicas=1000,
        scale_up_stabilization_s=0,
        scale_down_stabilization_s=scale_down_s,
        cooldown_s=0,
    )


def hpa_policy(
    prefill_waiting_target: float, decode_kv_target: float, scale_down_s: float = 300.0
) -> PolicyFn:
    """Two HPAs: prefill on vllm:num_requests_waiting (AverageValue), decode on KV usage (notes §5.4 item 2)."""
    states = {PREFILL: DampingState(), DECODE: DampingState()}
    damping = hpa_damping(scale_down_s)

    def decide(t: float, loads: dict[str, RoleLoad], cur: dict[str, int]) -> dict[str, int]:
        out = {}
        for role, total, target in (
            # Per-pod averages over every pod of the target: on scale-up the HPA counts pods that
            # are not ready yet as using nothing, which is what keeps it from compounding.
            (PREFILL, loads[PREFILL].waiting, prefill_waiting_target),
            (DECODE, loads[DECODE].kv_usage * loads[DECODE].ready_replicas, decode_kv_target),
        ):
            n = max(cur[role], 1)
            desired = min(peers.hpa_desired(n, total / n, target), peers.hpa_scale_up_limit(n))
            out[role] = damp(states[role], damping, t, cur[role], desired).replicas
        return out

    return decide


def fixed_ratio_policy(ratio: float, tps_target_per_replica: float, scale_down_s: float = 300.0) -> PolicyFn:
    """HeteroScale-style: decode on decode tokens/s (proportional), prefill = round(ratio x decode)."""
    state = DampingState()
    damping = hpa_damping(scale_down_s)

    def decide(t: float, loads: dict[str, RoleLoad], cur: dict[str, int]) -> dict[str, int]:
        d = loads[DECODE]
        tps = d.request_rate * d.mean_output_tokens
        desired = peers.decode_tps_desired(max(d.ready_replicas, 1), tps, tps_target_per_replica)
        n_d = damp(state, damping, t, cur[DECODE], max(desired, 1)).replicas
        return {DECODE: n_d, PREFILL: peers.fixed_ratio(n_d, ratio)}

    return decide


def dynamo_policy(c: Coefficients, slo: Slo, interval_s: float, tick_s: float) -> PolicyFn:
    """Dynamo SLA planner (constant predictor) acting every `interval_s` on the interval's averages."""
    acc: list[tuple[RoleLoad, RoleLoad]] = []
    last = {"t": 0.0}

    def decide(t: float, loads: dict[str, RoleLoad], cur: dict[str, int]) -> dict[str, int]:
        acc.append((loads[PREFILL], loads[DECODE]))
        if t - last["t"] < interval_s - 1e-6:
            return cur
        last["t"] = t
        window = tick_s * len(acc)
        pre = _merge([a for a, _ in acc], window)
        dec = _merge([b for _, b in acc], window)
        acc.clear()
        n_p, n_d = peers.dynamo_sla_planner(peers.load_to_dynamo(pre, dec), c, window, slo.ttft_s, slo.tpot_s)
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


# The peers' knobs: their documented defaults, and the values `tune.py --policy <peer>` chose on the
# tuning half with the same rule as pdorch's (notes/autoscaling.md §5.1: equal tuning, and defaults).
PEER_DEFAULTS: dict[str, dict[str, float]] = {
    "hpa": {"waiting_target": 5.0, "kv_target": 0.7, "scale_down_s": 300.0},
    # tps_fraction: share of the profiled per-replica decode throughput at the TPOT target;
    # ratio_scale: multiple of the workload's static-best P:D ratio (a hindsight advantage).
    "fixed-ratio": {"tps_fraction": 0.7, "ratio_scale": 1.0, "scale_down_s": 300.0},
    # slo_scale: the planner's TTFT/ITL targets as a share of the real SLO (users set them tighter).
    "dynamo-sla": {"interval_s": 60.0, "slo_scale": 1.0},
}
# `tune.py --policy <peer>` on 2026-12-04 (bench/results/autoscale-tuning-<peer>.{json,md}).
PEER_TUNED: dict[str, dict[str, float]] = {
    "hpa": {"waiting_target": 20.0, "kv_target": 0.7, "scale_down_s": 300.0},
    "fixed-ratio": {"tps_fraction": 0.6, "ratio_scale": 1.0, "scale_down_s": 600.0},
    "dynamo-sla": {"interval_s": 60.0, "slo_scale": 0.5},
}
# The same grids and rule behind the proxy's prefill queue: `tune.py --policy <peer> --proxy-queue`
# on 2026-12-06 (bench/results/autoscale-tuning-<peer>-proxy-queue.{json,md}); used by
# `run.py --proxy-queue`, whose pdorch row gets its queued profile the same way.
PEER_TUNED_QUEUE: dict[str, dict[str, float]] = {
    "hpa": {"waiting_target": 1.0, "kv_target": 0.9, "scale_down_s": 600.0},
    "fixed-ratio": {"tps_fraction": 0.8, "ratio_scale": 1.0, "scale_down_s": 600.0},
    "dynamo-sla": {"interval_s": 60.0, "slo_scale": 0.5},
}


def peer_policy(
    name: str,
    knobs: dict[str, float],
    c: Coefficients,
    slo: Slo,
    tick_s: float,
    arrivals: list[tuple[float, int, int]],
    static_ratio: float,
) -> PolicyFn:
    """A peer policy with `knobs` (keys as in PEER_DEFAULTS) for a workload (`arrivals`, its static-best P:D)."""
    if name == "hpa":
        return hpa_policy(knobs["waiting_target"], knobs["kv_target"], knobs["scale_down_s"])
    if name == "fixed-ratio":
        mean_ctx = sum(p + o / 2 for _, p, o in arrivals) / len(arrivals)
        mean_kv = sum(p + o for _, p, o in arrivals) / len(arrivals)
        tps = knobs["tps_fraction"] * peers.decode_throughput_at(c, slo.tpot_s, mean_ctx, mean_kv)
        return fixed_ratio_policy(static_ratio * knobs["ratio_scale"], tps, knobs["scale_down_s"])
    if name == "dynamo-sla":
        k = knobs["slo_scale"]
        return dynamo_policy(c, Slo(slo.ttft_s * k, slo.tpot_s * k), knobs["interval_s"], tick_s)
    raise ValueError(f"unknown peer {name!r}; known: {sorted(PEER_DEFAULTS)}")

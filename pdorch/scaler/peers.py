"""Peer autoscaling policies the bench compares pdorch's policy with (pure re-implementations).

Each follows its public description (notes/autoscaling.md §2.3, §5.4) with its documented
defaults; approximations are named in the docstrings. None of them is pdorch code that runs in a
cluster: they exist so the bench drives every policy through the same simulated fleet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdorch.scaler.observe import RoleLoad
from pdorch.sim.latency import Coefficients, decode_step_time_s, prefill_time_s


def hpa_desired(current: int, average_value: float, target: float, tolerance: float = 0.1) -> int:
    """Kubernetes HPA (autoscaling/v2) for one metric: ceil(N * value / target) outside the tolerance.

    `average_value` is the per-pod average (AverageValue target, or a utilisation fraction).
    """
    if target <= 0:
        raise ValueError(f"HPA target must be > 0, got {target}")
    if current <= 0:
        return 1 if average_value > 0 else 0
    ratio = average_value / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return math.ceil(current * ratio - 1e-9)


def hpa_scale_up_limit(current: int) -> int:
    """HPA default scale-up policy: at most max(+100%, +4 pods) per 15 s period."""
    return current + max(current, 4)


def fixed_ratio(decode_replicas: int, ratio: float) -> int:
    """HeteroScale-style coupling: prefill replicas = round(ratio * decode replicas), at least 1."""
    return max(1, round(ratio * decode_replicas))


def decode_tps_desired(current: int, decode_tokens_per_s: float, target_tps_per_replica: float) -> int:
    """Proportional control on decode tokens/s (HeteroScale's single signal), 10% tolerance."""
    return hpa_desired(current, decode_tokens_per_s / max(current, 1), target_tps_per_replica)


def decode_throughput_at(
    c: Coefficients, itl_s: float, context_tokens: float, kv_per_seq: float | None = None
) -> float:
    """Profiled decode tokens/s of one replica with ITL <= itl_s at the given mean context (Dynamo's
    profile interpolation, computed from the model instead of a profiling sweep).

    `kv_per_seq` is what one sequence holds in KV (default: its context); a profiling sweep on an
    engine that reserves prompt + max_tokens at admission measures that reservation.
    """
    per_seq = c.decode_beta_s + c.decode_gamma_s * context_tokens
    by_itl = (itl_s - c.decode_a_s) / per_seq if itl_s > c.decode_a_s else 1.0
    by_kv = c.kv_capacity_tokens / max(kv_per_seq or context_tokens, 1.0)
    batch = max(1, int(min(by_itl, by_kv, c.max_num_seqs)))
    return batch / decode_step_time_s(c, batch, int(batch * context_tokens))


@dataclass(frozen=True)
class DynamoObservation:
    """What Dynamo's SLA planner observes over one adjustment interval."""

    num_requests: float
    mean_isl: float
    mean_osl: float
    mean_ttft_s: float | None
    mean_itl_s: float | None
    decode_concurrency: float


# Below this utilisation the M/D/1 queue adds < 6% to the prefill time; a target under the bare
# prefill time cannot be met at any load, and the profile then reports this utilisation's rate
# (the planner still has to size for something; a zero rate would ask for infinite replicas).
MIN_PREFILL_UTILISATION = 0.1


def prefill_throughput_at(c: Coefficients, ttft_s: float, isl: float) -> float:
    """Profiled prompt tokens/s of one prefill replica whose mean TTFT stays within `ttft_s` at `isl`.

    Dynamo's profiler records, per ISL, the prefill throughput per GPU of a configuration that meets
    the TTFT target. Here a replica is one GPU and serves prompts of `isl` tokens in
    S = prefill_time(isl); with Poisson arrivals at utilisation u, the M/D/1 queue (DistServe's
    prefill model) waits u*S / (2(1-u)) on average, so mean TTFT = S + u*S / (2(1-u)) <= T holds for
    u <= 2r / (1 + 2r) with r = (T - S) / S. The throughput is u * isl / S: a tighter target means
    less load per replica and more replicas (at T -> infinity, the unconditional isl / S).
    """
    isl = max(isl, 1.0)
    s = prefill_time_s(c, [round(isl)])
    r = (ttft_s - s) / s
    u = 2 * r / (1 + 2 * r) if r > 0 else 0.0
    return max(u, MIN_PREFILL_UTILISATION) * isl / s


def dynamo_sla_planner(
    obs: DynamoObservation,
    c: Coefficients,
    interval_s: float,
    ttft_s: float,
    itl_s: float,
    predicted: tuple[float, float, float] | None = None,
) -> tuple[int, int]:
    """Dynamo SLA (throughput) planner's replica counts for the next interval.

    `predicted` is (requests, ISL, OSL) of the next interval, from the planner's predictor; by
    default the last interval's (the constant predictor). `obs` is the last interval: its TTFT, ITL
    and decode concurrency give the correction factors. Prefill: predicted prompt tokens/s x
    min(1, TTFT correction) over the profiled per-replica prefill throughput at the TTFT target
    (`prefill_throughput_at`); decode: predicted output tokens/s over the profiled decode
    throughput at ITL target / ITL correction and context ISL + OSL/2. Approximation: the profile
    is the analytical model (Dynamo interpolates a profiling sweep). At least 1 replica each.
    """
    num_req, isl, osl = predicted or (obs.num_requests, obs.mean_isl, obs.mean_osl)
    if num_req <= 0 or isl <= 0:
        return 1, 1
    osl = max(osl, 1.0)
    # Dynamo's correction compares the observed TTFT with the profile's TTFT at that ISL (the bare
    # prefill time; the queueing the target allows is in the throughput, not in this ratio).
    expected_ttft = prefill_time_s(c, [round(isl)])
    p_corr = obs.mean_ttft_s / expected_ttft if obs.mean_ttft_s and expected_ttft > 0 else 1.0
    prefill_load = num_req * isl / interval_s * min(1.0, p_corr)
    n_p = math.ceil(prefill_load / prefill_throughput_at(c, ttft_s, isl) - 1e-9)
    ctx = isl + osl / 2
    batch = max(obs.decode_concurrency, 1.0)
    expected_itl = decode_step_time_s(c, max(int(batch), 1), int(batch * ctx))
    d_corr = obs.mean_itl_s / expected_itl if obs.mean_itl_s and expected_itl > 0 else 1.0
    decode_tps = decode_throughput_at(c, itl_s / max(d_corr, 1e-3), ctx, isl + osl)
    n_d = math.ceil(num_req * osl / interval_s / decode_tps - 1e-9)
    return max(n_p, 1), max(n_d, 1)


def load_to_dynamo(prefill: RoleLoad, decode: RoleLoad) -> DynamoObservation:
    """The Dynamo planner's interval observation from the two roles' loads."""
    return DynamoObservation(
        num_requests=prefill.request_rate * prefill.window_s,
        mean_isl=prefill.mean_prompt_tokens,
        mean_osl=decode.mean_output_tokens,
        mean_ttft_s=prefill.mean_ttft_s,
        mean_itl_s=decode.mean_itl_s,
        decode_concurrency=decode.running / max(decode.ready_replicas, 1),
    )

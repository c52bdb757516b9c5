"""pdorch's built-in SLO policy: replicas of a prefill and a decode role from their load (pure).

Prefill: the work of the arriving prompts (rate x prompt tokens, priced with the engine's prefill
coefficients) against the utilisation one replica can carry while queueing still fits the TTFT
target; plus what it takes to drain the current queue within that target.

Decode: the sequences that must be resident (the larger of what runs and waits now and Little's
law on arrivals x output tokens x the step time) against the sequences one replica holds within the
TPOT target, its KV capacity and max_num_seqs.

Both return a `Recommendation` whose `reason` says which term decided, for status and events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdorch.scaler.observe import RoleLoad
from pdorch.sim.latency import Coefficients, decode_step_time_s


@dataclass(frozen=True)
class SloPolicyConfig:
    """Tunables of the built-in policy (defaults are what the bench and the scaler use)."""

    # Share of the TTFT/TPOT target the engine may use; the rest absorbs KV transfer, routing
    # and the variance the mean-based model does not see.
    ttft_budget: float = 0.8
    tpot_budget: float = 0.8
    # Tail the prefill queueing term is sized for: P(queue wait > budget) <= tail.
    ttft_tail: float = 0.01
    # Upper bound on per-replica prefill utilisation whatever the TTFT target allows.
    max_prefill_utilisation: float = 0.85
    # KV share decode may plan to fill (vLLM preempts near 100%).
    kv_target: float = 0.85
    # Prompt-length multiple that sizes the one long prompt every queue must absorb.
    long_prompt_factor: float = 2.0
    # Standard deviations of headroom on resident decode sequences: a new replica takes a
    # start-up time to help, and in that time the resident count of a Poisson-like stream moves by
    # about sqrt(resident), its KV by sqrt(2 x resident) sequences' worth (exponential-like lengths).
    decode_burst_z: float = 2.33


@dataclass(frozen=True)
class Recommendation:
    """A replica count and the term that decided it."""

    replicas: int
    reason: str


def prefill_service_s(c: Coefficients, mean_prompt: float, mean_sq_prompt: float | None = None) -> float:
    """Mean prefill busy time per request, charging the batch constant to every request (conservative)."""
    sq = mean_prompt * mean_prompt if mean_sq_prompt is None else mean_sq_prompt
    return c.prefill_a_s + c.prefill_b_s * mean_prompt + c.prefill_c_s * sq


def max_prefill_utilisation(service_s: float, budget_s: float, tail: float, cap: float) -> float:
    """Largest utilisation rho with P(wait > budget) = rho * exp(-(1 - rho) * budget / S) <= tail.

    That is the M/M/1 waiting-time tail with mean service S; exponential service overstates the
    variance of a batched prefill queue, which keeps the estimate on the safe side.
    """
    if service_s <= 0:
        return cap
    if budget_s <= 0:
        return 0.05  # the target cannot be met even unloaded: run nearly idle, and say so upstream
    lo, hi = 0.0, cap
    for _ in range(40):
        mid = (lo + hi) / 2
        if mid * math.exp(-(1 - mid) * budget_s / service_s) <= tail:
            lo = mid
        else:
            hi = mid
    return max(lo, 0.05)


def prefill_replicas(
    load: RoleLoad, c: Coefficients, ttft_target_s: float, cfg: SloPolicyConfig = SloPolicyConfig()
) -> Recommendation:
    """Prefill replicas for `load` under the TTFT target."""
    n = load.mean_prompt_tokens
    if load.request_rate <= 0 or n <= 0:
        if load.waiting > 0:
            return Recommendation(
                max(load.ready_replicas, 1), f"{load.waiting:.0f} queued, no finished requests yet"
            )
        return Recommendation(0, "no prefill load")
    service = prefill_service_s(c, n)
    long_prompt = prefill_service_s(c, n * cfg.long_prompt_factor)
    budget = ttft_target_s * cfg.ttft_budget - long_prompt
    rho = max_prefill_utilisation(service, budget, cfg.ttft_tail, cfg.max_prefill_utilisation)
    work = load.request_rate * service  # replica-seconds of prefill per second
    steady = work / rho
    # Queued prompts must be done within the TTFT budget on top of the steady load.
    backlog = load.waiting * service / max(ttft_target_s * cfg.ttft_budget, 1e-3)
    need = math.ceil(steady + backlog - 1e-9)
    reason = (
        f"prefill {load.request_rate:.2f} req/s x {n:.0f} tok = {work:.2f} replica-s/s at <= {rho:.0%} "
        f"utilisation for TTFT {ttft_target_s * 1000:.0f}ms"
    )
    if backlog >= 0.5:
        reason += f", +{backlog:.1f} to drain {load.waiting:.0f} queued"
    return Recommendation(need, reason)


def decode_seqs_per_replica(
    c: Coefficients, mean_prompt: float, mean_output: float, tpot_target_s: float, cfg: SloPolicyConfig
) -> tuple[float, str]:
    """Sequences one decode replica holds within TPOT, KV capacity and max_num_seqs, and the binding limit."""
    ctx = mean_prompt + mean_output / 2  # mean context over a sequence's life
    budget = tpot_target_s * cfg.tpot_budget
    per_seq = c.decode_beta_s + c.decode_gamma_s * ctx
    by_itl = (budget - c.decode_a_s) / per_seq if budget > c.decode_a_s else 1.0
    # The engine reserves prompt + max_tokens blocks at admission.
    by_kv = cfg.kv_target * c.kv_capacity_tokens / max(mean_prompt + mean_output, 1.0)
    limits = {"TPOT": by_itl, "KV": by_kv, "max_num_seqs": float(c.max_num_seqs)}
    name = min(limits, key=lambda k: limits[k])
    return max(limits[name], 1.0), name


def decode_replicas(
    load: RoleLoad, c: Coefficients, tpot_target_s: float, cfg: SloPolicyConfig = SloPolicyConfig()
) -> Recommendation:
    """Decode replicas for `load` under the TPOT target."""
    resident_now = load.running + load.waiting
    if load.request_rate <= 0 and resident_now <= 0:
        return Recommendation(0, "no decode load")
    prompt = load.mean_prompt_tokens or 1.0
    output = load.mean_output_tokens or 1.0
    per_replica, limit = decode_seqs_per_replica(c, prompt, output, tpot_target_s, cfg)
    # Little's law needs the step time sequences will see: the measured ITL when there is one
    # (the model's step at full occupancy overstates it), else the model at full occupancy.
    step = load.mean_itl_s or decode_step_time_s(
        c, max(int(per_replica), 1), int(per_replica * (prompt + output / 2))
    )
    little = load.request_rate * output * step
    base = max(resident_now, little)
    resident = base + cfg.decode_burst_z * math.sqrt(2 * base)
    by_seqs = math.ceil(resident / per_replica - 1e-9)
    # KV in use now (vLLM's gauge) may bind before the sequence count does.
    kv_replicas = load.kv_usage * load.ready_replicas / cfg.kv_target
    by_kv = math.ceil(kv_replicas * (resident / base if base else 1.0) - 1e-9)
    reason = (
        f"decode {resident:.0f} resident seqs with headroom (running+waiting {resident_now:.0f}, "
        f"Little {little:.0f}) / {per_replica:.0f} per replica ({limit}-bound at TPOT {tpot_target_s * 1000:.0f}ms)"
    )
    if by_kv > by_seqs:
        reason = (
            f"decode KV usage {load.kv_usage:.0%} on {load.ready_replicas} replicas, with headroom, "
            f"needs {by_kv} at {cfg.kv_target:.0%}"
        )
    return Recommendation(max(by_seqs, by_kv), reason)

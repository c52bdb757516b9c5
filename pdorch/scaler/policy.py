"""pdorch's built-in SLO policy: replicas of a prefill and a decode role from their load (pure).

Prefill: the work of the arriving prompts (rate x prompt tokens, priced with the engine's prefill
coefficients) as an M/M/c queue whose waiting-time tail must fit the TTFT target; plus what it
takes to drain the current queue.

Decode: the sequences that must be resident (the larger of what runs and waits now and Little's
law on arrivals x output tokens x the step time) against the sequences one replica holds within the
TPOT target, its KV capacity and max_num_seqs.

Both return a `Recommendation` whose `reason` says which term decided, for status and events.

Predictive layer (`recommend_prefill`, `recommend_decode`): a replica asked for now serves only
after the pod start-up time, so each role's demand signal (prefill: offered work in replica-seconds
per second; decode: Little's-law residency of the arrivals) is recorded every tick in a
`RoleMemory`, and the sizing
above is given the demand plus the rise the recent past showed within one start-up window
(`pdorch.scaler.forecast`). The memory is plain data the caller keeps between ticks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pdorch.scaler.forecast import Forecast, Series, peak_forecast, record
from pdorch.scaler.observe import RoleLoad
from pdorch.sim.latency import Coefficients, decode_step_time_s


@dataclass(frozen=True)
class SloPolicyConfig:
    """Tunables of the built-in policy (defaults are what the bench and the scaler use)."""

    # Share of the TTFT/TPOT target the engine may use; the rest absorbs KV transfer, routing
    # and the variance the mean-based model does not see.
    ttft_budget: float = 0.8
    tpot_budget: float = 0.8
    # Tail the prefill queue is sized for: P(queueing delay > TTFT budget) <= tail.
    ttft_tail: float = 0.01
    # Upper bound on per-replica prefill utilisation whatever the TTFT target allows.
    max_prefill_utilisation: float = 0.85
    # KV share decode may plan to fill (vLLM preempts near 100%).
    kv_target: float = 0.85
    # Seconds in which prompts already queued should be worked off by extra replicas.
    backlog_drain_s: float = 30.0
    # Prompt-length multiple that sizes the one long prompt every queue must absorb.
    long_prompt_factor: float = 2.0
    # Standard deviations of headroom on resident decode sequences: a new replica takes a
    # start-up time to help, and in that time the resident count of a Poisson-like stream moves by
    # about sqrt(resident), its KV by sqrt(2 x resident) sequences' worth (exponential-like lengths).
    decode_burst_z: float = 1.64
    # Forecast of the next start-up window (pdorch.scaler.forecast): lead = pod start-up time +
    # one controller tick; the rises of the last `forecast_horizon_s` seconds; their quantile
    # (0.5, work-weighted: chosen by bench/autoscale/tune.py on the tuning half of the Azure traces).
    # forecast_horizon_s = 0 turns the forecast off (size for the last tick only).
    forecast_lead_s: float = 75.0
    forecast_horizon_s: float = 1800.0
    forecast_quantile: float = 0.5
    # Weight the rises by the work their lead window carried (requests, not ticks, make attainment).
    forecast_weighted: bool = True


def behind_prefill_queue(cfg: SloPolicyConfig) -> SloPolicyConfig:
    """The policy for a group whose proxy holds prompts (``router.prefillQueue``).

    There a burst's short prompts still make the TTFT target on a busy prefill role, so prefill may
    run hotter and the forecast follows the rise of a typical tick rather than of the typical
    request. Chosen by `bench/autoscale/tune.py --proxy-queue` on the tuning half of the Azure
    traces (the same grid and rule as the defaults; that rule's 75 s hold is left to
    ``scaling.scaleDownStabilizationSeconds``).
    """
    return replace(
        cfg,
        max_prefill_utilisation=0.95,
        forecast_quantile=0.75,
        forecast_weighted=False,
        decode_burst_z=2.33,
    )


@dataclass(frozen=True)
class Recommendation:
    """A replica count and the term that decided it."""

    replicas: int
    reason: str


def prefill_service_s(c: Coefficients, mean_prompt: float, mean_sq_prompt: float | None = None) -> float:
    """Mean prefill busy time per request, charging the batch constant to every request (conservative)."""
    sq = mean_prompt * mean_prompt if mean_sq_prompt is None else mean_sq_prompt
    return c.prefill_a_s + c.prefill_b_s * mean_prompt + c.prefill_c_s * sq


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with `offered` = lambda x S erlangs."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    # Erlang B by its stable recursion, then C from B.
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1 - rho + rho * b)


def wait_tail(servers: int, offered: float, service_s: float, t_s: float) -> float:
    """P(queueing delay > t) in M/M/c: C(c, a) * exp(-(c - a) * t / S)."""
    if offered >= servers:
        return 1.0
    return erlang_c(servers, offered) * math.exp(-(servers - offered) * t_s / service_s)


def prefill_replicas(
    load: RoleLoad,
    c: Coefficients,
    ttft_target_s: float,
    cfg: SloPolicyConfig = SloPolicyConfig(),
    rise: float = 0.0,
) -> Recommendation:
    """Prefill replicas for `load` under the TTFT target.

    The role is sized as an M/M/c queue (the proxy spreads prompts over the replicas by load):
    the fewest replicas whose waiting-time tail beyond the TTFT budget (the target's share the
    engine may use, less the service of one long prompt) is at most `ttft_tail`, and at most
    `max_prefill_utilisation` busy. Exponential service overstates a batched prefill's variance,
    which keeps the estimate on the safe side. `rise` (replica-s/s) is added to the offered work:
    the forecast growth within a start-up window.
    """
    n = load.mean_prompt_tokens
    if n <= 0 or (load.request_rate <= 0 and rise <= 0 and load.waiting <= 0):
        if load.waiting > 0 or load.running > 0 or load.request_rate > 0:
            # Work in the engines but no prompt length to price it yet (nothing finished since
            # this scaler started), or nothing arriving and nothing queued: keep what serves it.
            why = "no finished requests yet" if n <= 0 else "nothing arriving"
            return Recommendation(
                max(load.ready_replicas, 1), f"{load.running + load.waiting:.0f} in the engines, {why}"
            )
        return Recommendation(0, "no prefill load")
    # From here a queue is priced even when nothing finished in the window (a burst's first tick):
    # its drain term below sizes for it, where keeping the ready replicas lost a tick.
    service = prefill_service_s(c, n)
    long_prompt = prefill_service_s(c, n * cfg.long_prompt_factor)
    budget = max(ttft_target_s * cfg.ttft_budget - long_prompt, 0.0)
    offered = load.request_rate * service + max(rise, 0.0)  # replica-s of prefill per s (erlangs)
    need = max(math.ceil(offered / cfg.max_prefill_utilisation - 1e-9), 1)
    while need < 100_000 and wait_tail(need, offered, service, budget) > cfg.ttft_tail:
        need += 1
    # Prompts already queued are drained within `backlog_drain_s` on top of the arrivals.
    backlog = load.waiting * service / cfg.backlog_drain_s
    extra = math.ceil(backlog - 1e-9) if backlog >= 0.5 else 0
    reason = (
        f"prefill {load.request_rate:.2f} req/s x {n:.0f} tok"
        + (f" + forecast rise {rise:.2f}" if rise > 0 else "")
        + f" = {offered:.2f} replica-s/s; "
        f"{need} keep the TTFT {ttft_target_s * 1000:.0f}ms tail <= {cfg.ttft_tail:.0%}"
    )
    if extra:
        reason += f", +{extra} to drain {load.waiting:.0f} queued"
    if load.request_rate <= 0 and rise <= 0 and load.ready_replicas > need + extra:
        # Nothing finished in the window: the replicas busy with what runs (long prompts) are not
        # idle, so a queue is never a reason to shed them.
        return Recommendation(
            load.ready_replicas,
            f"{load.running + load.waiting:.0f} in the engines, nothing finished in the window: keep "
            f"{load.ready_replicas} ({need + extra} for the queue alone)",
        )
    return Recommendation(need + extra, reason)


def decode_seqs_per_replica(
    c: Coefficients, mean_prompt: float, mean_output: float, tpot_target_s: float, cfg: SloPolicyConfig
) -> tuple[float, str]:
    """Sequences one decode replica holds within TPOT, KV capacity and max_num_seqs, and the binding limit."""
    ctx = mean_prompt + mean_output / 2  # mean context over a sequence's life
    budget = tpot_target_s * cfg.tpot_budget
    per_seq = c.decode_beta_s + c.decode_gamma_s * ctx
    if budget <= c.decode_a_s:
        by_itl = 1.0
    else:  # a profile whose sequences cost a step nothing leaves KV and max_num_seqs to bind
        by_itl = (budget - c.decode_a_s) / per_seq if per_seq > 0 else math.inf
    # The engine reserves prompt + max_tokens blocks at admission.
    by_kv = cfg.kv_target * c.kv_capacity_tokens / max(mean_prompt + mean_output, 1.0)
    limits = {"TPOT": by_itl, "KV": by_kv, "max_num_seqs": float(c.max_num_seqs)}
    name = min(limits, key=lambda k: limits[k])
    return max(limits[name], 1.0), name


def decode_demand(
    load: RoleLoad, c: Coefficients, tpot_target_s: float, cfg: SloPolicyConfig = SloPolicyConfig()
) -> tuple[float, float, float]:
    """(sequences that must be resident, running + backlog share, Little's law) for `load`."""
    prompt = load.mean_prompt_tokens or 1.0
    output = load.mean_output_tokens or 1.0
    per_replica, _ = decode_seqs_per_replica(c, prompt, output, tpot_target_s, cfg)
    # Little's law needs the step time sequences will see: the measured ITL when there is one
    # (the model's step at full occupancy overstates it), else the model at full occupancy.
    step = load.mean_itl_s or decode_step_time_s(
        c, max(int(per_replica), 1), int(per_replica * (prompt + output / 2))
    )
    little = load.request_rate * output * step
    # Waiting sequences are a backlog, not a steady state: each holds a slot for its lifetime
    # (output x step), and the backlog should clear within backlog_drain_s, so it needs
    # waiting x min(1, lifetime / drain) extra slots, not one slot per waiting sequence.
    backlog_share = min(1.0, output * step / cfg.backlog_drain_s)
    resident_now = load.running + load.waiting * backlog_share
    return max(resident_now, little), resident_now, little


def decode_replicas(
    load: RoleLoad,
    c: Coefficients,
    tpot_target_s: float,
    cfg: SloPolicyConfig = SloPolicyConfig(),
    rise: float = 0.0,
    demand: tuple[float, float, float] | None = None,
) -> Recommendation:
    """Decode replicas for `load` under the TPOT target (`rise`: forecast growth of resident sequences;
    `demand`: `decode_demand` of the same inputs, when the caller already has it)."""
    if load.request_rate <= 0 and load.running + load.waiting <= 0 and rise <= 0:
        return Recommendation(0, "no decode load")
    prompt = load.mean_prompt_tokens or 1.0
    output = load.mean_output_tokens or 1.0
    per_replica, limit = decode_seqs_per_replica(c, prompt, output, tpot_target_s, cfg)
    now_base, resident_now, little = demand or decode_demand(load, c, tpot_target_s, cfg)
    # Headroom for the start-up window: the forecast rise, but never less than the Poisson-like
    # movement of the resident count (z standard deviations) the forecast may not have seen yet.
    noise = cfg.decode_burst_z * math.sqrt(2 * now_base)
    resident = now_base + max(rise, noise)
    by_seqs = math.ceil(resident / per_replica - 1e-9)
    # KV in use now (vLLM's gauge) may bind before the sequence count does. (Known: scaling it by
    # resident / now_base asks several replicas for one long sequence; the fixes tried cost code's
    # bursts behind the prefill queue 0.7 points of attainment: docs/benchmarks.md.)
    kv_replicas = load.kv_usage * load.ready_replicas / cfg.kv_target
    by_kv = math.ceil(kv_replicas * (resident / now_base if now_base else 1.0) - 1e-9)
    reason = (
        f"decode {resident:.0f} resident seqs with headroom (running + backlog share {resident_now:.0f}, "
        f"Little {little:.0f}"
        + (f", forecast rise {rise:.0f}" if rise > 0 else "")
        + f") / {per_replica:.0f} per replica ({limit}-bound at TPOT {tpot_target_s * 1000:.0f}ms)"
    )
    if by_kv > by_seqs:
        reason = (
            f"decode KV usage {load.kv_usage:.0%} on {load.ready_replicas} replicas, with headroom, "
            f"needs {by_kv} at {cfg.kv_target:.0%}"
        )
    return Recommendation(max(by_seqs, by_kv), reason)


@dataclass
class RoleMemory:
    """What the predictive layer keeps of one role between ticks (plain data, no I/O)."""

    demand: Series = field(default_factory=Series)
    # Last known request shape, for ticks in which nothing finished (bursty traffic has many).
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    # Last KV capacity the engines reported: an idle SGLang server may not export its gauge yet, and
    # the preset's capacity can be far off the deployment's.
    kv_capacity_tokens: float = 0.0


def _with_shape(mem: RoleMemory, load: RoleLoad) -> RoleLoad:
    """`load` with the remembered mean lengths and KV capacity when this tick saw none; remembers
    new ones."""
    if load.mean_prompt_tokens > 0:
        mem.prompt_tokens = load.mean_prompt_tokens
    if load.mean_output_tokens > 0:
        mem.output_tokens = load.mean_output_tokens
    if load.kv_capacity_tokens > 0:
        mem.kv_capacity_tokens = load.kv_capacity_tokens
    return replace(
        load,
        mean_prompt_tokens=load.mean_prompt_tokens or mem.prompt_tokens,
        mean_output_tokens=load.mean_output_tokens or mem.output_tokens,
        kv_capacity_tokens=load.kv_capacity_tokens or mem.kv_capacity_tokens,
    )


def _forecast(mem: RoleMemory, now_s: float, level: float, cfg: SloPolicyConfig) -> Forecast:
    keep = cfg.forecast_horizon_s + cfg.forecast_lead_s
    record(mem.demand, now_s, level, keep)
    if cfg.forecast_horizon_s <= 0:
        return Forecast(level, level, 0.0, 0)
    return peak_forecast(
        mem.demand,
        now_s,
        cfg.forecast_lead_s,
        cfg.forecast_horizon_s,
        cfg.forecast_quantile,
        cfg.forecast_weighted,
    )


def recommend_prefill(
    mem: RoleMemory,
    now_s: float,
    load: RoleLoad,
    c: Coefficients,
    ttft_target_s: float,
    cfg: SloPolicyConfig = SloPolicyConfig(),
) -> Recommendation:
    """Prefill replicas for the forecast peak of the next start-up window (records this tick in `mem`)."""
    load = _with_shape(mem, load)
    n = load.mean_prompt_tokens
    work = load.request_rate * prefill_service_s(c, n) if n > 0 else 0.0
    f = _forecast(mem, now_s, work, cfg)
    return prefill_replicas(load, c, ttft_target_s, cfg, rise=f.rise)


def with_kv_capacity(c: Coefficients, tokens: float) -> Coefficients:
    """`c` holding `tokens` KV tokens per replica (unchanged when `tokens` is 0: not reported).

    A replica is one leader's server: with data parallelism, all its ranks' KV, while the profile's
    max_num_seqs and step times stay those of one engine core."""
    if tokens <= 0:
        return c
    return replace(c, num_kv_blocks=max(1, round(tokens / c.block_size)))


def recommend_decode(
    mem: RoleMemory,
    now_s: float,
    load: RoleLoad,
    c: Coefficients,
    tpot_target_s: float,
    cfg: SloPolicyConfig = SloPolicyConfig(),
) -> Recommendation:
    """Decode replicas for the forecast peak of the next start-up window (records this tick in `mem`).
    The KV capacity is the engines' own where they report it (vLLM's `cache_config_info`, SGLang's
    `max_total_num_tokens`): the preset's is one GPU and memory setting, the deployment may differ."""
    load = _with_shape(mem, load)
    c = with_kv_capacity(c, load.kv_capacity_tokens)
    # The forecast follows the arrival-driven demand (Little's law), not a backlog being worked off:
    # a backlog is transient and the running + backlog term already sizes for it.
    demand = decode_demand(load, c, tpot_target_s, cfg)
    f = _forecast(mem, now_s, demand[2], cfg)
    return decode_replicas(load, c, tpot_target_s, cfg, rise=f.rise, demand=demand)

"""pdorch's SLO policy, damping, ratio band and the peer policies (pure functions)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdorch.scaler import peers
from pdorch.scaler.damping import DampingConfig, DampingState, damp
from pdorch.scaler.observe import missed_target
from pdorch.scaler.policy import (
    RoleMemory,
    SloPolicyConfig,
    decode_replicas,
    decode_seqs_per_replica,
    erlang_c,
    prefill_replicas,
    recommend_decode,
    wait_tail,
)
from pdorch.scaler.ratio import RatioBand, within_band
from pdorch.sim.latency import BLIS_LLAMA31_8B_H100 as BLIS
from pdorch.sim.latency import DISTSERVE_OPT13B_A100 as DIST
from tests.unit.role_loads import role_load

pytestmark = pytest.mark.unit


@given(rate=st.floats(0.1, 200), prompt=st.floats(10, 8000), k=st.floats(1.0, 4.0))
def test_prefill_never_shrinks_with_more_or_longer_prompts(rate: float, prompt: float, k: float) -> None:
    base = prefill_replicas(role_load(rate, prompt), DIST, 2.0).replicas
    assert prefill_replicas(role_load(rate * k, prompt), DIST, 2.0).replicas >= base
    assert prefill_replicas(role_load(rate, min(prompt * k, 16000)), DIST, 2.0).replicas >= base


def test_erlang_c_known_values() -> None:
    # M/M/1: P(wait) = rho; M/M/2 at a = 1: C = 1/3.
    assert erlang_c(1, 0.7) == pytest.approx(0.7)
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.5) == 1.0
    assert wait_tail(2, 1.0, 0.1, 0.0) == pytest.approx(1 / 3)
    assert wait_tail(2, 1.0, 0.1, 0.5) == pytest.approx(1 / 3 * math.exp(-5))


def test_prefill_capacity_matches_the_latency_model() -> None:
    # 20 req/s x 1000-token prompts on OPT-13B: 20 x (18.1 + 102 + 7.1) ms = 2.54 replica-s/s.
    rec = prefill_replicas(role_load(20, 1000), DIST, 2.0)
    assert "2.54 replica-s/s" in rec.reason and "TTFT 2000ms" in rec.reason
    # The fewest M/M/c replicas meeting the tail, and never planned above 85% busy.
    budget = 2.0 * 0.8 - (0.0181 + 0.204 + 0.0284)
    assert wait_tail(rec.replicas, 2.544, 0.1272, budget) <= 0.01
    assert rec.replicas == 3 or wait_tail(rec.replicas - 1, 2.544, 0.1272, budget) > 0.01
    assert rec.replicas >= 2.544 / 0.85


def test_a_tighter_ttft_needs_more_prefill() -> None:
    loose = prefill_replicas(role_load(30, 1500), DIST, 4.0).replicas
    tight = prefill_replicas(role_load(30, 1500), DIST, 0.6).replicas
    assert tight > loose


def test_prefill_backlog_adds_replicas_and_says_so() -> None:
    calm = prefill_replicas(role_load(10, 1000), DIST, 2.0)
    queued = prefill_replicas(role_load(10, 1000, waiting=200), DIST, 2.0)
    assert queued.replicas > calm.replicas and "to drain 200 queued" in queued.reason


def test_idle_roles_want_zero() -> None:
    assert prefill_replicas(role_load(0, 0), DIST, 2.0).replicas == 0
    assert decode_replicas(role_load(0, 0), DIST, 0.1).replicas == 0


@given(rate=st.floats(0.1, 100), output=st.floats(2, 2000), k=st.floats(1.0, 4.0))
def test_decode_grows_with_output_length(rate: float, output: float, k: float) -> None:
    base = decode_replicas(role_load(rate, 500, output), BLIS, 0.05).replicas
    assert decode_replicas(role_load(rate, 500, output * k), BLIS, 0.05).replicas >= base


def test_decode_ignores_prompt_length_when_not_kv_bound() -> None:
    # BLIS H100 holds 467k KV tokens: 200 vs 800-token prompts stay max_num_seqs-bound.
    short = decode_replicas(role_load(20, 200, 300), BLIS, 0.05)
    long = decode_replicas(role_load(20, 800, 300), BLIS, 0.05)
    assert short.replicas == long.replicas
    assert "max_num_seqs-bound" in short.reason


def test_decode_limits() -> None:
    cfg = SloPolicyConfig()
    per, limit = decode_seqs_per_replica(DIST, 1000, 200, 0.1, cfg)
    assert limit == "KV" and per == pytest.approx(0.85 * 64000 / 1200)
    per, limit = decode_seqs_per_replica(BLIS, 100, 100, 0.5, cfg)
    assert limit == "max_num_seqs" and per == 256
    per, limit = decode_seqs_per_replica(BLIS, 4000, 100, 0.0075, cfg)
    assert limit == "TPOT"


def test_decode_sizes_by_the_kv_capacity_the_engines_report() -> None:
    """The preset holds 467k KV tokens per H100 engine; engines that report 40k (a smaller GPU
    memory share, say) hold fewer sequences each, so the same load needs more of them."""
    load = role_load(60, 200, 300)
    preset = recommend_decode(RoleMemory(), 0.0, load, BLIS, 0.05)
    small = recommend_decode(
        RoleMemory(), 0.0, role_load(60, 200, 300, kv_capacity_tokens=40_000), BLIS, 0.05
    )
    assert "KV-bound" in small.reason and "KV-bound" not in preset.reason
    assert small.replicas > preset.replicas
    # Reported the same as the preset: the same decision.
    same = recommend_decode(
        RoleMemory(), 0.0, role_load(60, 200, 300, kv_capacity_tokens=BLIS.kv_capacity_tokens), BLIS, 0.05
    )
    assert same.replicas == preset.replicas


def test_decode_remembers_the_reported_kv_capacity_through_a_silent_tick() -> None:
    """A tick whose engines report no capacity (an idle SGLang server before its first batch) keeps
    the last reported one instead of falling back to the preset's."""
    mem = RoleMemory()
    reported = recommend_decode(mem, 0.0, role_load(60, 200, 300, kv_capacity_tokens=40_000), BLIS, 0.05)
    silent = recommend_decode(mem, 15.0, role_load(60, 200, 300), BLIS, 0.05)
    assert "KV-bound" in silent.reason
    assert silent.replicas == reported.replicas
    fresh = recommend_decode(RoleMemory(), 15.0, role_load(60, 200, 300), BLIS, 0.05)
    assert fresh.replicas < silent.replicas


def test_decode_follows_kv_usage() -> None:
    low = decode_replicas(role_load(1, 500, 10, running=5, kv_usage=0.2, ready=4), DIST, 0.1)
    high = decode_replicas(role_load(1, 500, 10, running=5, kv_usage=0.95, ready=4), DIST, 0.1)
    assert high.replicas > 4 >= low.replicas and "KV usage 95%" in high.reason


# ---------------------------------------------------------------------------- damping
def test_scale_down_waits_for_the_stabilization_window() -> None:
    cfg = DampingConfig(min_replicas=1, max_replicas=10, scale_down_stabilization_s=60, cooldown_s=0)
    s = DampingState()
    assert damp(s, cfg, 0, 5, 5).replicas == 5
    d = damp(s, cfg, 30, 5, 2)
    assert d.replicas == 5 and not d.changed and "scale-down stabilization" in d.held
    assert damp(s, cfg, 61, 5, 2).replicas == 2


def test_after_a_gap_longer_than_the_window_the_fleet_is_not_dropped_at_once() -> None:
    """Ticks held during a metrics outage record nothing; the first decision after it must not find
    an empty window and drop a warm fleet in one step (it starts a new window, as the first ever does)."""
    cfg = DampingConfig(min_replicas=1, max_replicas=10, scale_down_stabilization_s=300, cooldown_s=0)
    s = DampingState()
    assert damp(s, cfg, 0, 10, 10).replicas == 10
    d = damp(s, cfg, 360, 10, 2)  # six minutes later
    assert d.replicas == 10 and "scale-down stabilization" in d.held
    got = {t: damp(s, cfg, t, 10, 2).replicas for t in range(375, 676, 15)}  # ticks resume
    assert got[645] == 10 and got[660] == 2  # a full window after the gap, not before


def test_after_a_miss_the_longer_scale_down_window_holds_for_the_miss_memory() -> None:
    cfg = DampingConfig(
        min_replicas=1,
        max_replicas=10,
        scale_down_stabilization_s=60,
        cooldown_s=0,
        scale_down_after_miss_s=600,
        miss_memory_s=1000,
    )
    assert cfg.scale_down_window(100, None) == 60
    assert cfg.scale_down_window(100, 50) == 600
    assert cfg.scale_down_window(1050, 50) == 60  # an hour (here 1000 s) without a miss: back to normal
    assert DampingConfig(scale_down_stabilization_s=60).scale_down_window(100, 50) == 60  # off when unset
    # Shorter than the normal window: a miss never shortens it.
    short = DampingConfig(scale_down_stabilization_s=300, scale_down_after_miss_s=30)
    assert short.scale_down_window(100, 50) == 300

    s = DampingState()
    assert damp(s, cfg, 0, 8, 8, last_miss_s=0).replicas == 8  # a burst that missed its target
    d = damp(s, cfg, 120, 8, 2, last_miss_s=0)  # the lull after it: the 60 s window has passed
    assert d.replicas == 8 and "scale-down stabilization 600s after an SLO miss" in d.held
    assert damp(s, cfg, 601, 8, 2, last_miss_s=0).replicas == 2
    # Without a miss the same lull scales down after 60 s.
    s = DampingState()
    damp(s, cfg, 0, 8, 8)
    assert damp(s, cfg, 120, 8, 2).replicas == 2


def test_a_window_misses_when_its_mean_latency_is_above_the_target() -> None:
    load = role_load(10, 500, mean_ttft_s=2.5, mean_itl_s=0.05)
    assert missed_target(load, ttft_s=2.0)
    assert not missed_target(load, ttft_s=3.0)
    assert not missed_target(load, tpot_s=0.1)
    assert missed_target(load, tpot_s=0.04)
    assert not missed_target(role_load(0, 0), ttft_s=0.001, tpot_s=0.001)  # nothing finished: no signal


def test_scale_up_is_immediate_and_bounded() -> None:
    cfg = DampingConfig(min_replicas=1, max_replicas=6, scale_down_stabilization_s=300, cooldown_s=0)
    s = DampingState()
    d = damp(s, cfg, 0, 2, 9)
    assert d.replicas == 6 and d.changed and "bounds" in d.held


def test_cooldown_holds_a_second_action_but_not_a_rebound() -> None:
    cfg = DampingConfig(min_replicas=1, max_replicas=20, scale_down_stabilization_s=0, cooldown_s=60)
    s = DampingState()
    assert damp(s, cfg, 0, 4, 6).replicas == 6
    d = damp(s, cfg, 10, 6, 8)
    assert d.replicas == 6 and "cooldown" in d.held
    assert damp(s, cfg, 70, 6, 3).replicas == 3
    # Scaling up again right after a scale-down is not held: a burst must not wait.
    assert damp(s, cfg, 75, 3, 7).replicas == 7


@given(
    recs=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    lo=st.integers(0, 5),
    span=st.integers(0, 30),
)
def test_damped_replicas_stay_within_bounds(recs: list[int], lo: int, span: int) -> None:
    cfg = DampingConfig(min_replicas=lo, max_replicas=lo + span, scale_down_stabilization_s=30, cooldown_s=10)
    s, cur = DampingState(), lo
    for i, r in enumerate(recs):
        cur = damp(s, cfg, i * 15.0, cur, r).replicas
        assert lo <= cur <= lo + span


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        DampingConfig(min_replicas=5, max_replicas=2)


# ---------------------------------------------------------------------------- ratio band
def test_ratio_band_raises_the_short_side() -> None:
    band = RatioBand(2, 1, 0.25)  # P:D in [1.5, 2.5]
    assert within_band(band, 2, 4, 100, 100)[:2] == (6, 4)
    assert within_band(band, 12, 2, 100, 100)[:2] == (12, 5)
    assert within_band(band, 4, 2, 100, 100) == (4, 2, "")
    assert within_band(band, 12, 2, 100, 3)[:2] == (12, 3)  # max wins over the band
    assert "stays above 2.50" in within_band(band, 12, 2, 100, 3)[2]  # and the note says so


def test_a_narrow_band_raises_both_sides_when_one_would_overshoot() -> None:
    # 1:2 exactly from 1P:3D: 2P:3D overshoots (0.67), 1P:4D falls short (0.25); 2P:4D adds the fewest.
    assert within_band(RatioBand(1, 2, 0.0), 1, 3, 10, 10) == (
        2,
        4,
        "prefill raised 1->2 and decode raised 3->4 to keep P:D in [0.50, 0.50]",
    )


@given(
    p=st.integers(1, 200),
    d=st.integers(1, 200),
    rp=st.integers(1, 8),
    rd=st.integers(1, 8),
    tol=st.floats(0, 0.9),
)
def test_ratio_band_only_raises_and_lands_inside(p: int, d: int, rp: int, rd: int, tol: float) -> None:
    band = RatioBand(rp, rd, tol)
    np_, nd, _ = within_band(band, p, d, 10_000, 10_000)
    assert np_ >= p and nd >= d
    r = rp / rd
    assert r * (1 - tol) - 1e-9 <= np_ / nd <= r * (1 + tol) + 1e-9  # lands in the band
    # ... by the fewest replicas added: no pair with a smaller total is in the band.
    for d2 in range(d, nd + 1):
        p2 = max(p, math.ceil(r * (1 - tol) * d2 - 1e-9))
        assert not (p2 + d2 < np_ + nd and p2 / d2 <= r * (1 + tol) + 1e-9)


# ---------------------------------------------------------------------------- peers
def test_hpa_formula_and_tolerance() -> None:
    assert peers.hpa_desired(4, 10, 5) == 8
    assert peers.hpa_desired(4, 5.4, 5) == 4  # within 10%
    assert peers.hpa_desired(4, 1, 5) == 1
    assert peers.hpa_scale_up_limit(2) == 6 and peers.hpa_scale_up_limit(10) == 20
    with pytest.raises(ValueError):
        peers.hpa_desired(1, 1, 0)


def test_fixed_ratio_couples_prefill_to_decode() -> None:
    assert peers.fixed_ratio(4, 1.9) == 8
    assert peers.fixed_ratio(0, 1.9) == 1


def test_dynamo_planner_sizes_from_interval_throughput() -> None:
    obs = peers.DynamoObservation(
        num_requests=600,
        mean_isl=1000,
        mean_osl=200,
        mean_ttft_s=None,
        mean_itl_s=None,
        decode_concurrency=10,
    )
    n_p, n_d = peers.dynamo_sla_planner(obs, DIST, 60, 2.0, 0.1)
    # 10 req/s x 1000 tokens / (1000 tokens per 127.2 ms) = 1.27 -> 2 prefill.
    assert n_p == 2
    assert n_d >= 1
    slow = peers.DynamoObservation(600, 1000, 200, None, 0.2, 10)
    assert peers.dynamo_sla_planner(slow, DIST, 60, 2.0, 0.1)[1] >= n_d


def test_decode_backlog_counts_by_lifetime_not_one_slot_each() -> None:
    # 900 sequences waiting for KV; each lives 100 tokens x 50 ms = 5 s, so clearing them in the
    # 30 s drain window needs 1/6 of a slot each, not a whole one.
    waiting = role_load(1, 1000, 100, running=0, waiting=900, mean_itl_s=0.05)
    rec = decode_replicas(waiting, DIST, 0.1)
    per = 0.85 * 64000 / 1100
    slots = 900 * (100 * 0.05 / 30)
    assert rec.replicas == math.ceil((slots + 2.33 * math.sqrt(2 * slots)) / per - 1e-9)
    assert rec.replicas < 900 / per


def test_prefill_work_without_a_known_prompt_length_keeps_the_replicas() -> None:
    """Right after the scaler starts nothing may have finished yet: requests run and arrive, but
    there is no prompt length to price them. That is not "no load"."""
    from pdorch.scaler.observe import RoleLoad

    for load in (
        RoleLoad(ready_replicas=4, window_s=15.0, request_rate=3.0, running=12),
        RoleLoad(ready_replicas=4, window_s=15.0, running=5),
        RoleLoad(ready_replicas=4, window_s=15.0, request_rate=2.0),
    ):
        assert prefill_replicas(load, DIST, 1.0).replicas == 4, load
    assert prefill_replicas(RoleLoad(ready_replicas=4, window_s=15.0), DIST, 1.0).replicas == 0


def test_a_profile_whose_sequences_cost_a_step_nothing_is_bound_by_kv_not_a_division() -> None:
    """beta = gamma = 0 (a profile built in Python, past the file checks) divided by zero."""
    free = replace(DIST, decode_beta_s=0.0, decode_gamma_s=0.0)
    per, limit = decode_seqs_per_replica(free, 1000, 200, 0.1, SloPolicyConfig())
    assert limit in ("KV", "max_num_seqs") and math.isfinite(per)


def test_a_queue_with_nothing_finished_in_the_window_is_priced_when_its_shape_is_known() -> None:
    """helper-75 B4: with the prompt length remembered, 600 queued prompts and rate 0 kept the
    ready replicas ("no finished requests yet"), while rate 0.001 drained them: a jump, and a lost
    tick at a burst's start."""
    from pdorch.scaler.observe import RoleLoad

    queued = RoleLoad(ready_replicas=2, window_s=15, mean_prompt_tokens=4000, waiting=600, running=8)
    at_zero = prefill_replicas(queued, DIST, 2.0)
    at_trickle = prefill_replicas(replace(queued, request_rate=0.001), DIST, 2.0)
    assert at_zero.replicas > 2 and "to drain 600 queued" in at_zero.reason
    assert abs(at_zero.replicas - at_trickle.replicas) <= 1
    # Without a known shape nothing can be priced: keep what serves, and say why.
    unknown = prefill_replicas(replace(queued, mean_prompt_tokens=0), DIST, 2.0)
    assert unknown.replicas == 2 and "no finished requests yet" in unknown.reason
    idle = prefill_replicas(replace(queued, waiting=0), DIST, 2.0)
    assert idle.replicas == 2 and "nothing arriving" in idle.reason
    # helper-76: with engines busy on long prompts and a few queued, the queue alone asked for 1 of
    # 10 ready replicas (a scale-down with work queued): busy replicas are kept.
    busy = RoleLoad(ready_replicas=10, window_s=15, mean_prompt_tokens=8000, running=40, waiting=5)
    kept = prefill_replicas(busy, DIST, 1.0)
    assert kept.replicas == 10 and "nothing finished in the window" in kept.reason

"""The start-up-window forecast and the predictive layer of the SLO policy (pure functions)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdorch.scaler.forecast import (
    Rise,
    Series,
    from_similar_levels,
    peak_forecast,
    quantile,
    record,
    rises,
    weighted_quantile,
)
from pdorch.scaler.policy import (
    RoleMemory,
    SloPolicyConfig,
    decode_replicas,
    prefill_replicas,
    recommend_decode,
    recommend_prefill,
)
from pdorch.sim.latency import DISTSERVE_OPT13B_A100 as DIST
from tests.unit.role_loads import role_load

pytestmark = pytest.mark.unit


def _series(values: list[float], step: float = 15.0) -> Series:
    s = Series()
    for i, v in enumerate(values):
        record(s, i * step, v, keep_s=1e9)
    return s


def test_record_forgets_old_samples_and_merges_one_instant() -> None:
    s = Series()
    for t in (0.0, 10.0, 20.0, 30.0):
        record(s, t, t, keep_s=15.0)
    assert s.samples == [(20.0, 20.0), (30.0, 30.0)]
    record(s, 30.0, 5.0, keep_s=15.0)
    assert s.samples[-1] == (30.0, 5.0)


def test_rises_only_use_fully_observed_lead_windows() -> None:
    # Samples every 15 s; lead 30 s: the sample at t has its window (t, t + 30] seen once now >= t + 30.
    samples = [(0.0, 1.0), (15.0, 5.0), (30.0, 2.0), (45.0, 9.0)]
    got = rises(samples, now=45.0, lead_s=30.0, horizon_s=1e9)
    # t=0: max(5, 2) - 1, the window carried 5 + 2; t=15: max(2, 9) - 5, it carried 2 + 9.
    assert got == [Rise(1.0, 4.0, 7.0), Rise(5.0, 4.0, 11.0)]
    # Nothing in the future is read: at now=30 only t=0 qualifies.
    assert rises(samples[:3], now=30.0, lead_s=30.0, horizon_s=1e9) == [Rise(1.0, 4.0, 7.0)]
    # The horizon drops old samples.
    assert rises(samples, now=45.0, lead_s=30.0, horizon_s=30.0) == [Rise(5.0, 4.0, 11.0)]


def test_quantile_nearest_rank() -> None:
    assert quantile([], 0.9) == 0.0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 11)], 0.9) == 9.0
    assert quantile([float(i) for i in range(1, 11)], 1.0) == 10.0


def test_weighted_quantile_covers_a_share_of_the_work_not_of_the_ticks() -> None:
    # Nine quiet windows (no rise, 1 unit of work each) and one before a burst (rise 8, 91 units).
    past = [Rise(1.0, 0.0, 1.0)] * 9 + [Rise(1.0, 8.0, 91.0)]
    assert quantile([r.rise for r in past], 0.75) == 0.0  # by ticks the burst is a 10% outlier
    assert weighted_quantile(past, 0.75) == 8.0  # by work it is 91% of what had to be served
    assert weighted_quantile(past, 0.05) == 0.0  # the quiet windows alone cover 9%
    # Windows that carried nothing do not count; no work at all means no rise.
    assert weighted_quantile([Rise(0.0, 5.0, 0.0), Rise(1.0, 1.0, 3.0)], 1.0) == 1.0
    assert weighted_quantile([Rise(0.0, 5.0, 0.0)], 0.9) == 0.0
    assert weighted_quantile([], 0.9) == 0.0


@given(st.lists(st.tuples(st.floats(0, 50), st.floats(0, 50)), min_size=1, max_size=40), st.floats(0.01, 1.0))
def test_weighted_quantile_is_the_smallest_rise_covering_the_share(
    pairs: list[tuple[float, float]], q: float
) -> None:
    past = [Rise(0.0, rise, work) for rise, work in pairs]
    got = weighted_quantile(past, q)
    total = sum(w for _, w in pairs)
    if total <= 0:
        assert got == 0.0
        return
    covered = lambda x: sum(w for r, w in pairs if r <= x)  # noqa: E731
    assert covered(got) >= q * total * (1 - 1e-9)
    # Any smaller rise that occurs covers less than the share.
    assert all(covered(r) < q * total * (1 - 1e-12) for r, _ in pairs if r < got)


def test_rises_are_conditioned_on_levels_at_least_today() -> None:
    lull = [Rise(1.0, 4.0, 1.0)] * 10
    top = [Rise(5.0, 0.5, 5.0)] * 10
    # At the top of a burst, what followed the tops counts, not what followed the lulls.
    assert sorted(r.rise for r in from_similar_levels(lull + top, 5.0)) == [0.5] * 10
    # In a lull, everything at or above it counts.
    assert len(from_similar_levels(lull + top, 1.0)) == 20
    # Above every level seen: the highest levels seen stand in.
    assert [r.rise for r in from_similar_levels(lull + top, 9.0)] == [0.5] * 8


def test_steady_load_forecasts_its_level() -> None:
    f = peak_forecast(_series([3.0] * 40), now=39 * 15.0, lead_s=75.0, horizon_s=1800.0, q=0.9)
    assert f.peak == 3.0 and f.rise == 0.0 and f.samples > 0


def test_record_skips_values_that_are_not_numbers() -> None:
    s = _series([1.0, 2.0])
    record(s, 30.0, float("nan"), keep_s=1e9)
    record(s, 45.0, float("inf"), keep_s=1e9)
    assert s.samples == [(0.0, 1.0), (15.0, 2.0)]


def test_the_policy_passes_its_weighting_on() -> None:
    # The rare-burst shape of the test below, fed through the policy's memory: weighted by work the
    # lull is sized for the burst, weighted by tick it is not.
    def lull_replicas(weighted: bool) -> int:
        cfg = SloPolicyConfig(forecast_quantile=0.5, forecast_weighted=weighted)
        mem = RoleMemory()
        rec = None
        for i in range(117):
            rate = 40.0 if i % 20 in (18, 19) else 1.0
            rec = recommend_prefill(mem, i * 15.0, role_load(rate, 1000), DIST, 2.0, cfg)
        assert rec is not None
        return rec.replicas

    assert lull_replicas(True) > lull_replicas(False)


def test_recurring_bursts_raise_the_forecast_in_a_lull() -> None:
    # A burst to 10 for 2 ticks every 10 ticks, on a base of 1: in a lull the forecast holds the burst.
    values = [10.0 if i % 10 in (8, 9) else 1.0 for i in range(58)]
    f = peak_forecast(_series(values), now=57 * 15.0, lead_s=75.0, horizon_s=1800.0, q=0.9)
    assert f.level == 1.0 and f.peak == pytest.approx(10.0)
    # At the top of a burst the lull's rise is not added again.
    top = peak_forecast(_series(values[:-8]), now=49 * 15.0, lead_s=75.0, horizon_s=1800.0, q=0.9)
    assert top.level == 10.0 and top.peak == pytest.approx(10.0)
    # Without bursts in the horizon the forecast is the level.
    f = peak_forecast(_series(values), now=57 * 15.0, lead_s=75.0, horizon_s=0.0, q=0.9)
    assert f.peak == 1.0


def test_rare_bursts_that_carry_most_requests_raise_the_weighted_forecast_only() -> None:
    # One 2-tick burst to 40 every 20 ticks on a base of 1: only 5 of 20 lull samples see it coming
    # (25% of ticks), but the burst windows carry most of the requests.
    values = [40.0 if i % 20 in (18, 19) else 1.0 for i in range(117)]
    now = 116 * 15.0
    by_ticks = peak_forecast(_series(values), now=now, lead_s=75.0, horizon_s=1800.0, q=0.5, weighted=False)
    by_work = peak_forecast(_series(values), now=now, lead_s=75.0, horizon_s=1800.0, q=0.5)
    assert by_ticks.level == by_work.level == 1.0
    assert by_ticks.peak == 1.0 and by_work.peak == pytest.approx(40.0)


@given(
    values=st.lists(st.floats(0, 100), min_size=1, max_size=80),
    q=st.floats(0.0, 1.0),
)
def test_forecast_never_below_the_level_and_within_the_seen_range(values: list[float], q: float) -> None:
    s = _series(values)
    f = peak_forecast(s, now=(len(values) - 1) * 15.0, lead_s=75.0, horizon_s=1800.0, q=q)
    assert f.peak >= f.level == values[-1]
    assert f.rise <= max(values) - min(values) + 1e-9


def test_a_rise_adds_prefill_and_decode_replicas_and_says_so() -> None:
    calm = prefill_replicas(role_load(10, 1000), DIST, 2.0)
    risen = prefill_replicas(role_load(10, 1000), DIST, 2.0, rise=2.0)
    assert risen.replicas > calm.replicas and "forecast rise 2.00" in risen.reason
    d_calm = decode_replicas(role_load(10, 1000, running=100), DIST, 0.1)
    d_risen = decode_replicas(role_load(10, 1000, running=100), DIST, 0.1, rise=400)
    assert d_risen.replicas > d_calm.replicas and "forecast rise 400" in d_risen.reason
    # A rise smaller than the noise headroom changes nothing.
    assert decode_replicas(role_load(10, 1000, running=100), DIST, 0.1, rise=1).replicas == d_calm.replicas


def test_predictive_prefill_holds_capacity_for_a_recurring_burst() -> None:
    cfg = SloPolicyConfig(forecast_lead_s=75.0, forecast_horizon_s=1800.0, forecast_quantile=0.9)
    mem = RoleMemory()
    reactive = SloPolicyConfig(forecast_horizon_s=0.0)
    for i in range(60):
        burst = i % 10 in (8, 9)
        load = role_load(40.0 if burst else 2.0, 1500) if burst or i % 2 else role_load(0.0, 0.0)
        rec = recommend_prefill(mem, i * 15.0, load, DIST, 2.0, cfg)
    # Tick 59 is a burst tick; tick 60 is a lull with nothing finished: the memory supplies the shape.
    lull = role_load(0.0, 0.0)
    rec = recommend_prefill(mem, 60 * 15.0, lull, DIST, 2.0, cfg)
    burst_size = prefill_replicas(role_load(40.0, 1500), DIST, 2.0, reactive).replicas
    assert rec.replicas >= burst_size - 1 and "forecast rise" in rec.reason
    assert prefill_replicas(lull, DIST, 2.0, reactive).replicas == 0
    assert mem.prompt_tokens == 1500


def test_predictive_decode_follows_arrivals_and_is_reactive_when_off() -> None:
    off = SloPolicyConfig(forecast_horizon_s=0.0)
    mem = RoleMemory()
    load = role_load(10, 1000, running=50, mean_itl_s=0.03)
    assert (
        recommend_decode(mem, 0.0, load, DIST, 0.1, off).replicas
        == decode_replicas(load, DIST, 0.1, off).replicas
    )
    cfg = SloPolicyConfig()
    mem = RoleMemory()
    for i in range(40):
        rate = 60.0 if i % 8 == 7 else 5.0
        recommend_decode(
            mem, i * 15.0, role_load(rate, 1000, running=rate * 3, mean_itl_s=0.03), DIST, 0.1, cfg
        )
    quiet = role_load(5.0, 1000, running=15, mean_itl_s=0.03)
    assert (
        recommend_decode(mem, 40 * 15.0, quiet, DIST, 0.1, cfg).replicas
        > decode_replicas(quiet, DIST, 0.1, cfg).replicas
    )

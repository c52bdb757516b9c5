"""Engine metrics -> EngineSample -> RoleLoad, on the text the simulated engines really expose."""

from __future__ import annotations

import pytest

from pdorch.scaler.observe import role_load, total
from pdorch.scaler.scrape import EngineSample, MetricsParseError, parse_engine_metrics
from pdorch.scaler.sources import prometheus_vector_to_text
from pdorch.sim.metrics import EngineSnapshot, FinishedRequest, SglangMetrics, VllmMetrics

pytestmark = pytest.mark.unit

SNAP = EngineSnapshot(
    running=3, waiting=2, kv_usage=0.25, used_tokens=100, max_tokens=4000, num_blocks=250, block_size=16
)


def _finish(m: VllmMetrics | SglangMetrics, prompt: int, out: int) -> None:
    m.finished(
        FinishedRequest(
            finish_reason="length",
            prompt_tokens=prompt,
            generation_tokens=out,
            ttft_s=0.5,
            e2e_s=1.0,
            itls_s=[0.02] * (out - 1),
            queue_s=0.1,
        )
    )


@pytest.mark.parametrize("factory", [VllmMetrics, lambda m, s: SglangMetrics(m, s, "decode")])
def test_parses_the_simulators_real_metric_names(factory) -> None:  # type: ignore[no-untyped-def]
    m = factory("llama", lambda: SNAP)
    _finish(m, 100, 11)
    _finish(m, 300, 21)
    s = parse_engine_metrics(m.render().decode())
    assert s.engine in ("vllm", "sglang")
    assert (s.running, s.waiting) == (3, 2)
    assert s.kv_usage == pytest.approx(0.25)
    assert s.requests_total == 2
    assert s.prompt_tokens_total == 400
    assert s.generation_tokens_total == 32
    assert s.ttft_sum_s == pytest.approx(1.0) and s.ttft_count == 2
    assert s.itl_count == 30 and s.itl_sum_s == pytest.approx(0.6)
    assert s.kv_capacity_tokens == 4000


def test_text_without_engine_metrics_is_refused() -> None:
    with pytest.raises(MetricsParseError, match="no vllm: or sglang:"):
        parse_engine_metrics("# TYPE foo gauge\nfoo 1\n")


def test_prometheus_api_result_becomes_the_same_sample() -> None:
    m = VllmMetrics("llama", lambda: SNAP)
    _finish(m, 100, 11)
    direct = parse_engine_metrics(m.render().decode())
    vector = [
        {"metric": {"__name__": name, "pod": "p0"}, "value": [0, str(value)]}
        for name, value in (
            ("vllm:num_requests_running", 3),
            ("vllm:num_requests_waiting", 2),
            ("vllm:kv_cache_usage_perc", 0.25),
            ("vllm:request_success_total", 1),
            ("vllm:prompt_tokens_total", 100),
            ("vllm:generation_tokens_total", 11),
            ("vllm:time_to_first_token_seconds_sum", 0.5),
            ("vllm:time_to_first_token_seconds_count", 1),
            ("vllm:inter_token_latency_seconds_sum", 0.2),
            ("vllm:inter_token_latency_seconds_count", 10),
        )
    ] + [{"metric": {"__name__": "vllm:num_requests_running", "pod": "other"}, "value": [0, "99"]}]
    via = parse_engine_metrics(prometheus_vector_to_text(vector, "p0"))
    for f in (
        "running",
        "waiting",
        "requests_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "ttft_count",
        "itl_count",
    ):
        assert getattr(via, f) == getattr(direct, f), f
    assert via.itl_sum_s == pytest.approx(direct.itl_sum_s)


def test_role_load_rates_and_means() -> None:
    a = EngineSample(
        "vllm", running=2, waiting=0, requests_total=10, prompt_tokens_total=1000, ttft_sum_s=1, ttft_count=10
    )
    b = EngineSample(
        "vllm", running=2, waiting=4, requests_total=30, prompt_tokens_total=5000, ttft_sum_s=5, ttft_count=30
    )
    load = role_load([a], [b], 10.0)
    # 20 finished + 4 more in the engine = 24 arrivals in 10 s.
    assert load.request_rate == pytest.approx(2.4)
    assert load.mean_prompt_tokens == pytest.approx(200)
    assert load.mean_ttft_s == pytest.approx(0.2)
    assert load.ready_replicas == 1


def test_restarted_counter_counts_from_zero() -> None:
    a = EngineSample("vllm", requests_total=100, prompt_tokens_total=10_000)
    b = EngineSample("vllm", requests_total=5, prompt_tokens_total=500)
    load = role_load([a], [b], 5.0)
    assert load.request_rate == pytest.approx(1.0)
    assert load.mean_prompt_tokens == pytest.approx(100)


def test_total_averages_kv_but_adds_counts() -> None:
    t = total([EngineSample("vllm", running=1, kv_usage=0.2), EngineSample("vllm", running=3, kv_usage=0.6)])
    assert t.running == 4 and t.kv_usage == pytest.approx(0.4)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        role_load([], [EngineSample("vllm")], 0)

"""Engine metrics -> EngineSample -> RoleLoad, on the text the simulated engines really expose."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pdorch.scaler.loop import RoleState
from pdorch.scaler.observe import MAX_SAMPLE_AGE_S, pair_with_previous, role_load, total
from pdorch.scaler.scrape import EngineSample, MetricsParseError, parse_engine_metrics
from pdorch.scaler.sources import (
    PrometheusQuery,
    prometheus_query,
    prometheus_scrape_time,
    prometheus_vector_to_text,
)
from pdorch.sim.metrics import EngineSnapshot, FinishedRequest, SglangMetrics, VllmMetrics
from tests.unit.role_loads import rates_read

pytestmark = pytest.mark.unit

SNAP = EngineSnapshot(
    running=3, waiting=2, kv_usage=0.25, used_tokens=100, max_tokens=4000, num_blocks=250, block_size=16
)


def _finish(m: VllmMetrics | SglangMetrics, prompt: int, out: int) -> None:
    """A request's tokens as the engine reports them: each one as it is made, then its end."""
    for i in range(out):
        m.token(prompt if i == 0 else 0)
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


def test_vllm_counts_tokens_as_they_are_made_sglang_when_the_request_ends() -> None:
    """vLLM V1 moves its token counters every step (a running generation shows progress);
    SGLang's tokenizer manager counts a request's tokens when it finishes (its scheduler's
    realtime_tokens counter is the one that moves meanwhile: tests/unit/test_proxy_progress.py)."""
    v, g = VllmMetrics("llama", lambda: SNAP), SglangMetrics("llama", lambda: SNAP, "decode")
    for m in (v, g):
        m.token(100)
        m.token(0)
    mid_v, mid_g = (parse_engine_metrics(m.render().decode()) for m in (v, g))
    assert (mid_v.prompt_tokens_total, mid_v.generation_tokens_total) == (100, 2)
    assert (mid_g.prompt_tokens_total, mid_g.generation_tokens_total) == (0, 0)


def test_a_simulated_sglang_decode_counts_requests_waiting_for_kv_once() -> None:
    """SGLang's num_queue_reqs is its scheduler's waiting queue; requests waiting for their KV are
    num_decode_transfer_queue_reqs only. The scaler adds both: counted in each, they read twice."""
    snap = replace(SNAP, waiting=5, transfer_queue=5, queued=0)
    s = parse_engine_metrics(SglangMetrics("llama", lambda: snap, "decode").render().decode())
    assert s.waiting == 5
    assert parse_engine_metrics(VllmMetrics("llama", lambda: snap).render().decode()).waiting == 5


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
            ("vllm:request_prompt_tokens_sum", 100),
            ("vllm:request_prompt_tokens_count", 1),
            ("vllm:request_generation_tokens_sum", 11),
            ("vllm:request_generation_tokens_count", 1),
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
        "finished_prompt_tokens",
        "finished_output_tokens",
        "finished_lengths_count",
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


def test_requests_lost_in_a_restart_are_not_subtracted_from_the_arrivals() -> None:
    """50 requests were in the engine when it restarted; since then 10 finished and 5 are in it:
    15 arrivals in 5 s, not 15 - 50 (the lost ones never finished, they did not leave early)."""
    a = EngineSample("vllm", running=40, waiting=10, requests_total=1000, generation_tokens_total=90_000)
    b = EngineSample("vllm", running=5, requests_total=10, generation_tokens_total=900)
    assert role_load([a], [b], 5.0).request_rate == pytest.approx(3.0)


def test_total_averages_kv_but_adds_counts() -> None:
    t = total([EngineSample("vllm", running=1, kv_usage=0.2), EngineSample("vllm", running=3, kv_usage=0.6)])
    assert t.running == 4 and t.kv_usage == pytest.approx(0.4)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        role_load([], [EngineSample("vllm")], 0)


def test_one_replica_restart_is_not_read_as_a_burst_or_a_lull() -> None:
    # Two replicas, 10 s: A finishes 20 (it had 1000), B restarted (5000 -> 12 since the restart).
    prev = [EngineSample("vllm", requests_total=1000), EngineSample("vllm", requests_total=5000)]
    cur = [EngineSample("vllm", requests_total=1020), EngineSample("vllm", requests_total=12)]
    assert role_load(prev, cur, 10.0).request_rate == pytest.approx(3.2)


def test_a_replica_without_baseline_adds_its_gauges_not_its_lifetime() -> None:
    old = EngineSample("vllm", running=1, requests_total=100)
    new = EngineSample("vllm", running=1, requests_total=130)
    back = EngineSample("vllm", running=4, waiting=2, requests_total=90_000, kv_usage=0.5)
    load = role_load([old, None], [new, back], 10.0)
    assert load.request_rate == pytest.approx(3.0)
    assert (load.running, load.waiting, load.ready_replicas) == (5, 2, 2)
    assert load.kv_usage == pytest.approx(0.25)
    with pytest.raises(ValueError, match="None for a missing one"):
        role_load([old], [new, back], 10.0)


def test_a_failed_scrape_does_not_shift_the_other_replicas_baselines() -> None:
    a0, b0, c0 = (EngineSample("vllm", requests_total=n) for n in (100, 200, 300))
    first = pair_with_previous({}, ["a", "b", "c"], [a0, b0, c0])
    a1, c1 = EngineSample("vllm", requests_total=110), EngineSample("vllm", requests_total=310)
    second = pair_with_previous(first.by_key, ["a", "b", "c"], [a1, None, c1])
    assert second.unread == 1 and second.prev == [a0, c0] and second.cur == [a1, c1]
    assert role_load(second.prev, second.cur, 10.0).request_rate == pytest.approx(2.0)
    # b is back next tick with no baseline (its last one is two ticks old): no lifetime spike.
    b2 = EngineSample("vllm", requests_total=230)
    third = pair_with_previous(second.by_key, ["a", "b", "c"], [a1, b2, c1], known={"a", "b", "c"})
    assert third.prev == [a1, None, c1]
    assert role_load(third.prev, third.cur, 10.0).request_rate == 0.0
    # ... which the loop must not take for a lull: b's part is unknown (it holds scale-down).
    assert (third.unread, third.blind) == (0, 1) and (second.blind, first.blind) == (0, 3)
    # A new engine (never read, Ready since the last tick) counts from 0: what it served since.
    d = EngineSample("vllm", running=2, requests_total=30)
    keys = ["a", "b", "c", "d"]
    fourth = pair_with_previous(third.by_key, keys, [a1, b2, c1, d], known={"a", "b", "c"}, fresh={"d"})
    assert fourth.prev[3] == EngineSample("vllm")
    assert role_load(fourth.prev, fourth.cur, 10.0).request_rate == pytest.approx(3.2)
    # Never read but Ready for longer (the scaler restarted, a drain hid it): its counters are a
    # lifetime, not one tick's work, so it gets no baseline.
    old_engine = EngineSample("vllm", running=2, requests_total=100_000)
    fifth = pair_with_previous(third.by_key, keys, [a1, b2, c1, old_engine], known={"a", "b", "c"})
    assert fifth.prev[3] is None
    assert role_load(fifth.prev, fifth.cur, 10.0).request_rate == 0.0
    # Fresh but read before (a readiness flap of a running engine): still no baseline.
    sixth = pair_with_previous({}, ["a"], [a1], known={"a"}, fresh={"a"})
    assert sixth.prev == [None]
    with pytest.raises(ValueError, match="2 samples for 3 endpoints"):
        pair_with_previous({}, ["a", "b", "c"], [a0, b0])


def test_non_finite_values_refuse_the_scrape() -> None:
    text = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting +Inf\n"
    with pytest.raises(MetricsParseError, match="non-finite values for waiting"):
        parse_engine_metrics(text)


def _itl(name: str, total_s: float, count: float) -> str:
    return (
        f'# TYPE {name} histogram\n{name}_bucket{{le="+Inf"}} {count}\n'
        f"{name}_sum {total_s}\n{name}_count {count}\n"
    )


def test_older_vllm_itl_name_is_read_when_the_newer_is_absent() -> None:
    old = _itl("vllm:time_per_output_token_seconds", 250.0, 5000)
    s = parse_engine_metrics(old)
    assert (s.itl_sum_s, s.itl_count) == (250.0, 5000)
    both = old + _itl("vllm:inter_token_latency_seconds", 100.0, 4000)
    s = parse_engine_metrics(both)
    assert (s.itl_sum_s, s.itl_count) == (100.0, 4000)


def test_older_vllm_kv_gauge_survives_the_prometheus_path() -> None:
    result = [{"metric": {"__name__": "vllm:gpu_cache_usage_perc", "pod": "p"}, "value": [0, "0.6"]}]
    assert parse_engine_metrics(prometheus_vector_to_text(result, "p")).kv_usage == pytest.approx(0.6)


def test_a_pod_scraped_by_two_prometheus_jobs_is_counted_once() -> None:
    def series(job: str, model: str, running: int) -> dict[str, object]:
        labels = {"__name__": "vllm:num_requests_running", "pod": "p", "job": job, "model_name": model}
        return {"metric": labels, "value": [0, str(running)]}

    # Two models on one engine are two series to add; the same series from a second job is not.
    result = [
        series("b-annotations", "m1", 3),
        series("a-podmonitor", "m1", 3),
        series("a-podmonitor", "m2", 2),
    ]
    result += [series("b-annotations", "m2", 2)]
    assert parse_engine_metrics(prometheus_vector_to_text(result, "p")).running == 5


def test_a_non_numeric_cache_config_label_is_skipped_not_raised() -> None:
    # Some vLLM builds export num_gpu_blocks="None" until the KV cache is profiled.
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m"} 3.0\n'
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1.0\n'
    )
    s = parse_engine_metrics(text)
    assert (s.running, s.kv_capacity_tokens) == (3.0, 0.0)
    ok = text.replace('"None"', '"100"')
    assert parse_engine_metrics(ok).kv_capacity_tokens == 1600.0


def test_an_sglang_decodes_own_queues_are_waiting_requests() -> None:
    """A P/D decode's requests waiting for KV memory or for their KV are demand it has not served
    (vLLM counts them in num_requests_waiting); read as nothing, an overloaded KV-bound decode
    looked as busy as its completions."""
    text = (
        'sglang:num_running_reqs{model_name="m"} 40\n'
        'sglang:num_queue_reqs{model_name="m"} 3\n'
        'sglang:num_decode_prealloc_queue_reqs{model_name="m"} 150\n'
        'sglang:num_decode_transfer_queue_reqs{model_name="m"} 5\n'
        'sglang:num_prefill_bootstrap_queue_reqs{model_name="m"} 7\n'
        'sglang:num_prefill_inflight_queue_reqs{model_name="m"} 2\n'
    )
    s = parse_engine_metrics(text)
    assert (s.running, s.waiting) == (40, 158)
    # A prefill's requests waiting on their decode are no load, but they keep it from being drained.
    assert s.held == 9


def test_an_sglang_prefills_bootstrap_queue_under_its_older_name_is_held_work() -> None:
    """Many SGLang releases name the prefill's bootstrap queue num_prefill_prealloc_queue_reqs: a
    prefill with requests there still waits on its decodes, so it is not drained."""
    s = parse_engine_metrics('sglang:num_prefill_prealloc_queue_reqs{model_name="m"} 7\n')
    assert (s.held, s.running, s.waiting) == (7, 0, 0)


def test_a_restart_resets_every_counter_even_those_that_grew_past_their_old_value() -> None:
    """A container restarted in place (same pod IP): the prompt-token sum went down, the request
    count did not. Differencing one and not the other read 13 req/s of 12,000-token prompts
    instead of 80 req/s of 2,000."""
    old = EngineSample(engine="vllm", requests_total=1000, generation_tokens_total=1000,
                       finished_prompt_tokens=10_000_000, finished_output_tokens=1000, finished_lengths_count=1000)  # fmt: skip
    new = EngineSample(engine="vllm", requests_total=1200, generation_tokens_total=1200,
                       finished_prompt_tokens=2_400_000, finished_output_tokens=1200, finished_lengths_count=1200)  # fmt: skip
    load = role_load([old], [new], 15.0)
    assert load.request_rate == pytest.approx(80.0)
    assert load.mean_prompt_tokens == pytest.approx(2000.0)


def test_an_older_sglangs_per_token_latency_name_is_read() -> None:
    text = (
        "# TYPE sglang:time_per_output_token_seconds histogram\n"
        'sglang:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 4\n'
        'sglang:time_per_output_token_seconds_sum{model_name="m"} 0.2\n'
        'sglang:time_per_output_token_seconds_count{model_name="m"} 4\n'
    )
    s = parse_engine_metrics(text)
    assert s.itl_count == 4 and s.itl_sum_s == pytest.approx(0.2)


def test_vllm_mean_lengths_come_from_finished_requests_not_step_counters() -> None:
    """vLLM's token counters move every step, its success counter when a request ends: while the
    rate rises, in-flight requests' tokens inflate tokens / finished. The per-request histograms
    (observed at the end) give the finished requests' own lengths."""
    m = VllmMetrics("llama", lambda: SNAP)
    before = parse_engine_metrics(m.render().decode())
    _finish(m, 1000, 50)  # one request done: 1000 prompt, 50 output tokens
    for _ in range(3):  # three more started (prompts done, 20 tokens each so far)
        for i in range(20):
            m.token(1000 if i == 0 else 0)
    after = parse_engine_metrics(m.render().decode())
    load = role_load([before], [after], 10.0)
    assert (load.mean_prompt_tokens, load.mean_output_tokens) == (1000, 50)
    # Without the histograms (an engine that does not export them) the counters are the fallback.
    bare = [
        replace(x, finished_prompt_tokens=0, finished_output_tokens=0, finished_lengths_count=0)
        for x in (before, after)
    ]
    assert role_load([bare[0]], [bare[1]], 10.0).mean_prompt_tokens == 4000


def _prometheus_ticks(scrape_every: float, offsets: list[float], ticks: list[float]) -> list:
    """What each scaler tick sees through Prometheus: engine i is scraped every `scrape_every` s from
    `offsets[i]` and serves a steady 10 requests/s; a tick sees each engine's newest scrape."""
    out = []
    for now in ticks:
        scraped = [off + ((now - off) // scrape_every) * scrape_every for off in offsets]
        out.append((now, [EngineSample("vllm", requests_total=10 * t, at=t) for t in scraped]))
    return out


@pytest.mark.parametrize(
    ("scrape_every", "offsets", "ticks"),
    [
        # Prometheus scrapes at half the scaler's rate; one job's targets a few seconds apart.
        (30.0, [0.0, 4.0], [100.0 + 15 * i for i in range(20)]),
        # The same rate, the scrapes close to the ticks, and the ticks jitter around them.
        (15.0, [10.0, 10.2], [100.0 + 15 * i + (0.4 if i % 3 else -0.4) for i in range(20)]),
    ],
)
def test_prometheus_scrape_times_keep_the_rate_steady(
    scrape_every: float, offsets: list[float], ticks: list[float]
) -> None:
    """Counters seen through Prometheus move only when it scrapes. Divided by the scaler's own tick
    they read 0 on some ticks and double on others (and the scale-down window keeps the doubles);
    divided by the time between the engine's own scrapes they read the true rate on every tick."""
    seen = _prometheus_ticks(scrape_every, offsets, ticks)
    by_tick = rates_read(seen, stamped=False)
    assert min(by_tick) < 15 and max(by_tick) > 25  # the aliasing: true rate 20/s
    by_scrape = rates_read(seen)
    assert by_scrape[2:] == pytest.approx([20.0] * len(by_scrape[2:]))


def test_a_sample_no_newer_than_the_baseline_repeats_the_last_interval() -> None:
    a0, a1 = EngineSample("vllm", requests_total=0, at=0.0), EngineSample("vllm", requests_total=300, at=30.0)
    first = pair_with_previous({}, ["a"], [a0])
    second = pair_with_previous(first.by_key, ["a"], [a1], before=first.before)
    assert role_load(second.prev, second.cur, 15.0).request_rate == pytest.approx(10.0)
    # Prometheus has not scraped again: the same interval is read, not an empty one.
    third = pair_with_previous(second.by_key, ["a"], [a1], before=second.before)
    assert (third.prev, third.cur, third.blind, third.repeated) == ([a0], [a1], 0, 1)
    assert role_load(third.prev, third.cur, 15.0).request_rate == pytest.approx(10.0)
    # With no earlier sample to repeat, the engine reads as blind (scale-down holds).
    assert pair_with_previous(first.by_key, ["a"], [a0], before=first.before).blind == 1


def _series(name: str, value: float, **labels: str) -> dict:
    return {"metric": {"__name__": name, **labels}, "value": [1000.0, str(value)]}


def _scrape_time(at: float, **labels: str) -> dict:
    # What `label_replace(timestamp(up{...}), "pdorch", "scrape_time", "", "")` gives: no name.
    return {"metric": {"pdorch": "scrape_time", **labels}, "value": [1000.0, str(at)]}


def test_the_query_result_gives_the_sample_and_when_it_was_scraped() -> None:
    pod = {"pod": "p", "job": "engines"}
    result = [
        _series("vllm:request_success_total", 9, instance="10.0.0.2:8000", **pod),
        _series("vllm:num_requests_running", 2, instance="10.0.0.2:8000", **pod),
        _scrape_time(998.5, instance="10.0.0.2:8000", **pod),
        # The pod was recreated under the same name: the old target's series linger until stale.
        _series("vllm:request_success_total", 2_000_000, instance="10.0.0.1:8000", **pod),
        _series("vllm:num_requests_running", 40, instance="10.0.0.1:8000", **pod),
        _scrape_time(950.0, instance="10.0.0.1:8000", **pod),
        _series("vllm:num_requests_running", 7, instance="10.0.0.3:8000", pod="q", job="engines"),
    ]
    sample = parse_engine_metrics(prometheus_vector_to_text(result, "p"))
    assert (sample.requests_total, sample.running) == (9, 2)  # the newest target's series only
    assert prometheus_scrape_time(result, "p") == 998.5
    assert prometheus_scrape_time(result, "q") is None  # no scrape time in the result: the tick's
    assert parse_engine_metrics(prometheus_vector_to_text(result, "q")).running == 7


def test_scrape_targets_of_the_pod_without_engine_series_are_not_picked() -> None:
    """A sidecar port scraped by a job whose name sorts first, and a second endpoint of the engine's
    job scraped later, have an `up` of their own and nothing to read: the engine's series stay."""
    pod = {"pod": "p", "instance": "10.0.0.2:8000", "job": "vllm"}
    result = [
        _series("vllm:num_requests_running", 7, **pod),
        _scrape_time(990.0, **pod),
        _scrape_time(995.0, pod="p", job="kubernetes-pods", instance="10.0.0.2:15020"),
        _scrape_time(999.0, pod="p", job="vllm", instance="10.0.0.2:9090"),
    ]
    assert parse_engine_metrics(prometheus_vector_to_text(result, "p")).running == 7
    assert prometheus_scrape_time(result, "p") == 990.0


def test_the_query_asks_for_values_and_scrape_times_at_once() -> None:
    q = prometheus_query("serving", ["a", "b"])
    values, times = q.split(" or ")
    assert values.startswith('{__name__=~"vllm\\\\:num_requests_running|') and values.endswith(
        ',namespace="serving",pod=~"a|b"}'
    )
    assert "[" not in values  # an instant vector: stale series (a target gone or failing) drop out
    assert (
        times
        == 'label_replace(timestamp(up{namespace="serving",pod=~"a|b"}), "pdorch", "scrape_time", "", "")'
    )


def test_means_weigh_each_engine_by_its_rate_not_by_its_interval() -> None:
    # X: 1 request/s of 1000 prompt tokens, read over 60 s; Y: 1 request/s of 100, over 15 s.
    x0, x1 = (
        EngineSample("vllm", requests_total=n, prompt_tokens_total=1000 * n, at=t)
        for n, t in ((0, 0), (60, 60))
    )
    y0, y1 = (
        EngineSample("vllm", requests_total=n, prompt_tokens_total=100 * n, at=t)
        for n, t in ((0, 45), (15, 60))
    )
    load = role_load([x0, y0], [x1, y1], 15.0)
    assert load.request_rate == pytest.approx(2.0)
    assert load.mean_prompt_tokens == pytest.approx(550)  # 1100 prompt tokens/s over 2 requests/s


def test_a_new_engine_repeats_its_first_interval_too() -> None:
    d = EngineSample("vllm", requests_total=30, at=10.0)
    first = pair_with_previous({}, ["d"], [d], fresh={"d"})
    assert first.prev == [EngineSample("vllm")] and first.blind == 0
    again = pair_with_previous(first.by_key, ["d"], [d], known={"d"}, before=first.before)
    assert (again.blind, again.repeated) == (0, 1)
    assert role_load(again.prev, again.cur, 10.0).request_rate == pytest.approx(3.0)


def test_sglang_queues_count_each_data_parallel_rank_once_however_many_ranks_export() -> None:
    """With --enable-metrics-for-all-schedulers every tensor rank of a data-parallel rank exports
    the batch they all run: 2 data-parallel ranks x 4 tensor ranks, 10 and 6 running, 3 and 1
    waiting, read as 16 and 4 (not 64 and 16), directly and through Prometheus."""
    ranks = [(dp, tp, run, wait) for dp, run, wait in ((0, 10, 3), (1, 6, 1)) for tp in range(4)]
    text = "".join(
        f"# TYPE {name} gauge\n"
        + "".join(
            f'{name}{{dp_rank="{dp}",tp_rank="{tp}",pp_rank="0"}} {(run, wait)[i]}\n'
            for dp, tp, run, wait in ranks
        )
        for i, name in enumerate(("sglang:num_running_reqs", "sglang:num_queue_reqs"))
    )
    direct = parse_engine_metrics(text)
    assert (direct.running, direct.waiting) == (16, 4)
    series = [
        _series(name, value, dp_rank=str(dp), tp_rank=str(tp), pp_rank="0", pod="s")
        for dp, run, wait in ((0, 10, 3), (1, 6, 1))
        for tp in range(4)
        for name, value in (("sglang:num_running_reqs", run), ("sglang:num_queue_reqs", wait))
    ]
    via = parse_engine_metrics(prometheus_vector_to_text(series, "s"))
    assert (via.running, via.waiting) == (16, 4)
    # The default (one exporting scheduler, no rank labels) reads as it is.
    plain = parse_engine_metrics("sglang:num_running_reqs 7\nsglang:num_queue_reqs 2\n")
    assert (plain.running, plain.waiting) == (7, 2)


def test_the_kv_capacity_the_engines_report_reaches_the_role_load() -> None:
    # vLLM says it in cache_config_info's labels, also through Prometheus; SGLang in a gauge.
    info = _series("vllm:cache_config_info", 1, num_gpu_blocks="2500", block_size="16", pod="p")
    # Data parallel: one series per engine core, each with the whole server's blocks (vLLM sums
    # its engines' counts into the config it exports).
    ranks = [
        _series("vllm:cache_config_info", 1, num_gpu_blocks="2000", block_size="16", engine=str(i), pod="dp")
        for i in (0, 1)
    ]
    assert parse_engine_metrics(prometheus_vector_to_text(ranks, "dp")).kv_capacity_tokens == 32_000
    # SGLang: one series per data-parallel rank (added up); with metrics from all schedulers also
    # one per tensor rank of the same pool (counted once).
    pools = [
        _series("sglang:max_total_num_tokens", 30_000, dp_rank=str(dp), tp_rank=str(tp), pod="s")
        for dp in (0, 1)
        for tp in (0, 1, 2, 3)
    ]
    assert parse_engine_metrics(prometheus_vector_to_text(pools, "s")).kv_capacity_tokens == 60_000
    # A size label that is not a positive number is ignored, not a reason to drop the scrape.
    odd = _series("vllm:cache_config_info", 1, num_gpu_blocks="inf", block_size="16", pod="o")
    assert parse_engine_metrics(prometheus_vector_to_text([odd], "o")).kv_capacity_tokens == 0
    via = parse_engine_metrics(
        prometheus_vector_to_text([info, _series("vllm:num_requests_running", 1, pod="p")], "p")
    )
    assert via.kv_capacity_tokens == 40_000
    sglang = parse_engine_metrics(
        prometheus_vector_to_text([_series("sglang:max_total_num_tokens", 30_000, pod="p")], "p")
    )
    assert sglang.kv_capacity_tokens == 30_000
    # Per replica: the mean of those that report it (older builds may not).
    cur = [EngineSample("vllm", kv_capacity_tokens=c) for c in (40_000, 20_000, 0)]
    assert role_load([None] * 3, cur, 10.0).kv_capacity_tokens == 30_000
    assert role_load([], [EngineSample("vllm")], 10.0).kv_capacity_tokens == 0


@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "the file is empty"), ("ab\ncd", "whitespace or control"), ("ab c", "whitespace or control")],
)
def test_a_token_file_that_cannot_be_sent_is_refused_without_echoing_it(
    tmp_path: Path, content: str, problem: str
) -> None:
    """A token with a newline inside passed the start-up check, then every query failed with a
    warning that printed the token."""
    f = tmp_path / "token"
    f.write_text(content)
    with pytest.raises(ValueError, match=problem) as err:
        PrometheusQuery("https://127.0.0.1:9", token_file=str(f))
    assert "--prometheus-token-file" in str(err.value)
    assert content == "" or content not in str(err.value)


def test_a_ca_file_that_is_not_pem_names_the_flag(tmp_path: Path) -> None:
    f = tmp_path / "ca.pem"
    f.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"--prometheus-ca-file .*ca\.pem"):
        PrometheusQuery("https://127.0.0.1:9", ca_file=str(f))


def _vllm_text(requests: float, *, drop: str = "", started: float | None = None) -> str:
    """A vLLM decode's exposition after `requests` requests of 1000 prompt and 200 output tokens;
    `drop`: a family (or one series) the scrape lacks; `started`: its process start time."""
    families = {
        "vllm:num_requests_running": "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 20",
        "vllm:prompt_tokens_total": f"# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total {requests * 1000}",
        "vllm:generation_tokens_total": f"# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total {requests * 200}",
        "vllm:inter_token_latency_seconds": (
            "# TYPE vllm:inter_token_latency_seconds histogram\n"
            f'vllm:inter_token_latency_seconds_bucket{{le="+Inf"}} {requests * 200}\n'
            f"vllm:inter_token_latency_seconds_sum {requests * 4}\n"
            f"vllm:inter_token_latency_seconds_count {requests * 200}"
        ),
        "vllm:request_success_total": (
            "# TYPE vllm:request_success_total counter\n"
            f'vllm:request_success_total{{finished_reason="stop"}} {requests * 0.75}'
            + ("" if drop == "length" else f'\nvllm:request_success_total{{finished_reason="length"}} {requests * 0.25}')
        ),
    }  # fmt: skip
    if started is not None:
        families["process"] = f"# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {started}"
    return "\n".join(v for k, v in families.items() if k != drop) + "\n"


def _rates(ticks: list[list[EngineSample | None]]) -> list[tuple[float, float, int, int]]:
    """(request rate, mean output tokens, unread, blind) each tick reads after the first, through
    `pair_with_previous` as the scaler's `RoleState` calls it, at 15 s ticks."""
    keys = [str(i) for i in range(len(ticks[0]))]
    seen = pair_with_previous({}, keys, ticks[0])
    out = []
    for samples in ticks[1:]:
        seen = pair_with_previous(seen.by_key, keys, samples, known=keys, before=seen.before)
        load = role_load(seen.prev, seen.cur, 15.0)
        out.append((load.request_rate, round(load.mean_output_tokens), seen.unread, seen.blind))
    return out


def test_a_scrape_missing_a_counter_family_is_unread_not_an_engine_restart() -> None:
    """Two decodes at 2 requests/s each after a day of work; one scrape of engine 0 lacks
    vllm:request_success_total. Read as 0, it looked like a restart: the day's requests became one
    interval's (77,510 replicas recommended), then the next complete scrape a second such spike.
    Now that scrape is unread (scale-down holds) and the next one has no baseline."""
    day = 86_400 * 2
    ticks = [
        [parse_engine_metrics(_vllm_text(day + 30 * t, drop="vllm:request_success_total" if (t, i) == (3, 0) else ""))
         for i in range(2)]
        for t in range(6)
    ]  # fmt: skip
    # Per tick: (req/s, mean output, unread, blind). Engines still running 20 add no arrivals.
    ok, alone, unread, blind = (4.0, 200, 0, 0), (2.0, 200), (1, 0), (0, 1)
    assert _rates(ticks) == [ok, ok, (*alone, *unread), (*alone, *blind), ok]
    assert ticks[3][0].counters is not None and "requests_total" not in ticks[3][0].counters
    assert ticks[3][1].counters is not None and "requests_total" in ticks[3][1].counters
    seen = pair_with_previous({"0": ticks[2][0]}, ["0"], [ticks[3][0]], known=["0"])
    assert (seen.unread, seen.broken, seen.stale) == (1, 1, 0)
    assert "incomplete" in seen.unread_why()


def test_a_counter_family_the_baseline_lacked_gives_no_baseline() -> None:
    """The scaler's first scrape of an engine lacked a family: the next complete one must not read
    the family's lifetime count as one interval's."""
    day = 86_400 * 2
    first = parse_engine_metrics(_vllm_text(day, drop="vllm:request_success_total"))
    then = [parse_engine_metrics(_vllm_text(day + 30 * t)) for t in (1, 2)]
    assert _rates([[first], [then[0]], [then[1]]]) == [(0.0, 0, 0, 1), (2.0, 200, 0, 0)]


def test_the_process_start_time_tells_a_restart_from_a_lost_series() -> None:
    """Where the engine says when its process started (vLLM with one API server), a counter going
    down in the same process is a series missing from the scrape: unread. A new start time is a
    restart, even when counters grew past their old values (all of them count from 0)."""
    old = parse_engine_metrics(_vllm_text(1000, started=1.7e9))
    lost = parse_engine_metrics(_vllm_text(1030, drop="length", started=1.7e9))  # requests_total down
    assert lost.requests_total < old.requests_total
    seen = pair_with_previous({"a": old}, ["a"], [lost], known=["a"])
    assert (seen.unread, seen.cur) == (1, [])
    assert role_load([old], [lost], 15.0).request_rate == 0.0  # unpaired by callers, not a restart
    assert seen.broken == 1 and old.started_at == 1.7e9 and lost.counters == old.counters
    # The same drop without start times (SGLang, Prometheus): a restart, as before.
    bare = [replace(s, started_at=None) for s in (old, lost)]
    assert pair_with_previous({"a": bare[0]}, ["a"], [bare[1]], known=["a"]).broken == 0
    # A restart 15 s ago whose engine then served 1,200 requests (more than the old one's 1,000).
    new = parse_engine_metrics(_vllm_text(1200, started=1.7e9 + 600))
    seen = pair_with_previous({"a": old}, ["a"], [new], known=["a"])
    assert (seen.unread, seen.blind) == (0, 0)
    # 1,200 finished and 20 in the engine, all since the restart.
    assert role_load(seen.prev, seen.cur, 15.0).request_rate == pytest.approx(1220 / 15)


def test_a_real_restart_with_every_family_present_still_counts_from_zero() -> None:
    """Every family present, every counter back near 0: a restart, read as before."""
    old = parse_engine_metrics(_vllm_text(100_000))
    new = parse_engine_metrics(_vllm_text(150))
    seen = pair_with_previous({"a": old}, ["a"], [new], known=["a"])
    assert (seen.unread, seen.blind) == (0, 0)
    load = role_load(seen.prev, seen.cur, 15.0)
    assert load.request_rate == pytest.approx((150 + 20) / 15)  # finished + running since the restart
    assert load.mean_output_tokens == pytest.approx(200.0)


def test_a_sample_older_than_the_age_bound_is_unread_as_stale() -> None:
    """Prometheus stopped scraping at 30 s but keeps answering with the last samples: the scaler
    repeats their interval for a while (a slow scrape is not a lull), then reads them as stale
    (unread: scale-down holds) instead of sizing the role on minutes-old load."""
    st = RoleState()
    at = {0.0: 0.0, 15.0: 15.0}
    reads = []
    for now in (0.0, 15.0, 30.0, 45.0, 30.0 + MAX_SAMPLE_AGE_S, 45.0 + MAX_SAMPLE_AGE_S):
        sample = EngineSample("vllm", requests_total=10 * at.get(now, 30.0), at=at.get(now, 30.0))
        seen, last = st.read(["a"], [sample], (), now, now)
        if last is not None:
            reads.append((seen.unread, seen.repeated))
    assert reads == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0)]
    assert seen.stale == 1
    assert "stale" in seen.unread_why() and f"{MAX_SAMPLE_AGE_S:.0f}s" in seen.unread_why()
    # A source without scrape times (a direct scrape) has nothing to age.
    assert pair_with_previous({}, ["a"], [EngineSample("vllm")], wall=1e12).unread == 0


@pytest.mark.parametrize("scrape_every", [60.0, 150.0, 240.0])
def test_a_scrape_interval_longer_than_the_age_bound_still_reads_every_tick(scrape_every: float) -> None:
    """A Prometheus scraping every 150 s left samples older than the fixed 120 s bound for part of
    every interval. Read as stale, they dropped the engine's baseline, so the next new sample had
    nothing to pair with and every tick held the scale-down for good. The bound now spans two of the
    engine's own scrape intervals (up to Prometheus's 5 min lookback), and a stale tick keeps the
    baseline for the next new sample."""
    ticks = [15.0 * i for i in range(1, 200)]
    st = RoleState()
    reads = []
    for now, samples in _prometheus_ticks(scrape_every, [0.0, 40.0], ticks):
        seen, last = st.read(["a", "b"], samples, (), now, now)
        if last is not None:
            reads.append(
                (now, seen.unread, seen.blind, role_load(seen.prev, seen.cur, now - last).request_rate)
            )
    warm = [r for r in reads if r[0] > 3 * scrape_every]  # two scrapes of each engine seen
    assert warm and all((unread, blind) == (0, 0) for _, unread, blind, _ in warm), warm[:5]
    assert all(rate == pytest.approx(20.0) for *_, rate in warm)


def test_a_stale_tick_keeps_the_baseline_for_the_next_new_sample() -> None:
    """An engine's first interval is unknown, so its first long gap reads stale under the fixed
    bound; the sample after it is still read against the baseline, over the time between them."""
    a0 = EngineSample("vllm", requests_total=0, at=0.0)
    first = pair_with_previous({}, ["a"], [a0], wall=0.0)
    stale = pair_with_previous(first.by_key, ["a"], [a0], before=first.before, wall=MAX_SAMPLE_AGE_S + 1)
    assert (stale.unread, stale.stale) == (1, 1)
    a1 = EngineSample("vllm", requests_total=1500, at=150.0)
    after = pair_with_previous(stale.baselines, ["a"], [a1], before=stale.before, wall=151.0)
    assert (after.unread, after.blind) == (0, 0)
    assert role_load(after.prev, after.cur, 15.0).request_rate == pytest.approx(10.0)


@pytest.mark.parametrize("order", [("5", "NaN"), ("NaN", "5")])
def test_a_nan_repeat_of_an_sglang_rank_gauge_reads_the_same_in_either_order(order: tuple[str, str]) -> None:
    """helper-75 M5: max() with a NaN depends on the order, so one order read 5 and the other
    refused the whole scrape (the engine unread, scale-down held)."""
    text = (
        "# TYPE sglang:num_requests counter\nsglang:num_requests_total 10\n# TYPE sglang:num_running_reqs gauge\n"
        f'sglang:num_running_reqs{{dp_rank="0",tp_rank="0"}} {order[0]}\n'
        f'sglang:num_running_reqs{{dp_rank="0",tp_rank="1"}} {order[1]}\n'
    )
    assert parse_engine_metrics(text).running == 5.0

"""The proxy's engine-progress bookkeeping for non-streamed answers (pure)."""

from __future__ import annotations

import pytest

from pdorch.proxy.progress import ProgressWatch, step_tokens
from pdorch.sim.metrics import EngineSnapshot, SglangMetrics, VllmMetrics

pytestmark = pytest.mark.unit

SNAP = EngineSnapshot(
    running=1, waiting=0, kv_usage=0.1, used_tokens=10, max_tokens=100, num_blocks=10, block_size=16
)


def test_step_tokens_sums_both_counters_across_label_sets() -> None:
    text = (
        b"# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n"
        b"# TYPE vllm:prompt_tokens_total counter\n"
        b'vllm:prompt_tokens_total{engine="0",model_name="a b"} 120.0\n'
        b'vllm:prompt_tokens_total{engine="1",model_name="a b"} 30.0\n'
        b'vllm:prompt_tokens_total_created{engine="0",model_name="a b"} 1.7e9\n'
        b"vllm:generation_tokens_total 7\n"
        b'vllm:request_success_total{finished_reason="stop"} 3.0\n'
    )
    assert step_tokens(text) == 157.0


def test_step_tokens_reads_sglangs_scheduler_counter_not_its_completion_counters() -> None:
    text = (
        b'sglang:generation_tokens_total{model_name="m"} 5.0\n'
        b'sglang:prompt_tokens_total{model_name="m"} 50.0\n'
        b'sglang:realtime_tokens_total{model_name="m",mode="prefill_compute"} 300.0\n'
        b'sglang:realtime_tokens_total{model_name="m",mode="decode"} 12.0\n'
    )
    assert step_tokens(text) == 312.0


def test_step_tokens_is_none_without_progress_counters() -> None:
    assert step_tokens(b"") is None
    assert step_tokens(b'sglang:generation_tokens_total{model_name="m"} 5.0\n') is None
    assert step_tokens(b"<html>not metrics</html>") is None


def test_step_tokens_reads_the_value_not_a_trailing_timestamp() -> None:
    text = (
        b'vllm:prompt_tokens_total{model_name="m } x"} 100 1700000000000\n'
        b"vllm:generation_tokens_total 5.0e+00 1700000000000\r\n"
    )
    assert step_tokens(text) == 105.0


def test_step_tokens_reads_the_simulated_engines_and_moves_per_token() -> None:
    m = VllmMetrics("m", lambda: SNAP)
    before = step_tokens(m.render())
    m.token(100)
    m.token(0)
    assert before == 0.0 and step_tokens(m.render()) == 102.0
    g = SglangMetrics("m", lambda: SNAP, "decode")
    assert step_tokens(g.render()) == 0.0
    g.token(100)
    g.token(0)
    assert step_tokens(g.render()) == 102.0


def test_a_wait_is_sampled_only_after_half_the_limit() -> None:
    w = ProgressWatch(silence_s=10.0)
    w.started("d", "http://d", "a", now=0.0)
    assert w.due(4.9) == []
    assert w.due(5.0) == [("d", "http://d")]


def test_waits_fail_after_the_limit_without_progress_and_only_the_old_ones() -> None:
    w = ProgressWatch(silence_s=10.0)
    w.started("d", "http://d", "old", now=0.0)
    assert w.observe("d", 50.0, now=5.0) == []  # first sample: the baseline
    w.started("d", "http://d", "young", now=8.0)
    assert w.observe("d", 50.0, now=14.9) == []
    assert w.observe("d", 50.0, now=15.0) == ["old"]  # 10 s since the baseline, no movement
    assert w.observe("d", 50.0, now=17.9) == []  # "young" waited 9.9 s
    assert w.observe("d", 50.0, now=18.0) == ["young"]
    assert w.engines == {}  # nothing left to watch


def test_progress_resets_the_clock_and_unreadable_metrics_do_not() -> None:
    w = ProgressWatch(silence_s=10.0)
    w.started("d", "http://d", "a", now=0.0)
    w.observe("d", 1.0, now=5.0)
    assert w.observe("d", 2.0, now=14.0) == []  # moved at 14
    assert w.observe("d", None, now=23.9) == []
    assert w.observe("d", None, now=24.0) == ["a"]  # still no sign of progress since 14


def test_an_ended_wait_is_forgotten_with_its_engine_baseline() -> None:
    w = ProgressWatch(silence_s=10.0)
    w.started("d", "http://d", "a", now=0.0)
    w.observe("d", 1.0, now=5.0)
    w.ended("d", "a")
    assert w.engines == {}
    w.started("d", "http://d", "b", now=20.0)
    # A fresh baseline: the stand-still before "b" started does not count against it.
    assert w.observe("d", 1.0, now=25.0) == []
    assert w.observe("d", 1.0, now=34.9) == []
    w.ended("d", "missing")  # unknown waits and engines are ignored
    w.ended("x", "b")
    assert w.observe("x", 1.0, now=40.0) == []


def test_an_engine_whose_counters_were_never_read_is_not_judged() -> None:
    w = ProgressWatch(silence_s=10.0)
    w.started("d", "http://d", "a", now=0.0)
    for t in (5.0, 15.0, 100.0):
        assert w.observe("d", None, now=t) == []
    assert w.observe("d", 3.0, now=101.0) == []  # the first reading is the baseline
    assert w.observe("d", None, now=111.0) == ["a"]

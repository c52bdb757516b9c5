"""Parse one engine's Prometheus text exposition into an `EngineSample` (pure, no I/O).

Both engines' real metric names are understood: vLLM V1 (`vllm:` prefix) and SGLang (`sglang:`
prefix), the names `pdorch sim` exports. Counters and histogram sums/counts are cumulative; the
scaler turns two samples into rates (`pdorch.scaler.observe`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class EngineSample:
    """Cumulative counters and live gauges of one engine at one scrape."""

    engine: str  # "vllm" or "sglang"
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1
    # Requests the engine holds that are not load: an SGLang prefill's, waiting for their decode to
    # connect or to take the KV. Read only to tell whether the engine is drained.
    held: float = 0.0
    requests_total: float = 0.0  # finished requests
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    itl_sum_s: float = 0.0
    itl_count: float = 0.0
    kv_capacity_tokens: float = 0.0  # 0 when the engine does not say
    # vLLM's per-request length histograms (observed when a request ends): sums and their count.
    # Its token counters move every step, so dividing them by finished requests skews the means
    # while the rate changes; these do not.
    finished_prompt_tokens: float = 0.0
    finished_output_tokens: float = 0.0
    finished_lengths_count: float = 0.0
    # When the engine was scraped (Unix seconds), where the source knows it: Prometheus keeps each
    # sample's scrape time. None for a direct scrape, which happens at the scaler's own tick.
    at: float | None = None
    # The counter fields (`COUNTER_FIELDS`) whose metric families the exposition held; None: not
    # known (a sample built by hand). A family missing from one scrape parses as 0, which must not
    # be read as the counter going back to 0 (`pdorch.scaler.observe`).
    counters: frozenset[str] | None = None
    # When the engine's process started (Unix seconds, `process_start_time_seconds`), where its
    # exposition says: vLLM's does when it runs one API server (prometheus_client's process
    # collector); SGLang's, vLLM's with several API servers (multiprocess mode) and pdorch sim's do
    # not, nor does the Prometheus source (not every pod's sidecar is told from the engine by it).
    started_at: float | None = None


# Cumulative fields: each counts from 0 when the engine starts and only grows while it runs.
COUNTER_FIELDS = (
    "requests_total",
    "prompt_tokens_total",
    "generation_tokens_total",
    "ttft_sum_s",
    "ttft_count",
    "itl_sum_s",
    "itl_count",
    "finished_prompt_tokens",
    "finished_output_tokens",
    "finished_lengths_count",
)


# Metric family name (as the parser reports it, i.e. without _total/_sum/_count) -> field.
_VLLM_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    # Older vLLM builds name the KV gauge gpu_cache_usage_perc.
    "vllm:gpu_cache_usage_perc": "kv_usage",
}
_SGLANG_GAUGES = {
    "sglang:num_running_reqs": "running",
    "sglang:num_queue_reqs": "waiting",
    # A P/D decode holds requests in queues of its own before they reach num_queue_reqs: waiting for
    # KV memory (prealloc) and for the KV to arrive (transfer). vLLM counts those as waiting too.
    # The prefill side's bootstrap/inflight queues are not prefill work (they wait on the decode),
    # but a prefill holding them still has requests whose KV a decode waits for: not drained.
    "sglang:num_decode_prealloc_queue_reqs": "waiting",
    "sglang:num_decode_transfer_queue_reqs": "waiting",
    "sglang:num_prefill_bootstrap_queue_reqs": "held",
    # Many SGLang releases name the prefill's bootstrap queue gauge this way (held only counts as
    # busy or not, so a release exporting both is not double-counted where it matters).
    "sglang:num_prefill_prealloc_queue_reqs": "held",
    "sglang:num_prefill_inflight_queue_reqs": "held",
    "sglang:token_usage": "kv_usage",
}
_COUNTERS = {
    "vllm:request_success": "requests_total",
    "vllm:prompt_tokens": "prompt_tokens_total",
    "vllm:generation_tokens": "generation_tokens_total",
    "sglang:num_requests": "requests_total",
    "sglang:prompt_tokens": "prompt_tokens_total",
    "sglang:generation_tokens": "generation_tokens_total",
}
# Histogram family -> (field of its _sum, field of its _count; None: the count is not read).
_HISTOGRAMS: dict[str, tuple[str, str | None]] = {
    "vllm:time_to_first_token_seconds": ("ttft_sum_s", "ttft_count"),
    "vllm:inter_token_latency_seconds": ("itl_sum_s", "itl_count"),
    # vLLM builds before inter_token_latency export the same histogram under this name only (later
    # ones export both, with the same values): read it when the newer one is absent.
    "vllm:time_per_output_token_seconds": ("itl_old_sum_s", "itl_old_count"),
    # Lengths per finished request (the two counts are the same requests: one is read).
    "vllm:request_prompt_tokens": ("finished_prompt_tokens", None),
    "vllm:request_generation_tokens": ("finished_output_tokens", "finished_lengths_count"),
    "sglang:time_to_first_token_seconds": ("ttft_sum_s", "ttft_count"),
    "sglang:inter_token_latency_seconds": ("itl_sum_s", "itl_count"),
    # ... and SGLang releases before inter_token_latency under this name.
    "sglang:time_per_output_token_seconds": ("itl_old_sum_s", "itl_old_count"),
}

# Gauges read for the KV cache size, each by a rule of its own (`parse_engine_metrics`).
VLLM_KV_INFO = "vllm:cache_config_info"  # its labels carry the size: num_gpu_blocks x block_size
SGLANG_KV_TOKENS = "sglang:max_total_num_tokens"
# prometheus_client's process collector: read for `EngineSample.started_at` (direct scrapes only).
PROCESS_START = "process_start_time_seconds"
# SGLang's per-scheduler gauges read per data-parallel rank (`_per_data_parallel_rank`), and the
# labels that tell the ranks apart: a source that rewrites the series must keep them.
SGLANG_PER_RANK = (*(n for n, f in _SGLANG_GAUGES.items() if f != "kv_usage"), SGLANG_KV_TOKENS)
SGLANG_RANK_LABELS = ("dp_rank", "tp_rank", "pp_rank")


def read_series() -> dict[str, str]:
    """Every exposition series this parser reads, with its family type (`# TYPE`): what a source
    that does not scrape the engines itself (Prometheus) must fetch."""
    gauges = [*_VLLM_GAUGES, *_SGLANG_GAUGES, VLLM_KV_INFO, SGLANG_KV_TOKENS]
    return (
        dict.fromkeys(gauges, "gauge")
        | {f"{name}_total": "counter" for name in _COUNTERS}
        | {f"{name}{part}": "histogram" for name in _HISTOGRAMS for part in ("_sum", "_count")}
    )


class MetricsParseError(ValueError):
    """The text is not Prometheus exposition format or has no engine metrics."""


def _label_product(labels: dict[str, str], a: str, b: str) -> float | None:
    """The product of two numeric labels; None when either is absent, not a number (some vLLM
    builds export ``num_gpu_blocks="None"`` before the cache is profiled) or not a positive size."""
    try:
        product = float(labels[a]) * float(labels[b])
    except (KeyError, ValueError):
        return None
    return product if math.isfinite(product) and product > 0 else None


def _per_data_parallel_rank(samples: Sequence[Sample], name: str) -> float:
    """An SGLang scheduler gauge: one series per data-parallel rank, and with
    --enable-metrics-for-all-schedulers also one per tensor/pipeline rank, which run the same batch
    and pool and so repeat the value: summed over data-parallel ranks, counted once within one."""
    per_dp: dict[str, float] = {}
    for smp in samples:
        if smp.name == name:
            dp = smp.labels.get("dp_rank", "")
            # A NaN never wins (max() with a NaN depends on the series' order): the repeats of one
            # rank then agree whatever order the engine wrote them in.
            if dp not in per_dp or math.isnan(per_dp[dp]) or smp.value > per_dp[dp]:
                per_dp[dp] = smp.value
    return sum(per_dp.values())


def parse_engine_metrics(text: str) -> EngineSample:
    """Sum every series (all label sets) of the known vLLM/SGLang metrics into one sample."""
    values: dict[str, float] = {}
    engine = ""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        raise MetricsParseError(f"not Prometheus text exposition format: {e}") from e
    for fam in families:
        name = fam.name
        if name.startswith("vllm:"):
            engine = engine or "vllm"
        elif name.startswith("sglang:"):
            engine = engine or "sglang"
        if name in _VLLM_GAUGES or name in _SGLANG_GAUGES:
            field = _VLLM_GAUGES.get(name) or _SGLANG_GAUGES[name]
            vals = [s.value for s in fam.samples if s.name == name]
            if not vals:
                continue
            # KV usage is a fraction per engine: average the label sets (and of two names for it, the
            # last read wins); counts add up, also across families (SGLang's decode queues).
            if field == "kv_usage":
                values[field] = sum(vals) / len(vals)
            elif name in _SGLANG_GAUGES:
                values[field] = values.get(field, 0.0) + _per_data_parallel_rank(fam.samples, name)
            else:
                values[field] = values.get(field, 0.0) + sum(vals)
        elif name in _COUNTERS:
            values[_COUNTERS[name]] = sum(s.value for s in fam.samples if s.name.endswith("_total"))
        elif name in _HISTOGRAMS:
            sum_field, count_field = _HISTOGRAMS[name]
            values[sum_field] = sum(s.value for s in fam.samples if s.name == name + "_sum")
            if count_field is not None:
                values[count_field] = sum(s.value for s in fam.samples if s.name == name + "_count")
        elif name == VLLM_KV_INFO:
            # One series per engine core (data-parallel rank, label `engine`), each with the whole
            # server's block count (vLLM sums its engines' into the config it exports): take one.
            sizes = [
                c for s in fam.samples if (c := _label_product(s.labels, "num_gpu_blocks", "block_size"))
            ]
            if sizes:
                values["kv_capacity_tokens"] = max(sizes)
        elif name == SGLANG_KV_TOKENS:
            if any(smp.name == name for smp in fam.samples):
                values["kv_capacity_tokens"] = _per_data_parallel_rank(fam.samples, name)
        elif name == PROCESS_START:
            # One process serves the port: several series would not say which one restarted.
            starts = [s.value for s in fam.samples if s.name == name]
            if len(starts) == 1:
                values["started_at"] = starts[0]
    if not engine:
        raise MetricsParseError("no vllm: or sglang: metrics in the scraped text")
    has_old_itl = "itl_old_count" in values
    old_sum, old_count = values.pop("itl_old_sum_s", 0.0), values.pop("itl_old_count", 0.0)
    if "itl_count" not in values and has_old_itl:
        values["itl_sum_s"], values["itl_count"] = old_sum, old_count
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if bad:
        # One NaN or Inf would turn a rate or a replica count into nonsense: refuse the scrape.
        raise MetricsParseError(f"non-finite values for {', '.join(bad)}")
    counters = frozenset(f for f in COUNTER_FIELDS if f in values)
    return EngineSample(engine=engine, counters=counters, **values)

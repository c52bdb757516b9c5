"""Prometheus metrics of one simulated engine, with the real vLLM (`vllm:`) and SGLang (`sglang:`) names.

Each engine owns a `CollectorRegistry`, so one process serving many pod IPs exposes per-pod metrics on
each pod's own `/metrics`. Counters and histograms are updated by the engine as requests finish; gauges
are read from the engine's live state at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries (seconds) for the request latency histograms.
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# vLLM's 1-2-5 buckets for request lengths in tokens (up to a 16k-token context here).
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
XFER_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
# fmt: on


@dataclass(frozen=True)
class EngineSnapshot:
    """Live engine state read at scrape time."""

    running: int
    waiting: int
    kv_usage: float  # 0..1
    used_tokens: int
    max_tokens: int
    num_blocks: int
    block_size: int
    bootstrap_queue: int = 0  # SGLang prefill waiting for its decode
    transfer_queue: int = 0  # decode waiting for KV
    # The scheduler's own waiting queue, without the requests waiting for remote KV (which `waiting`
    # includes, as vLLM counts them): SGLang's num_queue_reqs. None: same as `waiting`.
    queued: int | None = None


@dataclass(frozen=True)
class FinishedRequest:
    """What the engine reports when a request leaves it (normally or aborted)."""

    finish_reason: str  # stop | length | abort
    prompt_tokens: int
    generation_tokens: int
    ttft_s: float | None
    e2e_s: float
    itls_s: Sequence[float]
    queue_s: float


class _StateCollector(Collector):
    """Turns an `EngineSnapshot` into gauge families at scrape time."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterable[Metric]:
        return self._build()


class EngineMetrics:
    """Common interface; `VllmMetrics` and `SglangMetrics` provide the real names."""

    def __init__(self, model: str, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.model = model
        self.snapshot = snapshot
        self.registry = CollectorRegistry(auto_describe=True)

    def _register_state(self) -> None:
        # Called last by subclasses: registering collects once, which needs their attributes.
        self.registry.register(_StateCollector(self._gauges))

    def _gauges(self) -> Iterable[Metric]:
        raise NotImplementedError

    def finished(self, req: FinishedRequest) -> None:
        """Record a request that left the engine."""
        raise NotImplementedError

    def token(self, prompt_tokens: int) -> None:
        """Record one generated token (`prompt_tokens` > 0 on a sequence's first: its prompt is
        done). Engines whose token counters move per step override this."""

    def kv_transfer(self, seconds: float, nbytes: int) -> None:
        """Record one KV transfer (pull on vLLM decode, push on SGLang prefill)."""
        raise NotImplementedError

    def handshake(self, outcome: str) -> None:
        """Record one P/D handshake outcome on this engine (simulator-specific counter)."""
        self._handshakes.labels(outcome=outcome).inc()

    def render(self) -> bytes:
        """Prometheus text exposition of this engine."""
        return generate_latest(self.registry)

    def _handshake_counter(self) -> None:
        # Simulator-only counter so tests can see which side of a P/D handshake an engine took part in.
        self._handshakes = Counter(
            "pdorch_sim_pd_handshakes",
            "P/D handshake steps seen by this simulated engine, by outcome.",
            ["outcome"],
            registry=self.registry,
        )


class VllmMetrics(EngineMetrics):
    """vLLM V1 metric names (`vllm:` prefix, `model_name` label)."""

    def __init__(self, model: str, snapshot: Callable[[], EngineSnapshot]) -> None:
        super().__init__(model, snapshot)
        r = self.registry
        labels = ["model_name", "engine"]  # vLLM V1 labels every metric with its engine index
        self._lv = (model, "0")
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        # vLLM creates its per-engine series at start-up: the token counters read 0, not absent.
        self.prompt_tokens.labels(*self._lv)
        self.generation_tokens.labels(*self._lv)
        self.success = Counter(
            "vllm:request_success",
            "Count of finished requests by finish reason.",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Inter-token latency.",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        # Observed when a request ends (unlike the token counters, which move every step).
        self.request_prompt = Histogram(
            "vllm:request_prompt_tokens",
            "Prompt tokens per finished request.",
            labels,
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.request_generation = Histogram(
            "vllm:request_generation_tokens",
            "Generated tokens per finished request.",
            labels,
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Time spent waiting in the queue.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.xfer = Histogram(
            "vllm:nixl_xfer_time_seconds", "NIXL KV transfer time.", labels, buckets=XFER_BUCKETS, registry=r
        )
        self.xfer_bytes = Counter(
            "vllm:nixl_bytes_transferred", "Bytes moved by NIXL KV transfers.", labels, registry=r
        )
        self._handshake_counter()
        for reason in ("stop", "length", "abort"):
            self.success.labels(*self._lv, reason)  # expose zeros, as vLLM does
        self._register_state()

    def _gauges(self) -> Iterable[Metric]:
        s = self.snapshot()
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", s.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name", "engine"])
            g.add_metric(list(self._lv), value)
            yield g
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the KV cache config.",
            labels=["engine", "block_size", "num_gpu_blocks"],
        )
        info.add_metric(["0", str(s.block_size), str(s.num_blocks)], 1.0)
        yield info

    def token(self, prompt_tokens: int) -> None:
        # vLLM V1 counts tokens per engine step (iteration stats), not when a request ends: a long
        # generation moves the counters while it runs (the proxy's progress check relies on it).
        m = self._lv
        if prompt_tokens:
            self.prompt_tokens.labels(*m).inc(prompt_tokens)
        self.generation_tokens.labels(*m).inc()

    def finished(self, req: FinishedRequest) -> None:
        m = self._lv
        self.request_prompt.labels(*m).observe(req.prompt_tokens)
        self.request_generation.labels(*m).observe(req.generation_tokens)
        self.success.labels(*m, req.finish_reason).inc()
        if req.ttft_s is not None:
            self.ttft.labels(*m).observe(req.ttft_s)
        for itl in req.itls_s:
            self.itl.labels(*m).observe(itl)
        self.e2e.labels(*m).observe(req.e2e_s)
        self.queue.labels(*m).observe(req.queue_s)

    def kv_transfer(self, seconds: float, nbytes: int) -> None:
        self.xfer.labels(*self._lv).observe(seconds)
        self.xfer_bytes.labels(*self._lv).inc(nbytes)


class SglangMetrics(EngineMetrics):
    """SGLang metric names (`sglang:` prefix, `model_name` and `engine_type` labels)."""

    def __init__(self, model: str, snapshot: Callable[[], EngineSnapshot], engine_type: str) -> None:
        super().__init__(model, snapshot)
        self.engine_type = engine_type
        r = self.registry
        labels = ["model_name", "engine_type"]
        self._lv = (model, engine_type)
        self.prompt_tokens = Counter(
            "sglang:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "sglang:generation_tokens", "Number of generation tokens processed.", labels, registry=r
        )
        self.requests = Counter("sglang:num_requests", "Number of requests processed.", labels, registry=r)
        # The scheduler's progress counter (newer SGLang): moves while requests run, unlike the two
        # above, which count a request's tokens when it ends.
        self.realtime_tokens = Counter(
            "sglang:realtime_tokens",
            "Tokens processed by the scheduler, by mode.",
            ["model_name", "mode"],
            registry=r,
        )
        for mode in ("prefill_compute", "decode"):
            self.realtime_tokens.labels(model, mode)
        self.aborted = Counter(
            "sglang:num_aborted_requests", "Number of aborted requests.", labels, registry=r
        )
        self.bootstrap_failed = Counter(
            "sglang:num_bootstrap_failed_reqs", "Number of bootstrap failures.", labels, registry=r
        )
        self.transfer_failed = Counter(
            "sglang:num_transfer_failed_reqs", "Number of KV transfer failures.", labels, registry=r
        )
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds",
            "Inter-token latency.",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "sglang:queue_time_seconds",
            "Time spent waiting in the queue.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.xfer_ms = Histogram(
            "sglang:kv_transfer_latency_ms",
            "KV transfer latency (ms).",
            labels,
            buckets=tuple(b * 1000 for b in XFER_BUCKETS),
            registry=r,
        )
        self._handshake_counter()
        self._register_state()

    def _gauges(self) -> Iterable[Metric]:
        s = self.snapshot()
        labels = ["model_name", "engine_type"]
        for name, doc, value in (
            ("sglang:num_running_reqs", "The number of running requests.", s.running),
            (
                "sglang:num_queue_reqs",
                "The number of requests in the waiting queue.",
                s.waiting if s.queued is None else s.queued,
            ),
            ("sglang:token_usage", "The token usage (KV cache fraction).", s.kv_usage),
            ("sglang:num_used_tokens", "The number of used tokens.", s.used_tokens),
            ("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV pool.", s.max_tokens),
            ("sglang:cache_hit_rate", "The prefix cache hit rate.", 0.0),
            (
                "sglang:num_prefill_bootstrap_queue_reqs",
                "Prefill requests waiting for bootstrap.",
                s.bootstrap_queue,
            ),
            (
                "sglang:num_decode_transfer_queue_reqs",
                "Decode requests waiting for KV transfer.",
                s.transfer_queue,
            ),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(list(self._lv), value)
            yield g
        info = GaugeMetricFamily(
            "sglang:cache_config_info", "KV cache configuration.", labels=["page_size", "num_pages"]
        )
        info.add_metric([str(s.block_size), str(s.num_blocks)], 1.0)
        yield info

    def token(self, prompt_tokens: int) -> None:
        if prompt_tokens:
            self.realtime_tokens.labels(self.model, "prefill_compute").inc(prompt_tokens)
        self.realtime_tokens.labels(self.model, "decode").inc()

    def finished(self, req: FinishedRequest) -> None:
        lv = self._lv
        self.prompt_tokens.labels(*lv).inc(req.prompt_tokens)
        self.generation_tokens.labels(*lv).inc(req.generation_tokens)
        self.requests.labels(*lv).inc()
        if req.finish_reason == "abort":
            self.aborted.labels(*lv).inc()
        if req.ttft_s is not None:
            self.ttft.labels(*lv).observe(req.ttft_s)
        for itl in req.itls_s:
            self.itl.labels(*lv).observe(itl)
        self.e2e.labels(*lv).observe(req.e2e_s)
        self.queue.labels(*lv).observe(req.queue_s)

    def kv_transfer(self, seconds: float, nbytes: int) -> None:
        self.xfer_ms.labels(*self._lv).observe(seconds * 1000)

    def bootstrap_failure(self) -> None:
        """Count a prefill/decode whose bootstrap rendezvous failed (timeout, duplicate room)."""
        self.bootstrap_failed.labels(*self._lv).inc()

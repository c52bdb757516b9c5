"""Prometheus metrics of one proxy (own registry, so several proxies can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 1 ms .. 240 s, like the SGLang gateway's duration buckets.
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 240)


def _memoise_labels(metric: Any) -> dict[tuple[str, ...], Any]:
    """Make ``metric.labels(...)`` a dict lookup after the first call for a label set.

    prometheus_client validates and locks on every `labels()` call; the proxy makes about a dozen
    per request. ``remove`` and ``clear`` forget the memo too: a series removed (an endpoint gone)
    must come back when its label set is used again (the endpoint is back at the same address)."""
    children: dict[tuple[str, ...], Any] = {}
    make, remove, clear = metric.labels, metric.remove, metric.clear

    def labels(*values: str) -> Any:
        child = children.get(values)
        if child is None:
            child = children[values] = make(*values)
        return child

    def remove_child(*values: str) -> None:
        children.pop(values, None)
        remove(*values)

    def clear_all() -> None:
        children.clear()
        clear()

    metric.labels, metric.remove, metric.clear = labels, remove_child, clear_all
    return children


class ProxyMetrics:
    """Every metric the proxy exports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pdorch_proxy_requests",
            "Client requests by route and final HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "pdorch_proxy_time_to_first_byte_seconds",
            "End-to-end time from request arrival to the first response byte sent to the client "
            "(streaming: the proxy's TTFT, including the prefill leg).",
            ["route", "mode"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "pdorch_proxy_request_duration_seconds",
            "End-to-end request duration.",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.prefill = Histogram(
            "pdorch_proxy_prefill_duration_seconds",
            "Prefill leg: dispatch to complete prefill response.",
            ["engine"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.decode_first_byte = Histogram(
            "pdorch_proxy_decode_first_byte_seconds",
            "Decode leg: dispatch to its first body byte.",
            ["engine", "mode"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.handoff = Histogram(
            "pdorch_proxy_kv_handoff_seconds",
            "vLLM: prefill response to the decode's first byte (KV transfer plus first decode step); "
            "SGLang: dispatch of both legs to the decode's first byte.",
            ["engine"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "pdorch_proxy_endpoint_inflight", "In-flight legs per endpoint.", ["endpoint", "role"], registry=r
        )
        self.errors = Counter(
            "pdorch_proxy_endpoint_errors",
            "Failed legs per endpoint.",
            ["endpoint", "role", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "pdorch_proxy_retries",
            "Retries with a fresh pair, by the endpoint whose failure caused them.",
            ["endpoint", "role", "reason"],
            registry=r,
        )
        self.breaker = Gauge(
            "pdorch_proxy_breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            ["endpoint"],
            registry=r,
        )
        self.decisions = Counter(
            "pdorch_proxy_pd_decisions",
            "P/D decisions: mode pd|decode_only and why.",
            ["mode", "reason"],
            registry=r,
        )
        self.picks = Counter(
            "pdorch_proxy_policy_picks", "How the policy picked endpoints.", ["policy", "pick"], registry=r
        )
        self.no_params = Counter(
            "pdorch_proxy_prefill_without_kv_params",
            "vLLM prefill answers without kv_transfer_params (decode then prefills locally).",
            registry=r,
        )
        self.queue_depth = Gauge("pdorch_proxy_queue_depth", "Requests waiting for admission.", registry=r)
        self.active = Gauge("pdorch_proxy_active_requests", "Admitted requests in flight.", registry=r)
        self.prefill_queue_depth = Gauge(
            "pdorch_proxy_prefill_queue_depth",
            "Prompts waiting in the prefill queue for room on the prefill role (router.prefillQueue).",
            registry=r,
        )
        self.prefill_queue_wait = Histogram(
            "pdorch_proxy_prefill_queue_wait_seconds",
            "Time a prompt waited in the prefill queue (0 when there was room at once).",
            buckets=_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "pdorch_proxy_rejected",
            "Requests refused before reaching an engine, by reason.",
            ["reason"],
            registry=r,
        )
        self.endpoints = Gauge(
            "pdorch_proxy_endpoints",
            "Discovered endpoints by role and revision.",
            ["role", "revision"],
            registry=r,
        )
        self.request_timeouts = Counter(
            "pdorch_proxy_request_timeouts",
            "Requests cut by the proxy's own request timeout (not counted against any engine), by phase.",
            ["phase"],
            registry=r,
        )
        self.disconnects = Counter(
            "pdorch_proxy_client_disconnects",
            "Clients gone before the answer ended (legs cancelled).",
            registry=r,
        )
        # `endpoints` is cleared and refilled on every scrape, so its children are not memoised.
        self._errors_memo = _memoise_labels(self.errors)
        self._retries_memo = _memoise_labels(self.retries)
        for m in (
            self.requests,
            self.ttft,
            self.duration,
            self.prefill,
            self.decode_first_byte,
            self.handoff,
            self.inflight,
            self.breaker,
            self.decisions,
            self.picks,
            self.rejected,
        ):
            _memoise_labels(m)

    def counted_endpoints(self) -> set[str]:
        """The ``endpoint`` labels that have error or retry series."""
        return {k[0] for memo in (self._errors_memo, self._retries_memo) for k in memo}

    def forget_endpoint(self, label: str) -> None:
        """Remove every error and retry series of one endpoint label."""
        for metric, memo in ((self.errors, self._errors_memo), (self.retries, self._retries_memo)):
            for values in [k for k in memo if k[0] == label]:
                metric.remove(*values)

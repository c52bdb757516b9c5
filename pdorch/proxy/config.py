"""`ProxyConfig`: every setting of `pdorch proxy`, from CLI flags over ``PDORCH_ROUTER_CONFIG``.

``PDORCH_ROUTER_CONFIG`` is the JSON of the ServingGroup's ``spec.router`` (camelCase, as rendered by
the controller). An explicitly given CLI flag wins over the same setting in that JSON.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdorch.proxy.policies import Policy

ENV_ROUTER_CONFIG = "PDORCH_ROUTER_CONFIG"
ENV_API_KEY = "PDORCH_API_KEY"


class ProxyConfig(BaseModel):
    """Settings of one proxy process."""

    # inf or nan anywhere is a mistake (an infinite connect timeout crashed every request).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    engine: Literal["vllm", "sglang"]
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    # Discovery: either a group in a namespace (Kubernetes) or static URLs.
    group: str | None = None
    namespace: str | None = None
    kubeconfig: str | None = None
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    bootstrap_port: int | None = Field(None, ge=1, le=65535)  # default for static SGLang prefills
    policy: Policy = "least_load"
    api_key: str | None = None
    max_inflight: int = Field(256, ge=1)
    max_queue: int = Field(1024, ge=0)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    min_prompt_tokens: int = Field(0, ge=0)
    # Prefill queue (pdorch.proxy.prefill_queue): estimated prompt tokens in flight per prefill
    # engine (None = off: every prompt goes to an engine at once), and the TTFT target that orders
    # the waiting prompts.
    prefill_queue_tokens: int | None = Field(None, ge=1)
    prefill_queue_ttft_s: float = Field(2.0, gt=0)
    # ... and the wait after which a prompt goes first whatever its length (no starvation).
    prefill_queue_max_wait_s: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    retry_backoff_s: float = Field(0.05, ge=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    # Until an engine starts answering: the prefill leg, and a streamed answer's first bytes. A
    # non-streamed answer's first byte is its last, so its decode leg is bounded by the request
    # timeout instead (a long generation is not a silent engine), and also by the decode's progress
    # counters: standing still this long while it waits fails the leg (pdorch.proxy.progress).
    first_byte_timeout_s: float = Field(300.0, gt=0)
    request_timeout_s: float | None = Field(1800.0, gt=0)
    # Once an answer is being relayed, an engine silent this long fails it (checked by a watchdog,
    # not a timer per chunk): an engine that stalls or vanishes without a reset ends the stream.
    stream_idle_timeout_s: float | None = Field(60.0, gt=0)
    # Upstream silence between two reads (headers or body chunks) that fails a leg; None = no limit
    # (a long prefill queue may legitimately stay silent up to first_byte_timeout_s).
    upstream_idle_timeout_s: float | None = Field(None, gt=0)
    # Client side: a connection that sends no complete request head (idle keep-alive or slow
    # headers) is closed after this; a request body must arrive within body_timeout_s (else 408).
    client_idle_timeout_s: float = Field(75.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    # Serve /metrics on this separate port instead of the client port (None = on the client port).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    health_interval_s: float = Field(5.0, gt=0)
    health_timeout_s: float = Field(2.0, gt=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(10.0, ge=0)
    breaker_successes: int = Field(2, ge=1)
    models_ttl_s: float = Field(30.0, ge=0)
    # SIGTERM: the whole shutdown stays within shutdown_grace_s. For the first shutdown_drain_delay_s
    # of it the listener stays open while /health answers 503 "draining" and new requests get a 503,
    # so load balancers and endpoint updates move traffic away before connections are refused.
    shutdown_grace_s: float = Field(30.0, ge=0)
    shutdown_drain_delay_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _one_discovery(self) -> ProxyConfig:
        kube = self.group is not None or self.namespace is not None
        static = bool(self.prefill or self.decode)
        if kube and static:
            raise ValueError("use either --group/--namespace or --prefill/--decode, not both")
        if kube and not (self.group and self.namespace):
            raise ValueError("--group and --namespace go together")
        if not kube and not self.decode:
            raise ValueError("give --group and --namespace, or at least one --decode URL")
        if self.engine == "sglang" and self.min_prompt_tokens > 0:
            # The SGLang decode server aborts requests without bootstrap_room (HTTP 400).
            raise ValueError(
                "--min-prompt-tokens (conditional disaggregation) needs --engine vllm: an SGLang decode "
                "server refuses requests without bootstrap fields, so no prompt can skip the prefill"
            )
        if self.metrics_port is not None and self.metrics_port != 0 and self.metrics_port == self.port:
            raise ValueError(
                "--metrics-port must differ from --port (pass --metrics-on-client-port to serve /metrics on --port)"
            )
        return self

    @property
    def static(self) -> bool:
        """Static endpoints (no Kubernetes discovery)."""
        return self.group is None


def router_settings(raw: str | None) -> dict[str, Any]:
    """ProxyConfig fields from the ``spec.router`` JSON (unknown/absent keys ignored)."""
    if not raw:
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"{ENV_ROUTER_CONFIG} must be a JSON object")
    out: dict[str, Any] = {}
    if data.get("policy"):
        out["policy"] = data["policy"]
    cd = data.get("conditionalDisaggregation") or {}
    if cd.get("minPromptTokens") is not None:
        out["min_prompt_tokens"] = cd["minPromptTokens"]
    pq = data.get("prefillQueue") or {}
    if pq.get("maxInflightTokens") is not None:
        out["prefill_queue_tokens"] = pq["maxInflightTokens"]
    if pq.get("ttftSeconds") is not None:
        out["prefill_queue_ttft_s"] = pq["ttftSeconds"]
    if pq.get("maxWaitSeconds") is not None:
        out["prefill_queue_max_wait_s"] = pq["maxWaitSeconds"]
    t = data.get("timeouts") or {}
    for src, dst in (
        ("connectSeconds", "connect_timeout_s"),
        ("firstByteSeconds", "first_byte_timeout_s"),
        ("requestSeconds", "request_timeout_s"),
        ("streamIdleSeconds", "stream_idle_timeout_s"),
    ):
        if t.get(src) is not None:
            out[dst] = t[src]
    r = data.get("retries") or {}
    if r.get("maxRetries") is not None:
        out["max_retries"] = r["maxRetries"]
    return out


def build_config(flags: dict[str, Any], env: dict[str, str]) -> ProxyConfig:
    """Merge: defaults < ``PDORCH_ROUTER_CONFIG`` < explicit flags (None = not given)."""
    merged = router_settings(env.get(ENV_ROUTER_CONFIG))
    if env.get(ENV_API_KEY):
        merged["api_key"] = env[ENV_API_KEY]
    merged.update({k: v for k, v in flags.items() if v is not None})
    return ProxyConfig(**merged)

"""The proxy's metric set (pdorch.proxy.metrics): series removed with an endpoint come back with it."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from pdorch.proxy.metrics import ProxyMetrics

pytestmark = pytest.mark.unit


def _lines(m: ProxyMetrics, name: str) -> list[str]:
    return [ln for ln in generate_latest(m.registry).decode().splitlines() if ln.startswith(name + "{")]


def test_a_removed_series_is_exported_again_when_its_endpoint_comes_back() -> None:
    m = ProxyMetrics()
    ep = "http://127.0.0.1:8001"
    m.breaker.labels(ep).set(0)
    m.inflight.labels(ep, "prefill").inc()
    m.breaker.remove(ep)
    m.inflight.remove(ep, "prefill")
    assert _lines(m, "pdorch_proxy_breaker_state") == []
    assert _lines(m, "pdorch_proxy_endpoint_inflight") == []
    m.breaker.labels(ep).set(2)  # back at the same address, its breaker open
    m.inflight.labels(ep, "prefill").inc()
    assert _lines(m, "pdorch_proxy_breaker_state") == [f'pdorch_proxy_breaker_state{{endpoint="{ep}"}} 2.0']
    assert _lines(m, "pdorch_proxy_endpoint_inflight") == [
        f'pdorch_proxy_endpoint_inflight{{endpoint="{ep}",role="prefill"}} 1.0'
    ]
    m.breaker.clear()
    m.breaker.labels(ep).set(1)
    assert _lines(m, "pdorch_proxy_breaker_state") == [f'pdorch_proxy_breaker_state{{endpoint="{ep}"}} 1.0']

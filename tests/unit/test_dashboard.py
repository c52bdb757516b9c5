"""dashboards/pdorch.json only queries metrics pdorch exports, with labels they carry.

The exported set comes from pdorch's own metric objects: the controller's module-level metrics
(default registry, served on the controller's /metrics), a ProxyMetrics registry, and the simulated
engines' vLLM and SGLang registries (which mirror the real engines' names).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

import pdorch.controller.informer
import pdorch.controller.kubeapi
import pdorch.controller.leader
import pdorch.controller.manager
import pdorch.controller.reconciler
import pdorch.scaler.loop  # noqa: F401  (imports register the controller's and scaler's metrics)
from pdorch.proxy.metrics import ProxyMetrics
from pdorch.sim.metrics import EngineSnapshot, SglangMetrics, VllmMetrics

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).parents[2] / "dashboards" / "pdorch.json"
# Labels Prometheus adds to every scraped series (Kubernetes service discovery), and `le`.
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "container", "service", "endpoint", "le"})
PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
)
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}


def exported(registries: Iterable[CollectorRegistry]) -> dict[str, set[str]]:
    """{series name: label names} of every series the registries can expose."""
    out: dict[str, set[str]] = {}
    for reg in registries:
        wrappers = {
            getattr(c, "_name", None): set(getattr(c, "_labelnames", ()))
            for c in list(reg._collector_to_names)  # the metric objects, for labels of empty families
        }
        for fam in reg.collect():
            labels = set(wrappers.get(fam.name, set()))
            for s in fam.samples:
                labels |= set(s.labels) - {"le", "quantile"}
            for suffix in SUFFIXES[fam.type]:
                out.setdefault(fam.name + suffix, set()).update(labels)
    return out


def pdorch_metrics() -> dict[str, set[str]]:
    snap = EngineSnapshot(
        running=1, waiting=0, kv_usage=0.5, used_tokens=10, max_tokens=100, num_blocks=8, block_size=16
    )
    engines = [VllmMetrics("m", lambda: snap), SglangMetrics("m", lambda: snap, "prefill")]
    return exported([REGISTRY, ProxyMetrics().registry, *(e.registry for e in engines)])


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and query variables."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, labels used) per metric in a PromQL expression: matchers and by/without lists."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings may hold anything
    grouped = {
        lbl.strip()
        for m in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
        for lbl in m.group(1).split(",")
        if lbl.strip()
    }
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors like [$__rate_interval]
    out: list[tuple[str, set[str]]] = []
    # label_values(metric, label) is a Grafana function: the second argument is a label.
    lv = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", expr)
    if lv:
        return [(lv.group(1), {lv.group(2)})]
    for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?", expr):
        name, matchers, call = m.group(1), m.group(2), m.group(3)
        if call or name in PROMQL_WORDS or name.startswith("$"):
            continue
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or "")) | grouped
        out.append((name, labels))
    return out


def problems(exprs: Iterable[str], metrics: dict[str, set[str]]) -> list[str]:
    """Unknown metric names and labels a metric does not carry; empty when the dashboard is sound."""
    found = []
    for expr in exprs:
        sels = selectors(expr)
        if not sels:
            found.append(f"no metric in query: {expr}")
        carried = set(TARGET_LABELS)
        for name, _ in sels:
            carried |= metrics.get(name, set())
        for name, labels in sels:
            if name not in metrics:
                found.append(f"{name}: not exported by pdorch (query: {expr})")
            elif labels - carried:
                found.append(f"{name}: no label(s) {sorted(labels - carried)} (query: {expr})")
    return found


def test_every_dashboard_query_uses_exported_metrics_and_labels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = queries(dash)
    assert len(exprs) > 30
    assert problems(exprs, pdorch_metrics()) == []


def test_the_dashboard_covers_controller_proxy_and_engines() -> None:
    names = {n for e in queries(json.loads(DASHBOARD.read_text())) for n, _ in selectors(e)}
    assert any(n.startswith("pdorch_proxy_") for n in names)
    assert any(n.startswith("pdorch_reconcile") for n in names)
    assert "leader_election_master_status" in names
    assert any(n.startswith("vllm:") for n in names)
    assert any(n.startswith("sglang:") for n in names)


def test_panels_fit_the_grid_and_have_unique_ids() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("sum(rate(pdorch_proxy_request_total[5m]))", "pdorch_proxy_request_total: not exported"),
        ("rate(vllm:time_to_first_token_seconds[5m])", "vllm:time_to_first_token_seconds: not exported"),
        ("sum by (role) (rate(pdorch_proxy_requests_total[5m]))", "no label(s) ['role']"),
        ('pdorch_proxy_queue_depth{engine="vllm"}', "no label(s) ['engine']"),
        ("label_values(pdorch_proxy_requests_total, group)", "no label(s) ['group']"),
        ("vector(1)", "no metric in query"),
    ],
)
def test_the_checker_catches_bad_queries(expr: str, expected: str) -> None:
    found = problems([expr], pdorch_metrics())
    assert any(expected in f for f in found), found


def test_the_checker_accepts_what_pdorch_exports() -> None:
    ok = [
        'histogram_quantile(0.99, sum by (le, route) (rate(pdorch_proxy_request_duration_seconds_bucket{namespace="x"}[5m])))',
        "sum by (finished_reason) (rate(vllm:request_success_total[1m]))",
        "max by (engine_type) (sglang:num_queue_reqs)",
    ]
    assert problems(ok, pdorch_metrics()) == []

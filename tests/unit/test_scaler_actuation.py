"""The scaler's tick against an apiserver answering at the HTTP layer (no cluster): what a refused
write leaves behind."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx2
import pytest
import yaml

from pdorch.controller.kubeapi import KubeApi
from pdorch.proxy.endpoints import Endpoint
from pdorch.scaler import loop
from pdorch.scaler.loop import BuiltinScaler, ScalerConfig
from pdorch.scaler.scrape import EngineSample

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sim-pd" / "servinggroup.yaml"


class _Saturated:
    """A decode whose load grows every tick: the policy asks for more replicas each time."""

    def __init__(self) -> None:
        self.n = 0

    async def samples(self, _ns: str, eps: list[Endpoint]) -> list[EngineSample | None]:
        self.n += 1
        n = self.n
        return [
            EngineSample(
                engine="vllm",
                running=200 + 50 * n,
                waiting=50,
                kv_usage=0.9,
                requests_total=100 * n,
                generation_tokens_total=30000 * n,
                finished_prompt_tokens=100_000 * n,
                finished_output_tokens=30000 * n,
                finished_lengths_count=100 * n,
                itl_sum_s=0.05 * 30000 * n,
                itl_count=30000 * n,
            )
            for _ in eps
        ]


async def test_a_refused_scale_up_does_not_start_the_cooldown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first scale-up's /scale write meets a 409 (the object changed since the tick read it):
    nothing changed, so the next tick scales up instead of waiting out cooldownSeconds."""
    group = yaml.safe_load(EXAMPLE.read_text())
    group["metadata"]["namespace"] = "ns"
    for r in group["spec"]["roles"]:
        if r["name"] == "decode":
            r["scaling"] = {
                "mode": "Builtin",
                "maxReplicas": 50,
                "targets": {"tpotMs": 100},
                "cooldownSeconds": 60,
            }
    srs = {"apiVersion": "pdorch.io/v1alpha1", "kind": "ServingRoleScaler",
           "metadata": {"name": "sim-pd-decode", "namespace": "ns", "resourceVersion": "1"}, "spec": {"replicas": 1}}  # fmt: skip
    pod = {"metadata": {"name": "sim-pd-decode-0", "namespace": "ns", "annotations": {}, "labels": {
               "pdorch.io/group": "sim-pd", "pdorch.io/role": "decode", "pdorch.io/role-type": "decode",
               "leaderworkerset.sigs.k8s.io/worker-index": "0", "leaderworkerset.sigs.k8s.io/group-index": "0"}},
           "status": {"podIP": "127.0.0.5", "phase": "Running",
                      "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}],
                      "containerStatuses": [{"name": "engine", "state": {"running": {"startedAt": "2020-01-01T00:00:00Z"}}}]}}  # fmt: skip
    written: list[int] = []
    refuse = [True]

    def handler(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if request.method == "GET" and path.endswith("/servinggroups"):
            return httpx2.Response(200, json={"metadata": {"resourceVersion": "1"}, "items": [group]})
        if request.method == "GET" and path.endswith("/pods"):
            decode = "decode" in request.url.params.get("labelSelector", "")
            return httpx2.Response(
                200, json={"metadata": {"resourceVersion": "1"}, "items": [pod] if decode else []}
            )
        if request.method == "GET" and path.endswith("/servingrolescalers/sim-pd-decode"):
            return httpx2.Response(200, json=copy.deepcopy(srs))
        if request.method == "PATCH" and path.endswith("/scale"):
            if refuse[0]:
                refuse[0] = False
                return httpx2.Response(409, json={"kind": "Status", "code": 409, "reason": "Conflict"})
            srs["spec"]["replicas"] = json.loads(request.content)["spec"]["replicas"]
            srs["metadata"]["resourceVersion"] = str(int(srs["metadata"]["resourceVersion"]) + 1)
            written.append(srs["spec"]["replicas"])
            return httpx2.Response(200, json={})
        if request.method == "GET":
            return httpx2.Response(404, json={"kind": "Status", "code": 404, "reason": "NotFound"})
        return httpx2.Response(200, json={})

    clock = [1000.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    api = KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://k8s.invalid"))
    scaler = BuiltinScaler(api, ScalerConfig(namespace="ns", interval_s=15), source=_Saturated())
    targets: list[tuple[int, int]] = []
    for _ in range(3):
        decided = [d for d in await scaler.tick() if d.role == "decode"]
        targets += [(d.current, d.target) for d in decided]
        clock[0] += 15
    await api.close()
    assert not refuse[0], "the first scale-up was never refused: the test did not exercise the conflict"
    assert written, f"no scale-up after the refused one: {targets}"


async def test_a_hold_on_stale_samples_says_they_are_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two quiet decodes read through Prometheus, which stops scraping the second at 15 s but keeps
    answering with its last sample. The policy wants 1 replica (minReplicas keeps 2, so no drain
    starts); once that sample is older than the age bound the tick holds for unread leaders and
    says they are stale (the sample's last interval was repeated without an age limit before)."""
    group = yaml.safe_load(EXAMPLE.read_text())
    group["metadata"]["namespace"] = "ns"
    for r in group["spec"]["roles"]:
        if r["name"] == "decode":
            r["scaling"] = {"mode": "Builtin", "maxReplicas": 8, "targets": {"tpotMs": 50},
                            "minReplicas": 2, "scaleDownStabilizationSeconds": 0}  # fmt: skip
            r["replicas"] = 2
    srs = {"apiVersion": "pdorch.io/v1alpha1", "kind": "ServingRoleScaler",
           "metadata": {"name": "sim-pd-decode", "namespace": "ns", "resourceVersion": "1"}, "spec": {"replicas": 2}}  # fmt: skip
    pods = [
        {"metadata": {"name": f"sim-pd-decode-{i}", "namespace": "ns", "annotations": {}, "labels": {
            "pdorch.io/group": "sim-pd", "pdorch.io/role": "decode", "pdorch.io/role-type": "decode",
            "leaderworkerset.sigs.k8s.io/worker-index": "0", "leaderworkerset.sigs.k8s.io/group-index": str(i)}},
         "status": {"podIP": f"127.0.0.{5 + i}", "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}],
                    "containerStatuses": [{"name": "engine", "state": {"running": {"startedAt": "2020-01-01T00:00:00Z"}}}]}}
        for i in range(2)
    ]  # fmt: skip

    def handler(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if request.method == "GET" and path.endswith("/servinggroups"):
            return httpx2.Response(200, json={"metadata": {"resourceVersion": "1"}, "items": [group]})
        if request.method == "GET" and path.endswith("/pods"):
            decode = "decode" in request.url.params.get("labelSelector", "")
            return httpx2.Response(
                200,
                json={"metadata": {"resourceVersion": "1"}, "items": copy.deepcopy(pods) if decode else []},
            )
        if request.method == "GET" and path.endswith("/servingrolescalers/sim-pd-decode"):
            return httpx2.Response(200, json=copy.deepcopy(srs))
        if request.method == "GET":
            return httpx2.Response(404, json={"kind": "Status", "code": 404, "reason": "NotFound"})
        return httpx2.Response(200, json={})  # drain marks, status, events

    clock = [1000.0]
    wall0 = 1.7e9

    class _StuckPrometheus:
        async def samples(self, _ns: str, eps: list[Endpoint]) -> list[EngineSample | None]:
            now = wall0 + clock[0] - 1000.0
            scraped = [now, min(now, wall0 + 15.0)]  # the second pod's last scrape: 15 s
            return [EngineSample("vllm", requests_total=0.1 * t, at=t) for t in scraped[: len(eps)]]

    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(loop.time, "time", lambda: wall0 + clock[0] - 1000.0)
    api = KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://k8s.invalid"))
    scaler = BuiltinScaler(api, ScalerConfig(namespace="ns", interval_s=15), source=_StuckPrometheus())
    reasons: list[tuple[int, str]] = []
    for _ in range(12):  # up to 165 s
        reasons += [(d.target, d.reason) for d in await scaler.tick() if d.role == "decode"]
        clock[0] += 15
    await api.close()
    assert [t for t, _ in reasons] == [2] * 11
    # Up to 135 s the second pod's sample is at most 120 s old: its last interval is read again.
    assert not any("unreadable" in r for _, r in reasons[:-2]), reasons
    # At 150 s and 165 s it is 135 s and 150 s old.
    assert all("held at 2: 1 of 2 leaders unreadable (1 stale" in r for _, r in reasons[-2:]), reasons[-2:]

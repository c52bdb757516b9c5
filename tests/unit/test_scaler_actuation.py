"""The scaler's tick against an apiserver answering at the HTTP layer (no cluster): what a refused
write leaves behind."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from prometheus_client import REGISTRY

from pdorch.controller.kubeapi import KubeApi
from pdorch.proxy.endpoints import Endpoint
from pdorch.roles.labels import ANNOTATION_DRAINING
from pdorch.scaler import loop
from pdorch.scaler.loop import BuiltinScaler, ScalerConfig
from pdorch.scaler.scrape import EngineSample

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sim-pd" / "servinggroup.yaml"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The scaler's monotonic clock, moved by the test (`clock[0] += 15` is one tick)."""
    now = [1000.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    return now


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


async def test_a_refused_scale_up_does_not_start_the_cooldown(clock: list[float]) -> None:
    """The first scale-up's /scale write meets a 409 on every try of its tick (the object changed
    since the tick read it): nothing changed, so the next tick scales up instead of waiting out
    cooldownSeconds. (One 409 alone is retried within the tick and never reaches that path.)"""
    apiserver = _Apiserver(
        "ns", {"mode": "Builtin", "maxReplicas": 50, "targets": {"tpotMs": 100}, "cooldownSeconds": 60}, 1
    )
    # Every try of the first tick's write (the scaler tries 3 times within a tick): refused.
    apiserver.refusals = 3
    scaler = apiserver.scaler(_Saturated())
    targets: list[tuple[int, int]] = []
    for _ in range(3):
        decided = [d for d in await scaler.tick() if d.role == "decode"]
        targets += [(d.current, d.target) for d in decided]
        clock[0] += 15
    await scaler.api.close()
    assert apiserver.refusals == 0, (
        "the first scale-up was not refused: the test did not exercise the conflict"
    )
    assert apiserver.writes, f"no scale-up after the refused one: {targets}"


async def test_a_hold_on_stale_samples_says_they_are_stale(
    monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    """Two quiet decodes read through Prometheus, which stops scraping the second at 15 s but keeps
    answering with its last sample. The policy wants 1 replica (minReplicas keeps 2, so no drain
    starts); once that sample is older than the age bound the tick holds for unread leaders and
    says they are stale (the sample's last interval was repeated without an age limit before)."""
    scaling = {"mode": "Builtin", "maxReplicas": 8, "targets": {"tpotMs": 50}, "minReplicas": 2,
               "scaleDownStabilizationSeconds": 0}  # fmt: skip
    apiserver = _Apiserver("ns", scaling, 2)
    wall0 = 1.7e9

    class _StuckPrometheus:
        async def samples(self, _ns: str, eps: list[Endpoint]) -> list[EngineSample | None]:
            now = wall0 + clock[0] - 1000.0
            scraped = [now, min(now, wall0 + 15.0)]  # the second pod's last scrape: 15 s
            return [EngineSample("vllm", requests_total=0.1 * t, at=t) for t in scraped[: len(eps)]]

    monkeypatch.setattr(loop.time, "time", lambda: wall0 + clock[0] - 1000.0)
    scaler = apiserver.scaler(_StuckPrometheus())
    reasons: list[tuple[int, str]] = []
    for _ in range(12):  # up to 165 s
        reasons += [(d.target, d.reason) for d in await scaler.tick() if d.role == "decode"]
        clock[0] += 15
    await scaler.api.close()
    assert [t for t, _ in reasons] == [2] * 11
    # Up to 135 s the second pod's sample is at most 120 s old: its last interval is read again.
    assert not any("unreadable" in r for _, r in reasons[:-2]), reasons
    # At 150 s and 165 s it is 135 s and 150 s old.
    assert all("held at 2: 1 of 2 leaders unreadable (1 stale" in r for _, r in reasons[-2:]), reasons[-2:]


def _leader(role: str, i: int, ns: str) -> dict[str, Any]:
    return {"metadata": {"name": f"sim-pd-{role}-{i}", "namespace": ns, "annotations": {}, "labels": {
                "pdorch.io/group": "sim-pd", "pdorch.io/role": role, "pdorch.io/role-type": role,
                "leaderworkerset.sigs.k8s.io/worker-index": "0", "leaderworkerset.sigs.k8s.io/group-index": str(i)}},
            "status": {"podIP": f"127.0.1.{i + 1}", "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}],
                       "containerStatuses": [{"name": "engine", "state": {"running": {"startedAt": "2020-01-01T00:00:00Z"}}}]}}  # fmt: skip


class _Apiserver:
    """One ServingGroup whose decode is Builtin, its ServingRoleScaler (generation, managedFields
    of spec.replicas, the status the scaler applies, merged per condition type as SSA does) and its
    decode leaders (groups 0..replicas-1, as LWS keeps them), answered at the HTTP layer."""

    def __init__(self, ns: str, scaling: dict[str, Any], replicas: int) -> None:
        self.ns = ns
        self.group = yaml.safe_load(EXAMPLE.read_text())
        self.group["metadata"]["namespace"] = ns
        for r in self.group["spec"]["roles"]:
            if r["name"] == "decode":
                r["scaling"], r["replicas"] = scaling, replicas
        self.srs: dict[str, Any] = {
            "apiVersion": "pdorch.io/v1alpha1", "kind": "ServingRoleScaler",
            "metadata": {"name": "sim-pd-decode", "namespace": ns, "uid": "u1", "resourceVersion": "1",
                         "generation": 1, "managedFields": []},
            "spec": {"servingGroup": "sim-pd", "role": "decode", "replicas": replicas}, "status": {}}  # fmt: skip
        self.pods: dict[str, dict[str, Any]] = {}
        self.writes: list[int] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.refusals = 0  # answer that many /scale writes with a 409
        self.sync()

    def sync(self) -> None:
        n = self.srs["spec"]["replicas"]
        self.pods = {k: p for k, p in self.pods.items() if int(k.rsplit("-", 1)[1]) < n}
        for i in range(n):
            self.pods.setdefault(f"sim-pd-decode-{i}", _leader("decode", i, self.ns))

    def scale(self, n: int, manager: str) -> None:
        """Another writer's /scale (kubectl scale, an HPA)."""
        md = self.srs["metadata"]
        self.srs["spec"]["replicas"] = n
        md["generation"] += 1
        md["resourceVersion"] = str(int(md["resourceVersion"]) + 1)
        md["managedFields"] = [{"manager": manager, "operation": "Update", "subresource": "scale",
                                "time": "2026-12-07T07:00:00Z", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]  # fmt: skip

    def marked(self) -> list[str]:
        return sorted(
            k for k, p in self.pods.items() if p["metadata"]["annotations"].get(ANNOTATION_DRAINING)
        )

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        path, method = request.url.path, request.method
        md = self.srs["metadata"]
        if method == "GET" and path.endswith("/servinggroups"):
            return httpx2.Response(200, json={"metadata": {"resourceVersion": "1"}, "items": [self.group]})
        if method == "GET" and path.endswith("/pods"):
            decode = "decode" in request.url.params.get("labelSelector", "")
            items = [copy.deepcopy(p) for p in self.pods.values()] if decode else []
            return httpx2.Response(200, json={"metadata": {"resourceVersion": "1"}, "items": items})
        if method == "GET" and path.endswith("/servingrolescalers/sim-pd-decode"):
            return httpx2.Response(200, json=copy.deepcopy(self.srs))
        if method == "PATCH" and path.endswith("/scale"):
            if self.refusals:  # the object changed since the tick read it
                self.refusals -= 1
                return httpx2.Response(409, json={"kind": "Status", "code": 409, "reason": "Conflict"})
            body = json.loads(request.content)
            if (body.get("metadata") or {}).get("resourceVersion", md["resourceVersion"]) != md[
                "resourceVersion"
            ]:
                return httpx2.Response(409, json={"kind": "Status", "code": 409, "reason": "Conflict"})
            self.scale(body["spec"]["replicas"], "pdorch-scaler")
            self.writes.append(body["spec"]["replicas"])
            return httpx2.Response(200, json={})
        if method == "PATCH" and path.endswith("/sim-pd-decode/status"):
            status = json.loads(request.content)["status"]
            self.statuses.append(status)
            have = self.srs["status"]
            conds = {c["type"]: c for c in have.get("conditions") or []}
            conds.update({c["type"]: c for c in status.get("conditions") or []})
            have.update(
                {k: v for k, v in status.items() if k != "conditions"}, conditions=list(conds.values())
            )
            md["resourceVersion"] = str(int(md["resourceVersion"]) + 1)
            return httpx2.Response(200, json=copy.deepcopy(self.srs))
        if method == "PATCH" and "/pods/" in path:
            name = path.rsplit("/", 1)[1]
            notes = self.pods[name]["metadata"]["annotations"]
            for k, v in json.loads(request.content)["metadata"]["annotations"].items():
                notes.pop(k, None) if v is None else notes.__setitem__(k, v)
            return httpx2.Response(200, json={})
        if method == "POST" and path.endswith("/events"):
            e = json.loads(request.content)
            self.events.append((e["type"], e["reason"], e["note"]))
            return httpx2.Response(201, json=e)
        if method == "GET":
            return httpx2.Response(404, json={"kind": "Status", "code": 404, "reason": "NotFound"})
        return httpx2.Response(200, json={})

    def scaler(self, source: Any) -> BuiltinScaler:
        api = KubeApi(
            httpx2.AsyncClient(transport=httpx2.MockTransport(self.handler), base_url="http://k8s.invalid")
        )
        api.field_manager = "pdorch-scaler"
        return BuiltinScaler(api, ScalerConfig(namespace=self.ns, interval_s=15), source=source)


class _Idle:
    """Every decode engine quiet (a request a tick), or none readable during an outage."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.outage = False

    async def samples(self, _ns: str, eps: list[Endpoint]) -> list[EngineSample | None]:
        if self.outage:
            return [None for _ in eps]
        out: list[EngineSample | None] = []
        for e in eps:
            n = self.n[e.url] = self.n.get(e.url, 0) + 1
            out.append(EngineSample("vllm", requests_total=n, generation_tokens_total=100 * n,
                                    finished_output_tokens=100 * n, finished_prompt_tokens=500 * n,
                                    finished_lengths_count=n))  # fmt: skip
        return out


def _series(name: str, ns: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"namespace": ns, "group": "sim-pd", "role": "decode"})


async def test_a_kubectl_scale_mid_drain_is_the_new_baseline_not_drained_back(clock: list[float]) -> None:
    """A drain 4 -> 1 is under way when an operator scales to 6: the scaler drained the new groups
    back within 30 s, skipping its cooldown (helper-65 finding 5, t5_override). Now the drain is
    cancelled, status says who set 6, and nothing moves before the scale-down window has passed."""
    fake = _Apiserver("own-kubectl", {"mode": "Builtin", "minReplicas": 1, "maxReplicas": 8, "targets": {"tpotMs": 50},
                                      "scaleDownStabilizationSeconds": 120, "cooldownSeconds": 60}, 4)  # fmt: skip
    scaler = fake.scaler(_Idle())
    try:
        while not fake.marked():  # baseline, then the scale-down window: the drain to 1 starts
            await scaler.tick()
            clock[0] += 15
            assert clock[0] < 1300
        fake.scale(6, "kubectl")  # kubectl scale's field manager
        fake.sync()
        for _ in range(7):  # 105 s: within the window restarted by the operator's change
            decided = await scaler.tick()
            assert [(d.current, d.target) for d in decided if d.role == "decode"] == [(6, 6)]
            assert fake.marked() == [] and fake.writes == []
            clock[0] += 15
    finally:
        await scaler.api.close()
    reason = fake.srs["status"]["lastScaleReason"]
    assert reason.startswith("4 -> 6 by kubectl, not pdorch's scaler: kept as the new baseline"), reason
    assert _series("pdorch_scaler_desired_replicas", "own-kubectl") == 6
    assert not [e for e in fake.events if e[1] == "ConflictingScaler"]  # one change is not a conflict


async def test_another_scaler_replacing_the_scalers_sizes_is_a_conflicting_scaler_warning(
    clock: list[float],
) -> None:
    """An HPA with minReplicas 3 on a Builtin decode at low load: each scale-down to 1 was written
    back to 3, with no word of the other writer (helper-65 finding 5). The second replacement is a
    Warning ConflictingScaler naming the HPA's field manager, also in lastScaleReason."""
    fake = _Apiserver("own-hpa", {"mode": "Builtin", "minReplicas": 1, "maxReplicas": 8, "targets": {"tpotMs": 50},
                                  "scaleDownStabilizationSeconds": 30, "cooldownSeconds": 30}, 3)  # fmt: skip
    scaler = fake.scaler(_Idle())
    try:
        for _ in range(60):  # 15 minutes
            if fake.srs["spec"]["replicas"] < 3:
                fake.scale(3, "kube-controller-manager")  # the HPA's next sync
            fake.sync()
            await scaler.tick()
            await scaler.events.flush()
            clock[0] += 15
    finally:
        await scaler.api.close()
    assert fake.writes.count(1) >= 3, fake.writes
    warnings = [e for e in fake.events if e[:2] == ("Warning", "ConflictingScaler")]
    assert len(warnings) == 1, fake.events  # once per episode, not on every replacement
    assert "by kube-controller-manager, not pdorch's scaler" in warnings[0][2]
    assert "another scaler (an HPA or KEDA?) writes this ServingRoleScaler" in warnings[0][2]
    assert "another scaler" in fake.srs["status"]["lastScaleReason"]


async def test_a_metrics_outage_drops_the_load_gauges_and_says_scaling_is_inactive(
    clock: list[float],
) -> None:
    """During a total /metrics outage the request-rate and recommendation gauges kept their last
    values, and status and events said nothing (helper-65 finding 8, t4_outage). Now both series
    go, desired stays, ScalingActive=False MetricsUnavailable is applied with the scaler's other
    status fields (an apply without them would remove them) and is a Warning; True once read."""
    fake = _Apiserver("own-outage", {"mode": "Builtin", "minReplicas": 1, "maxReplicas": 8,
                                     "targets": {"tpotMs": 50}}, 2)  # fmt: skip
    fake.srs["status"] = {"lastScaleTime": "2026-12-07T06:00:00Z", "lastScaleReason": "1 -> 2: busy"}
    source = _Idle()
    scaler = fake.scaler(source)

    def active() -> dict[str, Any]:
        return next(c for c in fake.srs["status"]["conditions"] if c["type"] == "ScalingActive")

    try:
        for _ in range(2):
            await scaler.tick()
            clock[0] += 15
        assert _series("pdorch_scaler_request_rate", "own-outage") is not None
        assert (active()["status"], active()["reason"]) == ("True", "ValidMetricFound")
        source.outage = True
        for _ in range(3):
            await scaler.tick()
            clock[0] += 15
        await scaler.events.flush()
        assert _series("pdorch_scaler_request_rate", "own-outage") is None
        assert _series("pdorch_scaler_recommended_replicas", "own-outage") is None
        assert _series("pdorch_scaler_desired_replicas", "own-outage") == 2
        assert (active()["status"], active()["reason"]) == ("False", "MetricsUnavailable")
        assert active()["message"].startswith("no metrics from 2 ready leaders of 2 replicas"), active()
        assert fake.statuses[-1]["lastScaleReason"] == "1 -> 2: busy"  # carried, not dropped
        assert [e[:2] for e in fake.events] == [("Warning", "MetricsUnavailable")]  # once
        source.outage = False
        for _ in range(2):  # read again without a baseline, then with one
            await scaler.tick()
            clock[0] += 15
        assert (active()["status"], active()["reason"]) == ("True", "ValidMetricFound")
        assert _series("pdorch_scaler_request_rate", "own-outage") is not None
    finally:
        await scaler.api.close()


async def test_desired_replicas_is_set_by_a_decision_that_writes_nothing(clock: list[float]) -> None:
    """A scaler started next to a role already at its size had no desired-replicas series at all
    (it was set only on a write: helper-65 finding 8, t7_desired)."""
    fake = _Apiserver("own-desired", {"mode": "Builtin", "minReplicas": 2, "maxReplicas": 8,
                                      "targets": {"tpotMs": 50}}, 2)  # fmt: skip
    scaler = fake.scaler(_Idle())
    try:
        for _ in range(3):
            await scaler.tick()
            clock[0] += 15
    finally:
        await scaler.api.close()
    assert fake.writes == []
    assert _series("pdorch_scaler_desired_replicas", "own-desired") == 2


@pytest.mark.parametrize(
    ("undecided", "wanted", "acted"),
    [
        # Beside 4 held, the band [0.75, 1.25] allows prefill 3-5 or decode 4-5: the quiet role
        # stops at the band's edge (it asked for 1).
        ("prefill", 1, {"decode": 4}),
        ("decode", 1, {"prefill": 3}),
        # A busy role grows past the band: the held one is raised into it (helper-82).
        ("prefill", 8, {"decode": 8, "prefill": 6}),
        ("decode", 8, {"prefill": 8, "decode": 7}),
    ],
)
async def test_the_ratio_band_holds_against_a_role_without_a_decision(
    monkeypatch: pytest.MonkeyPatch, undecided: str, wanted: int, acted: dict[str, int]
) -> None:
    """A tick with no decision for one role (its metrics unreadable) holds that role's size, and the
    other is kept in the declared band against it: it was sized as if there were no band, so a
    quiet decode beside an unreadable prefill was drained 4 -> 1 (P:D 4:1 against 1:1 +- 25%) and
    raised again once prefill was read (helper-81)."""
    group = yaml.safe_load(EXAMPLE.read_text())
    group["metadata"]["namespace"] = "ns"
    group["spec"]["ratio"] = {"prefill": 1, "decode": 1, "tolerance": 0.25}
    for r in group["spec"]["roles"]:
        if r["type"] in ("prefill", "decode"):
            r["replicas"] = 4
            r["scaling"] = {"mode": "Builtin", "minReplicas": 1, "maxReplicas": 8,
                            "targets": {"ttftMs": 500, "tpotMs": 50}}  # fmt: skip
    from types import SimpleNamespace

    from pdorch.api.servinggroup import ServingGroup

    scaler = BuiltinScaler(SimpleNamespace(), ScalerConfig(namespace="ns"))  # type: ignore[arg-type]
    targets: dict[str, int] = {}

    async def get(_res: Any, name: str, _ns: str) -> dict[str, Any]:
        assert name == f"sim-pd-{undecided}"
        return {"spec": {"replicas": 4}}

    async def decide(_ns: str, _group: str, role: Any, _policy: Any) -> Any:
        return None if role.name == undecided else ({"metadata": {}}, 4, wanted, "load", [])

    async def act(_ns: str, _group: str, role: Any, _srs: Any, _cur: int, target: int, *_: Any) -> None:
        targets[role.name] = target

    async def nothing(*_: Any) -> None:
        return None

    monkeypatch.setattr(scaler, "api", SimpleNamespace(get=get))
    monkeypatch.setattr(scaler, "_decide", decide)
    monkeypatch.setattr(scaler, "_act", act)
    monkeypatch.setattr(scaler, "_release_unscaled", nothing)
    await scaler._group(group, ServingGroup.model_validate(group))
    assert targets == acted, targets


class _Prometheus:
    """Samples as Prometheus gives them: idle; the victim (group 1) scraped 3 s after the drain's
    mark and then every `period` seconds (None: not again), or with no scrape time at all."""

    dates_samples = True

    def __init__(self, wall: Any, undated: bool = False, period: float | None = None) -> None:
        self.wall, self.undated, self.period, self.mark = wall, undated, period, None

    async def samples(self, _ns: str, eps: list[Endpoint]) -> list[EngineSample | None]:
        now = self.wall()
        out: list[EngineSample | None] = []
        for e in eps:
            at = now - 1
            if self.mark is not None and e.pod.endswith("-1"):
                first = self.mark + 3.0
                at = first + (self.period * ((now - first) // self.period) if self.period else 0.0)
            out.append(EngineSample("vllm", requests_total=1, at=None if self.undated else at))
        return out


async def _drain_2_to_1(
    monkeypatch: pytest.MonkeyPatch, clock: list[float], undated: bool, period: float | None = None
) -> float:
    """Seconds from the drain's mark to the write of 2 -> 1 of an idle decode read through
    `_Prometheus` (the drain timeout is 300 s)."""
    wall0 = 1.7e9
    monkeypatch.setattr(loop.time, "time", lambda: wall0 + clock[0] - 1000.0)
    fake = _Apiserver("prom-drain", {"mode": "Builtin", "minReplicas": 1, "maxReplicas": 8, "targets": {"tpotMs": 50},
                                     "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 0}, 2)  # fmt: skip
    source = _Prometheus(lambda: wall0 + clock[0] - 1000.0, undated, period)
    scaler = fake.scaler(source)
    try:
        for _ in range(40):
            await scaler.tick()
            if fake.marked() and source.mark is None:
                source.mark = wall0 + clock[0] - 1000.0
            if fake.writes:
                assert source.mark is not None and fake.writes == [1], fake.writes
                return wall0 + clock[0] - 1000.0 - source.mark
            fake.sync()
            clock[0] += 15
    finally:
        await scaler.api.close()
    raise AssertionError("no scale-down written in 600 s")


async def test_a_drain_read_through_prometheus_needs_two_scrapes_of_each_victim(
    monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    """The two idle checks of a drain read the same Prometheus scrape when it scrapes less often
    than the scaler ticks: the victim was written away at mark + 30 s, seen once, 3 s after the
    mark (helper-81). A second check now needs a newer scrape of it; this source has none, so the
    drain ends at its timeout. A sample with no scrape time (an `up` series without the pod's
    labels) is of unknown age and never reads as idle either."""
    assert await _drain_2_to_1(monkeypatch, clock, undated=False) >= 300
    assert await _drain_2_to_1(monkeypatch, clock, undated=True) >= 300
    # Scraped every 30 s (the scaler ticks every 15 s): the second look is the next scrape, and the
    # drain ends well before its timeout (helper-82).
    assert await _drain_2_to_1(monkeypatch, clock, undated=False, period=30.0) < 120


async def test_shutdown_cancels_every_drain_when_the_api_fails_for_one_role() -> None:
    """A transport error while cancelling one role's drain left the next roles' pods marked
    (hidden from the proxy) and escaped `run` before the events' flush (helper-81)."""
    from pdorch.scaler.loop import RoleState

    calls: list[str | None] = []

    def handler(req: httpx2.Request) -> httpx2.Response:
        calls.append(req.url.params.get("labelSelector"))
        if len(calls) == 1:
            raise httpx2.ConnectError("reset")
        return httpx2.Response(200, json={"metadata": {}, "items": []})

    api = KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://k8s.invalid"))
    scaler = BuiltinScaler(api, ScalerConfig(interval_s=15), source=_Idle())
    for role in ("prefill", "decode"):
        scaler.roles[("ns", "g", role)] = RoleState(draining_to=1)
    stop = asyncio.Event()
    stop.set()
    try:
        await scaler.run(stop)
    finally:
        await api.close()
    assert len(calls) == 2, calls  # the second role's drain was cancelled too


async def test_a_group_the_scaler_cannot_read_gets_its_drained_pods_back(clock: list[float]) -> None:
    """A drain is under way when the group stops validating for this scaler (a field a newer CRD
    has and its models lack): the drain cannot end, so its pods are unmarked instead of staying
    hidden from the proxy (helper-81)."""
    fake = _Apiserver("unreadable", {"mode": "Builtin", "minReplicas": 1, "maxReplicas": 8, "targets": {"tpotMs": 50},
                                     "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 0}, 2)  # fmt: skip
    scaler = fake.scaler(_Idle())
    try:
        for _ in range(4):
            await scaler.tick()
            clock[0] += 15
            if fake.marked():
                break
        assert fake.marked() == ["sim-pd-decode-1"], "no drain started: the test did not exercise it"
        fake.group["spec"]["fieldFromTheFuture"] = True
        await scaler.tick()
        assert fake.marked() == []
    finally:
        await scaler.api.close()


async def test_a_group_recreated_between_two_ticks_starts_afresh(clock: list[float]) -> None:
    """Deleted and created again under the same name within one interval, a group kept its
    predecessor's damping history, forecast memory and drain (helper-81)."""
    fake = _Apiserver("recreated", {"mode": "Builtin", "minReplicas": 1, "maxReplicas": 8, "targets": {"tpotMs": 50},
                                    "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 0}, 2)  # fmt: skip
    fake.group["metadata"]["uid"] = "first"
    scaler = fake.scaler(_Idle())
    key = ("recreated", "sim-pd", "decode")
    try:
        for _ in range(4):
            await scaler.tick()
            clock[0] += 15
            if scaler.roles[key].draining_to is not None:
                break
        assert scaler.roles[key].draining_to == 1, "no drain started: the test did not exercise it"
        before = scaler.roles[key]
        fake.group["metadata"]["uid"] = "second"
        await scaler.tick()
        assert scaler.roles[key] is not before and scaler.roles[key].draining_to is None
    finally:
        await scaler.api.close()


async def test_a_role_that_leaves_builtin_loses_the_scalers_scaling_active(clock: list[float]) -> None:
    """ScalingActive says the built-in scaler reads the role's load; once the role is External it
    stayed, telling of a scaler that no longer acts (helper-81). Its withdrawal is an apply of the
    scaler's status fields without the condition (server-side apply then removes it)."""
    fake = _Apiserver("left-builtin", {"mode": "Builtin", "minReplicas": 1, "maxReplicas": 8,
                                       "targets": {"tpotMs": 50}}, 2)  # fmt: skip
    scaler = fake.scaler(_Idle())
    try:
        for _ in range(2):  # a baseline, then a reading
            await scaler.tick()
            clock[0] += 15
        assert any(c["type"] == "ScalingActive" for c in fake.srs["status"].get("conditions") or [])
        applied = len(fake.statuses)
        decode = next(r for r in fake.group["spec"]["roles"] if r["name"] == "decode")
        decode["scaling"] = {"mode": "External", "minReplicas": 1, "maxReplicas": 8}
        clock[0] += 15
        await scaler.tick()
        assert len(fake.statuses) == applied + 1, fake.statuses
        assert not [c for c in fake.statuses[-1].get("conditions") or [] if c["type"] == "ScalingActive"]
        await scaler.tick()  # withdrawn once, not on every tick
        assert len(fake.statuses) == applied + 1
    finally:
        await scaler.api.close()

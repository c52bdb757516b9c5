"""The built-in scaler clears drain annotations on roles it no longer scales (real apiserver, LWS, kwok).

The proxy never routes to a pod annotated `pdorch.io/draining`, so one left behind on a role that is
not (or no longer) Builtin would hide that pod from traffic for good.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod

from pdorch.api.servinggroup import ServingGroup
from pdorch.controller.kubeapi import SERVING_ROLE_SCALER, KubeApi
from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for, wait_for_async
from pdorch.proxy.endpoints import Endpoint
from pdorch.roles.labels import ANNOTATION_DRAINING, leader_selector
from pdorch.scaler import loop
from pdorch.scaler.loop import BuiltinScaler, ScalerConfig
from pdorch.scaler.scrape import EngineSample
from tests.integration.test_controller import LWS as LWS_RES
from tests.integration.test_controller import SG, example_scaled, kubectl, update_spec, wait_available
from tests.integration.test_controller import SRS as SRS_RES

pytestmark = pytest.mark.integration


def leader_pod(kube: Client, ns: str, group: str, role: str) -> Pod:
    """A leader pod of the role (waits for one)."""
    return wait_for(
        lambda: next(iter(kube.list(Pod, namespace=ns, labels=leader_selector(group, role))), None),
        60,
        f"a {role} leader pod",
    )


def mark_draining(kube: Client, ns: str, pod: Pod) -> None:
    """Annotate `pod` as the scaler does before a scale-down."""
    kube.patch(
        Pod, pod.metadata.name, {"metadata": {"annotations": {ANNOTATION_DRAINING: "true"}}}, namespace=ns
    )


def is_draining(kube: Client, ns: str, pod: Pod) -> bool:
    """Whether `pod` carries the drain annotation now."""
    return (kube.get(Pod, pod.metadata.name, namespace=ns).metadata.annotations or {}).get(
        ANNOTATION_DRAINING
    ) == "true"


async def test_drain_marks_on_unscaled_roles_are_cleared(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    doc = example_scaled(
        "drains", "decode", {"mode": "Builtin", "maxReplicas": 4, "targets": {"tpotMs": 100}}
    )
    kube.create(SG.from_dict(doc), namespace=namespace)
    await asyncio.to_thread(wait_available, kube, namespace, "drains")
    prefill = leader_pod(kube, namespace, "drains", "prefill")
    decode = leader_pod(kube, namespace, "drains", "decode")
    # As an earlier scaler process would have left them mid-drain.
    mark_draining(kube, namespace, prefill)
    mark_draining(kube, namespace, decode)

    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace, interval_s=1.0))
    try:
        await scaler.tick()
        # prefill is not Builtin: cleared on first sight. decode is Builtin and keeps its mark
        # until this scaler decides about it (the first tick only takes a baseline).
        assert not is_draining(kube, namespace, prefill)
        assert is_draining(kube, namespace, decode)

        def external(spec: dict[str, Any]) -> None:
            for role in spec["roles"]:
                if role["type"] == "decode":
                    role["scaling"] = {"mode": "External", "minReplicas": 1, "maxReplicas": 4}

        update_spec(kube, namespace, "drains", external)
        await scaler.tick()
        assert not is_draining(kube, namespace, decode)  # left Builtin: its mark goes too
        assert not scaler.roles  # and so does the scaler's state for it
    finally:
        await api.close()


class ScriptedMetrics:
    """Engine metrics chosen by the test (the engines' numbers, not the Kubernetes API's):
    every endpoint idle, or none readable (a metrics outage)."""

    def __init__(self) -> None:
        self.outage = False

    async def samples(self, namespace: str, endpoints: Sequence[Endpoint]) -> list[EngineSample | None]:
        return [None if self.outage else EngineSample("vllm") for _ in endpoints]


async def _two_builtin_decodes(
    kube: Client, namespace: str, name: str, cooldown_s: int = 0
) -> Callable[[], list[Pod]]:
    """A group whose decode is Builtin with 2 groups and no damping (but `cooldown_s`); a function
    listing its decode leaders (by name), once both exist."""
    doc = example_scaled(
        name,
        "decode",
        {
            "mode": "Builtin",
            "minReplicas": 1,
            "maxReplicas": 4,
            "targets": {"tpotMs": 100},
            "scaleDownStabilizationSeconds": 0,
            "cooldownSeconds": cooldown_s,
        },
    )
    next(r for r in doc["spec"]["roles"] if r["type"] == "decode")["replicas"] = 2
    kube.create(SG.from_dict(doc), namespace=namespace)
    await asyncio.to_thread(wait_available, kube, namespace, name)

    def leaders() -> list[Pod]:
        pods = kube.list(Pod, namespace=namespace, labels=leader_selector(name, "decode"))
        return sorted(pods, key=lambda p: p.metadata.name)

    await asyncio.to_thread(wait_for, lambda: len(leaders()) == 2, 60, "two decode leaders")
    return leaders


async def test_a_drain_is_cancelled_by_a_metrics_outage_and_by_shutdown(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """The pods a drain hides from the proxy serve again when the scaler cannot decide (a metrics
    outage: holding means holding) and when it stops (a drain lives in its memory only)."""
    leaders = await _two_builtin_decodes(kube, namespace, "undrain")
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    metrics = ScriptedMetrics()
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace, interval_s=1.0), source=metrics)
    try:

        def drained() -> list[bool]:
            return [is_draining(kube, namespace, p) for p in leaders()]

        await scaler.tick()  # baseline
        await scaler.tick()  # idle: 2 -> 1 starts by draining group 1
        assert drained() == [False, True]

        metrics.outage = True
        await scaler.tick()
        assert drained() == [False, False], "a metrics outage left the drained pod hidden"
        assert scaler.roles[(namespace, "undrain", "decode")].draining_to is None

        metrics.outage = False
        await scaler.tick()  # back, but read without a previous reading: no scale-down blind
        assert drained() == [False, False]
        await scaler.tick()  # idle again: the drain starts over
        assert drained() == [False, True]
        stop = asyncio.Event()
        stop.set()
        await scaler.run(stop)  # a stopping scaler gives the pod back
        assert drained() == [False, False], "shutdown left the drained pod hidden"
        # Nothing was scaled down meanwhile: each drain ended before it completed.
        srs = await api.get(SERVING_ROLE_SCALER, "undrain-decode", namespace)
        assert srs is not None and srs["spec"]["replicas"] == 2
    finally:
        await api.close()


async def test_marks_an_earlier_leader_left_are_cleared_when_this_one_cannot_decide(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A leader killed mid-drain leaves its marks; the next one carries on from them when it
    decides. During a metrics outage it never decides, and only its own drains were cancelled:
    half the role stayed hidden from the proxy for the whole outage (helper-65's reproducer)."""
    leaders = await _two_builtin_decodes(kube, namespace, "orphan")
    mark_draining(kube, namespace, leaders()[1])  # as the killed leader left it
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    metrics = ScriptedMetrics()
    metrics.outage = True
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace, interval_s=1.0), source=metrics)
    try:
        await scaler.tick()  # the baseline tick keeps them: a decision would carry on from them
        assert [is_draining(kube, namespace, p) for p in leaders()] == [False, True]
        await scaler.tick()  # still no decision: the pod serves again
        assert [is_draining(kube, namespace, p) for p in leaders()] == [False, False]
    finally:
        await api.close()


class VictimMetrics:
    """Every engine idle, except the pod named `victim`, whose sample the test sets."""

    def __init__(self) -> None:
        self.victim = ""
        self.sample = EngineSample("vllm")

    async def samples(self, namespace: str, endpoints: Sequence[Endpoint]) -> list[EngineSample | None]:
        return [self.sample if e.pod == self.victim else EngineSample("vllm") for e in endpoints]


async def test_a_drain_ends_only_on_a_fresh_empty_sample_of_a_marked_victim(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A victim is not drained after one idle check (a vLLM prefill may hold KV its decode has yet
    to pull, which no gauge shows), while it holds requests a decode waits for (SGLang's prefill
    bootstrap/inflight queues), nor on a sample scraped before the proxy could see its mark
    (Prometheus), and a victim recreated mid-drain (its mark lost with the old pod) is marked again
    before the scale-down is written."""
    leaders = await _two_builtin_decodes(kube, namespace, "redrain")
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    metrics = VictimMetrics()
    metrics.victim = leaders()[1].metadata.name
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace, interval_s=1.0), source=metrics)

    async def replicas() -> int:
        srs = await api.get(SERVING_ROLE_SCALER, "redrain-decode", namespace)
        assert srs is not None
        return int(srs["spec"]["replicas"])

    def drained() -> list[bool]:
        return [is_draining(kube, namespace, p) for p in leaders()]

    try:
        await scaler.tick()  # baseline
        await scaler.tick()  # idle: 2 -> 1 starts by draining group 1
        assert drained() == [False, True]
        await scaler.tick()  # idle at one check: a vLLM prefill may still hold KV for its decode
        assert await replicas() == 2 and drained() == [False, True]

        metrics.sample = EngineSample("sglang", held=3)  # KV a decode has yet to take
        await scaler.tick()
        assert await replicas() == 2 and drained() == [False, True]

        metrics.sample = EngineSample("vllm", at=time.time() - 60)  # idle, but scraped before the mark
        await scaler.tick()
        assert await replicas() == 2 and drained() == [False, True]

        old = leaders()[1]
        kube.delete(Pod, old.metadata.name, namespace=namespace)  # LWS recreates it, unmarked
        await asyncio.to_thread(
            wait_for,
            lambda: (len(p := leaders()) == 2 and p[1].metadata.uid != old.metadata.uid) or None,
            60,
            "the victim recreated",
        )
        metrics.sample = EngineSample("vllm")
        # The scaler marks the new pod again, or (reading it as an engine without a previous
        # reading) holds and cancels the drain; either way the size is only lowered while the
        # victim is marked, and then it is.
        for _ in range(10):
            before = drained()
            await scaler.tick()
            if await replicas() == 1:
                break
        assert await replicas() == 1
        assert before == [False, True], "scaled down onto a victim the proxy could use"
    finally:
        await api.close()


async def test_a_lowered_max_keeps_the_groups_until_the_scaler_has_drained_them(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """maxReplicas lowered below a Builtin role's size: the controller cut the LWS to the bound at
    once, killing the streams on the removed groups, and the scaler then wrote "drained"
    (helper-65). Now the groups stay, marked for the proxy, until the scaler writes the bound."""
    leaders = await _two_builtin_decodes(kube, namespace, "maxcut")
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace, interval_s=1.0), source=ScriptedMetrics())

    def lowered(spec: dict[str, Any]) -> None:
        for role in spec["roles"]:
            if role["type"] == "decode":
                role["scaling"]["maxReplicas"] = 1
                role["replicas"] = 1  # roles[].replicas must lie within the bounds

    def limited() -> str | None:
        srs = kube.get(SRS_RES, "maxcut-decode", namespace=namespace)
        for c in (srs.status or {}).get("conditions") or []:
            if c["type"] == "ScalingLimited" and c["reason"] == "TooManyReplicas":
                return str(c["message"])
        return None

    try:
        update_spec(kube, namespace, "maxcut", lowered)
        message = await asyncio.to_thread(wait_for, limited, 30, "ScalingLimited TooManyReplicas")
        assert "while pdorch's scaler drains the groups above 1" in message, message
        assert kube.get(LWS_RES, "maxcut-decode", namespace=namespace).spec["replicas"] == 2
        assert len(leaders()) == 2

        marked_before_cut = False
        for _ in range(8):  # baseline, the decision (drain starts), two idle checks, the write
            await scaler.tick()
            lws = kube.get(LWS_RES, "maxcut-decode", namespace=namespace)
            if lws.spec["replicas"] == 2:
                marked_before_cut = [is_draining(kube, namespace, p) for p in leaders()] == [False, True]
            else:
                break
        assert marked_before_cut, "the group was removed without being drained first"
        await asyncio.to_thread(
            wait_for,
            lambda: kube.get(LWS_RES, "maxcut-decode", namespace=namespace).spec["replicas"] == 1,
            30,
            "decode's LWS at the new bound",
        )
        srs = await api.get(SERVING_ROLE_SCALER, "maxcut-decode", namespace)
        assert srs is not None and srs["status"]["lastScaleReason"].endswith("; drained"), srs["status"]
    finally:
        await api.close()


class SecondUnreadable:
    """The second decode leader's metrics cannot be read; the first is idle."""

    async def samples(self, namespace: str, endpoints: Sequence[Endpoint]) -> list[EngineSample | None]:
        return [None if e.pod.endswith("-1") else EngineSample("vllm") for e in endpoints]


async def test_a_lowered_max_is_reached_with_a_leader_unreadable(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """An unreadable leader held the size (unknown load holds a scale-down), so no drain started,
    and the controller, waiting for one, kept the role above its new maxReplicas for good
    (helper-67). The hold never exceeds the bound: the drain runs, and its timeout ends it."""
    await _two_builtin_decodes(kube, namespace, "maxhold")
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    cfg = ScalerConfig(namespace=namespace, interval_s=1.0, drain_timeout_s=1.0)
    scaler = BuiltinScaler(api, cfg, source=SecondUnreadable())

    def lowered(spec: dict[str, Any]) -> None:
        for role in spec["roles"]:
            if role["type"] == "decode":
                role["scaling"]["maxReplicas"] = 1
                role["replicas"] = 1

    try:
        update_spec(kube, namespace, "maxhold", lowered)
        for _ in range(12):
            await scaler.tick()
            await asyncio.sleep(0.5)
            if kube.get(LWS_RES, "maxhold-decode", namespace=namespace).spec["replicas"] == 1:
                break
        assert kube.get(LWS_RES, "maxhold-decode", namespace=namespace).spec["replicas"] == 1
        srs = await api.get(SERVING_ROLE_SCALER, "maxhold-decode", namespace)
        assert srs is not None and "drain timed out" in srs["status"]["lastScaleReason"], srs["status"]
    finally:
        await api.close()


async def test_a_drain_that_times_out_is_a_warning_naming_what_was_cut(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A scale-down written when the drain timed out cuts the requests still on the victims; it
    was a Normal ScaledDown event saying only "drain timed out" (helper-65)."""
    leaders = await _two_builtin_decodes(kube, namespace, "timeout")
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    metrics = VictimMetrics()
    metrics.victim = leaders()[1].metadata.name
    metrics.sample = EngineSample("vllm", running=2)  # two streams that will not end in time
    cfg = ScalerConfig(namespace=namespace, interval_s=1.0, drain_timeout_s=0.0)
    scaler = BuiltinScaler(api, cfg, source=metrics)
    try:
        for _ in range(4):  # baseline, the decision (its drain starts), the timed-out write
            await scaler.tick()
        srs = await api.get(SERVING_ROLE_SCALER, "timeout-decode", namespace)
        assert srs is not None and srs["spec"]["replicas"] == 1
        assert (
            "drain timed out after 0s with 2 requests still on the victims"
            in srs["status"]["lastScaleReason"]
        ), srs["status"]

        def warned() -> list[dict[str, Any]]:
            raw = kubectl(devcluster, "get", "events.events.k8s.io", "-n", namespace, "-o", "json")
            return [
                e
                for e in json.loads(raw)["items"]
                if e.get("reason") == "DrainTimedOut" and e.get("type") == "Warning"
            ]

        events = await asyncio.to_thread(wait_for, warned, 30, "a DrainTimedOut warning")
        assert events[0]["regarding"]["name"] == "timeout-decode"
        assert not [
            e
            for e in json.loads(
                kubectl(devcluster, "get", "events.events.k8s.io", "-n", namespace, "-o", "json")
            )["items"]
            if e.get("reason") == "ScaledDown"
        ]
    finally:
        await api.close()


async def test_the_controller_leaves_the_scalers_status_fields_to_the_scaler(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """The controller writes only replicas and selector of a ServingRoleScaler's status; it never
    co-owns lastScaleTime/lastScaleReason, so a stale copy in its cache cannot overwrite the
    scaler's newer reason."""
    doc = example_scaled(
        "owners", "decode", {"mode": "Builtin", "maxReplicas": 4, "targets": {"tpotMs": 100}}
    )
    kube.create(SG.from_dict(doc), namespace=namespace)
    await asyncio.to_thread(wait_available, kube, namespace, "owners")
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    try:
        # What the scaler does on a scale-up: /scale, then its reason in status.
        await api.patch(
            SERVING_ROLE_SCALER, "owners-decode", namespace, {"spec": {"replicas": 2}}, subresource="scale"
        )
        await api.apply(
            {
                "apiVersion": "pdorch.io/v1alpha1",
                "kind": "ServingRoleScaler",
                "metadata": {"name": "owners-decode", "namespace": namespace},
                "status": {"lastScaleTime": "2026-12-05T12:00:00Z", "lastScaleReason": "1 -> 2: test"},
            },
            subresource="status",
        )

        async def synced() -> dict[str, Any] | None:
            srs = await api.get(SERVING_ROLE_SCALER, "owners-decode", namespace)
            return srs if srs and (srs.get("status") or {}).get("replicas") == 2 else None

        srs = await wait_for_async(synced, 60, "the controller syncing status.replicas to 2")
    finally:
        await api.close()
    assert srs["status"]["lastScaleReason"] == "1 -> 2: test"
    owners = {
        m["manager"]: m.get("fieldsV1", {}).get("f:status", {})
        for m in srs["metadata"]["managedFields"]
        if m.get("subresource") == "status"
    }
    assert "f:lastScaleReason" in owners.get("pdorch-scaler", {}), owners
    others = {k: v for k, v in owners.items() if k != "pdorch-scaler"}
    assert others and all(
        "f:lastScaleReason" not in v and "f:lastScaleTime" not in v for v in others.values()
    ), owners


async def test_a_kubectl_scale_since_the_tick_read_the_size_is_not_overwritten(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """The scaler's /scale write carries the resourceVersion it decided on: a `kubectl scale` in
    between wins (the next tick decides from it) instead of being silently replaced."""
    doc = example_scaled("race", "decode", {"mode": "Builtin", "maxReplicas": 4, "targets": {"tpotMs": 100}})
    kube.create(SG.from_dict(doc), namespace=namespace)
    await asyncio.to_thread(wait_available, kube, namespace, "race")
    role = next(r for r in ServingGroup.model_validate(doc).spec.roles if r.name == "decode")
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace, interval_s=1.0))
    try:
        read = await api.get(SERVING_ROLE_SCALER, "race-decode", namespace)
        assert read is not None
        out = devcluster.kubectl("scale", "-n", namespace, "servingrolescaler/race-decode", "--replicas=3")
        assert out.returncode == 0, out.stderr
        assert not await scaler._write(namespace, "race", role, read, 1, 2, "decided on the old size")
        now = await api.get(SERVING_ROLE_SCALER, "race-decode", namespace)
        assert now is not None and now["spec"]["replicas"] == 3
        assert "decided on the old size" not in (now.get("status") or {}).get("lastScaleReason", "")
        # A write that moves only metadata or status since the read (the controller writes the
        # scaler's observedGeneration after every scale) must not cost the decision: this one
        # failed the write now and then in CI.
        await api.patch(
            SERVING_ROLE_SCALER, "race-decode", namespace, {"metadata": {"labels": {"touched": "1"}}}
        )
        assert await scaler._write(namespace, "race", role, now, 3, 2, "decided on kubectl's size")
        after = await api.get(SERVING_ROLE_SCALER, "race-decode", namespace)
        assert after is not None and after["spec"]["replicas"] == 2
    finally:
        await api.close()


def _events(devcluster: ClusterState, namespace: str, reason: str) -> list[dict[str, Any]]:
    raw = kubectl(devcluster, "get", "events.events.k8s.io", "-n", namespace, "-o", "json")
    return [e for e in json.loads(raw)["items"] if e.get("reason") == reason]


async def test_a_size_another_writer_set_is_the_new_baseline_and_a_second_scaler_a_warning(
    devcluster: ClusterState,
    kube: Client,
    namespace: str,
    controller: ControllerProc,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scaler took spec.replicas as its own every tick: a `kubectl scale` mid-drain was drained
    back at once, and an HPA on a Builtin role fought it with no word (helper-65 finding 5). Now a
    size it did not write is its new baseline (the drain is cancelled, the cooldown runs from it)
    and status names the writer; one that keeps replacing the scaler's sizes is a Warning
    ConflictingScaler naming its field manager."""
    leaders = await _two_builtin_decodes(kube, namespace, "foreign", cooldown_s=600)
    clock = [1000.0]  # the scaler's monotonic clock only: the cooldown passes without waiting it out
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    hpa = KubeApi.from_config(devcluster.kubeconfig, field_manager="test-hpa")
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace, interval_s=1.0), source=ScriptedMetrics())

    async def srs() -> dict[str, Any]:
        got = await api.get(SERVING_ROLE_SCALER, "foreign-decode", namespace)
        assert got is not None
        return got

    async def tick() -> None:
        await scaler.tick()
        clock[0] += 15

    async def scaled_down_to_1() -> None:
        clock[0] += 601  # past the cooldown the last change started
        for _ in range(40):  # the decision (its drain starts), two idle checks, the write
            await tick()
            if (await srs())["spec"]["replicas"] == 1:
                return
            await asyncio.sleep(0.5)  # for the groups a scale-up added to become Ready
        raise AssertionError(f"never scaled down: {(await srs())['status']}")

    try:
        await tick()  # baseline
        await tick()  # idle: 2 -> 1 starts by draining group 1
        assert [is_draining(kube, namespace, p) for p in leaders()] == [False, True]
        out = devcluster.kubectl("scale", "-n", namespace, "servingrolescaler/foreign-decode", "--replicas=3")
        assert out.returncode == 0, out.stderr
        for _ in range(3):  # 45 s, well within the cooldown
            await tick()
            assert (await srs())["spec"]["replicas"] == 3
            assert not any(is_draining(kube, namespace, p) for p in leaders()), "drained back"
        reason = (await srs())["status"]["lastScaleReason"]
        assert reason.startswith("2 -> 3 by kubectl"), reason
        assert "not pdorch's scaler: kept as the new baseline" in reason
        assert not _events(devcluster, namespace, "ConflictingScaler")

        # An HPA with minReplicas 3: it writes 3 back over each scale-down.
        warned: list[dict[str, Any]] = []
        for i in range(2):
            await scaled_down_to_1()
            await hpa.patch(
                SERVING_ROLE_SCALER,
                "foreign-decode",
                namespace,
                {"spec": {"replicas": 3}},
                subresource="scale",
            )
            await tick()
            await scaler.events.flush()
            assert (await srs())["spec"]["replicas"] == 3
            warned = _events(devcluster, namespace, "ConflictingScaler")
            assert len(warned) == i, warned  # the first replacement may be an operator's
        assert len(warned) == 1 and warned[0]["type"] == "Warning", warned
        assert "1 -> 3 by test-hpa, not pdorch's scaler" in warned[0]["note"], warned[0]["note"]
        assert warned[0]["regarding"]["name"] == "foreign-decode"
        assert "another scaler (an HPA or KEDA?)" in (await srs())["status"]["lastScaleReason"]
    finally:
        await api.close()
        await hpa.close()


async def test_a_metrics_outage_is_scaling_active_false_and_the_controller_leaves_it(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """During a total /metrics outage nothing but a counter said the scaler was blind (helper-65
    finding 8). Now ScalingActive is False (MetricsUnavailable) with a Warning; the scaler owns that
    condition by server-side apply next to the controller's ScalingLimited (conditions merge per
    type), the controller's own status writes keep it, and it is True once the load is read."""
    await _two_builtin_decodes(kube, namespace, "blind")
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    metrics = ScriptedMetrics()
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace, interval_s=1.0), source=metrics)

    async def conditions() -> dict[str, dict[str, Any]]:
        srs = await api.get(SERVING_ROLE_SCALER, "blind-decode", namespace)
        assert srs is not None
        return {c["type"]: c for c in (srs.get("status") or {}).get("conditions") or []}

    try:
        await scaler.tick()  # baseline
        await scaler.tick()
        active = (await conditions())["ScalingActive"]
        assert (active["status"], active["reason"]) == ("True", "ValidMetricFound"), active
        metrics.outage = True
        await scaler.tick()
        await scaler.events.flush()
        active = (await conditions())["ScalingActive"]
        assert (active["status"], active["reason"]) == ("False", "MetricsUnavailable"), active
        # (The idle tick started draining group 1: its leader is not scraped.)
        assert active["message"].startswith("no metrics from 1 ready leaders of 2 replicas"), active
        warned = _events(devcluster, namespace, "MetricsUnavailable")
        assert len(warned) == 1 and warned[0]["type"] == "Warning", warned

        # The controller writes its part of the status after a scale: the scaler's condition stays.
        await api.patch(
            SERVING_ROLE_SCALER, "blind-decode", namespace, {"spec": {"replicas": 3}}, subresource="scale"
        )

        async def synced() -> dict[str, Any] | None:
            srs = await api.get(SERVING_ROLE_SCALER, "blind-decode", namespace)
            return (
                srs
                if srs
                and (srs.get("status") or {}).get("observedGeneration") == srs["metadata"]["generation"]
                else None
            )

        srs = await wait_for_async(synced, 60, "the controller observing the new generation")
        have = {c["type"]: c for c in srs["status"]["conditions"]}
        assert have["ScalingActive"]["status"] == "False" and "ScalingLimited" in have, have
        owners = {
            m["manager"]: m.get("fieldsV1", {}).get("f:status", {}).get("f:conditions", {})
            for m in srs["metadata"]["managedFields"]
            if m.get("subresource") == "status"
        }
        key = 'k:{"type":"ScalingActive"}'
        assert key in owners["pdorch-scaler"], owners
        assert all(key not in v for k, v in owners.items() if k != "pdorch-scaler"), owners

        metrics.outage = False
        await scaler.tick()  # read again, without a previous reading: held, but read
        active = (await conditions())["ScalingActive"]
        assert (active["status"], active["reason"]) == ("True", "ValidMetricFound"), active
    finally:
        await api.close()

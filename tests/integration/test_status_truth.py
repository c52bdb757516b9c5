"""What `kubectl get sg`, status, events and metrics say on the dev cluster during a stalled
rollout, an outage under an invalid spec, after a group is deleted, and when a ServingRoleScaler
asks for more than its role allows."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from lightkube import Client
from lightkube.models.core_v1 import ResourceQuotaSpec, ResourceQuotaStatus
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Node, Pod, ResourceQuota
from lightkube.types import PatchType
from prometheus_client.parser import text_string_to_metric_families

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from tests.integration.test_controller import (
    LWS,
    SG,
    SRS,
    condition,
    example,
    example_scaled,
    example_sized,
    kubectl,
    set_engine_image,
    unschedulable,
    update_spec,
    wait_available,
)

pytestmark = pytest.mark.integration


def _events(devcluster: ClusterState, namespace: str, name: str) -> list[dict[str, Any]]:
    # As JSON: lightkube's typed Event refuses the null eventTime of converted core events.
    raw = kubectl(devcluster, "get", "events.events.k8s.io", "-n", namespace, "-o", "json")
    return [
        e
        for e in json.loads(raw)["items"]
        if (e.get("regarding") or {}).get("name") == name
        and e.get("reportingController") == "pdorch.io/controller"
    ]


def _reasons(devcluster: ClusterState, namespace: str, name: str, etype: str | None = None) -> list[str]:
    return [e["reason"] for e in _events(devcluster, namespace, name) if etype is None or e["type"] == etype]


def _series(metrics: str, group: str) -> set[str]:
    """Names of the controller's series that carry `group=<group>`."""
    return {
        s.name
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.labels.get("group") == group and not s.name.endswith("_created")
    }


def _value(metrics: str, name: str, group: str) -> float | None:
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == name and s.labels.get("group") == group:
                return s.value
    return None


def decode_port(port: Any) -> Callable[[dict[str, Any]], None]:
    """An `update_spec` edit setting decode's container port; "http" is a spec the API refuses
    (a name where a number belongs), so the group turns Invalid."""

    def edit(spec: dict[str, Any]) -> None:
        for role in spec["roles"]:
            if role["type"] == "decode":
                role["workerTemplate"]["spec"]["containers"][0]["ports"][0]["containerPort"] = port

    return edit


@pytest.fixture
def cordon(kube: Client) -> Iterator[Any]:
    """`cordon(True)` makes every node unschedulable (a deleted pod then stays Pending); undone after."""

    def set_all(on: bool) -> None:
        for node in kube.list(Node):
            kube.patch(Node, node.metadata.name, {"spec": {"unschedulable": on or None}})

    try:
        yield set_all
    finally:
        set_all(False)


def _outage(kube: Client, cordon: Any, namespace: str, name: str, role: str) -> None:
    """No node takes new pods, and the role's pods are deleted: its groups stay down."""
    cordon(True)
    for pod in kube.list(Pod, namespace=namespace, labels={"pdorch.io/group": name, "pdorch.io/role": role}):
        kube.delete(Pod, pod.metadata.name, namespace=namespace, grace_period=0)


def test_a_stalled_rollout_shows_desired_counts_and_its_state_and_stays_quiet(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    doc = example_sized("frozen", 4, 2)
    doc["spec"]["rolloutStrategy"] = {"progressDeadlineSeconds": 5}
    kube.create(SG.from_dict(doc), namespace=namespace)
    first = wait_available(kube, namespace, "frozen").status["updateRevision"]

    update_spec(kube, namespace, "frozen", unschedulable)

    def exceeded() -> Any:
        sg = kube.get(SG, "frozen", namespace=namespace)
        c = condition(sg, "RolloutStalled")
        return sg if c and c["reason"] == "ProgressDeadlineExceeded" else None

    sg = wait_for(exceeded, 90, "RolloutStalled reason ProgressDeadlineExceeded")
    status = sg.status
    # The operator asked for 4:2 (it used to read 3/5 and 2/3: the planner's replicas, surge
    # included); ready counts the groups that serve, at most the desired ones. (This stall's surge
    # groups never become ready, so the cap is not exercised here: the unit test
    # test_summary_and_roles_report_the_operators_desired_count_during_a_rollout pins it.)
    roles = {r["name"]: r for r in status["roles"]}
    assert roles["prefill"]["desiredReplicas"] == 4 and roles["decode"]["desiredReplicas"] == 2
    summary = status["summary"]
    assert summary["prefill"] == f"{min(roles['prefill']['readyReplicas'], 4)}/4", summary
    assert summary["decode"] == f"{min(roles['decode']['readyReplicas'], 2)}/2", summary
    assert summary["rollout"] == "Stalled"
    assert roles["prefill"]["surgeReplicas"] >= 1 and roles["prefill"]["replicas"] > 4
    assert roles["prefill"]["updatedReadyReplicas"] == 0
    second = status["updateRevision"]
    assert second != first and status["currentRevision"] == first

    header, row = kubectl(devcluster, "get", "sg", "-n", namespace).splitlines()[:2]
    cols = dict(zip(header.split(), row.split(), strict=True))
    assert cols["REVISION"] == first, "REVISION is the serving revision until the rollout completes"
    assert (cols["PREFILL"], cols["DECODE"], cols["ROLLOUT"]) == (
        summary["prefill"],
        summary["decode"],
        "Stalled",
    )

    # The surge groups' pods find no node: said per role, though the ready counts are complete,
    # each pod once it has waited 30 s.
    def pending(role: str) -> int:
        pods = kube.list(
            Pod, namespace=namespace, labels={"pdorch.io/group": "frozen", "pdorch.io/role": role}
        )
        return sum(p.status.phase == "Pending" for p in pods)

    def unplaced() -> str | None:
        c = condition(kube.get(SG, "frozen", namespace=namespace), "PodsUnschedulable")
        if not c or c["status"] != "True":
            return None
        counted = all(f"{role}: {pending(role)} pod" in c["message"] for role in ("prefill", "decode"))
        return c["message"] if counted else None

    msg = wait_for(unplaced, 90, "PodsUnschedulable=True counting every surge pod")
    assert msg.startswith("decode: ") and "; prefill: " in msg and "node affinity/selector" in msg, msg

    # An unchanged stall writes nothing (the message used to count seconds: a write every pass),
    # nor do pods that keep waiting for a node.
    time.sleep(3)
    rv = kube.get(SG, "frozen", namespace=namespace).metadata.resourceVersion
    time.sleep(12)  # two requeues of a stalled rollout (every 5 s) and their watch events
    again = kube.get(SG, "frozen", namespace=namespace)
    assert again.metadata.resourceVersion == rv, again.status["conditions"]

    # The stall is a Warning event.
    def stall_warned() -> bool:
        return "ProgressDeadlineExceeded" in _reasons(devcluster, namespace, "frozen", "Warning")

    wait_for(stall_warned, 15, "a Warning ProgressDeadlineExceeded event")

    # A scale-down mid-rollout shows at once in the desired count.
    update_spec(
        kube,
        namespace,
        "frozen",
        lambda s: [r.update({"replicas": 2}) for r in s["roles"] if r["type"] == "prefill"],
    )
    wait_for(
        lambda: kube.get(SG, "frozen", namespace=namespace).status["summary"]["prefill"].endswith("/2"),
        30,
        "prefill desired 2 in the summary",
    )
    assert _value(controller.metrics_text(), "pdorch_rollout_stalled", "frozen") == 1

    # An invalid spec drops RolloutStalled from the status (nothing is rolled out): the gauge too.
    update_spec(kube, namespace, "frozen", decode_port("http"))
    wait_for(
        lambda: (
            (condition(kube.get(SG, "frozen", namespace=namespace), "Invalid") or {}).get("status") == "True"
        ),
        60,
        "Invalid=True",
    )
    assert condition(kube.get(SG, "frozen", namespace=namespace), "RolloutStalled") is None
    assert _value(controller.metrics_text(), "pdorch_rollout_stalled", "frozen") == 0


def test_an_invalid_spec_still_reports_an_outage_and_warns_once(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc, cordon: Any
) -> None:
    kube.create(SG.from_dict(example("inv")), namespace=namespace)
    wait_available(kube, namespace, "inv")

    update_spec(kube, namespace, "inv", decode_port("http"))

    def invalid() -> Any:
        sg = kube.get(SG, "inv", namespace=namespace)
        c = condition(sg, "Invalid")
        return sg if c and c["status"] == "True" else None

    sg = invalid() or wait_for(invalid, 60, "Invalid=True")
    # The old LWS still serve: Available stays True (it used to go Unknown).
    assert condition(sg, "Available")["status"] == "True"
    assert sg.status["summary"]["rollout"] == "Invalid"
    time.sleep(3)  # events are sent in the background
    assert _reasons(devcluster, namespace, "inv", "Warning") == ["InvalidSpec"], "one refusal, one Warning"

    _outage(kube, cordon, namespace, "inv", "decode")

    def down() -> Any:
        sg = kube.get(SG, "inv", namespace=namespace)
        c = condition(sg, "Available")
        return sg if c and c["status"] == "False" else None

    sg = wait_for(down, 60, "Available=False while the spec is invalid")
    assert sg.status["summary"]["decode"] == "0/1", sg.status["summary"]
    assert condition(sg, "Available")["reason"] == "RoleNotReady"
    assert condition(sg, "Invalid")["status"] == "True"

    def warned(n: int) -> bool:
        return _reasons(devcluster, namespace, "inv", "Warning").count("RoleNotReady") >= n

    wait_for(lambda: warned(1), 15, "a Warning RoleNotReady event")

    # The recreated decode pod finds no node (all cordoned): said under the invalid spec too, which
    # a pass only reports (it used to look again only on an LWS change).
    def unplaced() -> str | None:
        c = condition(kube.get(SG, "inv", namespace=namespace), "PodsUnschedulable")
        return c["message"] if c and c["status"] == "True" else None

    msg = wait_for(unplaced, 75, "PodsUnschedulable=True while the spec is invalid")
    assert msg.startswith("decode: 1 pod not scheduled: ") and "unschedulable" in msg, msg
    assert condition(kube.get(SG, "inv", namespace=namespace), "Invalid")["status"] == "True"

    # Back up, then a second outage minutes before the old 10-minute dedup window ends: a second
    # Warning (it used to be dropped as a repeat).
    cordon(False)
    wait_for(
        lambda: condition(kube.get(SG, "inv", namespace=namespace), "Available")["status"] == "True",
        60,
        "decode back",
    )
    _outage(kube, cordon, namespace, "inv", "decode")
    wait_for(down, 60, "Available=False again")
    wait_for(lambda: warned(2), 15, "a second Warning RoleNotReady event")


def test_ratio_deviation_follows_a_one_sided_outage_and_a_deleted_group_leaves_no_series(
    kube: Client, namespace: str, controller: ControllerProc, cordon: Any
) -> None:
    name = f"gone-{namespace[-6:]}"
    kube.create(SG.from_dict(example(name)), namespace=namespace)
    wait_available(kube, namespace, name)
    wait_for(lambda: _value(controller.metrics_text(), "pdorch_ratio_deviation", name) == 0, 30, "on ratio")
    assert {"pdorch_rollout_stalled", "pdorch_ratio_deviation"} <= _series(controller.metrics_text(), name)

    _outage(kube, cordon, namespace, name, "decode")
    wait_for(
        lambda: _value(controller.metrics_text(), "pdorch_ratio_deviation", name) == 1.0,
        60,
        "ratio deviation 1.0 with no decode ready",
    )
    cordon(False)

    kube.delete(SG, name, namespace=namespace)
    wait_for(lambda: not _series(controller.metrics_text(), name), 60, f"no series of {name} left")


def test_pods_the_namespace_refuses_are_reported_as_replica_failure_until_fixed(
    kube: Client, devcluster: ClusterState, namespace: str, controller: ControllerProc
) -> None:
    """Pods a namespace's admission refuses (here Pod Security "restricted") pass every check of the
    group and its LWS; the StatefulSets LWS creates then cannot create them, which only their own
    Warning events said. The group carries ReplicaFailure=True (FailedCreate) with that message,
    and drops it once the templates comply. (Templates the pod validation refuses are Invalid
    before anything is created: test_validation.)"""
    kube.patch(
        Namespace,
        namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
        patch_type=PatchType.MERGE,
    )
    kube.create(SG.from_dict(example("restricted")), namespace=namespace)

    def failure() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "restricted", namespace=namespace), "ReplicaFailure")
        return c if c and c["status"] == "True" else None

    c = wait_for(failure, 90, "ReplicaFailure=True")
    assert c["reason"] == "FailedCreate"
    assert "violates PodSecurity" in c["message"] and "restricted" in c["message"], c["message"]

    # An invalid spec meanwhile resolves nothing: the condition stays (it used to be dropped, with a
    # Normal "Resolved" event).
    was = next(r for r in example("restricted")["spec"]["roles"] if r["type"] == "decode")
    update_spec(kube, namespace, "restricted", decode_port("http"))

    def invalid() -> dict[str, Any] | None:
        sg = kube.get(SG, "restricted", namespace=namespace)
        inv = condition(sg, "Invalid")
        return sg if inv and inv["status"] == "True" else None

    wait_for(invalid, 60, "Invalid=True")
    time.sleep(2)  # the invalid pass's status write and events
    assert failure() is not None, condition(kube.get(SG, "restricted", namespace=namespace), "ReplicaFailure")
    assert "Resolved" not in _reasons(devcluster, namespace, "restricted")
    update_spec(
        kube,
        namespace,
        "restricted",
        decode_port(was["workerTemplate"]["spec"]["containers"][0]["ports"][0]["containerPort"]),
    )

    def comply(spec: dict[str, Any]) -> None:
        for role in spec["roles"]:
            for container in (role.get("workerTemplate") or {}).get("spec", {}).get("containers", []):
                container["securityContext"] = {
                    "runAsNonRoot": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                }

    update_spec(kube, namespace, "restricted", comply)

    # The old groups never started, but one observation does not tell that from a blip: the
    # planner says it waits out the grace before recreating them (planner.OLD_DOWN_GRACE_S).
    def grace_announced() -> str | None:
        c = condition(kube.get(SG, "restricted", namespace=namespace), "Progressing")
        msg = (c or {}).get("message", "")
        return msg if "no old group of" in msg else None

    msg = wait_for(grace_announced, 60, "the planner waiting out the grace")
    assert "recreated on the current template" in msg, msg
    wait_available(kube, namespace, "restricted", timeout=180)
    wait_for(lambda: failure() is None, 60, "ReplicaFailure gone after the fix")


def test_pods_no_node_takes_are_reported_as_unschedulable_until_one_does(
    kube: Client, devcluster: ClusterState, namespace: str, controller: ControllerProc
) -> None:
    """Decode's pods ask for a node label no node has: the real scheduler leaves them Pending and
    says why only on each pod. The group carries PodsUnschedulable=True with the scheduler's
    message under the role's name and a Warning event; once a node gets the label the pods run,
    the condition goes and a Normal `Resolved` says so."""
    label = f"pdorch.io/test-{namespace}"
    doc = example("nogpu")
    for role in doc["spec"]["roles"]:
        if role["type"] == "decode":
            role["workerTemplate"]["spec"]["nodeSelector"] = {label: "yes"}
    kube.create(SG.from_dict(doc), namespace=namespace)

    def unplaced() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "nogpu", namespace=namespace), "PodsUnschedulable")
        return c if c and c["status"] == "True" else None

    c = wait_for(unplaced, 120, "PodsUnschedulable=True")
    assert c["reason"] == "Unschedulable"
    assert c["message"].startswith("decode: 1 pod not scheduled: 0/"), c["message"]
    assert "node affinity/selector" in c["message"], c["message"]  # the scheduler's own words
    assert "prefill" not in c["message"]
    assert "Unschedulable" in _reasons(devcluster, namespace, "nogpu", "Warning")
    assert _value(controller.metrics_text(), "pdorch_pods_unschedulable", "nogpu") == 1

    node = next(iter(kube.list(Node))).metadata.name
    kube.patch(Node, node, {"metadata": {"labels": {label: "yes"}}})
    try:
        wait_available(kube, namespace, "nogpu", timeout=120)
        wait_for(lambda: unplaced() is None, 60, "PodsUnschedulable gone once a node fits")
        assert "Resolved" in _reasons(devcluster, namespace, "nogpu", "Normal")
        assert _value(controller.metrics_text(), "pdorch_pods_unschedulable", "nogpu") == 0
    finally:
        kube.patch(Node, node, {"metadata": {"labels": {label: None}}})


def _event_lists(metrics: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "pdorch_kube_requests_total" and s.labels.get("resource") == "events":
                if s.labels.get("verb") == "list":
                    return s.value
    return 0.0


def test_groups_lacking_pods_in_one_namespace_share_one_list_of_its_warnings(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """Each group lacking groups listed its namespace's FailedCreate warnings every 15 s: 500 new
    groups in one namespace made that a list scan of its events 33 times a second, which swamped the
    apiserver (the controller benchmark no longer converged). One list per namespace now serves all."""
    kube.patch(
        Namespace,
        namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
        patch_type=PatchType.MERGE,
    )
    names = [f"lack{i}" for i in range(6)]
    for name in names:
        kube.create(SG.from_dict(example(name)), namespace=namespace)

    def failing(name: str) -> bool:
        c = condition(kube.get(SG, name, namespace=namespace), "ReplicaFailure")
        return c is not None and c["status"] == "True"

    wait_for(lambda: all(failing(n) for n in names), 90, "ReplicaFailure=True on every group")
    before = _event_lists(controller.metrics_text())
    time.sleep(46)  # three 15 s periods, each group requeued every 15 s
    lists = _event_lists(controller.metrics_text()) - before
    # One list per period for the namespace (a period may straddle the window's ends); per group,
    # the six groups would make about 18.
    assert lists <= 5, lists
    assert all(failing(n) for n in names)  # and every group still reports why


def test_a_scale_beyond_the_bounds_is_shown_on_the_scaler_until_it_is_back_within(
    kube: Client, namespace: str, controller: ControllerProc, devcluster: ClusterState
) -> None:
    """`kubectl scale` past maxReplicas (or under minReplicas) is held at the bound in the LWS;
    the scaler said nothing about it (Desired 9, Current 4). ScalingLimited and a Warning say so,
    and observedGeneration tells which /scale write the LWS reflects."""
    scaling = {"mode": "External", "minReplicas": 1, "maxReplicas": 2}
    kube.create(SG.from_dict(example_scaled("bound", "decode", scaling)), namespace=namespace)
    wait_available(kube, namespace, "bound")

    def scale(n: int) -> int:
        srs = kube.patch(
            SRS, "bound-decode", {"spec": {"replicas": n}}, namespace=namespace, patch_type=PatchType.MERGE
        )
        return int(srs.metadata.generation)

    def limited(generation: int) -> dict[str, Any] | None:
        srs = kube.get(SRS, "bound-decode", namespace=namespace)
        seen = (srs.status or {}).get("observedGeneration")
        return condition(srs, "ScalingLimited") if seen == generation else None

    gen = scale(9)
    cond = wait_for(lambda: limited(gen), 60, "the scaler observing replicas 9")
    assert (cond["status"], cond["reason"]) == ("True", "TooManyReplicas"), cond
    assert "maxReplicas 2" in cond["message"] and cond["observedGeneration"] == gen, cond
    assert kube.get(LWS, "bound-decode", namespace=namespace).spec["replicas"] == 2
    wait_for(
        lambda: "TooManyReplicas" in _reasons(devcluster, namespace, "bound-decode", "Warning"), 30, "event"
    )

    gen = scale(0)
    cond = wait_for(lambda: limited(gen), 60, "the scaler observing replicas 0")
    assert (cond["status"], cond["reason"]) == ("True", "TooFewReplicas"), cond
    assert "minReplicas 1" in cond["message"], cond

    gen = scale(2)
    cond = wait_for(lambda: limited(gen), 60, "the scaler observing replicas 2")
    assert (cond["status"], cond["reason"]) == ("False", "DesiredWithinRange"), cond
    assert _reasons(devcluster, namespace, "bound-decode", "Warning").count("TooManyReplicas") == 1


def test_a_paused_rollout_keeps_the_scalers_new_replicas_unobserved(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A /scale write during a paused rollout does not reach the LWS (the planner sizes it): the
    scaler's observedGeneration stays at the generation the LWS got until the rollout resumes."""
    scaling = {"mode": "External", "minReplicas": 1, "maxReplicas": 4}
    kube.create(SG.from_dict(example_scaled("held", "decode", scaling)), namespace=namespace)
    wait_available(kube, namespace, "held")
    first = wait_for(
        lambda: (kube.get(SRS, "held-decode", namespace=namespace).status or {}).get("observedGeneration"),
        60,
        "the scaler's first observedGeneration",
    )

    def pause_on_a_new_image(spec: dict[str, Any]) -> None:
        set_engine_image("pdorch/sim:v2")(spec)
        spec.setdefault("rolloutStrategy", {})["paused"] = True

    update_spec(kube, namespace, "held", pause_on_a_new_image)
    wait_for(
        lambda: (
            (condition(kube.get(SG, "held", namespace=namespace), "RolloutStalled") or {}).get("reason")
            == "Paused"
        ),
        60,
        "paused",
    )
    gen = kube.patch(
        SRS, "held-decode", {"spec": {"replicas": 3}}, namespace=namespace, patch_type=PatchType.MERGE
    ).metadata.generation
    time.sleep(6)  # several passes of the controller
    srs = kube.get(SRS, "held-decode", namespace=namespace)
    assert kube.get(LWS, "held-decode", namespace=namespace).spec["replicas"] == 1
    assert srs.status["observedGeneration"] == first != gen, srs.status

    update_spec(kube, namespace, "held", lambda spec: spec["rolloutStrategy"].update(paused=False))
    wait_for(
        lambda: (
            (kube.get(SRS, "held-decode", namespace=namespace).status or {}).get("observedGeneration") == gen
        ),
        120,
        "observedGeneration once the rollout resumed and ended",
    )
    assert kube.get(LWS, "held-decode", namespace=namespace).spec["replicas"] == 3


def test_a_hand_edited_kv_lws_restarts_at_most_a_group_and_is_put_back_with_a_warning(
    kube: Client, namespace: str, controller: ControllerProc, devcluster: ClusterState
) -> None:
    """An LWS template edited by hand rolls nothing the planner did not plan beyond one group at a
    time (at rest a KV role's LWS has maxUnavailable 1; a rollout's 100% recreated every group of
    the role at once), pdorch puts it back at once, and a Warning `Reverted` says so."""
    kube.create(SG.from_dict(example_sized("handed", 1, 4)), namespace=namespace)
    wait_available(kube, namespace, "handed")

    def decode_pods() -> dict[str, str]:
        pods = kube.list(
            Pod, namespace=namespace, labels={"pdorch.io/group": "handed", "pdorch.io/role": "decode"}
        )
        return {p.metadata.name: p.metadata.uid for p in pods}

    before = decode_pods()
    assert len(before) == 4, before
    lws = kube.get(LWS, "handed-decode", namespace=namespace).to_dict()
    lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"] = "hand/edited"
    kube.replace(LWS.from_dict(lws), namespace=namespace)

    wait_for(lambda: "Reverted" in _reasons(devcluster, namespace, "handed", "Warning"), 60, "Reverted")
    note = next(e["note"] for e in _events(devcluster, namespace, "handed") if e["reason"] == "Reverted")
    assert "LeaderWorkerSet/handed-decode" in note and "change the ServingGroup" in note, note
    image = kube.get(LWS, "handed-decode", namespace=namespace).spec["leaderWorkerTemplate"]
    assert image["workerTemplate"]["spec"]["containers"][0]["image"] == "pdorch/sim:dev"
    wait_available(kube, namespace, "handed")
    time.sleep(5)  # whatever LWS began rolling has rolled back
    after = decode_pods()
    kept = sorted(n for n, uid in before.items() if after.get(n) == uid)
    assert len(kept) >= 2, (before, after)

    # A field the ServingGroup does not set (a pod-template annotation, added by a patch that
    # touches nothing else): pdorch's apply leaves it, so it says so instead of "put back".
    kube.patch(
        LWS,
        "handed-prefill",
        {"spec": {"leaderWorkerTemplate": {"workerTemplate": {"metadata": {"annotations": {"hand": "1"}}}}}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    wait_for(
        lambda: "ChangedOutside" in _reasons(devcluster, namespace, "handed", "Warning"), 60, "ChangedOutside"
    )
    notes = [
        e["note"]
        for e in _events(devcluster, namespace, "handed")
        if e["reason"] in ("Reverted", "ChangedOutside")
    ]
    assert not any("handed-prefill" in n and n.startswith("put back") for n in notes), notes


def test_a_rollouts_surge_groups_the_namespace_refuses_are_reported_as_replica_failure(
    kube: Client, devcluster: ClusterState, namespace: str, controller: ControllerProc
) -> None:
    """A rollout's surge groups that a quota refuses leave the ready count at the desired one, so the
    group only showed a rollout waiting for readiness (then stalled), with nothing about the quota.
    It carries ReplicaFailure=True with the quota's message, as a scale-up does, until it is lifted."""
    kube.create(SG.from_dict(example("quota")), namespace=namespace)
    wait_available(kube, namespace, "quota")
    pods = len(list(kube.list(Pod, namespace=namespace)))
    kube.create(
        ResourceQuota(metadata=ObjectMeta(name="pods"), spec=ResourceQuotaSpec(hard={"pods": str(pods)})),
        namespace=namespace,
    )
    wait_for(
        lambda: (kube.get(ResourceQuota, "pods", namespace=namespace).status or ResourceQuotaStatus()).used,
        60,
        "the quota's usage counted",
    )
    update_spec(kube, namespace, "quota", set_engine_image("pdorch/sim:v2"))

    def failure() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "quota", namespace=namespace), "ReplicaFailure")
        return c if c and c["status"] == "True" else None

    c = wait_for(failure, 120, "ReplicaFailure=True")
    assert c["reason"] == "FailedCreate" and "exceeded quota" in c["message"], c
    kube.delete(ResourceQuota, "pods", namespace=namespace)
    wait_available(kube, namespace, "quota", timeout=180)
    wait_for(lambda: failure() is None, 60, "ReplicaFailure gone once the quota is lifted")


def test_a_child_taken_back_is_not_announced_as_created(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A child whose managed-by label was removed by hand looks deleted to the controller's watch;
    the controller takes it back, and that was announced as `created` (helper-80). A deleted child
    that is recreated still is."""
    kube.create(SG.from_dict(example("taken")), namespace=namespace)
    wait_available(kube, namespace, "taken")
    kube.patch(
        LWS,
        "taken-decode",
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    kube.delete(LWS, "taken-prefill", namespace=namespace)

    def notes() -> list[str]:
        return [
            e.get("note") or "" for e in _events(devcluster, namespace, "taken") if e["reason"] == "Created"
        ]

    wait_for(
        lambda: any("LeaderWorkerSet/taken-prefill" in n and "ServiceAccount" not in n for n in notes()),
        60,
        "the deleted prefill LWS recreated",
    )
    wait_for(
        lambda: (kube.get(LWS, "taken-decode", namespace=namespace).metadata.labels or {}).get(
            "app.kubernetes.io/managed-by"
        ),
        60,
        "the decode LWS taken back",
    )
    time.sleep(3)  # events go out in the background
    # Only the group's first event (which lists its ServiceAccount too) names the decode LWS.
    assert not [n for n in notes() if "LeaderWorkerSet/taken-decode" in n and "ServiceAccount" not in n], (
        notes()
    )

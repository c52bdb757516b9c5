"""Rollout controls on the dev cluster: revision history and `pdorch rollback`, a rollout the
planner refuses (RolloutStalled) and its fix, and `paused`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from lightkube import ApiError, Client
from lightkube.resources.apps_v1 import ControllerRevision
from lightkube.types import PatchType

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from pdorch.rollout.live import lws_replicas_partition, lws_revision
from tests.compat.helpers import sample
from tests.integration.admission import refusing
from tests.integration.test_controller import (
    LWS,
    SG,
    SRS,
    condition,
    example,
    example_scaled,
    example_sized,
    set_engine_image,
    unschedulable,
    update_spec,
    wait_available,
)

pytestmark = pytest.mark.integration


def _status(kube: Client, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(SG, name, namespace=namespace).status or {}


def _on(kube: Client, namespace: str, name: str, revision: str) -> bool:
    st = _status(kube, namespace, name)
    sg = kube.get(SG, name, namespace=namespace)
    prog = condition(sg, "Progressing")
    return (
        st.get("currentRevision") == revision
        and st.get("updateRevision") == revision
        and prog is not None
        and prog["status"] == "False"
    )


def _new_revision(kube: Client, namespace: str, name: str, old: str) -> str:
    return wait_for(
        lambda: (r := _status(kube, namespace, name).get("updateRevision")) != old and r,
        30,
        "a new update revision",
    )


def _kv_lws(kube: Client, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    return {
        o.metadata.name: o.to_dict()
        for o in kube.list(LWS, namespace=namespace, labels={"pdorch.io/group": name})
        if not o.metadata.name.endswith("-proxy")
    }


def test_revisions_are_recorded_and_rollback_restores_the_previous_one(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    kube.create(SG.from_dict(example("hist")), namespace=namespace)
    first = wait_available(kube, namespace, "hist").status["updateRevision"]
    update_spec(kube, namespace, "hist", set_engine_image("pdorch/sim:v2"))
    second = _new_revision(kube, namespace, "hist", first)
    wait_for(lambda: _on(kube, namespace, "hist", second), 90, "rollout to the second revision")
    listed = kube.list(ControllerRevision, namespace=namespace, labels={"pdorch.io/group": "hist"})
    # StatefulSets keep ControllerRevisions with our pod labels too; pdorch's are owned by the group.
    records = [r for r in listed if r.metadata.ownerReferences[0].kind == "ServingGroup"]
    assert {r.metadata.labels["pdorch.io/revision"] for r in records} == {first, second}

    cli = [
        sys.executable,
        "-m",
        "pdorch.cli",
        "rollback",
        "hist",
        "-n",
        namespace,
        "--kubeconfig",
        devcluster.kubeconfig,
    ]
    dry = subprocess.run([*cli, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"{second} -> {first}" in dry.stdout
    assert _status(kube, namespace, "hist")["updateRevision"] == second  # nothing changed

    done = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: _on(kube, namespace, "hist", first), 90, "rollback to the first revision")
    images = {
        o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"]
        for o in _kv_lws(kube, namespace, "hist").values()
    }
    assert images == {"pdorch/sim:dev"}

    # The group runs `first` again, so its record is the newest and the previous revision is
    # `second` (not "nothing earlier", and after another deploy not the revision rolled back from).
    def numbers() -> dict[str, int]:
        listed = kube.list(ControllerRevision, namespace=namespace, labels={"pdorch.io/group": "hist"})
        return {
            r.metadata.labels["pdorch.io/revision"]: r.revision
            for r in listed
            if r.metadata.ownerReferences[0].kind == "ServingGroup"
        }

    wait_for(lambda: (n := numbers()).get(first, 0) > n.get(second, 0), 30, "the first revision renumbered")
    again = subprocess.run([*cli, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and f"{first} -> {second}" in again.stdout, again.stdout + again.stderr

    bad = subprocess.run([*cli, "--to-revision", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no recorded revision 'nope'" in bad.stderr


def test_a_plan_that_cannot_finish_stalls_without_moving_and_recovers_when_fixed(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    doc = example("stuck")
    # 2 prefill : 1 decode, no surge, one unavailable group, exact ratio: moving the only decode
    # would leave the old prefills without a decode, so no step keeps both cohorts on ratio.
    doc["spec"]["rolloutStrategy"] = {"maxSurge": 0, "maxUnavailable": 1, "ratioTolerance": 0}
    kube.create(SG.from_dict(doc), namespace=namespace)
    first = wait_available(kube, namespace, "stuck").status["updateRevision"]
    update_spec(kube, namespace, "stuck", set_engine_image("pdorch/sim:v2"))
    second = _new_revision(kube, namespace, "stuck", first)

    def stalled() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "stuck", namespace=namespace), "RolloutStalled")
        return c if c and c["status"] == "True" else None

    c = wait_for(stalled, 30, "RolloutStalled=True")
    assert c["reason"] == "CannotProgress"
    labels = {"namespace": namespace, "group": "stuck"}
    assert sample(controller.metrics_text(), "pdorch_rollout_stalled", labels) == 1
    assert "maxSurge" in c["message"] and "cannot progress" in c["message"]
    # The new templates are in, but with partition = replicas: no group moved.
    for o in _kv_lws(kube, namespace, "stuck").values():
        replicas, partition = lws_replicas_partition(o)
        assert lws_revision(o) == second and partition == replicas

    # The strategy is not part of the revision: the same rollout resumes under the new budgets.
    update_spec(kube, namespace, "stuck", lambda s: s["rolloutStrategy"].update({"maxSurge": 2}))
    wait_for(
        lambda: _on(kube, namespace, "stuck", second),
        90,
        "rollout after raising maxSurge to a whole ratio unit",
    )
    c = condition(kube.get(SG, "stuck", namespace=namespace), "RolloutStalled")
    assert c is not None and c["status"] == "False"
    # Once the rollout is over, the stall and deviation gauges are back at 0 (not left at their last value).
    wait_for(
        lambda: (
            sample(controller.metrics_text(), "pdorch_rollout_stalled", labels) == 0
            and sample(controller.metrics_text(), "pdorch_rollout_cohort_ratio_deviation", labels) == 0
        ),
        30,
        "rollout gauges reset after the rollout",
    )


def test_paused_rollout_holds_then_finishes_when_resumed(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    doc = example_scaled("pause", "decode", {"mode": "External", "minReplicas": 1, "maxReplicas": 3})
    doc["spec"]["rolloutStrategy"] = {"paused": True}
    kube.create(SG.from_dict(doc), namespace=namespace)
    first = wait_available(kube, namespace, "pause").status["updateRevision"]
    update_spec(kube, namespace, "pause", set_engine_image("pdorch/sim:v2"))
    second = _new_revision(kube, namespace, "pause", first)

    def paused() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "pause", namespace=namespace), "RolloutStalled")
        return c if c and c["reason"] == "Paused" else None

    assert wait_for(paused, 30, "RolloutStalled reason Paused")["status"] == "False"
    for o in _kv_lws(kube, namespace, "pause").values():
        replicas, partition = lws_replicas_partition(o)
        assert partition == replicas
    assert _status(kube, namespace, "pause")["currentRevision"] == first
    # `pdorch plan --from-live` continues from the held state and shows how it would finish.
    plan = subprocess.run(
        [sys.executable, "-m", "pdorch.cli", "plan", "--from-live", "pause", "-n", namespace,
         "--kubeconfig", devcluster.kubeconfig],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert f"rollout to {second} in progress" in plan.stdout and "# done:" in plan.stdout
    assert "paused (spec.rolloutStrategy.paused)" in plan.stdout, plan.stdout

    def limited() -> dict[str, Any] | None:
        conds = (kube.get(SRS, "pause-decode", namespace=namespace).status or {}).get("conditions") or []
        c = next((c for c in conds if c["type"] == "ScalingLimited"), None)
        return c if c and c["status"] == "True" else None

    # A scale (an HPA's, kubectl's) waits for the rollout's next step, which a paused rollout
    # does not take: the decode's scaler says so instead of silently keeping its old size (and
    # says nothing while no scale waits).
    assert limited() is None
    kube.patch(
        SRS, "pause-decode", {"spec": {"replicas": 2}}, namespace=namespace, patch_type=PatchType.MERGE
    )

    held = wait_for(limited, 30, "ScalingLimited on the decode's scaler while paused")
    assert held["reason"] == "HeldByRollout" and "rollout paused" in held["message"], held
    assert lws_replicas_partition(_kv_lws(kube, namespace, "pause")["pause-decode"])[0] == 1

    update_spec(kube, namespace, "pause", lambda s: s["rolloutStrategy"].update({"paused": False}))
    wait_for(lambda: _on(kube, namespace, "pause", second), 90, "rollout after resuming")
    wait_for(
        lambda: lws_replicas_partition(_kv_lws(kube, namespace, "pause")["pause-decode"]) == (2, 0),
        60,
        "the decode at the scaled size after the rollout",
    )
    wait_for(lambda: limited() is None, 30, "ScalingLimited False once the rollout moved")


def test_a_rollout_past_its_deadline_stays_stalled_across_a_controller_restart(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """RolloutStalled=ProgressDeadlineExceeded counts from status.lastProgressTime, so a restarted
    controller does not flip it back to False and wait a whole deadline again."""
    doc = example("late")
    doc["spec"]["rolloutStrategy"] = {"progressDeadlineSeconds": 5}
    kube.create(SG.from_dict(doc), namespace=namespace)
    wait_available(kube, namespace, "late")

    update_spec(kube, namespace, "late", unschedulable)

    def exceeded() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "late", namespace=namespace), "RolloutStalled")
        return c if c and c["reason"] == "ProgressDeadlineExceeded" else None

    before = wait_for(exceeded, 90, "RolloutStalled reason ProgressDeadlineExceeded")
    assert before["status"] == "True"
    stamp = _status(kube, namespace, "late").get("lastProgressTime")
    assert stamp, "no status.lastProgressTime while rolling"

    assert controller.stop() == 0
    controller.restart()
    controller.wait_ready()
    # While rolling the controller passes the group every 5 s; watch it for three passes.
    deadline = time.monotonic() + 16
    while time.monotonic() < deadline:
        c = condition(kube.get(SG, "late", namespace=namespace), "RolloutStalled")
        assert c is not None and c["status"] == "True", f"the restart cleared the stall: {c}"
        assert c["lastTransitionTime"] == before["lastTransitionTime"], c
        time.sleep(0.5)
    assert sample(controller.metrics_text(), "pdorch_reconcile_total", {"result": "ok"}) > 0
    assert _status(kube, namespace, "late").get("lastProgressTime") == stamp


def test_a_refused_revision_record_is_reported_and_retried_after_a_controller_restart(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """An admission policy refuses the group's ControllerRevision: status says so
    (RevisionRecordFailed, with the API's message), and once the policy is gone the record is
    written, also when the controller restarted in between (no revision change to trigger it)."""
    name = f"norec-{namespace[-6:]}"
    rule = {
        "apiGroups": ["apps"],
        "apiVersions": ["v1"],
        "operations": ["CREATE"],
        "resources": ["controllerrevisions"],
    }
    # Only the group's own history: LWS keeps ControllerRevisions too.
    allowed = (
        "!has(object.metadata.ownerReferences) || "
        "!object.metadata.ownerReferences.exists(r, r.kind == 'ServingGroup' && r.name == 'rec')"
    )
    with refusing(
        kube, name, namespace, rule, allowed, "revision history is blocked by the test policy"
    ) as lift:
        probe = ControllerRevision.from_dict(
            {
                "metadata": {
                    "generateName": "probe-",
                    "ownerReferences": [
                        {
                            "apiVersion": "pdorch.io/v1alpha1",
                            "kind": "ServingGroup",
                            "name": "rec",
                            "uid": "00000000-0000-0000-0000-000000000000",
                        }
                    ],
                },
                "data": {},
                "revision": 1,
            }
        )

        def enforced() -> bool:
            try:
                made = kube.create(probe, namespace=namespace)
            except ApiError as e:
                return "blocked by the test policy" in e.status.message
            kube.delete(ControllerRevision, made.metadata.name, namespace=namespace)
            return False

        wait_for(enforced, 30, "the test admission policy in force")
        kube.create(SG.from_dict(example("rec")), namespace=namespace)

        def failed() -> dict[str, Any] | None:
            c = condition(kube.get(SG, "rec", namespace=namespace), "RevisionRecordFailed")
            return c if c and c["status"] == "True" else None

        c = wait_for(failed, 60, "RevisionRecordFailed=True")
        assert c["reason"] == "RecordRefused" and "blocked by the test policy" in c["message"], c
        revision = _status(kube, namespace, "rec")["updateRevision"]
        assert revision in c["message"]
        wait_available(kube, namespace, "rec")  # the rollout does not wait for its history

        assert controller.stop() == 0
        lift()
        controller.restart()
        controller.wait_ready()

    def recorded() -> bool:
        listed = kube.list(ControllerRevision, namespace=namespace, labels={"pdorch.io/group": "rec"})
        return any(r.metadata.labels.get("pdorch.io/revision") == revision for r in listed)

    wait_for(recorded, 60, "the ControllerRevision written after the restart")
    wait_for(
        lambda: condition(kube.get(SG, "rec", namespace=namespace), "RevisionRecordFailed") is None,
        30,
        "RevisionRecordFailed cleared",
    )


def test_size_and_restart_policy_changes_roll_out_through_the_planner(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """Fields LWS rolls on (restartPolicy here) and `size` go through pdorch's planner: the new
    template arrives held at partition = replicas, and the rollout finishes with every group of
    the new size (old one-pod groups are judged by their own size, not the new one)."""
    from lightkube.resources.core_v1 import Pod

    doc = example("resize")
    doc["spec"]["rolloutStrategy"] = {"paused": True}
    kube.create(SG.from_dict(doc), namespace=namespace)
    first = wait_available(kube, namespace, "resize").status["updateRevision"]

    def resize(spec: dict[str, Any]) -> None:
        for role in spec["roles"]:
            if role["name"] == "prefill":
                role["size"] = 2
            if role["name"] == "decode":
                role["restartPolicy"] = "None"

    update_spec(kube, namespace, "resize", resize)
    second = _new_revision(kube, namespace, "resize", first)

    def held() -> bool:
        objs = _kv_lws(kube, namespace, "resize")
        return all(
            lws_revision(o) == second and lws_replicas_partition(o)[1] == lws_replicas_partition(o)[0]
            for o in objs.values()
        )

    wait_for(held, 30, "new templates held at partition = replicas")
    decode = _kv_lws(kube, namespace, "resize")["resize-decode"]
    assert decode["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "None"
    update_spec(kube, namespace, "resize", lambda s: s["rolloutStrategy"].update({"paused": False}))
    wait_for(lambda: _on(kube, namespace, "resize", second), 120, "rollout of the new size")

    def prefill_pods() -> list[Any]:
        pods = kube.list(
            Pod, namespace=namespace, labels={"pdorch.io/group": "resize", "pdorch.io/role": "prefill"}
        )
        return [p for p in pods if p.metadata.deletionTimestamp is None]

    replicas = lws_replicas_partition(_kv_lws(kube, namespace, "resize")["resize-prefill"])[0]
    pods = wait_for(
        lambda: (ps := prefill_pods()) and len(ps) == 2 * replicas and ps, 60, "two pods per group"
    )
    assert {p.metadata.labels["pdorch.io/revision"] for p in pods} == {second}


def _sized(name: str, prefill: int, decode: int) -> dict[str, Any]:
    doc = example_sized(name, prefill, decode)
    doc["spec"]["rolloutStrategy"] = {"maxSurge": "25%", "maxUnavailable": "25%"}
    return doc


def _settled(kube: Client, namespace: str, name: str, want: dict[str, int]) -> bool:
    """Every KV LWS at its desired replicas, partition 0, and all groups ready."""
    got = {}
    for lws_name, o in _kv_lws(kube, namespace, name).items():
        replicas, partition = lws_replicas_partition(o)
        ready = (o.get("status") or {}).get("readyReplicas", 0)
        got[lws_name] = (replicas, partition, ready)
    return got == {f"{name}-{role}": (n, 0, n) for role, n in want.items()}


def test_a_rollout_that_never_becomes_ready_is_escaped_by_a_rollback(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """The new revision's pods fit no node, so its surge groups never become ready. After
    `pdorch rollback` they are old-side groups of an abandoned revision: the planner recreates them
    on the restored template instead of waiting for them forever (the group used to stay at
    reduced capacity with RolloutStalled until someone deleted the Pending pods)."""
    kube.create(SG.from_dict(_sized("esc", 4, 2)), namespace=namespace)
    first = wait_available(kube, namespace, "esc").status["updateRevision"]

    update_spec(kube, namespace, "esc", unschedulable)
    _new_revision(kube, namespace, "esc", first)
    # The first step surges or recreates groups on the broken revision; wait until it did.
    wait_for(
        lambda: any(
            lws_replicas_partition(o)[1] < lws_replicas_partition(o)[0]
            for o in _kv_lws(kube, namespace, "esc").values()
        ),
        60,
        "a group moved to the broken revision",
    )
    cli = [sys.executable, "-m", "pdorch.cli", "rollback", "esc", "-n", namespace]
    done = subprocess.run(
        [*cli, "--kubeconfig", devcluster.kubeconfig], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    wait_for(lambda: _on(kube, namespace, "esc", first), 120, "rollback finished on the first revision")
    wait_for(lambda: _settled(kube, namespace, "esc", {"prefill": 4, "decode": 2}), 60, "4/2 groups ready")


def test_a_template_change_applied_with_a_scale_down_finishes_at_the_new_count(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """One apply that scales 6P/3D down to 4P/2D and changes the image (GitOps does this): it used
    to stall with CannotProgress and leave 6/3 groups."""
    kube.create(SG.from_dict(_sized("shrink", 6, 3)), namespace=namespace)
    first = wait_available(kube, namespace, "shrink").status["updateRevision"]

    def smaller_and_new(spec: dict[str, Any]) -> None:
        set_engine_image("pdorch/sim:v2")(spec)
        for role in spec["roles"]:
            if role["type"] in ("prefill", "decode"):
                role["replicas"] = {"prefill": 4, "decode": 2}[role["type"]]

    update_spec(kube, namespace, "shrink", smaller_and_new)
    second = _new_revision(kube, namespace, "shrink", first)
    wait_for(lambda: _on(kube, namespace, "shrink", second), 120, "rollout to the second revision")
    wait_for(lambda: _settled(kube, namespace, "shrink", {"prefill": 4, "decode": 2}), 60, "4/2 groups ready")
    images = {
        o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"]
        for o in _kv_lws(kube, namespace, "shrink").values()
    }
    assert images == {"pdorch/sim:v2"}


def _rollout_step_events(devcluster: ClusterState, namespace: str, group: str) -> list[str]:
    out = devcluster.kubectl("get", "events", "-n", namespace, "-o", "json", timeout=60)
    assert out.returncode == 0, out.stderr
    return [
        str(e["message"])
        for e in json.loads(out.stdout)["items"]
        if e.get("reason") == "RolloutStep" and e["involvedObject"]["name"] == group
    ]


def test_a_step_the_api_refuses_outright_is_not_announced_and_the_fixed_one_is(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A new template LWS refuses (a container port that is not a number) ends in Invalid with nothing
    written: no RolloutStep event and no step counted. Once the spec is fixed, the step is taken,
    announced and counted."""
    kube.create(SG.from_dict(example("refstep")), namespace=namespace)
    wait_available(kube, namespace, "refstep")

    def bad(spec: dict[str, Any]) -> None:
        for role in spec["roles"]:
            if role["type"] == "prefill":
                role["workerTemplate"]["spec"]["containers"][0]["image"] = "pdorch/sim:v2"
                role["workerTemplate"]["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]

    update_spec(kube, namespace, "refstep", bad)
    c = wait_for(
        lambda: (
            (c := condition(kube.get(SG, "refstep", namespace=namespace), "Invalid"))
            and c["status"] == "True"
            and c
        ),
        60,
        "Invalid=True",
    )
    assert "containerPort" in c["message"], c
    assert _rollout_step_events(devcluster, namespace, "refstep") == []
    assert controller.sample_sum("pdorch_rollout_steps_total", namespace=namespace, group="refstep") == 0

    def good(spec: dict[str, Any]) -> None:
        for role in spec["roles"]:
            if role["type"] == "prefill":
                role["workerTemplate"]["spec"]["containers"][0].pop("ports", None)

    update_spec(kube, namespace, "refstep", good)
    wait_for(
        lambda: _rollout_step_events(devcluster, namespace, "refstep") or None, 60, "a RolloutStep event"
    )
    assert controller.sample_sum("pdorch_rollout_steps_total", namespace=namespace, group="refstep") >= 1

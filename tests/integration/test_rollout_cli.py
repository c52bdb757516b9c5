"""`pdorch rollback` and `pdorch plan --from-live` against the real controller on the dev cluster:
a rollback restores only what defines a revision, and a live plan uses the controller's inputs
(the ServingRoleScalers' replicas, the tolerance of the rollout's start)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from lightkube import Client

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from pdorch.rollout.live import lws_replicas_partition
from pdorch.rollout.planner import auto_tolerance, initial_state
from pdorch.rollout.state import RolloutSpec
from tests.integration.test_controller import (
    SG,
    condition,
    example,
    example_scaled,
    set_engine_image,
    unschedulable,
    update_spec,
    wait_available,
)
from tests.integration.test_rollout_control import _kv_lws, _new_revision, _on, _status

pytestmark = pytest.mark.integration


def _cli(devcluster: ClusterState, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pdorch.cli", *args, "--kubeconfig", devcluster.kubeconfig]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _settled(kube: Client, namespace: str, name: str, want: dict[str, int]) -> bool:
    """Every KV LWS at `want` replicas, partition 0, all groups ready."""
    got = {}
    for lws, o in _kv_lws(kube, namespace, name).items():
        replicas, partition = lws_replicas_partition(o)
        got[lws] = (replicas, partition, (o.get("status") or {}).get("readyReplicas", 0))
    return got == {f"{name}-{role}": (n, 0, n) for role, n in want.items()}


def _images(kube: Client, namespace: str, name: str) -> set[str]:
    return {
        o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"]
        for o in _kv_lws(kube, namespace, name).values()
    }


def test_rollback_restores_the_revision_and_keeps_replicas_and_router(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """The cluster repro: prefill scaled up and the router policy changed after the first revision
    was recorded, then a template change; the rollback used to restore the old replicas and policy."""
    kube.create(SG.from_dict(example("keep")), namespace=namespace)
    first = wait_available(kube, namespace, "keep").status["updateRevision"]

    def scale_and_route(spec: dict[str, Any]) -> None:
        next(r for r in spec["roles"] if r["type"] == "prefill")["replicas"] = 4
        spec["router"]["policy"] = "power_of_two"

    update_spec(kube, namespace, "keep", scale_and_route)
    wait_for(lambda: _settled(kube, namespace, "keep", {"prefill": 4, "decode": 1}), 90, "4 prefill groups")
    update_spec(kube, namespace, "keep", set_engine_image("pdorch/sim:v2"))
    second = _new_revision(kube, namespace, "keep", first)
    wait_for(lambda: _on(kube, namespace, "keep", second), 120, "rollout to the second revision")

    dry = _cli(devcluster, "rollback", "keep", "-n", namespace, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{second} -> {first}" in dry.stdout
    changed = [
        line for line in dry.stdout.splitlines() if line[:1] in "+-" and line[:3] not in ("---", "+++")
    ]
    # Only the two images go back: no replicas, no router line.
    assert len(changed) == 4 and all("image: pdorch/sim:" in line for line in changed), dry.stdout
    assert "(dry run: nothing changed)" in dry.stdout
    assert _status(kube, namespace, "keep")["updateRevision"] == second

    done = _cli(devcluster, "rollback", "keep", "-n", namespace)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: _on(kube, namespace, "keep", first), 120, "rollback to the first revision")
    spec = kube.get(SG, "keep", namespace=namespace).to_dict()["spec"]
    assert next(r for r in spec["roles"] if r["type"] == "prefill")["replicas"] == 4
    assert spec["router"]["policy"] == "power_of_two"
    wait_for(lambda: _settled(kube, namespace, "keep", {"prefill": 4, "decode": 1}), 60, "still 4 prefill")
    assert _images(kube, namespace, "keep") == {"pdorch/sim:dev"}


def test_plan_from_live_plans_with_the_scalers_replicas_like_the_controller(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """Spec 2:2 with External roles, scalers at prefill 1 / decode 3: the controller plans 1:3 and
    refuses the rollout; `--from-live` used to plan 2:2 and print a finished plan."""
    scaling = {"mode": "External", "minReplicas": 0, "maxReplicas": 4}
    doc = example_scaled("ext", "prefill", scaling)
    for role in doc["spec"]["roles"]:
        if role["type"] == "decode":
            role["replicas"], role["scaling"] = 2, scaling
    kube.create(SG.from_dict(doc), namespace=namespace)
    wait_available(kube, namespace, "ext")

    def scale(role: str, n: int) -> None:
        out = devcluster.kubectl("scale", "-n", namespace, f"servingrolescaler/ext-{role}", f"--replicas={n}")
        assert out.returncode == 0, out.stderr

    # A scaler at 0 is 0 (it was planned at roles[].replicas).
    scale("prefill", 0)
    scale("decode", 3)
    wait_for(lambda: _settled(kube, namespace, "ext", {"prefill": 0, "decode": 3}), 90, "prefill 0, decode 3")
    idle = _cli(devcluster, "plan", "--from-live", "ext", "-n", namespace)
    assert "no rollout in progress" in idle.stdout, idle.stdout + idle.stderr
    rows = [line.split() for line in idle.stdout.splitlines() if line[:1].isdigit()]
    assert rows and all(row[2:4] == ["0/0", "0/0"] for row in rows), idle.stdout  # prefill old new

    scale("prefill", 1)
    wait_for(lambda: _settled(kube, namespace, "ext", {"prefill": 1, "decode": 3}), 90, "prefill 1, decode 3")
    first = _status(kube, namespace, "ext")["updateRevision"]
    update_spec(kube, namespace, "ext", set_engine_image("pdorch/sim:v2"))
    _new_revision(kube, namespace, "ext", first)

    def stalled() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "ext", namespace=namespace), "RolloutStalled")
        return c if c and c["status"] == "True" else None

    assert wait_for(stalled, 30, "RolloutStalled=True")["reason"] == "CannotProgress"
    plan = _cli(devcluster, "plan", "--from-live", "ext", "-n", namespace)
    assert plan.returncode == 3, plan.stdout + plan.stderr
    assert "in progress" in plan.stdout and "ratio 1:3" in plan.stdout and "# blocked:" in plan.stdout


def test_plan_from_live_keeps_the_tolerance_the_rollout_started_with(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """Mid-rollout, the automatic tolerance is the one of the rollout's start state (what the
    controller uses), not the one the live state alone would allow."""
    doc = example("tol")  # 2 prefill : 1 decode
    # The first step recreates an old prefill (not only surges): from the state after it alone the
    # smallest tolerance is 0, while the rollout started at 0.5.
    doc["spec"]["rolloutStrategy"] = {"maxSurge": 1, "maxUnavailable": 1}
    kube.create(SG.from_dict(doc), namespace=namespace)
    first = wait_available(kube, namespace, "tol").status["updateRevision"]

    update_spec(kube, namespace, "tol", unschedulable)
    _new_revision(kube, namespace, "tol", first)
    wait_for(
        lambda: all(
            lws_replicas_partition(o)[1] < lws_replicas_partition(o)[0]
            for o in _kv_lws(kube, namespace, "tol").values()
        ),
        60,
        "the first step on every KV role",
    )
    spec = RolloutSpec(ratio_p=2, ratio_d=1, tolerance=None, max_surge=1, max_unavailable=1)
    start = auto_tolerance(initial_state([("prefill", "prefill", 2), ("decode", "decode", 1)]), spec)
    plan = _cli(devcluster, "plan", "--from-live", "tol", "-n", namespace)
    assert "in progress" in plan.stdout, plan.stdout + plan.stderr
    assert f"ratio 2:1 tolerance {start:g} (auto" in plan.stdout, plan.stdout

"""The ServingGroup controller against the real dev cluster (real apiserver, LWS, KCM, kwok)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Service, ServiceAccount
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding
from lightkube.types import PatchType

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from pdorch.roles.labels import LABEL_MANAGED_BY, MANAGED_BY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SG = create_namespaced_resource("pdorch.io", "v1alpha1", "ServingGroup", "servinggroups")
LWS = create_namespaced_resource("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet", "leaderworkersets")
SRS = create_namespaced_resource("pdorch.io", "v1alpha1", "ServingRoleScaler", "servingrolescalers")


def example(name: str = "sim-pd") -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "sim-pd" / "servinggroup.yaml").read_text())
    doc["metadata"]["name"] = name
    return doc


def without_engine_drain(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with engines that abort their requests on SIGTERM (vLLM's default): its containers lose
    the example's ``--shutdown-timeout``, so only pdorch's own draining keeps requests alive."""
    for role in doc["spec"]["roles"]:
        for c in (role.get("workerTemplate") or {}).get("spec", {}).get("containers", []):
            argv = c.get("command") or []
            if "--shutdown-timeout" in argv:
                i = argv.index("--shutdown-timeout")
                c["command"] = argv[:i] + argv[i + 2 :]
    return doc


def example_scaled(name: str, role_type: str, scaling: dict[str, Any]) -> dict[str, Any]:
    """The example with `scaling` on its roles of `role_type`."""
    doc = example(name)
    for role in doc["spec"]["roles"]:
        if role["type"] == role_type:
            role["scaling"] = scaling
    return doc


def lws_names(kube: Client, namespace: str, group: str) -> set[str]:
    return {o.metadata.name for o in kube.list(LWS, namespace=namespace, labels={"pdorch.io/group": group})}


def condition(obj: Any, ctype: str) -> dict[str, Any] | None:
    return next((c for c in (obj.status or {}).get("conditions", []) if c["type"] == ctype), None)


def wait_available(kube: Client, namespace: str, name: str, timeout: float = 120) -> Any:
    def ok() -> Any:
        sg = kube.get(SG, name, namespace=namespace)
        c = condition(sg, "Available")
        return sg if c and c["status"] == "True" and c["reason"] == "AllRolesReady" else None

    return wait_for(ok, timeout, f"ServingGroup {name} Available")


def update_spec(kube: Client, namespace: str, name: str, edit: Any) -> None:
    """Read-modify-write of the spec with the resourceVersion (retried on conflict)."""
    for _ in range(10):
        sg = kube.get(SG, name, namespace=namespace)
        d = sg.to_dict()
        edit(d["spec"])
        try:
            kube.replace(SG.from_dict(d), namespace=namespace)
            return
        except ApiError as e:
            if e.status.code != 409:
                raise
    raise AssertionError("could not update the ServingGroup")


def unschedulable(spec: dict[str, Any]) -> None:
    """An `update_spec` edit whose new revision's prefill/decode pods fit no node: they stay
    Pending, so its groups never become ready (a rollout that cannot finish)."""
    for role in spec["roles"]:
        if role["type"] in ("prefill", "decode"):
            role["workerTemplate"]["spec"]["nodeSelector"] = {"pdorch.io/test": "no-such-node"}


def example_sized(name: str, prefill: int, decode: int) -> dict[str, Any]:
    """The example with `prefill`/`decode` replicas on its roles of those types."""
    doc = example(name)
    for role in doc["spec"]["roles"]:
        if role["type"] in ("prefill", "decode"):
            role["replicas"] = {"prefill": prefill, "decode": decode}[role["type"]]
    return doc


def set_engine_image(image: str) -> Any:
    """An `update_spec` edit giving every prefill and decode container `image` (a new revision)."""

    def edit(spec: dict[str, Any]) -> None:
        for role in spec["roles"]:
            if role["type"] in ("prefill", "decode"):
                role["workerTemplate"]["spec"]["containers"][0]["image"] = image

    return edit


def kubectl(devcluster: ClusterState, *args: str) -> str:
    out = devcluster.kubectl(*args, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_example_becomes_one_ready_lws_per_role(
    kube: Client, namespace: str, controller: ControllerProc, devcluster: ClusterState
) -> None:
    kube.create(SG.from_dict(example()), namespace=namespace)
    wait_for(
        lambda: lws_names(kube, namespace, "sim-pd") == {"sim-pd-proxy", "sim-pd-prefill", "sim-pd-decode"},
        60,
        "3 LWS",
    )
    wait_available(kube, namespace, "sim-pd")
    # Available can come a pass before Progressing=Complete (LWS's status.replicas may lag its
    # readyReplicas by one update): the summary reads Scaling until then.
    sg = wait_for(
        lambda: (
            (g := kube.get(SG, "sim-pd", namespace=namespace)).status["summary"].get("rollout") == "Complete"
            and g
        ),
        30,
        "the rollout column Complete",
    )

    gen = sg.metadata.generation
    assert sg.status["observedGeneration"] == gen
    for c in sg.status["conditions"]:
        assert set(c) >= {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
        assert c["observedGeneration"] == gen
    assert condition(sg, "Invalid")["status"] == "False"
    assert sg.status["summary"] == {"proxy": "1/1", "prefill": "2/2", "decode": "1/1", "rollout": "Complete"}

    prefill = kube.get(LWS, "sim-pd-prefill", namespace=namespace)
    labels = prefill.metadata.labels
    assert (
        labels["pdorch.io/role-type"] == "prefill"
        and labels["pdorch.io/revision"] == sg.status["updateRevision"]
    )
    assert prefill.spec["replicas"] == 2
    ref = prefill.metadata.ownerReferences[0]
    assert (ref.kind, ref.name, ref.uid, ref.controller) == ("ServingGroup", "sim-pd", sg.metadata.uid, True)
    # The built-in proxy's companions.
    kube.get(Service, "sim-pd", namespace=namespace)
    kube.get(ServiceAccount, "sim-pd-proxy", namespace=namespace)
    kube.get(Role, "sim-pd-proxy", namespace=namespace)
    kube.get(RoleBinding, "sim-pd-proxy", namespace=namespace)

    table = kubectl(devcluster, "get", "sg", "-n", namespace)
    header, row = table.splitlines()[:2]
    assert header.split()[:8] == [
        "NAME",
        "PROXY",
        "PREFILL",
        "DECODE",
        "REVISION",
        "AVAILABLE",
        "ROLLOUT",
        "AGE",
    ]
    assert row.split()[:7] == ["sim-pd", "1/1", "2/2", "1/1", sg.status["updateRevision"], "True", "Complete"]


def test_no_surge_and_a_share_of_one_proxy_that_rounds_to_zero_is_served(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """maxSurge 0 with maxUnavailable 25% (no spare GPUs) is a valid spec, but for one proxy
    replica both budgets come to 0, which LWS's webhook refuses: the group would go Invalid with
    nothing created. As a Deployment does, one proxy pod may then be unavailable."""
    doc = example("nosurge")
    doc["spec"]["rolloutStrategy"] = {"maxSurge": 0, "maxUnavailable": "25%"}
    kube.create(SG.from_dict(doc), namespace=namespace)
    sg = wait_available(kube, namespace, "nosurge")
    assert condition(sg, "Invalid")["status"] == "False"
    proxy = kube.get(LWS, "nosurge-proxy", namespace=namespace)
    assert proxy.spec["rolloutStrategy"]["rollingUpdateConfiguration"]["maxUnavailable"] == 1


def test_a_refusal_quoting_a_huge_value_is_reported_cut_short(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """LWS refuses a 40,000-character pod label value and quotes it whole. Copied into the Invalid
    condition as is, the message broke the CRD's 32768-character cap, so the status write (and with
    it the report) failed on every pass."""
    doc = example("hugelabel")
    prefill = next(r for r in doc["spec"]["roles"] if r["type"] == "prefill")
    prefill["workerTemplate"].setdefault("metadata", {})["labels"] = {"team": "x" * 40000}
    kube.create(SG.from_dict(doc), namespace=namespace)

    def invalid() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "hugelabel", namespace=namespace), "Invalid")
        return c if c and c["status"] == "True" else None

    c = wait_for(invalid, 60, "Invalid=True")
    assert "team" in c["message"] and len(c["message"]) <= 4000, len(c["message"])


def test_spec_changes_flow_to_lws_and_removed_roles_are_pruned(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    kube.create(SG.from_dict(example("flow")), namespace=namespace)
    sg = wait_available(kube, namespace, "flow")
    rev1 = sg.status["updateRevision"]

    def set_prefill_replicas(spec: dict[str, Any]) -> None:
        next(r for r in spec["roles"] if r["name"] == "prefill")["replicas"] = 3

    update_spec(kube, namespace, "flow", set_prefill_replicas)
    wait_for(
        lambda: kube.get(LWS, "flow-prefill", namespace=namespace).spec["replicas"] == 3,
        60,
        "prefill LWS replicas 3",
    )

    def new_decode_image(spec: dict[str, Any]) -> None:
        role = next(r for r in spec["roles"] if r["name"] == "decode")
        role["workerTemplate"]["spec"]["containers"][0]["image"] = "pdorch/sim:v2"

    update_spec(kube, namespace, "flow", new_decode_image)

    def decode_image() -> str:
        lws = kube.get(LWS, "flow-decode", namespace=namespace)
        return lws.spec["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"]

    wait_for(lambda: decode_image() == "pdorch/sim:v2", 60, "decode template updated")
    sg = wait_for(
        lambda: (
            (s := kube.get(SG, "flow", namespace=namespace)).status.get("updateRevision") not in (None, rev1)
            and s
        ),
        60,
        "new revision",
    )
    assert (
        kube.get(LWS, "flow-decode", namespace=namespace).metadata.labels["pdorch.io/revision"]
        == sg.status["updateRevision"]
    )

    def drop_proxy(spec: dict[str, Any]) -> None:
        spec["roles"] = [r for r in spec["roles"] if r["type"] != "proxy"]
        spec.pop("router", None)  # it configures the proxy role

    update_spec(kube, namespace, "flow", drop_proxy)
    wait_for(
        lambda: lws_names(kube, namespace, "flow") == {"flow-prefill", "flow-decode"}, 60, "proxy LWS pruned"
    )

    def companions_gone() -> bool:
        for res, n in (
            (Service, "flow"),
            (ServiceAccount, "flow-proxy"),
            (Role, "flow-proxy"),
            (RoleBinding, "flow-proxy"),
        ):
            try:
                kube.get(res, n, namespace=namespace)
                return False
            except ApiError as e:
                if e.status.code != 404:
                    raise
        return True

    wait_for(companions_gone, 60, "proxy Service/ServiceAccount/Role/RoleBinding pruned")

    kube.delete(SG, "flow", namespace=namespace)
    wait_for(
        lambda: not lws_names(kube, namespace, "flow"), 90, "LWS garbage-collected after the group is deleted"
    )


def _unlabel_and_wait_taken_back(kube: Client, res: Any, name: str, namespace: str) -> None:
    """Remove a child's managed-by label by hand (to the controller's watch, which selects by it,
    the child is deleted) and wait until the controller has taken it back, label included."""
    kube.patch(
        res,
        name,
        {"metadata": {"labels": {LABEL_MANAGED_BY: None}}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    wait_for(
        lambda: (
            (kube.get(res, name, namespace=namespace).metadata.labels or {}).get(LABEL_MANAGED_BY)
            == MANAGED_BY
        ),
        60,
        f"the managed-by label of {name} restored",
    )


def test_deleted_or_hand_edited_lws_is_restored(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    kube.create(SG.from_dict(example("heal")), namespace=namespace)
    wait_available(kube, namespace, "heal")
    old_uid = kube.get(LWS, "heal-prefill", namespace=namespace).metadata.uid
    kube.delete(LWS, "heal-prefill", namespace=namespace)
    wait_for(
        lambda: kube.get(LWS, "heal-prefill", namespace=namespace).metadata.uid != old_uid,
        60,
        "prefill LWS recreated",
    )

    lws = kube.get(LWS, "heal-decode", namespace=namespace).to_dict()
    lws["spec"]["replicas"] = 4
    lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"] = "hand/edited"
    kube.replace(LWS.from_dict(lws), namespace=namespace)

    def restored() -> bool:
        d = kube.get(LWS, "heal-decode", namespace=namespace).spec
        image = d["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"]
        return d["replicas"] == 1 and image == "pdorch/sim:dev"

    wait_for(restored, 60, "hand edits of the decode LWS reverted")
    wait_available(kube, namespace, "heal")

    # Its managed-by label removed by hand: the watch (which selects by it) reports the LWS gone,
    # and the create that follows finds the name taken, by an object this group owns: taken back,
    # label included, not reported as a name clash.
    _unlabel_and_wait_taken_back(kube, LWS, "heal-decode", namespace)
    sg = wait_available(kube, namespace, "heal")
    assert condition(sg, "Invalid")["status"] == "False", condition(sg, "Invalid")

    # Its group label and its owner reference removed by hand: no generation moves, and the watch
    # events, status and garbage collection of the group rest on them; both are put back.
    kube.patch(
        LWS,
        "heal-prefill",
        [
            {"op": "remove", "path": "/metadata/labels/pdorch.io~1group"},
            {"op": "remove", "path": "/metadata/ownerReferences"},
        ],
        namespace=namespace,
        patch_type=PatchType.JSON,
    )

    def metadata_back() -> bool:
        md = kube.get(LWS, "heal-prefill", namespace=namespace).metadata
        return (md.labels or {}).get("pdorch.io/group") == "heal" and any(
            r.kind == "ServingGroup" and r.name == "heal" and r.controller for r in md.ownerReferences or []
        )

    wait_for(metadata_back, 60, "the group label and owner reference of heal-prefill put back")


def _light_group(name: str) -> dict[str, Any]:
    """A GPU-free prefill+decode group, so 50 of them fit on the dev cluster's nodes."""
    doc = example(name)
    doc["spec"]["roles"] = [r for r in doc["spec"]["roles"] if r["type"] != "proxy"]
    doc["spec"].pop("router", None)
    for r in doc["spec"]["roles"]:
        r["replicas"] = 1
        for c in r["workerTemplate"]["spec"]["containers"]:
            c.pop("resources", None)
    return doc


def test_fifty_idle_groups_cost_zero_writes(kube: Client, namespace: str, controller: ControllerProc) -> None:
    names = [f"idle-{i:02d}" for i in range(50)]
    for n in names:
        kube.create(SG.from_dict(copy.deepcopy(_light_group(n))), namespace=namespace)
    for n in names:
        wait_available(kube, namespace, n, timeout=300)

    # Every write counts except the renewals of the controller's own leader-election Lease,
    # which leader election needs by design (every retry period, like client-go).
    def writes() -> float:
        return controller.requests(exclude=("leases",))

    # Let the last status writes and watch events settle, then observe a quiet minute.
    def settled() -> bool:
        a = writes()
        time.sleep(5)
        return writes() == a

    wait_for(settled, 120, "controller writes to settle", interval=0)
    before = writes()
    reads_before = controller.requests(("get", "list"), exclude=("leases",))
    time.sleep(60)
    after = writes()
    assert after - before == 0, f"{after - before} write requests while idle\n{controller.log_tail()}"
    assert controller.requests(exclude=()) > after  # the Lease renewals were excluded, and happened
    # Reads stay bounded too (the caches serve reconciles; no per-reconcile GETs).
    assert controller.requests(("get", "list"), exclude=("leases",)) - reads_before == 0


def test_apply_failure_is_reported_in_status_and_recovers(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    from lightkube.resources.core_v1 import ResourceQuota

    kube.create(
        ResourceQuota.from_dict(
            {"metadata": {"name": "no-services", "namespace": namespace}, "spec": {"hard": {"services": "0"}}}
        )
    )
    kube.create(SG.from_dict(example("quota")), namespace=namespace)

    def apply_failed() -> dict[str, Any] | None:
        c = condition(kube.get(SG, "quota", namespace=namespace), "Progressing")
        return c if c and c["reason"] == "ApplyFailed" else None

    cond = wait_for(apply_failed, 60, "Progressing=False/ApplyFailed")
    assert cond["status"] == "False"
    assert "Service/quota" in cond["message"] and "quota" in cond["message"], cond["message"]

    kube.delete(ResourceQuota, "no-services", namespace=namespace)
    # Nudge the group (a label change is an event) instead of waiting out the retry backoff. A
    # merge patch: a get-then-replace raced the controller's status writes (409 Conflict in CI).
    kube.patch(
        SG, "quota", {"metadata": {"labels": {"nudge": "1"}}}, namespace=namespace, patch_type=PatchType.MERGE
    )
    wait_available(kube, namespace, "quota")


def test_a_scaled_role_keeps_its_size_when_its_scaler_is_deleted_or_unlabelled(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A ServingRoleScaler deleted by hand was recreated at roles[].replicas and cut the scaled-up
    role back at once; one whose managed-by label was removed was taken back by a forced apply of
    roles[].replicas, and then fell to the schema default of 1. Both keep the role's size now."""
    kube.create(
        SG.from_dict(example_scaled("keep", "decode", {"mode": "External", "maxReplicas": 4})),
        namespace=namespace,
    )
    wait_available(kube, namespace, "keep")
    kube.patch(SRS, "keep-decode", {"spec": {"replicas": 3}}, namespace=namespace, patch_type=PatchType.MERGE)
    wait_for(
        lambda: kube.get(LWS, "keep-decode", namespace=namespace).spec["replicas"] == 3, 60, "decode at 3"
    )

    def sizes() -> tuple[int, int] | None:
        try:
            srs = kube.get(SRS, "keep-decode", namespace=namespace)
        except ApiError:
            return None
        return srs["spec"]["replicas"], kube.get(LWS, "keep-decode", namespace=namespace).spec["replicas"]

    old = kube.get(SRS, "keep-decode", namespace=namespace).metadata.uid
    kube.delete(SRS, "keep-decode", namespace=namespace)
    wait_for(
        lambda: kube.get(SRS, "keep-decode", namespace=namespace).metadata.uid != old, 60, "scaler recreated"
    )
    seen = {sizes() for _ in range(8) if time.sleep(0.5) is None}
    assert seen == {(3, 3)}, seen

    _unlabel_and_wait_taken_back(kube, SRS, "keep-decode", namespace)
    seen = {sizes() for _ in range(8) if time.sleep(0.5) is None}
    assert seen == {(3, 3)}, seen


def _without_node_selector(spec: dict[str, Any]) -> None:
    for role in spec["roles"]:
        if role["type"] in ("prefill", "decode"):
            role["workerTemplate"]["spec"].pop("nodeSelector", None)


def test_a_scaler_deleted_mid_rollout_comes_back_without_the_surge(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A ServingRoleScaler deleted by hand while a rollout held its role's LWS above the desired
    size (surge) was recreated at the LWS's size, surge included, and the role kept those groups
    after the rollout. It comes back at the role's desired size now."""
    doc = example("surgekeep")
    for role in doc["spec"]["roles"]:
        if role["type"] in ("prefill", "decode"):
            role["scaling"] = {"mode": "External", "minReplicas": 1, "maxReplicas": 6}
    kube.create(SG.from_dict(doc), namespace=namespace)
    wait_available(kube, namespace, "surgekeep")
    desired = {"prefill": 2, "decode": 1}
    update_spec(kube, namespace, "surgekeep", unschedulable)  # its surge groups never become ready

    def surged() -> str | None:
        for role, n in desired.items():
            if kube.get(LWS, f"surgekeep-{role}", namespace=namespace).spec["replicas"] > n:
                return role
        return None

    role = wait_for(surged, 60, "a role held above its desired size by the rollout")
    name = f"surgekeep-{role}"
    surge_size = kube.get(LWS, name, namespace=namespace).spec["replicas"]
    old = kube.get(SRS, name, namespace=namespace).metadata.uid
    kube.delete(SRS, name, namespace=namespace)
    back = wait_for(
        lambda: (o := kube.get(SRS, name, namespace=namespace)).metadata.uid != old and o,
        60,
        "scaler recreated",
    )
    assert back["spec"]["replicas"] == desired[role] < surge_size, (back["spec"], surge_size)

    # Back to the running template: the rollout ends at the desired size, not with the surge.
    update_spec(kube, namespace, "surgekeep", _without_node_selector)

    def settled() -> bool:
        sg = kube.get(SG, "surgekeep", namespace=namespace)
        progressing = condition(sg, "Progressing") or {}
        at = kube.get(LWS, name, namespace=namespace).spec["replicas"]
        return at == desired[role] and progressing.get("status") == "False"

    wait_for(settled, 120, f"{role} back at {desired[role]} once the rollout ended")
    assert kube.get(SRS, name, namespace=namespace)["spec"]["replicas"] == desired[role]

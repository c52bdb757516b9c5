"""Bad ServingGroups: refused by the apiserver (schema + CEL) with a message naming the field, or,
where only the controller can tell, marked Invalid with a reason. Nothing is created for any."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from lightkube import Client
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import ResourceQuota
from lightkube.types import PatchType

from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from tests.integration.test_controller import (
    LWS,
    REPO,
    SG,
    example,
    example_sized,
    update_spec,
    wait_available,
)

pytestmark = pytest.mark.integration

SRS = create_namespaced_resource("pdorch.io", "v1alpha1", "ServingRoleScaler", "servingrolescalers")
Edit = Callable[[dict[str, Any]], None]


def role(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in doc["spec"]["roles"] if r["name"] == name)


def _set(path: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node: Any = doc
        for p in head:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = value

    return edit


def _dup_names(doc: dict[str, Any]) -> None:
    role(doc, "decode")["name"] = "prefill"


def _drop(rtype: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["spec"]["roles"] = [r for r in doc["spec"]["roles"] if r["type"] != rtype]

    return edit


_CLAIM_SPEC = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}


def _claims(spec: dict[str, Any], name: str | None = "data") -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        claim: dict[str, Any] = {"spec": spec} | ({"metadata": {"name": name}} if name else {})
        role(doc, "decode")["volumeClaimTemplates"] = [claim]

    return edit


def _two_proxies(doc: dict[str, Any]) -> None:
    doc["spec"]["roles"].append({"name": "proxy2", "type": "proxy", "replicas": 1})


def _sglang_bootstrap_on(port: int) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["spec"]["engine"] = {"name": "sglang"}
        role(doc, "prefill")["bootstrapPort"] = port

    return edit


def _scaling(name: str, **scaling: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        role(doc, name)["scaling"] = scaling

    return edit


def _extra_role_of_type(rtype: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        extra = copy.deepcopy(role(doc, "decode"))
        extra.update(name="extra", type=rtype)
        doc["spec"]["roles"].append(extra)

    return edit


def _too_many_roles(doc: dict[str, Any]) -> None:
    base = role(doc, "decode")
    for i in range(9):
        r = copy.deepcopy(base)
        r["name"] = f"w{i}"
        r["type"] = "worker"
        doc["spec"]["roles"].append(r)


def _no_template(doc: dict[str, Any]) -> None:
    role(doc, "decode").pop("workerTemplate")


def _sglang_with_conditional_disaggregation(doc: dict[str, Any]) -> None:
    doc["spec"]["engine"] = {"name": "sglang"}
    doc["spec"]["router"] = {"conditionalDisaggregation": {"minPromptTokens": 64}}


# (case id, edit, substring the apiserver's message must contain)
REFUSED: list[tuple[str, Edit, str]] = [
    ("duplicate-role-names", _dup_names, "spec.roles"),
    ("no-prefill-role", _drop("prefill"), "prefill"),
    ("no-decode-role", _drop("decode"), "decode"),
    # The example has spec.router, which configures the proxy role.
    ("router-without-proxy", _drop("proxy"), "add a role of type proxy"),
    # LWS's own `<group>-<role>-<index>` names (role decode's group 2) would clash with it.
    ("role-name-numbered", lambda d: role(d, "decode").__setitem__("name", "prefill-2"), "-<digits>"),
    ("bootstrap-port-is-the-port", _sglang_bootstrap_on(8000), "must differ from roles[].port"),
    ("two-proxy-roles", _two_proxies, "at most one role of type proxy"),
    ("size-zero", lambda d: role(d, "prefill").__setitem__("size", 0), "size"),
    ("negative-replicas", lambda d: role(d, "decode").__setitem__("replicas", -1), "replicas"),
    # Static: with External or Builtin the replicas-within-bounds rule fires too, and its message
    # also names minReplicas, so the case passed with this rule gone (helper-64).
    (
        "min-above-max",
        _scaling("decode", mode="Static", minReplicas=5, maxReplicas=2),
        "scaling.minReplicas must be <= scaling.maxReplicas",
    ),
    (
        "replicas-outside-bounds",
        _scaling("decode", mode="External", minReplicas=2, maxReplicas=4),
        "replicas",
    ),
    ("builtin-without-max", _scaling("decode", mode="Builtin", targets={"tpotMs": 50}), "maxReplicas"),
    ("builtin-prefill-without-ttft", _scaling("prefill", mode="Builtin", maxReplicas=4), "ttftMs"),
    (
        "builtin-min-zero",
        _scaling("decode", mode="Builtin", minReplicas=0, maxReplicas=4, targets={"tpotMs": 50}),
        "could never scale back up",
    ),
    ("builtin-on-proxy", _scaling("proxy", mode="Builtin", maxReplicas=2), "Builtin"),
    ("unknown-scaling-mode", _scaling("decode", mode="Sometimes"), "mode"),
    ("bad-ratio", _set("spec.ratio", {"prefill": 0, "decode": 1}), "ratio"),
    (
        "ratio-tolerance-above-one",
        _set("spec.ratio", {"prefill": 2, "decode": 1, "tolerance": 3}),
        "tolerance",
    ),
    ("unknown-engine", _set("spec.engine.name", "tgi"), "engine"),
    # An extra role, not the decode one retyped: without a decode role "at least one decode" fired
    # too and named `type`, so the case passed with the enum gone (helper-64).
    ("unknown-role-type", _extra_role_of_type("encoder"), 'Unsupported value: "encoder"'),
    # The field path, not `<nil>`: the rules on the name sit at the root of the schema.
    ("group-name-too-long", _set("metadata.name", "a" * 29), "metadata.name: Invalid value"),
    ("group-name-not-dns-1035", _set("metadata.name", "1sim"), "metadata.name: Invalid value"),
    ("role-name-too-long", lambda d: role(d, "decode").__setitem__("name", "d" * 17), "name"),
    ("role-name-not-dns", lambda d: role(d, "decode").__setitem__("name", "Decode_1"), "name"),
    (
        "bootstrap-port-with-vllm",
        lambda d: role(d, "prefill").__setitem__("bootstrapPort", 8998),
        "bootstrapPort",
    ),
    (
        "conditional-disaggregation-with-sglang",
        _sglang_with_conditional_disaggregation,
        "conditionalDisaggregation needs spec.engine.name vllm",
    ),
    (
        "prefill-queue-without-room",
        _set("spec.router", {"prefillQueue": {"maxInflightTokens": 0}}),
        "maxInflightTokens",
    ),
    (
        "prefill-queue-without-target",
        _set("spec.router", {"prefillQueue": {"maxInflightTokens": 16384, "ttftSeconds": 0}}),
        "ttftSeconds",
    ),
    ("bad-max-surge", _set("spec.rolloutStrategy", {"maxSurge": "lots"}), "maxSurge"),
    (
        "no-budget-written-00",
        _set("spec.rolloutStrategy", {"maxSurge": "00%", "maxUnavailable": 0}),
        "must not both be 0",
    ),
    (
        "negative-progress-deadline",
        _set("spec.rolloutStrategy", {"progressDeadlineSeconds": -5}),
        "progressDeadlineSeconds",
    ),
    ("too-many-roles", _too_many_roles, "roles"),
    ("kv-role-without-template", _no_template, "workerTemplate"),
    ("unknown-router-policy", _set("spec.router", {"policy": "fastest"}), "policy"),
    ("port-out-of-range", lambda d: role(d, "decode").__setitem__("port", 70000), "port"),
    # Names Kubernetes refuses in a secretKeyRef: the proxy's StatefulSet would never be created.
    ("auth-secret-not-dns", _set("spec.router", {"auth": {"secretName": "api..keys"}}), "secretName"),
    ("auth-key-with-slash", _set("spec.router", {"auth": {"secretName": "k", "key": "a/b"}}), "key"),
    # A claim template the StatefulSet would refuse locked the role: claim templates cannot change.
    ("claim-without-storage", _claims({"accessModes": ["ReadWriteOnce"]}), "resources: Required value"),
    ("claim-without-access-mode", _claims({"resources": {"requests": {"storage": "1Gi"}}}), "accessModes"),
    ("claim-without-name", _claims(_CLAIM_SPEC, name=None), "volumeClaimTemplates[0].metadata"),
    (
        "claim-size-not-a-quantity",
        _claims({**_CLAIM_SPEC, "resources": {"requests": {"storage": "big"}}}),
        "storage",
    ),
    ("claim-size-zero", _claims({**_CLAIM_SPEC, "resources": {"requests": {"storage": "0Gi"}}}), "storage"),
    (
        "claim-size-negative-int",
        _claims({**_CLAIM_SPEC, "resources": {"requests": {"storage": -1}}}),
        "storage",
    ),
    ("claim-size-zero-int", _claims({**_CLAIM_SPEC, "resources": {"requests": {"storage": 0}}}), "storage"),
    (
        "subgroup-not-dividing",
        lambda d: role(d, "decode").update(size=5, subGroupPolicy={"subGroupSize": 3}),
        "subGroupSize",
    ),
]


@pytest.mark.parametrize(("case", "edit", "needle"), REFUSED, ids=[c[0] for c in REFUSED])
def test_apiserver_refuses_bad_spec_naming_the_field(
    kube: Client, namespace: str, pdorch_crds: list[str], case: str, edit: Edit, needle: str
) -> None:
    doc = example(f"bad-{len(case)}")
    edit(doc)
    with pytest.raises(ApiError) as err:
        kube.create(SG.from_dict(doc), namespace=namespace)
    assert err.value.status.code == 422, err.value.status.message
    message = err.value.status.message or ""
    assert needle in message, message
    assert not list(kube.list(SG, namespace=namespace))


def test_template_lws_refuses_marks_invalid_and_creates_nothing(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    # Pod templates are free-form in the ServingGroup schema (a full PodTemplateSpec would make
    # the CRD megabytes); LWS's own schema refuses a containerPort that is not an integer.
    doc = example("badtpl")
    role(doc, "decode")["workerTemplate"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    kube.create(SG.from_dict(doc), namespace=namespace)

    def invalid() -> dict[str, Any] | None:
        sg = kube.get(SG, "badtpl", namespace=namespace)
        c = next((c for c in (sg.status or {}).get("conditions", []) if c["type"] == "Invalid"), None)
        return c if c and c["status"] == "True" else None

    cond = wait_for(invalid, 60, "Invalid=True")
    assert "LeaderWorkerSet badtpl-decode" in cond["message"] and "containerPort" in cond["message"], cond[
        "message"
    ]
    assert not list(kube.list(LWS, namespace=namespace))  # the dry runs went first: nothing was created
    assert not list(kube.list(SRS, namespace=namespace))

    # Fixing the spec clears Invalid and the group comes up.
    sg = kube.get(SG, "badtpl", namespace=namespace).to_dict()
    role(sg, "decode")["workerTemplate"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 8000
    kube.replace(SG.from_dict(sg), namespace=namespace)

    def valid() -> bool:
        s = kube.get(SG, "badtpl", namespace=namespace)
        conds = {c["type"]: c["status"] for c in (s.status or {}).get("conditions", [])}
        return conds.get("Invalid") == "False" and conds.get("Available") == "True"

    wait_for(valid, 90, "fixed group becomes Available")


def _mount_without_volume(spec: dict[str, Any]) -> None:
    role({"spec": spec}, "decode")["workerTemplate"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "models", "mountPath": "/models"}
    ]


def _invalid_condition(kube: Client, namespace: str, name: str) -> dict[str, Any] | None:
    sg = kube.get(SG, name, namespace=namespace)
    c = next((c for c in (sg.status or {}).get("conditions", []) if c["type"] == "Invalid"), None)
    return c if c and c["status"] == "True" else None


@pytest.mark.parametrize("when", ["create", "update"])
def test_a_template_the_pod_validation_refuses_is_invalid_before_anything_moves(
    kube: Client, namespace: str, controller: ControllerProc, when: str
) -> None:
    """LWS's admission checks a template's shape only: a volumeMount naming no volume was refused by
    the StatefulSet LWS then wrote. On an update the rollout had begun (a decode surge group of the
    new revision with no prefill to pair with) and the group said nothing but "waiting for
    readiness" until its progress deadline. Now the group is Invalid naming the field, and no LWS
    is created or changed until the template is fixed."""
    name = f"mount-{when}"
    doc = example(name)
    if when == "create":
        _mount_without_volume(doc["spec"])
    kube.create(SG.from_dict(doc), namespace=namespace)
    before: dict[str, tuple[str, int]] = {}
    if when == "update":
        wait_available(kube, namespace, name)
        before = {
            lws.metadata.name: (lws.metadata.uid, lws.metadata.generation)
            for lws in kube.list(LWS, namespace=namespace)
        }
        update_spec(kube, namespace, name, _mount_without_volume)

    cond = wait_for(lambda: _invalid_condition(kube, namespace, name), 60, "Invalid=True")
    assert "roles[decode].workerTemplate" in cond["message"], cond["message"]
    assert 'volumeMounts[0].name: Not found: "models"' in cond["message"], cond["message"]
    now = {
        lws.metadata.name: (lws.metadata.uid, lws.metadata.generation)
        for lws in kube.list(LWS, namespace=namespace)
    }
    assert now == before  # none created (create), none written (update)

    update_spec(
        kube,
        namespace,
        name,
        lambda spec: role({"spec": spec}, "decode")["workerTemplate"]["spec"]["containers"][0].pop(
            "volumeMounts"
        ),
    )
    wait_for(lambda: _invalid_condition(kube, namespace, name) is None, 60, "Invalid cleared")
    wait_available(kube, namespace, name)


def test_a_volume_mount_of_a_claim_template_passes_the_template_check(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A StatefulSet's pods get a volume per claim template, so mounting one is how claim templates
    are used; the bare pod template check refused it (review of the check above)."""
    doc = example("claimmount")
    decode = role(doc, "decode")
    decode["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": _CLAIM_SPEC}]
    decode["workerTemplate"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "data", "mountPath": "/data"}
    ]
    kube.create(SG.from_dict(doc), namespace=namespace)

    outcome = wait_for(lambda: _invalid_or_created(kube, namespace, "claimmount"), 60, "Invalid, or created")
    assert outcome[0] == "created", outcome


def test_a_refused_template_is_not_hidden_by_the_other_templates_forbidden_probe(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """Field validation runs before quota admission: under a quota of no PodTemplates a bad leader
    template is refused (422) while the worker's probe is forbidden (403). With the probes run
    together the 403 won, the templates were cached as checked, and the LWS was created to fail
    in its StatefulSet (helper-67's review of the concurrent check)."""
    _no_podtemplates(kube, namespace)
    doc = example("mixed")
    decode = role(doc, "decode")
    decode["size"] = 2
    decode["leaderTemplate"] = copy.deepcopy(decode["workerTemplate"])
    decode["leaderTemplate"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "models", "mountPath": "/m"}
    ]
    kube.create(SG.from_dict(doc), namespace=namespace)

    outcome = wait_for(lambda: _invalid_or_created(kube, namespace, "mixed"), 60, "Invalid, or created")
    assert outcome[0] == "invalid", outcome
    assert "roles[decode].leaderTemplate" in outcome[1], outcome


def _invalid_or_created(kube: Client, namespace: str, name: str) -> tuple[str, Any] | None:
    """("invalid", message) once group `name` is Invalid, ("created", LWS names) once its decode
    LWS exists, else None."""
    invalid = _invalid_condition(kube, namespace, name)
    if invalid is not None:
        return ("invalid", invalid["message"])
    names = {lws.metadata.name for lws in kube.list(LWS, namespace=namespace)}
    return ("created", names) if f"{name}-decode" in names else None


def _no_podtemplates(kube: Client, namespace: str) -> None:
    """A quota of no PodTemplates: the template check's dry runs are forbidden (403)."""
    kube.create(
        from_dict(
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "no-podtemplates"},
                "spec": {"hard": {"count/podtemplates": "0"}},
            }
        ),
        namespace=namespace,
    )
    wait_for(
        lambda: kube.get(ResourceQuota, "no-podtemplates", namespace=namespace).status.hard,
        30,
        "the quota observed",
    )


def test_a_template_check_the_api_forbids_is_skipped_once_not_on_every_write(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A quota of no PodTemplates forbids the check's dry run (403): the group still comes up on
    LWS's own checks, and writes of the same templates (a scale) do not ask again. Before, every
    LWS write cost two forbidden requests while the refusal lasted."""
    _no_podtemplates(kube, namespace)

    def forbidden() -> float:
        return controller.sample_sum(
            "pdorch_kube_requests_total", verb="create", resource="podtemplates", code="403"
        )

    before = forbidden()
    kube.create(SG.from_dict(example_sized("forbidden", 1, 1)), namespace=namespace)
    wait_available(kube, namespace, "forbidden")
    checked = forbidden()
    assert checked > before  # the check ran, and the quota forbade it

    for replicas in (2, 3):
        update_spec(
            kube,
            namespace,
            "forbidden",
            lambda spec, n=replicas: role({"spec": spec}, "decode").update(replicas=n),
        )
        wait_for(
            lambda n=replicas: kube.get(LWS, "forbidden-decode", namespace=namespace).spec["replicas"] == n,
            30,
            f"decode's LWS at {replicas} replicas",
        )
    assert forbidden() == checked


def _refused(kube: Client, namespace: str, name: str, edit: Edit) -> str:
    """The apiserver's message refusing `edit` of group `name` (it must refuse it)."""
    sg = kube.get(SG, name, namespace=namespace).to_dict()
    edit(sg)
    with pytest.raises(ApiError) as err:
        kube.replace(SG.from_dict(sg), namespace=namespace)
    return err.value.status.message or ""


def test_a_role_sub_group_policy_cannot_be_added_removed_or_resized_but_its_type_can_change(
    kube: Client, namespace: str, pdorch_crds: list[str]
) -> None:
    """LWS refuses these updates of an existing LWS (the group would go Invalid until reverted):
    the apiserver refuses them on the ServingGroup, naming the field and what to do."""
    doc = example("subgroups")
    role(doc, "decode")["size"] = 4
    role(doc, "decode")["subGroupPolicy"] = {"subGroupSize": 2}
    kube.create(SG.from_dict(doc), namespace=namespace)

    def resize(d: dict[str, Any]) -> None:
        role(d, "decode")["subGroupPolicy"]["subGroupSize"] = 4

    def remove(d: dict[str, Any]) -> None:
        del role(d, "decode")["subGroupPolicy"]

    def add(d: dict[str, Any]) -> None:
        role(d, "prefill")["subGroupPolicy"] = {"subGroupSize": 1}

    for edit in (resize, remove, add):
        assert "give the role a new name" in _refused(kube, namespace, "subgroups", edit)
    sg = kube.get(SG, "subgroups", namespace=namespace).to_dict()
    role(sg, "decode")["subGroupPolicy"]["subGroupPolicyType"] = "LeaderWorker"
    kube.replace(SG.from_dict(sg), namespace=namespace)  # the type may change


def test_a_role_volume_claim_templates_cannot_change(
    kube: Client, namespace: str, pdorch_crds: list[str]
) -> None:
    """A StatefulSet's claim templates are immutable and LWS's webhook lets the edit through, so the
    role's StatefulSets could never be written again: the apiserver refuses the edit on the group."""
    claim = {"metadata": {"name": "cache"}, "spec": {"accessModes": ["ReadWriteOnce"]}}
    claim["spec"]["resources"] = {"requests": {"storage": "1Gi"}}
    doc = example("claims")
    role(doc, "decode")["volumeClaimTemplates"] = [claim]
    kube.create(SG.from_dict(doc), namespace=namespace)

    def grow(d: dict[str, Any]) -> None:
        role(d, "decode")["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] = "2Gi"

    def remove(d: dict[str, Any]) -> None:
        del role(d, "decode")["volumeClaimTemplates"]

    def add(d: dict[str, Any]) -> None:
        role(d, "prefill")["volumeClaimTemplates"] = [copy.deepcopy(claim)]

    for edit in (grow, remove, add):
        message = _refused(kube, namespace, "claims", edit)
        assert "volumeClaimTemplates" in message and "give the role a new name" in message, message
    sg = kube.get(SG, "claims", namespace=namespace).to_dict()
    role(sg, "decode")["replicas"] = 2
    kube.replace(SG.from_dict(sg), namespace=namespace)  # other edits of the role still pass


# Rules this release added that must spare objects stored before it (`optionalOldSelf`).
_NEW_RULE_MARKERS = ("self.name.matches(", "oldSelf.value().router", "oldSelf.value().bootstrapPort")


def _without_new_rules(node: Any) -> Any:
    """The CRD as the previous release generated it: the rules this one added left out."""
    if isinstance(node, dict):
        out = {k: _without_new_rules(v) for k, v in node.items()}
        if "x-kubernetes-validations" in out:
            out["x-kubernetes-validations"] = [
                r
                for r in out["x-kubernetes-validations"]
                if not any(m in r["rule"] for m in _NEW_RULE_MARKERS)
            ]
        return out
    if isinstance(node, list):
        return [_without_new_rules(v) for v in node]
    return node


def test_a_group_stored_before_the_new_rules_stays_writable(
    kube: Client, namespace: str, pdorch_crds: list[str]
) -> None:
    """The apiserver's ratcheting does not spare an unchanged role that holds free-form pod
    templates: without `optionalOldSelf`, a group stored with a role `decode-1`, or a router and no
    proxy role, could no longer be labelled, get a status, or lose a finalizer after the upgrade.
    New groups are still refused."""
    crd_file = REPO / "manifests" / "crd" / "pdorch.io_servinggroups.yaml"
    current = yaml.safe_load(crd_file.read_text())
    doc = example("stored")
    role(doc, "decode")["name"] = "decode-1"
    doc["spec"]["roles"] = [r for r in doc["spec"]["roles"] if r["type"] != "proxy"]
    doc["metadata"]["finalizers"] = ["pdorch.io/test-hold"]

    def new_group_refused(marker: str) -> bool:
        probe = copy.deepcopy(doc)
        probe["metadata"] = {"name": f"probe-{marker}"}
        try:
            kube.create(SG.from_dict(probe), namespace=namespace, dry_run=True)
        except ApiError as e:
            return e.status.code == 422
        return False

    try:
        kube.apply(from_dict(_without_new_rules(current)), field_manager="pdorch-test", force=True)
        wait_for(lambda: not new_group_refused("old"), 30, "the previous release's CRD in effect")
        kube.create(SG.from_dict(doc), namespace=namespace)
    finally:
        kube.apply(from_dict(current), field_manager="pdorch-test", force=True)
    wait_for(lambda: new_group_refused("new"), 30, "this release's CRD in effect")
    kube.patch(
        SG, "stored", {"metadata": {"labels": {"team": "a"}}}, namespace=namespace, patch_type=PatchType.MERGE
    )
    kube.patch(
        SG.Status,
        "stored",
        {"status": {"observedGeneration": 1}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    kube.delete(SG, "stored", namespace=namespace)
    kube.patch(
        SG, "stored", {"metadata": {"finalizers": None}}, namespace=namespace, patch_type=PatchType.MERGE
    )
    wait_for(lambda: not list(kube.list(SG, namespace=namespace)), 30, "the stored group deleted")

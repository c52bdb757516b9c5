"""ServingGroup -> LWS/Service/RBAC/ServingRoleScaler rendering (pure)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdorch.api.servinggroup import ServingGroup
from pdorch.proxy.config import ProxyConfig, build_config
from pdorch.roles.context import DEFAULT_PROXY_IMAGE, RenderOptions, RoleOverride
from pdorch.roles.labels import (
    ANNOTATION_ROLLOUT,
    ANNOTATION_ROLLOUT_STEP,
    LABEL_GROUP,
    LABEL_MANAGED_BY,
    LABEL_REVISION,
    LABEL_ROLE,
    LABEL_ROLE_TYPE,
    LWS_WORKER_INDEX,
    selector_string,
)
from pdorch.roles.render import expected_keys, object_key, render, revision_of
from pdorch.roles.revision import compute_revision

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).parents[2] / "examples" / "sim-pd" / "servinggroup.yaml"
TEMPLATE = {"spec": {"containers": [{"name": "engine", "image": "pdorch/sim:dev"}]}}


def _raw() -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["metadata"].update({"namespace": "team-a", "uid": "0b6c5a0e-1111-2222-3333-444455556666"})
    return raw


def _sg(raw: dict[str, Any] | None = None) -> ServingGroup:
    return ServingGroup.model_validate(raw or _raw())


def _by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def _role(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in raw["spec"]["roles"] if r["name"] == name)


def test_objects_of_the_example() -> None:
    objs = render(_sg())
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [
        ("ServiceAccount", "sim-pd-proxy"),
        ("Role", "sim-pd-proxy"),
        ("RoleBinding", "sim-pd-proxy"),
        ("Service", "sim-pd"),
        ("LeaderWorkerSet", "sim-pd-proxy"),
        ("LeaderWorkerSet", "sim-pd-prefill"),
        ("LeaderWorkerSet", "sim-pd-decode"),
    ]
    assert all(o["metadata"]["namespace"] == "team-a" for o in objs)


def test_labels_on_objects_and_pod_templates() -> None:
    sg = _sg()
    rev = revision_of(sg)
    for obj in render(sg):
        labels = obj["metadata"]["labels"]
        assert labels[LABEL_GROUP] == "sim-pd"
        assert labels[LABEL_MANAGED_BY] == "pdorch"
        assert labels[LABEL_REVISION] == rev
        assert LABEL_ROLE in labels and LABEL_ROLE_TYPE in labels
    lws = _by_key(render(sg))[("LeaderWorkerSet", "sim-pd-decode")]
    pod_labels = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
    assert pod_labels == {
        LABEL_GROUP: "sim-pd",
        LABEL_ROLE: "decode",
        LABEL_ROLE_TYPE: "decode",
        LABEL_MANAGED_BY: "pdorch",
        LABEL_REVISION: rev,
    }


def test_proxy_pods_carry_no_revision_so_model_rollouts_do_not_restart_them() -> None:
    lws = _by_key(render(_sg()))[("LeaderWorkerSet", "sim-pd-proxy")]
    pod_labels = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
    assert LABEL_REVISION not in pod_labels
    assert pod_labels[LABEL_ROLE_TYPE] == "proxy"
    assert LABEL_REVISION in lws["metadata"]["labels"]


def test_user_labels_kept_but_pdorch_keys_win() -> None:
    raw = _raw()
    _role(raw, "decode")["workerTemplate"]["metadata"] = {
        "labels": {"team": "infra", LABEL_ROLE: "spoofed"},
        "annotations": {"a": "b"},
    }
    lws = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-decode")]
    meta = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]
    assert meta["labels"]["team"] == "infra"
    assert meta["labels"][LABEL_ROLE] == "decode"
    assert meta["annotations"]["a"] == "b"
    assert meta["annotations"]["pdorch.io/port"] == "8000"


def test_render_does_not_mutate_the_spec() -> None:
    sg = _sg()
    before = sg.model_dump()
    render(sg)
    assert sg.model_dump() == before


def test_owner_references_point_at_the_group() -> None:
    for obj in render(_sg()):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "pdorch.io/v1alpha1",
            "kind": "ServingGroup",
            "name": "sim-pd",
            "uid": "0b6c5a0e-1111-2222-3333-444455556666",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_offline_render_without_uid_omits_owner_references() -> None:
    raw = _raw()
    del raw["metadata"]["uid"], raw["metadata"]["namespace"]
    objs = render(_sg(raw), RenderOptions(namespace="scratch"))
    assert all("ownerReferences" not in o["metadata"] for o in objs)
    assert all(o["metadata"]["namespace"] == "scratch" for o in objs)


def test_lws_fields() -> None:
    lws = _by_key(render(_sg()))[("LeaderWorkerSet", "sim-pd-prefill")]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec = lws["spec"]
    assert spec["replicas"] == 2
    assert spec["leaderWorkerTemplate"]["size"] == 1
    assert "leaderTemplate" not in spec["leaderWorkerTemplate"]
    (container,) = spec["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]
    assert container["image"] == "pdorch/sim:dev"
    assert spec["rolloutStrategy"] == {
        "type": "RollingUpdate",
        # KV roles at rest: a template change pdorch did not plan (a hand edit) rolls one group at
        # a time, not the whole role (during a rollout the partition is the only brake, below).
        "rollingUpdateConfiguration": {"partition": 0, "maxSurge": 0, "maxUnavailable": 1},
    }
    # Fields pdorch does not own stay out of the SSA intent.
    assert "startupPolicy" not in spec and "networkConfig" not in spec
    assert "status" not in lws


def test_lws_pass_through_fields() -> None:
    raw = _raw()
    pvc = {
        "metadata": {"name": "cache"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
    }
    _role(raw, "decode").update(
        {
            "size": 4,
            "leaderTemplate": copy.deepcopy(TEMPLATE),
            "restartPolicy": "RecreateGroupAfterStart",
            "subGroupPolicy": {"subGroupPolicyType": "LeaderExcluded", "subGroupSize": 3},
            "startupPolicy": "LeaderReady",
            "networkConfig": {"subdomainPolicy": "UniquePerReplica"},
            "volumeClaimTemplates": [pvc],
        }
    )
    raw["spec"]["rolloutStrategy"] = {"maxSurge": "25%", "maxUnavailable": 0}
    spec = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-decode")]["spec"]
    lwt = spec["leaderWorkerTemplate"]
    assert lwt["size"] == 4
    assert lwt["leaderTemplate"]["spec"] == TEMPLATE["spec"]
    assert lwt["leaderTemplate"]["metadata"]["labels"][LABEL_ROLE] == "decode"
    assert lwt["restartPolicy"] == "RecreateGroupAfterStart"
    assert lwt["subGroupPolicy"] == {"subGroupPolicyType": "LeaderExcluded", "subGroupSize": 3}
    assert lwt["volumeClaimTemplates"] == [pvc]
    assert spec["startupPolicy"] == "LeaderReady"
    assert spec["networkConfig"] == {"subdomainPolicy": "UniquePerReplica"}
    # The strategy's budgets go to the planner, not to a KV role's LWS ...
    assert spec["rolloutStrategy"]["rollingUpdateConfiguration"] == {
        "partition": 0,
        "maxSurge": 0,
        "maxUnavailable": 1,
    }
    # ... while the proxy role's LWS rolls itself with them.
    proxy = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]["spec"]
    assert proxy["rolloutStrategy"]["rollingUpdateConfiguration"] == {
        "partition": 0,
        "maxSurge": "25%",
        "maxUnavailable": 0,
    }


@pytest.mark.parametrize(
    ("given", "lws"),
    [
        (("200%", 3_000_000_000), ("100%", 2**31 - 1)),
        (("100%", "5%"), ("100%", "5%")),
        ((7, "0%"), (7, "0%")),
        # Both come to 0 for one proxy replica, which LWS refuses: one may be unavailable.
        ((0, "25%"), (0, 1)),
        (("0%", "99%"), ("0%", 1)),
    ],
)
def test_proxy_budgets_the_api_allows_are_passed_as_lws_accepts_them(given: Any, lws: Any) -> None:
    # LWS refuses percentages above 100% and ints beyond int32; the API means "all of it" there.
    raw = _raw()
    raw["spec"]["rolloutStrategy"] = {"maxSurge": given[0], "maxUnavailable": given[1]}
    proxy = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]["spec"]
    assert proxy["replicas"] == 1
    ru = proxy["rolloutStrategy"]["rollingUpdateConfiguration"]
    assert (ru["maxSurge"], ru["maxUnavailable"]) == lws
    _role(raw, "proxy")["replicas"] = 4  # 25% of 4 is one: passed as given
    proxy = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]["spec"]
    if given == (0, "25%"):
        assert proxy["rolloutStrategy"]["rollingUpdateConfiguration"]["maxUnavailable"] == "25%"


def test_leader_template_only_becomes_the_worker_template() -> None:
    raw = _raw()
    prefill = _role(raw, "prefill")
    prefill["leaderTemplate"] = prefill.pop("workerTemplate")
    lwt = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-prefill")]["spec"]["leaderWorkerTemplate"]
    assert "leaderTemplate" not in lwt
    assert lwt["workerTemplate"]["spec"]["containers"][0]["image"] == "pdorch/sim:dev"


def test_overrides_replicas_partition_and_steps() -> None:
    overrides = {
        "prefill": RoleOverride(replicas=5, partition=3, rollout=True),
        "decode": RoleOverride(partition=1, rollout=True),
        "proxy": RoleOverride(max_surge=1, max_unavailable=0),
    }
    objs = _by_key(render(_sg(), overrides=overrides))
    prefill = objs[("LeaderWorkerSet", "sim-pd-prefill")]["spec"]
    assert prefill["replicas"] == 5
    assert prefill["rolloutStrategy"]["rollingUpdateConfiguration"] == {
        "partition": 3,
        "maxSurge": 0,
        "maxUnavailable": "100%",
    }
    proxy = objs[("LeaderWorkerSet", "sim-pd-proxy")]["spec"]
    assert proxy["rolloutStrategy"]["rollingUpdateConfiguration"] == {
        "partition": 0,
        "maxSurge": 1,
        "maxUnavailable": 0,
    }
    decode = objs[("LeaderWorkerSet", "sim-pd-decode")]["spec"]
    assert decode["replicas"] == 1
    assert decode["rolloutStrategy"]["rollingUpdateConfiguration"]["partition"] == 1


def test_a_rollout_step_rides_on_every_kv_lws_it_moves() -> None:
    """The step record goes out in the same write as the replicas and partition it names, so an
    LWS never holds one without the other."""
    step = '{"n":1,"revision":"r","to":{"decode":[1,0],"prefill":[5,3]}}'
    overrides = {
        "prefill": RoleOverride(replicas=5, partition=3, rollout=True, step=step),
        "decode": RoleOverride(replicas=1, partition=0, rollout=True, step=step),
    }
    objs = _by_key(render(_sg(), overrides=overrides))
    for role in ("prefill", "decode"):
        annotations = objs[("LeaderWorkerSet", f"sim-pd-{role}")]["metadata"]["annotations"]
        assert annotations[ANNOTATION_ROLLOUT_STEP] == step and ANNOTATION_ROLLOUT in annotations
    assert "annotations" not in objs[("LeaderWorkerSet", "sim-pd-proxy")]["metadata"]


def test_override_for_unknown_role_is_refused() -> None:
    with pytest.raises(KeyError, match="nope"):
        render(_sg(), overrides={"nope": RoleOverride(replicas=1)})


def _proxy_grace(raw: dict[str, Any]) -> tuple[list[str], int]:
    """The built-in proxy's --shutdown-grace arguments and its pod's terminationGracePeriodSeconds."""
    lws = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]
    pod = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    cmd = pod["containers"][0]["command"]
    flag = cmd[cmd.index("--shutdown-grace") :] if "--shutdown-grace" in cmd else []
    return flag, pod["terminationGracePeriodSeconds"]


def test_builtin_proxy_grace_follows_the_engines() -> None:
    """The proxy relays a stream for as long as the engines' pods may drain it: its --shutdown-grace
    is the longest grace of the prefill and decode pods (leader or worker template), at least the
    flag's default, and the flag is left out at the default so that existing proxies do not roll."""
    default = ProxyConfig.model_fields["shutdown_grace_s"].default
    raw = _raw()
    for role in ("prefill", "decode"):
        for key in ("leaderTemplate", "workerTemplate"):
            _role(raw, role).get(key, {}).get("spec", {}).pop("terminationGracePeriodSeconds", None)
    # Kubernetes' 30 s default everywhere: the proxy keeps its own defaults.
    assert _proxy_grace(raw) == ([], default + 5)
    # A decode worker template with a longer grace than the prefill's.
    decode = _role(raw, "decode")
    decode["workerTemplate"]["spec"]["terminationGracePeriodSeconds"] = 90
    _role(raw, "prefill")["workerTemplate"]["spec"]["terminationGracePeriodSeconds"] = 45
    assert _proxy_grace(raw) == (["--shutdown-grace", "90"], 95)
    # A leader template counts too; a shorter grace than the default does not shorten the proxy's.
    decode["leaderTemplate"] = copy.deepcopy(decode["workerTemplate"])
    decode["leaderTemplate"]["spec"]["terminationGracePeriodSeconds"] = 120
    assert _proxy_grace(raw) == (["--shutdown-grace", "120"], 125)
    for role in ("prefill", "decode"):
        for key in ("leaderTemplate", "workerTemplate"):
            if key in _role(raw, role):
                _role(raw, role)[key]["spec"]["terminationGracePeriodSeconds"] = 5
    assert _proxy_grace(raw) == ([], default + 5)


def test_builtin_proxy_pod() -> None:
    objs = _by_key(render(_sg(), RenderOptions(proxy_image="registry.local/pdorch:dev")))
    pod = objs[("LeaderWorkerSet", "sim-pd-proxy")]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    assert pod["serviceAccountName"] == "sim-pd-proxy"
    (c,) = pod["containers"]
    assert c["image"] == "registry.local/pdorch:dev"
    assert c["command"] == [
        "pdorch", "proxy", "--group", "sim-pd", "--namespace", "team-a", "--engine", "vllm", "--port", "8000",
        "--metrics-port", "9090", "--shutdown-grace", "60",  # the example's engine pods get 60 s
    ]  # fmt: skip
    # /metrics has its own port: the client port serves the API only.
    assert c["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"  # never restarted for the engines' state
    # The kubelet's SIGKILL comes after the proxy's whole shutdown (it ends within its grace).
    assert pod["terminationGracePeriodSeconds"] > 60
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in c["env"]}
    assert yaml.safe_load(env["PDORCH_ROUTER_CONFIG"]["value"])["policy"] == "least_load"


def test_default_proxy_image() -> None:
    lws = _by_key(render(_sg()))[("LeaderWorkerSet", "sim-pd-proxy")]
    (c,) = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]
    assert c["image"] == DEFAULT_PROXY_IMAGE


def test_proxy_auth_secret_is_wired() -> None:
    raw = _raw()
    raw["spec"]["router"]["auth"] = {"secretName": "keys"}
    lws = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]
    (c,) = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["PDORCH_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "api-key"}


def test_prefill_queue_reaches_the_proxy_process_config() -> None:
    raw = _raw()
    raw["spec"]["router"]["prefillQueue"] = {"maxInflightTokens": 16384}
    lws = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]
    (c,) = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    cfg = build_config({"engine": "vllm", "group": "sim-pd", "namespace": "ns"}, env)
    assert cfg.prefill_queue_tokens == 16384 and cfg.prefill_queue_ttft_s == 2.0


def test_custom_proxy_template_is_used_as_given() -> None:
    raw = _raw()
    raw["spec"].pop("router")
    _role(raw, "proxy")["workerTemplate"] = {"spec": {"containers": [{"name": "p", "image": "my/proxy"}]}}
    lws = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]
    (c,) = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]
    assert c == {"name": "p", "image": "my/proxy"}


def test_custom_proxy_template_gets_the_router_settings_in_its_proxy_container() -> None:
    """A template of one's own that runs `pdorch proxy` keeps the group's policy and API key: its
    proxy containers get them (also one reading other variables through envFrom), a sidecar does
    not, and a variable the container sets itself keeps its value."""
    raw = _raw()
    raw["spec"]["router"]["auth"] = {"secretName": "keys"}
    mine = {"name": "PDORCH_ROUTER_CONFIG", "value": '{"policy": "round_robin"}'}
    containers = [
        {"name": "proxy", "image": "my/proxy"},
        {"name": "p2", "image": "my/proxy", "command": ["/usr/local/bin/pdorch", "proxy"], "env": [mine]},
        {
            "name": "p3",
            "image": "my/proxy",
            "command": ["sh", "-c", "exec python -m pdorch.cli proxy"],
            "envFrom": [{"configMapRef": {"name": "otel"}}],
        },
        {"name": "p4", "image": "my/pdorch", "args": ["proxy", "--port", "8000"]},
        {"name": "oauth", "image": "my/sidecar"},
    ]
    tpl = {"spec": {"containers": containers}}
    _role(raw, "proxy")["leaderTemplate"] = tpl
    lws = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]
    proxy, p2, p3, p4, oauth = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]
    env = {e["name"]: e for e in proxy["env"]}
    assert yaml.safe_load(env["PDORCH_ROUTER_CONFIG"]["value"])["policy"] == "least_load"
    assert env["PDORCH_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "api-key"}
    assert p2["env"][0] == mine and [e["name"] for e in p2["env"]] == [
        "PDORCH_ROUTER_CONFIG",
        "PDORCH_API_KEY",
    ]
    for c in (p3, p4):
        assert [e["name"] for e in c["env"]] == ["PDORCH_ROUTER_CONFIG", "PDORCH_API_KEY"], c
    assert "env" not in oauth
    assert tpl["spec"]["containers"][0] == {"name": "proxy", "image": "my/proxy"}  # the spec is not edited


def test_a_proxy_template_whose_proxy_is_not_recognised_gives_every_container_the_settings() -> None:
    """Better a sidecar with the API key in its environment than a proxy serving without one."""
    raw = _raw()
    raw["spec"]["router"]["auth"] = {"secretName": "keys"}
    tpl = {"spec": {"containers": [{"name": "router", "image": "my/router"}, {"name": "log", "image": "x"}]}}
    _role(raw, "proxy")["workerTemplate"] = tpl
    lws = _by_key(render(_sg(raw)))[("LeaderWorkerSet", "sim-pd-proxy")]
    for c in lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]:
        assert {e["name"] for e in c["env"]} == {"PDORCH_ROUTER_CONFIG", "PDORCH_API_KEY"}, c


def test_proxy_rbac_is_namespaced_and_read_only() -> None:
    objs = _by_key(render(_sg()))
    role = objs[("Role", "sim-pd-proxy")]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    binding = objs[("RoleBinding", "sim-pd-proxy")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "sim-pd-proxy",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sim-pd-proxy", "namespace": "team-a"}]
    assert objs[("ServiceAccount", "sim-pd-proxy")]["apiVersion"] == "v1"


def test_proxy_service_selects_proxy_leaders() -> None:
    svc = _by_key(render(_sg()))[("Service", "sim-pd")]
    assert svc["spec"]["type"] == "ClusterIP"
    assert "clusterIP" not in svc["spec"]
    assert svc["spec"]["selector"] == {LABEL_GROUP: "sim-pd", LABEL_ROLE: "proxy", LWS_WORKER_INDEX: "0"}
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]


def test_no_proxy_role_means_no_service_or_rbac() -> None:
    raw = _raw()
    raw["spec"]["roles"] = [r for r in raw["spec"]["roles"] if r["type"] != "proxy"]
    raw["spec"].pop("router", None)
    kinds = {o["kind"] for o in render(_sg(raw))}
    assert kinds == {"LeaderWorkerSet"}


def test_scalers_only_for_external_and_builtin_roles() -> None:
    raw = _raw()
    _role(raw, "prefill")["scaling"] = {"mode": "External", "minReplicas": 1, "maxReplicas": 8}
    _role(raw, "decode")["scaling"] = {"mode": "Builtin", "maxReplicas": 4, "targets": {"tpotMs": 40}}
    _role(raw, "proxy")["scaling"] = {"mode": "Static"}
    objs = _by_key(render(_sg(raw)))
    srs = {name: o for (kind, name), o in objs.items() if kind == "ServingRoleScaler"}
    assert set(srs) == {"sim-pd-prefill", "sim-pd-decode"}
    assert srs["sim-pd-prefill"]["apiVersion"] == "pdorch.io/v1alpha1"
    assert srs["sim-pd-prefill"]["spec"] == {"servingGroup": "sim-pd", "role": "prefill", "replicas": 2}
    assert srs["sim-pd-decode"]["metadata"]["labels"][LABEL_ROLE] == "decode"
    assert srs["sim-pd-decode"]["metadata"]["ownerReferences"][0]["controller"] is True
    # A scaler created while its role's LWS runs (deleted by hand, a switch back to External)
    # starts at the size the controller gives it, not at roles[].replicas.
    later = _by_key(render(_sg(raw), overrides={"prefill": RoleOverride(replicas=6, scaler_replicas=6)}))
    assert later[("ServingRoleScaler", "sim-pd-prefill")]["spec"]["replicas"] == 6
    assert later[("LeaderWorkerSet", "sim-pd-prefill")]["spec"]["replicas"] == 6


def test_expected_keys_match_render() -> None:
    raw = _raw()
    _role(raw, "decode")["scaling"] = {"mode": "External"}
    sg = _sg(raw)
    keys = expected_keys(sg)
    assert keys == {object_key(o) for o in render(sg)}
    assert ("pdorch.io/v1alpha1", "ServingRoleScaler", "sim-pd-decode") in keys
    assert ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "sim-pd-prefill") in keys
    assert ("v1", "Service", "sim-pd") in keys


class TestRevision:
    def test_is_short_stable_hex(self) -> None:
        rev = compute_revision(_sg().spec)
        assert len(rev) == 10 and int(rev, 16) >= 0
        assert compute_revision(_sg().spec) == rev

    def test_proxy_changes_do_not_change_it(self) -> None:
        raw = _raw()
        base = compute_revision(_sg(raw).spec)
        _role(raw, "proxy")["workerTemplate"] = {
            "spec": {"containers": [{"name": "p", "image": "my/proxy:2"}]}
        }
        _role(raw, "proxy")["replicas"] = 3
        raw["spec"]["router"] = {"policy": "power_of_two"}
        assert compute_revision(_sg(raw).spec) == base

    def test_decode_template_change_changes_it(self) -> None:
        raw = _raw()
        base = compute_revision(_sg(raw).spec)
        _role(raw, "decode")["workerTemplate"]["spec"]["containers"][0]["image"] = "pdorch/sim:v2"
        assert compute_revision(_sg(raw).spec) != base

    def test_size_and_engine_change_it(self) -> None:
        raw = _raw()
        base = compute_revision(_sg(raw).spec)
        sized = copy.deepcopy(raw)
        _role(sized, "prefill")["size"] = 2
        assert compute_revision(_sg(sized).spec) != base
        engine = copy.deepcopy(raw)
        engine["spec"]["engine"]["kvTransfer"]["connector"] = "LMCacheConnectorV1"
        assert compute_revision(_sg(engine).spec) != base

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("restartPolicy", "None"),
            ("subGroupPolicy", {"subGroupSize": 1}),
            ("networkConfig", {"subdomainPolicy": "UniquePerReplica"}),
            (
                "volumeClaimTemplates",
                [
                    {
                        "metadata": {"name": "cache"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": 1}}},
                    }
                ],
            ),
        ],
    )
    def test_fields_lws_hashes_change_it(self, field: str, value: Any) -> None:
        # LWS rolls every group when these change; pdorch's planner must see the change first.
        raw = _raw()
        base = compute_revision(_sg(raw).spec)
        _role(raw, "decode")[field] = value
        assert compute_revision(_sg(raw).spec) != base

    def test_whole_floats_hash_as_the_apiserver_stores_them(self) -> None:
        # The apiserver returns a free-form 1.0e9 as 1000000000: `pdorch render` must agree.
        raw = _raw()
        raw["spec"]["engine"]["kvTransfer"]["extra"] = {"kv_buffer_size": 1.0e9, "share": 0.5}
        stored = copy.deepcopy(raw)
        stored["spec"]["engine"]["kvTransfer"]["extra"]["kv_buffer_size"] = 1000000000
        assert compute_revision(_sg(raw).spec) == compute_revision(_sg(stored).spec)
        stored["spec"]["engine"]["kvTransfer"]["extra"]["share"] = 0.25
        assert compute_revision(_sg(raw).spec) != compute_revision(_sg(stored).spec)

    def test_replicas_scaling_and_role_order_do_not_change_it(self) -> None:
        raw = _raw()
        base = compute_revision(_sg(raw).spec)
        _role(raw, "prefill")["replicas"] = 7
        _role(raw, "decode")["scaling"] = {"mode": "External", "maxReplicas": 9}
        raw["spec"]["roles"].reverse()
        assert compute_revision(_sg(raw).spec) == base

    def test_revision_reaches_the_kv_pod_templates(self) -> None:
        raw = _raw()
        old = _by_key(render(_sg(raw)))
        _role(raw, "decode")["workerTemplate"]["spec"]["containers"][0]["image"] = "pdorch/sim:v2"
        new = _by_key(render(_sg(raw)))
        for role in ("prefill", "decode"):
            key = ("LeaderWorkerSet", f"sim-pd-{role}")
            old_labels = old[key]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
            new_labels = new[key]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
            assert old_labels[LABEL_REVISION] != new_labels[LABEL_REVISION]
        proxy_key = ("LeaderWorkerSet", "sim-pd-proxy")
        assert old[proxy_key]["spec"] == new[proxy_key]["spec"]


def test_selector_string_is_sorted() -> None:
    assert selector_string({"b": "2", "a": "1"}) == "a=1,b=2"


def test_sglang_bootstrap_port_annotation() -> None:
    raw = _raw()
    raw["spec"]["engine"] = {"name": "sglang"}
    _role(raw, "prefill")["bootstrapPort"] = 8998
    objs = _by_key(render(_sg(raw)))
    meta = objs[("LeaderWorkerSet", "sim-pd-prefill")]["spec"]["leaderWorkerTemplate"]["workerTemplate"][
        "metadata"
    ]
    assert meta["annotations"] == {"pdorch.io/port": "8000", "pdorch.io/bootstrap-port": "8998"}
    proxy = objs[("LeaderWorkerSet", "sim-pd-proxy")]["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    assert "--engine" in proxy["spec"]["containers"][0]["command"]
    assert proxy["spec"]["containers"][0]["command"][7] == "sglang"

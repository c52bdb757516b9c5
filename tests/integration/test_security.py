"""Least privilege and Pod Security, checked on the real apiserver.

- RBAC: `kubectl auth can-i --list` as the controller's and the built-in proxy's ServiceAccounts,
  minus what any authenticated ServiceAccount may do (measured as an unbound one), must equal an
  explicit list of what each needs, rule for rule: nothing missing, nothing extra.
- Pod Security: every pod template the controller renders (built-in proxy, prefill and decode
  leaders/workers) is created server-side in a namespace that enforces `restricted`, and the real
  pods LWS creates from them are admitted there.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Pod

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from pdorch.roles.naming import proxy_rbac_name
from tests.compat.helpers import free_port, spawn, stop
from tests.integration.test_controller import LWS, SG, example, lws_names, wait_available
from tests.integration.test_manifests import installed  # noqa: F401  (module fixture: manifests/ applied)

pytestmark = pytest.mark.integration

CONTROLLER_SA = "system:serviceaccount:pdorch-system:pdorch-controller"
Rule = tuple[str, str, str]  # (resource or non-resource URL, resource names, verb)

# What the controller needs in any namespace holding ServingGroups (cluster-wide ClusterRole):
# read specs and write status; own LWS, ServingRoleScalers and the proxy's Service,
# ServiceAccount, Role, RoleBinding (create/patch via server-side apply, delete to prune);
# watch pods for readiness; write Events; keep the revision history.
# Informers list and watch; writes are server-side apply (patch), create and delete: no get/update.
_OWNED = ("list", "watch", "create", "patch", "delete")
CONTROLLER_NEEDS: set[Rule] = (
    {("servinggroups.pdorch.io", "", v) for v in ("list", "watch")}
    | {("servinggroups.pdorch.io/status", "", "patch")}
    # Children carry blockOwnerDeletion, which OwnerReferencesPermissionEnforcement allows only
    # to those who may update the owner's finalizers.
    | {("servinggroups.pdorch.io/finalizers", "", "update")}
    | {("servingrolescalers.pdorch.io", "", v) for v in _OWNED}
    | {("servingrolescalers.pdorch.io/status", "", "patch")}
    | {("leaderworkersets.leaderworkerset.x-k8s.io", "", v) for v in _OWNED}
    | {(r, "", v) for r in ("services", "serviceaccounts") for v in _OWNED}
    | {
        (r, "", v)
        for r in ("roles.rbac.authorization.k8s.io", "rolebindings.rbac.authorization.k8s.io")
        for v in _OWNED
    }
    | {("pods", "", v) for v in ("list", "watch")}
    | {("events.events.k8s.io", "", "create")}
    # Why a role's groups are missing: its LWS's and StatefulSets' FailedCreate warnings.
    | {("events", "", "list")}
    # Dry runs of PodTemplates: the pod validation of a role's templates before its LWS is written.
    | {("podtemplates", "", "create")}
    # Revision history for `pdorch rollback`: one ControllerRevision per revision, pruned.
    | {("controllerrevisions.apps", "", v) for v in ("list", "create", "delete")}
)
# ... plus, in its own namespace only, its leader-election Lease (a create cannot be limited to a name).
CONTROLLER_NEEDS_OWN_NS: set[Rule] = {
    ("leases.coordination.k8s.io", "pdorch-controller", v) for v in ("get", "update")
} | {("leases.coordination.k8s.io", "", "create")}
# The built-in autoscaler, in every namespace: list groups, read their scalers, write only the
# scalers' /scale and /status, list leader pods and annotate the ones it drains, write Events.
SCALER_SA = "system:serviceaccount:pdorch-system:pdorch-scaler"
SCALER_NEEDS: set[Rule] = {
    ("servinggroups.pdorch.io", "", "list"),
    ("servingrolescalers.pdorch.io", "", "get"),
    ("servingrolescalers.pdorch.io/scale", "", "patch"),
    ("servingrolescalers.pdorch.io/status", "", "patch"),
    ("pods", "", "list"),
    ("pods", "", "patch"),
    ("events.events.k8s.io", "", "create"),
}
# ... plus, in its own namespace only, its leader-election Lease.
SCALER_NEEDS_OWN_NS: set[Rule] = {
    ("leases.coordination.k8s.io", "pdorch-scaler", v) for v in ("get", "update")
} | {("leases.coordination.k8s.io", "", "create")}
# The built-in proxy discovers its group's pods, in its own namespace, and nothing else.
PROXY_NEEDS: set[Rule] = {("pods", "", v) for v in ("list", "watch")}

_ROW = re.compile(r"^(\S*)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


def can_i_list(devcluster: ClusterState, user: str, namespace: str) -> set[Rule]:
    """`kubectl auth can-i --list` as ``user`` in ``namespace``, one (resource, names, verb) per verb."""
    out = devcluster.kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace)
    assert out.returncode == 0, out.stderr
    rules: set[Rule] = set()
    lines = out.stdout.splitlines()
    assert lines and lines[0].split()[0] == "Resources", out.stdout
    for line in lines[1:]:
        m = _ROW.match(line.strip()) if line.startswith(" ") else _ROW.match(line)
        if m is None:
            # Rows without a resource start with blanks: "   [/api/*]   []   [get]".
            m = re.match(r"^\s*()\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$", line)
        assert m is not None, f"unparsed can-i row: {line!r}"
        resource, urls, names, verbs = m.groups()
        target = resource or urls
        for verb in verbs.split():
            rules.add((target, names, verb))
    return rules


def unbound_sa(namespace: str) -> str:
    """A ServiceAccount name nobody bound anything to: its rights are the cluster's baseline."""
    return f"system:serviceaccount:{namespace}:nobody-{uuid.uuid4().hex[:6]}"


def extra_and_missing(got: set[Rule], baseline: set[Rule], needs: set[Rule]) -> tuple[set[Rule], set[Rule]]:
    """Rules beyond baseline+needs, and needed rules not granted."""
    granted = got - baseline
    return granted - needs, needs - got


def test_controller_rbac_is_exactly_what_it_needs(
    devcluster: ClusterState,
    installed: subprocess.CompletedProcess[str],  # noqa: F811
    namespace: str,
) -> None:
    for ns, needs in (
        (namespace, CONTROLLER_NEEDS),
        ("pdorch-system", CONTROLLER_NEEDS | CONTROLLER_NEEDS_OWN_NS),
    ):
        got = can_i_list(devcluster, CONTROLLER_SA, ns)
        baseline = can_i_list(devcluster, unbound_sa(ns), ns)
        extra, missing = extra_and_missing(got, baseline, needs)
        assert not extra, f"controller may do more than it needs in {ns}: {sorted(extra)}"
        assert not missing, f"controller lacks rights it needs in {ns}: {sorted(missing)}"
        # Never Secrets, never RBAC escalation.
        assert not {r for r in got if r[0] == "secrets" or r[2] in ("bind", "escalate", "impersonate", "*")}


def test_scaler_rbac_is_exactly_what_it_needs(
    devcluster: ClusterState,
    installed: subprocess.CompletedProcess[str],  # noqa: F811
    namespace: str,
) -> None:
    for ns, needs in ((namespace, SCALER_NEEDS), ("pdorch-system", SCALER_NEEDS | SCALER_NEEDS_OWN_NS)):
        got = can_i_list(devcluster, SCALER_SA, ns)
        baseline = can_i_list(devcluster, unbound_sa(ns), ns)
        extra, missing = extra_and_missing(got, baseline, needs)
        assert not extra, f"scaler may do more than it needs in {ns}: {sorted(extra)}"
        assert not missing, f"scaler lacks rights it needs in {ns}: {sorted(missing)}"


def test_builtin_proxy_rbac_is_pods_read_in_its_namespace_only(
    kube: Client, devcluster: ClusterState, namespace: str, controller: ControllerProc
) -> None:
    kube.create(SG.from_dict(example("sec")), namespace=namespace)
    wait_for(
        lambda: lws_names(kube, namespace, "sec") == {"sec-proxy", "sec-prefill", "sec-decode"}, 60, "3 LWS"
    )
    sa = f"system:serviceaccount:{namespace}:{proxy_rbac_name('sec')}"

    def rbac_in_place() -> bool:
        return PROXY_NEEDS <= can_i_list(devcluster, sa, namespace)

    wait_for(rbac_in_place, 30, "the proxy's Role and RoleBinding")
    for ns, needs in ((namespace, PROXY_NEEDS), ("default", set()), ("pdorch-system", set())):
        got = can_i_list(devcluster, sa, ns)
        baseline = can_i_list(devcluster, unbound_sa(ns), ns)
        extra, missing = extra_and_missing(got, baseline, needs)
        assert not extra, f"proxy may do more than it needs in {ns}: {sorted(extra)}"
        assert not missing, f"proxy lacks rights it needs in {ns}: {sorted(missing)}"


def test_builtin_proxy_discovers_its_engines_on_its_own_rbac(
    kube: Client, devcluster: ClusterState, namespace: str, controller: ControllerProc, tmp_path: Path
) -> None:
    # Sufficiency of the proxy's Role: `pdorch proxy` with only its ServiceAccount's token finds
    # the group's prefill and decode pods.
    kube.create(SG.from_dict(example("disc")), namespace=namespace)
    wait_available(kube, namespace, "disc")
    sa = proxy_rbac_name("disc")
    token = devcluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h")
    assert token.returncode == 0, token.stderr
    cfg = yaml.safe_load(Path(devcluster.kubeconfig).read_text())
    cfg["users"] = [{"name": cfg["users"][0]["name"], "user": {"token": token.stdout.strip()}}]
    kcfg = tmp_path / "proxy-sa-kubeconfig"
    kcfg.write_text(yaml.safe_dump(cfg))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "pdorch.cli",
        "proxy",
        "--engine",
        "vllm",
        "--group",
        "disc",
        "--metrics-port",
        "0",
    ]
    cmd += ["--namespace", namespace, "--kubeconfig", str(kcfg), "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "proxy.log"
    proc = spawn(cmd, log)
    try:

        def discovered() -> dict[str, Any] | None:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = json.loads(r.read())
            except urllib.error.HTTPError as exc:  # 503 until a pair is usable: the body still counts
                body = json.loads(exc.read())
            except OSError:
                return None
            return body if (body.get("prefill"), body.get("decode")) == (2, 1) else None

        wait_for(discovered, 60, "the proxy to discover 2 prefill and 1 decode pods with its own token")
        text = log.read_text()
        # A word match (the proxy's random port may contain the digits 403), after each line's
        # timestamp (its milliseconds may read ",403").
        messages = "\n".join(line.split(" ", 2)[-1] for line in text.splitlines())
        assert not re.search(r"\b403\b", messages) and "forbidden" not in text.lower(), text[-3000:]
    finally:
        stop(proc)


# -- Pod Security ------------------------------------------------------------------------------------------

RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 65532,
}


def restricted_example(name: str) -> dict[str, Any]:
    """The example group with engine templates a restricted namespace admits (the user's part);
    the built-in proxy's template is entirely the controller's."""
    doc = example(name)
    for r in doc["spec"]["roles"]:
        spec = r.get("workerTemplate", {}).get("spec")
        if spec is None:
            continue
        spec["securityContext"] = copy.deepcopy(RESTRICTED_POD)
        for c in spec["containers"]:
            c["securityContext"] = copy.deepcopy(RESTRICTED_CONTAINER)
    return doc


@pytest.fixture
def restricted_namespace(kube: Client) -> Iterator[str]:
    name = f"r-{uuid.uuid4().hex[:8]}"
    labels = {
        "pdorch.io/test": "true",
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    kube.create(Namespace(metadata=ObjectMeta(name=name, labels=labels)))
    yield name
    kube.delete(Namespace, name)


def rendered_templates(lws: Any) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of one LWS: its leader template (if any) and worker template."""
    spec = lws.spec["leaderWorkerTemplate"]
    out = [(f"{lws.metadata.name} worker", spec["workerTemplate"])]
    if spec.get("leaderTemplate"):
        out.append((f"{lws.metadata.name} leader", spec["leaderTemplate"]))
    return out


def test_rendered_pods_meet_restricted_pod_security(
    kube: Client,
    devcluster: ClusterState,
    restricted_namespace: str,
    controller: ControllerProc,
    tmp_path: Path,
) -> None:
    ns = restricted_namespace
    kube.create(SG.from_dict(restricted_example("pss")), namespace=ns)
    wait_for(lambda: lws_names(kube, ns, "pss") == {"pss-proxy", "pss-prefill", "pss-decode"}, 60, "3 LWS")

    def dry_run_pod(tpl: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"pss-check-{uuid.uuid4().hex[:6]}",
                "labels": tpl.get("metadata", {}).get("labels", {}),
            },
            "spec": tpl["spec"],
        }
        path = tmp_path / "pod.json"
        path.write_text(json.dumps(pod))
        return devcluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", str(path), "-o", "name")

    # The namespace really enforces: the example's engine template (no securityContext) is refused.
    plain = next(r for r in example("x")["spec"]["roles"] if r["type"] == "decode")["workerTemplate"]
    refused = dry_run_pod(plain)
    assert refused.returncode != 0 and "PodSecurity" in refused.stderr, refused.stderr

    # Every rendered template, as a bare Pod, passes server-side admission (dry run: nothing stays).
    templates = [t for lws in kube.list(LWS, namespace=ns) for t in rendered_templates(lws)]
    assert len(templates) >= 3
    for where, tpl in templates:
        out = dry_run_pod(tpl)
        assert out.returncode == 0, f"{where}: {out.stderr}"
        assert "PodSecurity" not in out.stderr, f"{where}: {out.stderr}"

    # And the real pods LWS creates from them are admitted: the group becomes Available.
    wait_available(kube, ns, "pss", timeout=120)
    pods = list(kube.list(Pod, namespace=ns, labels={"pdorch.io/group": "pss"}))
    assert len(pods) >= 4  # 1 proxy + 2 prefill + 1 decode

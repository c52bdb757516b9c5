"""charts/pdorch renders the same objects as the kustomize base; the overlays differ from it only
where they say they do.

Both renderers are the real tools: `kubectl kustomize` from the dev cluster's Go-built kubectl and
`helm template` from helm built by hack/build-helm.sh (warm cache: builds nothing). No cluster is
needed for rendering.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdorch.devcluster import binaries

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "pdorch"
ObjKey = tuple[str, str, str, str]


@pytest.fixture(scope="module")
def helm() -> str:
    """The pinned helm binary, built into the cache on first use."""
    out = subprocess.run([str(REPO / "hack" / "build-helm.sh")], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-4000:]
    return str(Path(out.stdout.strip().splitlines()[-1]) / "helm")


@pytest.fixture(scope="module")
def kubectl() -> str:
    bins = binaries.locate()
    assert bins is not None, "control-plane binaries missing: run ./hack/install.sh"
    return bins.path("kubectl")


def run(*argv: str) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{argv}: {out.stderr}"
    return out.stdout


def objects(rendered: str) -> dict[ObjKey, dict[str, Any]]:
    """Rendered YAML as {(apiVersion, kind, namespace, name): object}; duplicates are an error."""
    out: dict[ObjKey, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(rendered):
        if not doc:
            continue
        meta = doc["metadata"]
        key = (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in out, f"{key} rendered twice"
        out[key] = doc
    return out


def differences(a: dict[ObjKey, dict[str, Any]], b: dict[ObjKey, dict[str, Any]]) -> list[str]:
    """What tells two object sets apart: missing objects, then objects whose content differs."""
    diffs = [f"only in first: {k}" for k in sorted(a.keys() - b.keys())]
    diffs += [f"only in second: {k}" for k in sorted(b.keys() - a.keys())]
    for k in sorted(a.keys() & b.keys()):
        # Canonical JSON: key order and YAML flow/block style do not matter, values and types do.
        if json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True):
            diffs.append(f"differs: {k}")
    return diffs


def helm_template(helm: str, *args: str) -> dict[ObjKey, dict[str, Any]]:
    return objects(run(helm, "template", "pdorch", str(CHART), "--include-crds", *args))


def kustomize(kubectl: str, path: str) -> dict[ObjKey, dict[str, Any]]:
    return objects(run(kubectl, "kustomize", str(REPO / path)))


def deployment(objs: dict[ObjKey, dict[str, Any]]) -> dict[str, Any]:
    return objs[("apps/v1", "Deployment", "pdorch-system", "pdorch-controller")]


def test_helm_chart_defaults_render_the_kustomize_base(helm: str, kubectl: str) -> None:
    base = kustomize(kubectl, "manifests/base")
    chart = helm_template(helm)
    assert differences(base, chart) == []
    # 2 CRDs, Namespace; controller: SA, ClusterRole(+Binding), Role(+Binding), Deployment, PDB;
    # scaler: SA, ClusterRole(+Binding), Role(+Binding) for its Lease, Deployment.
    assert len(base) == 16


def test_the_top_level_kustomization_is_the_base(kubectl: str) -> None:
    assert differences(kustomize(kubectl, "manifests"), kustomize(kubectl, "manifests/base")) == []


def test_the_comparison_sees_a_changed_value(helm: str, kubectl: str) -> None:
    base = kustomize(kubectl, "manifests/base")
    assert differences(base, helm_template(helm, "--set", "replicas=3")) == [
        "differs: ('apps/v1', 'Deployment', 'pdorch-system', 'pdorch-controller')"
    ]
    no_scaler = differences(base, helm_template(helm, "--set", "scaler.enabled=false"))
    scaler_objects = ("pdorch-scaler", "pdorch-scaler-leader-election")
    assert sorted(no_scaler) == sorted(f"only in first: {k}" for k in base if k[3] in scaler_objects)
    assert len(no_scaler) == 6  # SA, ClusterRole(+Binding), Lease Role(+Binding), Deployment
    no_pdb = differences(base, helm_template(helm, "--set", "podDisruptionBudget.enabled=false"))
    assert no_pdb == [
        "only in first: ('policy/v1', 'PodDisruptionBudget', 'pdorch-system', 'pdorch-controller')"
    ]


def test_watch_namespace_grants_the_roles_only_in_that_namespace(helm: str, kubectl: str) -> None:
    """With watchNamespace both service accounts get RoleBindings there, no cluster-wide writes."""
    base = kustomize(kubectl, "manifests/base")
    chart = helm_template(helm, "--set", "watchNamespace=team-a")
    rbac = "rbac.authorization.k8s.io/v1"
    assert [k for k in chart if k[1] == "ClusterRoleBinding"] == []
    for name in ("pdorch-controller", "pdorch-scaler"):
        binding = chart[(rbac, "RoleBinding", "team-a", name)]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": name,
        }
        assert binding["subjects"] == base[(rbac, "ClusterRoleBinding", "", name)]["subjects"]
        (container,) = chart[("apps/v1", "Deployment", "pdorch-system", name)]["spec"]["template"]["spec"][
            "containers"
        ]
        assert "--namespace=team-a" in container["args"]  # it lists and watches only there
    # The Lease stays in the controller's own namespace.
    assert (rbac, "RoleBinding", "pdorch-system", "pdorch-leader-election") in chart


@pytest.mark.parametrize(
    ("value", "deployment_name", "role_name"),
    [
        ("leaderElection.leaseName", "pdorch-controller", "pdorch-leader-election"),
        ("scaler.leaseName", "pdorch-scaler", "pdorch-scaler-leader-election"),
    ],
)
def test_a_lease_name_reaches_the_flag_and_the_role(
    helm: str, value: str, deployment_name: str, role_name: str
) -> None:
    """A Lease renamed through the values is the one the process elects on and the one its Role
    lets it update (a --lease-name in extraArgs alone would be refused by RBAC)."""
    chart = helm_template(helm, "--set", f"{value}=team-a-lease")
    (container,) = chart[("apps/v1", "Deployment", "pdorch-system", deployment_name)]["spec"]["template"][
        "spec"
    ]["containers"]
    assert "--lease-name=team-a-lease" in container["args"]
    role = chart[("rbac.authorization.k8s.io/v1", "Role", "pdorch-system", role_name)]
    named = [r for r in role["rules"] if "resourceNames" in r]
    assert named == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["team-a-lease"],
            "verbs": ["get", "update"],
        }
    ]


def test_helm_lint_is_clean_and_refuses_unsafe_values(helm: str) -> None:
    run(helm, "lint", "--strict", str(CHART))
    bad = subprocess.run(
        [helm, "template", "pdorch", str(CHART), "--set", "leaderElection.enabled=false"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "replicas > 1 needs leaderElection.enabled=true" in bad.stderr


def test_chart_crds_are_the_generated_crds() -> None:
    # Helm installs crds/ verbatim. `pdorch crds` writes copies there (symlinks made helm warn on
    # every install); they must be the generated CRDs, not links that a checkout may not keep.
    generated = sorted((REPO / "manifests" / "crd").glob("*.yaml"))
    assert [p.name for p in generated] == sorted(p.name for p in (CHART / "crds").glob("*.yaml")), (
        "run `pdorch crds`: it writes manifests/crd and charts/pdorch/crds"
    )
    for p in generated:
        copy = CHART / "crds" / p.name
        assert not copy.is_symlink(), f"{copy} must be a file"
        assert copy.read_text() == p.read_text(), f"{copy} drifted; run `pdorch crds`"


def test_dev_overlay_is_one_replica_without_leader_election(kubectl: str) -> None:
    base, dev = kustomize(kubectl, "manifests/base"), kustomize(kubectl, "manifests/overlays/dev")
    d = deployment(dev)
    (container,) = d["spec"]["template"]["spec"]["containers"]
    assert d["spec"]["replicas"] == 1
    assert "--no-leader-elect" in container["args"]  # on by default in `pdorch controller`
    assert "--leader-elect" not in container["args"]
    assert container["image"] == "ghcr.io/pdorch/pdorch:dev"
    assert "--proxy-image=ghcr.io/pdorch/pdorch:dev" in container["args"]
    assert "affinity" not in d["spec"]["template"]["spec"]
    assert set(differences(base, dev)) == {
        "differs: ('apps/v1', 'Deployment', 'pdorch-system', 'pdorch-controller')",
        "differs: ('apps/v1', 'Deployment', 'pdorch-system', 'pdorch-scaler')",  # imagePullPolicy
        "only in first: ('policy/v1', 'PodDisruptionBudget', 'pdorch-system', 'pdorch-controller')",
        "only in first: ('rbac.authorization.k8s.io/v1', 'Role', 'pdorch-system', 'pdorch-leader-election')",
        "only in first: ('rbac.authorization.k8s.io/v1', 'RoleBinding', 'pdorch-system', 'pdorch-leader-election')",
    }


def test_production_overlay_spreads_three_leader_elected_replicas(kubectl: str) -> None:
    base, prod = kustomize(kubectl, "manifests/base"), kustomize(kubectl, "manifests/overlays/production")
    d = deployment(prod)
    spec = d["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert d["spec"]["replicas"] == 3
    assert "--leader-elect" in container["args"]
    assert container["image"] == "ghcr.io/pdorch/pdorch:0.1.0"
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "256Mi"}
    # The base's security settings survive the strategic merge.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    pdb = prod[("policy/v1", "PodDisruptionBudget", "pdorch-system", "pdorch-controller")]
    assert pdb["spec"]["minAvailable"] == 2
    assert set(differences(base, prod)) == {
        "differs: ('apps/v1', 'Deployment', 'pdorch-system', 'pdorch-controller')",
        "differs: ('apps/v1', 'Deployment', 'pdorch-system', 'pdorch-scaler')",  # imagePullPolicy
        "differs: ('policy/v1', 'PodDisruptionBudget', 'pdorch-system', 'pdorch-controller')",
    }


def test_helm_values_reproduce_the_dev_overlay(helm: str, kubectl: str) -> None:
    values = REPO / "charts" / "pdorch" / "values-dev.yaml"
    dev = kustomize(kubectl, "manifests/overlays/dev")
    assert differences(dev, helm_template(helm, "-f", str(values))) == []


def test_helm_values_reproduce_the_production_overlay(helm: str, kubectl: str) -> None:
    """The chart's knobs reach what the production overlay does (a user can pick either tool)."""
    values = REPO / "charts" / "pdorch" / "values-production.yaml"
    prod = kustomize(kubectl, "manifests/overlays/production")
    assert differences(prod, helm_template(helm, "-f", str(values))) == []


def test_the_python_lock_pins_what_pyproject_pins_and_what_is_installed() -> None:
    """constraints.txt (hack/lock-deps.py) agrees with pyproject.toml's pins and, since install.sh
    installs under it, with the installed packages."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    lock = dict(
        line.split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for req in pins:
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req}: pyproject.toml pins exact versions"
        assert lock.get(canonicalize_name(req.name)) == spec.version, f"{req} vs constraints.txt"
    out = subprocess.run(
        [sys.executable, str(REPO / "hack" / "lock-deps.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr

"""manifests/ installs cleanly, meets restricted Pod Security, and its RBAC is enough and no more."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from lightkube import Client
from lightkube.resources.core_v1 import Namespace, Pod

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from tests.integration.test_controller import SG, example, lws_names, wait_available

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SA = "system:serviceaccount:pdorch-system:pdorch-controller"


def kubectl(devcluster: ClusterState, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = devcluster.kubectl(*args)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def installed(devcluster: ClusterState, pdorch_crds: list[str]) -> subprocess.CompletedProcess[str]:
    # Exactly what docs/README tell users to run.
    return kubectl(devcluster, "apply", "--server-side", "--force-conflicts", "-k", str(REPO / "manifests"))


@pytest.fixture
def sa_kubeconfig(
    devcluster: ClusterState, installed: subprocess.CompletedProcess[str], tmp_path: Path
) -> Iterator[str]:
    token = kubectl(
        devcluster, "create", "token", "pdorch-controller", "-n", "pdorch-system", "--duration=1h"
    ).stdout
    cfg = yaml.safe_load(Path(devcluster.kubeconfig).read_text())
    cfg["users"] = [{"name": "admin", "user": {"token": token.strip()}}]
    path = tmp_path / "sa-kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    yield str(path)


def test_install_has_no_pod_security_warnings_and_pods_are_admitted(
    kube: Client, installed: subprocess.CompletedProcess[str]
) -> None:
    assert "PodSecurity" not in installed.stderr, installed.stderr
    ns = kube.get(Namespace, "pdorch-system")
    assert ns.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"

    # The namespace enforces `restricted`: the ReplicaSet's pods exist only if they comply.
    def two_running() -> bool:
        pods = kube.list(Pod, namespace="pdorch-system", labels={"app.kubernetes.io/component": "controller"})
        return sum(p.status.phase == "Running" for p in pods) == 2

    wait_for(two_running, 90, "2 controller pods admitted under restricted Pod Security")


def test_controller_runs_on_its_service_account_rbac(
    kube: Client, namespace: str, devcluster: ClusterState, sa_kubeconfig: str
) -> None:
    ctl = ControllerProc(sa_kubeconfig, "sa-ctl", f"sa-{uuid.uuid4().hex[:6]}")
    try:
        ctl.wait_ready()
        kube.create(SG.from_dict(example("rbac")), namespace=namespace)
        wait_available(kube, namespace, "rbac")
        assert lws_names(kube, namespace, "rbac") == {"rbac-proxy", "rbac-prefill", "rbac-decode"}

        # Status (servinggroups/status) was written, and so were Events, on the SA's own rights.
        def event_recorded() -> bool:
            # As JSON: lightkube's typed Event refuses the null eventTime of converted core events.
            raw = kubectl(devcluster, "get", "events.events.k8s.io", "-n", namespace, "-o", "json").stdout
            return any(
                e["regarding"]["name"] == "rbac" and e.get("reportingController") == "pdorch.io/controller"
                for e in json.loads(raw)["items"]
            )

        wait_for(event_recorded, 30, "an Event about the group, written with the ServiceAccount's token")
    finally:
        ctl.stop()


@pytest.mark.parametrize(
    ("verb", "resource", "namespace", "allowed"),
    [
        ("patch", "leaderworkersets.leaderworkerset.x-k8s.io", "default", True),
        ("patch", "servinggroups.pdorch.io --subresource=status", "default", True),
        ("update", "leases.coordination.k8s.io", "pdorch-system", True),
        ("get", "secrets", "default", False),
        ("list", "secrets", "pdorch-system", False),
        ("delete", "servinggroups.pdorch.io", "default", False),
        ("patch", "servinggroups.pdorch.io", "default", False),
        ("create", "pods", "default", False),
        ("delete", "pods", "default", False),
        ("update", "leases.coordination.k8s.io", "kube-system", False),
        ("patch", "nodes", "", False),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", "", False),
        ("bind", "roles.rbac.authorization.k8s.io", "default", False),
        ("escalate", "roles.rbac.authorization.k8s.io", "default", False),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", "", False),
    ],
)
def test_service_account_can_do_only_what_it_needs(
    devcluster: ClusterState,
    installed: subprocess.CompletedProcess[str],
    verb: str,
    resource: str,
    namespace: str,
    allowed: bool,
) -> None:
    args = ["auth", "can-i", verb, *resource.split(), f"--as={SA}"]
    args += ["-n", namespace] if namespace else []
    out = kubectl(devcluster, *args, check=False)
    assert out.stdout.strip() == ("yes" if allowed else "no"), (args, out.stdout, out.stderr)

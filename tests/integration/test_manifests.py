"""manifests/ installs cleanly, meets restricted Pod Security, and its RBAC is enough and no more."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from lightkube import Client
from lightkube.resources.core_v1 import Namespace, Pod
from prometheus_client import REGISTRY

from pdorch.controller.kubeapi import KubeApi
from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from pdorch.proxy.endpoints import Endpoint
from pdorch.scaler.loop import BuiltinScaler, ScalerConfig
from pdorch.scaler.scrape import EngineSample
from tests.integration.test_controller import SG, SRS, example, example_scaled, lws_names, wait_available
from tests.integration.test_scaler_drains import is_draining, leader_pod, mark_draining

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


def kubeconfig_for(devcluster: ClusterState, service_account: str, path: Path) -> str:
    """A kubeconfig acting as ``pdorch-system/<service_account>`` (a short-lived token)."""
    token = kubectl(
        devcluster, "create", "token", service_account, "-n", "pdorch-system", "--duration=1h"
    ).stdout
    cfg = yaml.safe_load(Path(devcluster.kubeconfig).read_text())
    cfg["users"] = [{"name": "admin", "user": {"token": token.strip()}}]
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def sa_kubeconfig(
    devcluster: ClusterState, installed: subprocess.CompletedProcess[str], tmp_path: Path
) -> Iterator[str]:
    yield kubeconfig_for(devcluster, "pdorch-controller", tmp_path / "sa-kubeconfig")


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

    def scalers_running() -> bool:
        pods = kube.list(Pod, namespace="pdorch-system", labels={"app.kubernetes.io/component": "scaler"})
        return [p.status.phase for p in pods] == ["Running", "Running"]  # leader and standby

    wait_for(scalers_running, 90, "2 scaler pods admitted under restricted Pod Security")


def test_controller_runs_on_its_service_account_rbac(
    kube: Client, namespace: str, devcluster: ClusterState, sa_kubeconfig: str
) -> None:
    # The Lease the ServiceAccount may hold: its Role names it.
    ctl = ControllerProc(sa_kubeconfig, "sa-ctl", "pdorch-controller")
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
        ("update", "servinggroups.pdorch.io --subresource=finalizers", "default", True),
        ("update", "servinggroups.pdorch.io", "default", False),
        ("update", "leases.coordination.k8s.io/pdorch-controller", "pdorch-system", True),
        ("create", "leases.coordination.k8s.io", "pdorch-system", True),
        ("update", "leases.coordination.k8s.io/pdorch-scaler", "pdorch-system", False),
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


class _SaturatedDecodes:
    """Engine metrics of a saturated decode pool. Only the engines are stand-ins here: every
    Kubernetes read and write below goes to the real apiserver on the scaler's own token."""

    def __init__(self) -> None:
        self.scrapes = 0

    async def samples(self, namespace: str, endpoints: Sequence[Endpoint]) -> list[EngineSample | None]:
        self.scrapes += 1
        n = self.scrapes
        return [
            EngineSample(
                engine="vllm",
                running=250,
                waiting=60,
                kv_usage=0.97,
                requests_total=400 * n,
                prompt_tokens_total=400_000 * n,
                generation_tokens_total=80_000 * n,
                itl_sum_s=50.0 * n,  # 0.5 s per token against a 100 ms target: a miss
                itl_count=100.0 * n,
            )
            for _ in endpoints
        ]


async def test_scaler_runs_on_its_service_account_rbac(
    kube: Client,
    namespace: str,
    devcluster: ClusterState,
    installed: subprocess.CompletedProcess[str],
    controller: ControllerProc,
    tmp_path: Path,
) -> None:
    scaling = {
        "mode": "Builtin",
        "maxReplicas": 3,
        "targets": {"tpotMs": 100},
        "scaleDownAfterMissSeconds": 900,
    }
    doc = example_scaled("srbac", "decode", scaling)
    kube.create(SG.from_dict(doc), namespace=namespace)
    await asyncio.to_thread(wait_available, kube, namespace, "srbac")
    prefill = leader_pod(kube, namespace, "srbac", "prefill")
    mark_draining(kube, namespace, prefill)

    cfg = kubeconfig_for(devcluster, "pdorch-scaler", tmp_path / "scaler-kubeconfig")
    api = KubeApi.from_config(cfg, field_manager="pdorch-scaler")
    scaler = BuiltinScaler(api, ScalerConfig(namespace=namespace), _SaturatedDecodes())
    try:
        await scaler.tick()  # lists groups and pods, reads the scaler, clears the stale drain mark
        await asyncio.sleep(1)
        decisions = await scaler.tick()  # a saturated decode pool: scale up through /scale
        await scaler.events.flush()
    finally:
        await api.close()
    assert [(d.role, d.current, d.target) for d in decisions] == [("decode", 1, 3)], decisions
    # The engines' 0.5 s inter-token latency is above the 100 ms target: counted as a miss.
    misses = REGISTRY.get_sample_value(
        "pdorch_scaler_slo_misses_total", {"namespace": namespace, "group": "srbac", "role": "decode"}
    )
    assert misses == 1, misses
    srs = kube.get(SRS, "srbac-decode", namespace=namespace)
    assert srs.spec["replicas"] == 3
    assert srs.status.get("lastScaleReason", "").startswith("1 -> 3: decode"), srs.status
    assert not is_draining(kube, namespace, prefill)
    raw = kubectl(devcluster, "get", "events.events.k8s.io", "-n", namespace, "-o", "json").stdout
    assert any(
        e["regarding"]["name"] == "srbac-decode" and e["reason"] == "ScaledUp"
        for e in json.loads(raw)["items"]
    ), "the ScaledUp Event, written with the scaler's token"

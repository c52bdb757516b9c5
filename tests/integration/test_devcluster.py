"""The dev cluster's real control plane: CRDs by SSA, Leases, scheduling onto kwok nodes, GC."""

from __future__ import annotations

import ipaddress
import ssl
import uuid

import httpx2
import pytest
from lightkube import Client
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import StatefulSet
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Node, Pod

from pdorch.devcluster import binaries
from pdorch.devcluster.cluster import ClusterState, wait_for_crds
from pdorch.devcluster.waiting import wait_for

pytestmark = pytest.mark.integration


def test_apiserver_reports_pinned_version(devcluster: ClusterState) -> None:
    ctx = ssl.create_default_context(cafile=devcluster.ca)
    r = httpx2.get(
        f"{devcluster.server}/version",
        verify=ctx,
        headers={"Authorization": f"Bearer {devcluster.token}"},
        trust_env=False,
    )
    assert r.status_code == 200
    # Version ldflags were set at build time; without them this reads v0.0.0-master.
    assert r.json()["gitVersion"] == f"v{binaries.K8S_VERSION}"


def test_lws_crds_are_established(kube: Client) -> None:
    names = {c.metadata.name for c in kube.list(CustomResourceDefinition)}
    assert "leaderworkersets.leaderworkerset.x-k8s.io" in names
    assert "disaggregatedsets.disaggregatedset.x-k8s.io" in names
    wait_for_crds(kube, ["leaderworkersets.leaderworkerset.x-k8s.io"], timeout=5)


def test_crd_installs_with_server_side_apply(kube: Client) -> None:
    group = f"t{uuid.uuid4().hex[:6]}.pdorch.io"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    try:
        applied = kube.apply(from_dict(crd), field_manager="pdorch-test", force=True)
        managers = {(m.manager, m.operation) for m in applied.metadata.managedFields}
        assert ("pdorch-test", "Apply") in managers
        wait_for_crds(kube, [f"widgets.{group}"], timeout=30)
        widget = create_namespaced_resource(group, "v1", "Widget", "widgets")
        # The structural schema is enforced: size must be >= 1.
        with pytest.raises(ApiError) as bad:
            kube.create(
                widget.from_dict({"metadata": {"name": "w"}, "spec": {"size": 0}}), namespace="default"
            )
        assert bad.value.status.code == 422
        assert "spec.size" in (bad.value.status.message or "")
    finally:
        kube.delete(CustomResourceDefinition, f"widgets.{group}")


def test_lease_can_be_created_and_renewed(kube: Client, namespace: str) -> None:
    lease = kube.create(
        from_dict(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "leader", "namespace": namespace},
                "spec": {
                    "holderIdentity": "a",
                    "leaseDurationSeconds": 15,
                    "renewTime": "2026-01-01T00:00:00.123456Z",
                },
            }
        )
    )
    first_rv = lease.metadata.resourceVersion
    lease.spec.renewTime = "2026-01-01T00:00:05.654321Z"
    renewed = kube.replace(lease)
    assert renewed.metadata.resourceVersion != first_rv
    got = kube.get(Lease, "leader", namespace=namespace)
    assert str(got.spec.renewTime).startswith("2026-01-01")
    assert got.spec.renewTime != "2026-01-01T00:00:00.123456Z"
    # Optimistic locking: a renew carrying the stale resourceVersion is refused.
    lease.metadata.resourceVersion = first_rv
    lease.spec.holderIdentity = "b"
    with pytest.raises(ApiError) as conflict:
        kube.replace(lease)
    assert conflict.value.status.code == 409


def test_nodes_advertise_gpus(devcluster: ClusterState, kube: Client) -> None:
    nodes = [n for n in kube.list(Node) if n.metadata.name in devcluster.nodes]
    assert len(nodes) == len(devcluster.nodes) > 0
    for n in nodes:
        assert int(n.status.allocatable["nvidia.com/gpu"]) > 0
        assert {c.type: c.status for c in n.status.conditions}["Ready"] == "True"


def test_statefulset_pods_are_scheduled_onto_kwok_nodes(
    devcluster: ClusterState, kube: Client, namespace: str
) -> None:
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 3,
            "serviceName": "web",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [
                        {"name": "c", "image": "nginx", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                    ]
                },
            },
        },
    }
    kube.create(from_dict(sts))

    def running() -> list[Pod] | None:
        pods = list(kube.list(Pod, namespace=namespace, labels={"app": "web"}))
        ok = [p for p in pods if p.status.phase == "Running" and p.status.podIP]
        return ok if len(ok) == 3 else None

    pods = wait_for(running, 60, "3 StatefulSet pods Running")
    for p in pods:
        assert p.spec.nodeName in devcluster.nodes  # placed by the real scheduler
        assert ipaddress.ip_address(p.status.podIP) in ipaddress.ip_network(devcluster.pod_cidr)
    got = kube.get(StatefulSet, "web", namespace=namespace)
    wait_for(
        lambda: kube.get(StatefulSet, "web", namespace=namespace).status.readyReplicas == 3, 30, "sts ready"
    )
    assert got.metadata.name == "web"


def test_owner_reference_garbage_collection(kube: Client, namespace: str) -> None:
    owner = kube.create(ConfigMap.from_dict({"metadata": {"name": "owner", "namespace": namespace}}))
    kube.create(
        ConfigMap.from_dict(
            {
                "metadata": {
                    "name": "child",
                    "namespace": namespace,
                    "ownerReferences": [
                        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
                    ],
                }
            }
        )
    )
    kube.delete(ConfigMap, "owner", namespace=namespace)

    def child_gone() -> bool:
        try:
            kube.get(ConfigMap, "child", namespace=namespace)
        except ApiError as e:
            return e.status.code == 404
        return False

    # The real garbage collector in kube-controller-manager removes the dependent.
    wait_for(child_gone, 60, "the child ConfigMap to be garbage-collected")

"""LeaderWorkerSet and DisaggregatedSet on the dev cluster, driven by the real LWS controller."""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any

import pytest
from lightkube import Client
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.waiting import wait_for

pytestmark = pytest.mark.e2e

LWS = create_namespaced_resource("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet", "leaderworkersets")
DS = create_namespaced_resource("disaggregatedset.x-k8s.io", "v1", "DisaggregatedSet", "disaggregatedsets")

GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_NAME = "leaderworkerset.sigs.k8s.io/name"


def _template(role: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"role": role}},
        "spec": {"containers": [{"name": "engine", "image": "sim", "ports": [{"containerPort": 8000}]}]},
    }


def _running_pods(kube: Client, namespace: str, name: str) -> list[Pod]:
    pods = kube.list(Pod, namespace=namespace, labels={LWS_NAME: name})
    return [p for p in pods if p.status.phase == "Running" and not p.metadata.deletionTimestamp]


def _condition(obj: Any, ctype: str) -> str | None:
    for c in (obj.status or {}).get("conditions", []) or []:
        if c["type"] == ctype:
            return c["status"]
    return None


@pytest.fixture
def lws_3x2(kube: Client, namespace: str) -> str:
    kube.create(
        LWS.from_dict(
            {
                "metadata": {"name": "smoke", "namespace": namespace},
                "spec": {
                    "replicas": 2,
                    "leaderWorkerTemplate": {"size": 3, "workerTemplate": _template("worker")},
                },
            }
        )
    )
    wait_for(
        lambda: _condition(kube.get(LWS, "smoke", namespace=namespace), "Available") == "True",
        120,
        "LWS smoke Available",
    )
    return "smoke"


def test_lws_becomes_available_with_webhook_labels_env_and_loopback_ips(
    devcluster: ClusterState, kube: Client, namespace: str, lws_3x2: str
) -> None:
    pods = wait_for(
        lambda: (p := _running_pods(kube, namespace, lws_3x2)) and len(p) == 6 and p,
        60,
        "6 running pods",
    )
    groups: dict[str, list[str]] = {}
    for p in pods:
        labels = p.metadata.labels
        # Set by the real LWS pod webhook, not by us.
        assert GROUP_INDEX in labels and WORKER_INDEX in labels, labels
        groups.setdefault(labels[GROUP_INDEX], []).append(labels[WORKER_INDEX])
        env = {e.name: e.value for e in p.spec.containers[0].env or []}
        assert env["LWS_GROUP_SIZE"] == "3"
        assert env["LWS_LEADER_ADDRESS"].startswith(f"{lws_3x2}-{labels[GROUP_INDEX]}.")
        assert env["LWS_WORKER_INDEX"] == labels[WORKER_INDEX]
        assert ipaddress.ip_address(p.status.podIP) in ipaddress.ip_network(devcluster.pod_cidr)
    assert {g: sorted(w) for g, w in groups.items()} == {"0": ["0", "1", "2"], "1": ["0", "1", "2"]}


def test_deleting_a_worker_pod_recreates_its_group(kube: Client, namespace: str, lws_3x2: str) -> None:
    wait_for(lambda: len(_running_pods(kube, namespace, lws_3x2)) == 6, 60, "6 running pods")
    before = {p.metadata.name: p.metadata.uid for p in _running_pods(kube, namespace, lws_3x2)}
    leader = f"{lws_3x2}-1"
    worker = f"{lws_3x2}-1-2"
    assert leader in before and worker in before
    kube.delete(Pod, worker, namespace=namespace)

    def group_recreated() -> bool:
        now = {p.metadata.name: p.metadata.uid for p in _running_pods(kube, namespace, lws_3x2)}
        if len(now) != 6:
            return False
        # RecreateGroupOnPodRestart (the default): the leader of group 1 is a new pod too,
        # while group 0 is untouched.
        return now.get(leader) not in (None, before[leader]) and now[f"{lws_3x2}-0"] == before[f"{lws_3x2}-0"]

    wait_for(group_recreated, 120, "group 1 recreated with a new leader, group 0 untouched")


def test_listener_on_all_interfaces_receives_traffic_for_a_pod_ip(
    kube: Client, namespace: str, lws_3x2: str
) -> None:
    pods = wait_for(lambda: _running_pods(kube, namespace, lws_3x2), 60, "running pods")
    pod_ip = pods[0].status.podIP
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    seen: dict[str, str] = {}

    def accept() -> None:
        conn, _ = srv.accept()
        with conn:
            seen["local"] = conn.getsockname()[0]  # which pod IP the client dialled
            conn.sendall(b"ok")

    t = threading.Thread(target=accept)
    t.start()
    try:
        with socket.create_connection((pod_ip, port), timeout=5) as c:
            assert c.recv(2) == b"ok"
    finally:
        t.join(10)
        srv.close()
    assert seen["local"] == pod_ip


def test_disaggregatedset_with_prefill_and_decode_becomes_ready(
    devcluster: ClusterState, kube: Client, namespace: str
) -> None:
    def role(name: str, replicas: int) -> dict[str, Any]:
        return {
            "name": name,
            "spec": {
                "replicas": replicas,
                "leaderWorkerTemplate": {"size": 1, "workerTemplate": _template(name)},
            },
        }

    kube.create(
        DS.from_dict(
            {
                "metadata": {"name": "peer", "namespace": namespace},
                "spec": {"roles": [role("prefill", 2), role("decode", 1)]},
            }
        )
    )

    def ready() -> dict[str, int] | None:
        # LWS v0.9.0's DisaggregatedSet controller writes no status of its own (roleStatuses stay
        # empty), so readiness is read from the LeaderWorkerSets it owns, one per role.
        by_role = {}
        for lws in kube.list(LWS, namespace=namespace, labels={"disaggregatedset.x-k8s.io/name": "peer"}):
            ref = lws.metadata.ownerReferences[0]
            assert (ref.kind, ref.name) == ("DisaggregatedSet", "peer")
            role = lws.metadata.labels["disaggregatedset.x-k8s.io/role"]
            by_role[role] = (lws.status or {}).get("readyReplicas", 0)
        return by_role if by_role == {"prefill": 2, "decode": 1} else None

    wait_for(ready, 120, "DisaggregatedSet roles ready (prefill 2, decode 1)")
    pods = [p for p in kube.list(Pod, namespace=namespace) if p.status.phase == "Running"]
    assert len(pods) == 3
    assert all(
        ipaddress.ip_address(p.status.podIP) in ipaddress.ip_network(devcluster.pod_cidr) for p in pods
    )

"""Pure builders for the dev cluster's config files and bootstrap objects.

Nothing here touches the network or starts processes; `cluster.py` writes and applies what these
functions return.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

# StatefulSet maxUnavailable (alpha in 1.34, beta and on by default from 1.35): LWS sets it on
# its leader StatefulSets, and without it every group of a rollout step is recreated one at a time.
FEATURE_GATES = "MaxUnavailableStatefulSet=true"
POD_CIDR = "127.1.0.0/16"  # loopback: pods' IPs are reachable by a process on 0.0.0.0 here
# Fixed second octets of the well-known clusters, so `default` and the test session's `pytest`
# cluster can run side by side; any other name hashes into the rest of 127.3-127.250 (127.0 holds
# 127.0.0.1, 127.255 is avoided as a broadcast-looking octet).
FIXED_POD_OCTETS = {"default": 1, "pytest": 2}
FIRST_HASHED_OCTET = 3
LAST_POD_OCTET = 250


def pod_octet(cidr: str) -> int | None:
    """The second octet of a loopback pod /16 (`127.X.0.0/16` -> X), or None for anything else."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None
    if net.version != 4 or net.network_address.packed[0] != 127:
        return None
    return net.network_address.packed[1]


def pod_cidr_for(name: str, taken: Iterable[str] = ()) -> str:
    """A loopback /16 for a cluster's pod IPs that no CIDR in `taken` (other clusters') uses.

    `default` and `pytest` prefer their fixed ranges, any other name a range picked by its hash;
    when that one is taken the next free one of 127.3-127.250 is used. Raises RuntimeError when
    all are taken.
    """
    used = {o for o in map(pod_octet, taken) if o is not None}
    span = LAST_POD_OCTET - FIRST_HASHED_OCTET + 1
    start = zlib.crc32(name.encode()) % span
    candidates = [FIXED_POD_OCTETS[name]] if name in FIXED_POD_OCTETS else []
    candidates += [FIRST_HASHED_OCTET + (start + i) % span for i in range(span)]
    for octet in candidates:
        if octet not in used:
            return f"127.{octet}.0.0/16"
    raise RuntimeError(f"no free loopback /16 for pod IPs: {len(used)} dev clusters hold them all")


def legacy_pod_cidr_for(name: str) -> str:
    """The pod CIDR a cluster started before the CIDR was recorded in state.json got from its name."""
    if name in ("default", "pytest"):
        return POD_CIDR
    return f"127.{2 + zlib.crc32(name.encode()) % 249}.0.0/16"


NODE_IP = "127.0.0.1"
# Allocated only, never dialled (no kube-proxy); loopback all the same, above the pod ranges, so an
# address that leaks into a client stays on this machine. A /24 runs out after ~250 Services.
SERVICE_CIDR = "127.251.0.0/16"
POD_TERMINATION_MS = 1000
NODE_LABELS = {"type": "kwok", "pdorch.io/devcluster": "true"}


def kubeconfig(server: str, ca_path: Path, token: str) -> str:
    """A kubeconfig for the admin token (system:masters)."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "pdorch-dev", "cluster": {"server": server, "certificate-authority": str(ca_path)}}
        ],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "pdorch-dev", "context": {"cluster": "pdorch-dev", "user": "admin"}}],
        "current-context": "pdorch-dev",
    }
    return yaml.safe_dump(doc, sort_keys=False)


def kwok_config(
    stage_files: list[Path], pod_cidr: str = POD_CIDR, pod_ready_ms: tuple[int, int] | None = None
) -> str:
    """kwok's config: loopback pod CIDR and node IP, plus the explicit stages v0.8.0 requires."""
    head = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "cidr": pod_cidr,
            "nodeIP": NODE_IP,
            "nodeLeaseDurationSeconds": 40,
            # With a config file kwok v0.8.0 leaves these at 0 and refuses to start.
            "podPlayStageParallelism": 8,
            "nodePlayStageParallelism": 4,
            "nodeLeaseParallelism": 4,
            "podsOnNodeSyncParallelism": 4,
        },
    }
    docs = [head]
    for f in stage_files:
        for stage in yaml.safe_load_all(f.read_text()):
            if stage and stage.get("metadata", {}).get("name") == "pod-delete":
                # kwok's stock stage removes a deleted pod at once; a kubelet always leaves a
                # termination window. LWS restarts a group only if it sees the pod terminating,
                # and the proxy drains pods in that window, so keep one, like a quick kubelet.
                stage["spec"]["delay"] = {"durationMilliseconds": POD_TERMINATION_MS}
            if stage and pod_ready_ms and stage.get("metadata", {}).get("name") == "pod-ready":
                # Engines take time to load a model: a pod turns Ready after a delay drawn uniformly
                # from [lo, hi] ms (benchmarks use it so every system sees the same start-up times).
                lo, hi = pod_ready_ms
                stage["spec"]["delay"] = {"durationMilliseconds": lo, "jitterDurationMilliseconds": hi}
            if stage:
                docs.append(stage)
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def lws_config(webhook_port: int, health_port: int, cert_dir: Path) -> str:
    """LWS manager config for running out of cluster on loopback.

    Leader election and internal cert management are off: both need objects in lws-system and the
    latter would issue certs for an in-cluster Service name instead of 127.0.0.1.
    """
    doc = {
        "apiVersion": "config.lws.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _apply_replace_patches(doc: dict[str, Any], patches: list[dict[str, Any]]) -> None:
    """Apply the JSON-patch `replace` ops of LWS's kustomize patches (the only op they use)."""
    for op in patches:
        if op.get("op") != "replace":
            raise ValueError(f"unsupported patch op {op.get('op')!r} in LWS webhook patches")
        parts = [p for p in op["path"].split("/") if p]
        target: Any = doc
        for p in parts[:-1]:
            target = target[int(p)] if isinstance(target, list) else target[p]
        last = parts[-1]
        if isinstance(target, list):
            target[int(last)] = copy.deepcopy(op["value"])
        else:
            target[last] = copy.deepcopy(op["value"])


def lws_webhook_configurations(webhook_dir: Path, port: int, ca_pem: bytes) -> list[dict[str, Any]]:
    """LWS's webhook configurations, pointed at https://127.0.0.1:<port> with our CA.

    Built from the module's own manifests and kustomize patches, so the rules and the pod
    objectSelector (which keeps every other pod create out of the webhook) are LWS's.
    """
    docs = [d for d in yaml.safe_load_all((webhook_dir / "manifests.yaml").read_text()) if d]
    patches = {
        "MutatingWebhookConfiguration": webhook_dir / "mutating-patch.yaml",
        "ValidatingWebhookConfiguration": webhook_dir / "validating-patch.yaml",
    }
    ca_b64 = base64.b64encode(ca_pem).decode()
    out = []
    for doc in docs:
        kind = doc["kind"]
        patch_file = patches.get(kind)
        if patch_file is not None and patch_file.exists():
            _apply_replace_patches(doc, yaml.safe_load(patch_file.read_text()) or [])
        doc["metadata"] = {
            "name": f"lws-{doc['metadata']['name']}",
            "labels": {"pdorch.io/devcluster": "true"},
        }
        for wh in doc["webhooks"]:
            path = wh["clientConfig"]["service"]["path"]
            wh["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_b64}
        out.append(doc)
    return out


def node(name: str, gpus: int, max_pods: int = 250) -> dict[str, Any]:
    """A kwok-managed fake node advertising GPUs.

    Status is accepted on Node create; kwok's node-initialize stage keeps a capacity that is
    already set, so the node advertises `nvidia.com/gpu` from the start.
    """
    # Fake nodes run no containers, so they can hold more pods than a real kubelet's 110.
    capacity = {"cpu": "256", "memory": "2Ti", "pods": str(max_pods), "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {**NODE_LABELS, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def probe_lws(namespace: str = "default") -> dict[str, Any]:
    """A minimal LWS, used with a server-side dry run to prove the LWS webhooks answer."""
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "pdorch-devcluster-probe", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "leaderWorkerTemplate": {
                "size": 1,
                "workerTemplate": {"spec": {"containers": [{"name": "c", "image": "probe"}]}},
            },
        },
    }

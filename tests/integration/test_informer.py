"""The controller's informer against the real apiserver: initial sync, live events, 410 relist."""

from __future__ import annotations

import asyncio
import contextlib

import httpx2
import pytest
from lightkube import Client
from lightkube.resources.core_v1 import ConfigMap
from prometheus_client import REGISTRY

from pdorch.controller.informer import Informer
from pdorch.controller.kubeapi import KubeApi, Resource
from pdorch.devcluster.cluster import ClusterState

pytestmark = pytest.mark.integration

CONFIGMAP = Resource("", "v1", "configmaps", "ConfigMap")
LABELS = {"pdorch.io/test": "informer"}


def _compact_etcd(devcluster: ClusterState) -> None:
    """Compact etcd's history up to its current revision (etcd's JSON gateway on loopback)."""
    base = f"http://127.0.0.1:{devcluster.ports['etcd']}"
    rev = httpx2.post(f"{base}/v3/kv/range", json={"key": "AA=="}, timeout=10, trust_env=False).json()
    current = int(rev["header"]["revision"])
    r = httpx2.post(
        f"{base}/v3/kv/compaction",
        json={"revision": str(current), "physical": True},
        timeout=30,
        trust_env=False,
    )
    assert r.status_code == 200, r.text


def _relists(reason: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "pdorch_informer_relists_total", {"resource": "configmaps", "reason": reason}
        )
        or 0.0
    )


async def _until(cond) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition on the informer's state (callers bound it with asyncio.timeout)."""
    while not cond():  # noqa: ASYNC110 - the state is plain data mutated by the informer task
        await asyncio.sleep(0.05)


async def test_informer_resumed_from_a_stale_version_converges_and_reports_the_gap(
    devcluster: ClusterState, kube: Client, namespace: str
) -> None:
    kube.create(ConfigMap.from_dict({"metadata": {"name": "a", "namespace": namespace, "labels": LABELS}}))
    kube.create(ConfigMap.from_dict({"metadata": {"name": "b", "namespace": namespace, "labels": LABELS}}))
    api = KubeApi.from_config(devcluster.kubeconfig)
    inf = Informer(api, CONFIGMAP, namespace, "pdorch.io/test=informer", watch_timeout=30, inactivity=60)
    events: list[tuple[str, str]] = []
    inf.add_handler(lambda t, o: events.append((t, o["metadata"]["name"])))
    task = asyncio.create_task(inf.run())
    try:
        async with asyncio.timeout(60):
            await _until(inf.synced.is_set)
            assert {k.split("/")[1] for k in inf.store} == {"a", "b"}
            # The field sets are dropped for memory; who wrote when is kept (ReplicaFailure reads it).
            managed = inf.store[f"{namespace}/a"]["metadata"]["managedFields"]
            assert managed and all("fieldsV1" not in e and e.get("time") for e in managed)

            kube.create(
                ConfigMap.from_dict({"metadata": {"name": "c", "namespace": namespace, "labels": LABELS}})
            )
            await _until(lambda: ("ADDED", "c") in events)

            # Stop watching, delete "a" while nobody watches, compact etcd past the informer's
            # resourceVersion, then resume: the apiserver (ConfigMaps bypass its watch cache in the
            # dev cluster) answers 410 Gone and the informer must relist and notice the gap.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stale = inf._rv
            kube.delete(ConfigMap, "a", namespace=namespace)
            kube.create(ConfigMap.from_dict({"metadata": {"name": "z", "namespace": namespace}}))
            await asyncio.to_thread(_compact_etcd, devcluster)
            expired_before = _relists("expired")
            inf._rv = stale
            events.clear()
            task = asyncio.create_task(inf.run(resume=True))
            await _until(lambda: ("DELETED", "a") in events)
            assert _relists("expired") == expired_before + 1  # a real 410, not a replay
            assert f"{namespace}/a" not in inf.store
            assert {k.split("/")[1] for k in inf.store} == {"b", "c"}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()

"""The controller's informer against the real apiserver: initial sync, live events, 410 relist."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import ConfigMap

from pdorch.controller.informer import Informer
from pdorch.controller.kubeapi import KubeApi, Resource
from pdorch.devcluster.cluster import ClusterState

pytestmark = pytest.mark.integration

CONFIGMAP = Resource("", "v1", "configmaps", "ConfigMap")
LABELS = {"pdorch.io/test": "informer"}


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
            assert "managedFields" not in inf.store[f"{namespace}/a"]["metadata"]  # stripped for memory

            kube.create(
                ConfigMap.from_dict({"metadata": {"name": "c", "namespace": namespace, "labels": LABELS}})
            )
            await _until(lambda: ("ADDED", "c") in events)

            # Stop watching, delete "a" while nobody watches, then resume from a resourceVersion the
            # apiserver no longer serves: it answers 410 and the informer must relist and notice the gap.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            kube.delete(ConfigMap, "a", namespace=namespace)
            inf._rv = "1"  # a stale resourceVersion
            events.clear()
            task = asyncio.create_task(inf.run(resume=True))
            await _until(lambda: ("DELETED", "a") in events)
            assert f"{namespace}/a" not in inf.store
            assert {k.split("/")[1] for k in inf.store} == {"b", "c"}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()

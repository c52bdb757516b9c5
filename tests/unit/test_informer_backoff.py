"""The informer's watch loop against an apiserver that misbehaves (HTTP layer only, no cluster)."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from pdorch.controller.kubeapi import KubeApi

pytestmark = pytest.mark.unit


async def test_a_watch_that_ends_at_once_is_retried_with_backoff() -> None:
    """A server (or a proxy in front of it) that closes every watch the moment it opens: the
    informer backs off instead of sending watch requests in a tight loop."""
    from pdorch.controller.informer import Informer
    from pdorch.controller.kubeapi import SERVING_GROUP

    watches: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.params.get("watch"):
            watches.append(str(request.url))
            # A tight loop never yields to this test's clock: past 20, an error makes it sleep.
            return httpx2.Response(200 if len(watches) <= 20 else 500, content=b"")
        return httpx2.Response(200, json={"metadata": {"resourceVersion": "7"}, "items": []})

    api = KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://k8s.invalid"))
    task = asyncio.create_task(Informer(api, SERVING_GROUP, None).run())
    await asyncio.sleep(1.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await api.close()
    assert 1 <= len(watches) <= 4, len(watches)  # 0.5 s, then 1 s ...: not hundreds

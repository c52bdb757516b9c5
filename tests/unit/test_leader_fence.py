"""The write fence of leader election: a replica whose Lease may have passed on sends no writes."""

from __future__ import annotations

import time

import httpx2
import pytest

from pdorch.controller.kubeapi import LEASE, LWS, KubeApi, NotLeader
from pdorch.controller.leader import LeaseElector

pytestmark = pytest.mark.unit


def _api(sent: list[str]) -> KubeApi:
    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(f"{request.method} {request.url.path}")
        return httpx2.Response(200, json={})

    return KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://k8s.invalid"))


def _leader(api: KubeApi, renewed_ago: float) -> LeaseElector:
    elector = LeaseElector(api, "pdorch-system", "ctl", "me", renew_deadline=10.0)
    elector.is_leader.set()
    elector._last_renew = time.monotonic() - renewed_ago
    api.write_guard = elector.guard_writes
    return elector


def test_holds_only_while_renewed_within_the_deadline() -> None:
    api = KubeApi(httpx2.AsyncClient())
    assert _leader(api, 2.0).holds()
    assert not _leader(api, 11.0).holds()
    standby = LeaseElector(api, "pdorch-system", "ctl", "me")
    assert not standby.holds()


async def test_stale_leader_writes_nothing_but_reads_and_renews() -> None:
    sent: list[str] = []
    api = _api(sent)
    _leader(api, 11.0)  # e.g. the process was frozen past its renew deadline
    lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
           "metadata": {"name": "g-decode", "namespace": "ns"}, "spec": {}}  # fmt: skip
    with pytest.raises(NotLeader, match="last renewed 11"):
        await api.apply(lws)
    with pytest.raises(NotLeader):
        await api.delete(LWS, "g-decode", "ns")
    assert sent == []
    await api.apply(lws, dry_run=True)  # dry runs change nothing
    await api.get(LWS, "g-decode", "ns")
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "ctl", "namespace": "pdorch-system", "resourceVersion": "1"}}  # fmt: skip
    await api.replace(lease)  # the elector's own renewal must still go out
    assert [s.split()[0] for s in sent] == ["PATCH", "GET", "PUT"]
    assert LEASE.plural in sent[-1]
    await api.close()


async def test_fresh_leader_writes() -> None:
    sent: list[str] = []
    api = _api(sent)
    _leader(api, 1.0)
    await api.patch(LWS, "g-decode", "ns", {"spec": {"replicas": 2}})
    assert sent == ["PATCH /apis/leaderworkerset.x-k8s.io/v1/namespaces/ns/leaderworkersets/g-decode"]
    await api.close()

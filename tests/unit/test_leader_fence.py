"""The write fence of leader election: a replica whose Lease may have passed on sends no writes,
and what the controller and the scaler do when the fence refuses one."""

from __future__ import annotations

import asyncio
import time

import httpx2
import pytest

from pdorch.controller import leader
from pdorch.controller.kubeapi import LEASE, LWS, KubeApi, NotLeader
from pdorch.controller.leader import LeaseElector
from pdorch.controller.manager import Controller, ControllerConfig

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


def _lease_api(holder: list[str], delay: float = 0.0, hang: bool = False) -> KubeApi:
    """The Lease as the apiserver would answer it: held by `holder[0]`, renewed on every read."""
    rv = iter(range(1, 10**6))

    async def handler(request: httpx2.Request) -> httpx2.Response:
        if hang:
            await asyncio.sleep(3600)
        await asyncio.sleep(delay)
        n = next(rv)
        spec = {"holderIdentity": holder[0], "leaseDurationSeconds": 15, "renewTime": f"t{n}"}
        return httpx2.Response(200, json={"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                          "metadata": {"name": "ctl", "namespace": "pdorch-system",
                                                       "resourceVersion": str(n)}, "spec": spec})  # fmt: skip

    return KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://k8s.invalid"))


async def test_a_leader_that_sees_another_holder_steps_down_at_once() -> None:
    """Its Lease deleted and re-created by a standby: the next renewal reads the other holder, and
    the old leader stops writing then, not a renew deadline later."""
    holder = ["me"]
    api = _lease_api(holder)
    elector = LeaseElector(api, "pdorch-system", "ctl", "me", renew_deadline=30.0, retry_period=0.01)
    task = asyncio.create_task(elector.run())
    await asyncio.wait_for(elector.is_leader.wait(), 5)
    holder[0] = "standby"
    await asyncio.wait_for(elector.lost.wait(), 5)
    assert not elector.holds()
    await task
    await api.close()


async def test_a_renewal_counts_from_when_it_was_sent() -> None:
    """The others' lease clock starts when the renewal commits; a slow answer must not stretch ours."""
    api = _lease_api(["me"], delay=0.3)
    elector = LeaseElector(api, "pdorch-system", "ctl", "me", retry_period=0.01)
    sent = time.monotonic()
    task = asyncio.create_task(elector.run())
    await asyncio.wait_for(elector.is_leader.wait(), 5)
    assert elector._last_renew - sent < 0.3  # the answer came >= 0.6 s (GET + PUT) after
    task.cancel()
    await api.close()


async def test_release_gives_up_when_the_apiserver_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader, "RELEASE_TIMEOUT_S", 0.05)
    api = _lease_api(["me"], hang=True)
    elector = _leader(api, 1.0)
    await asyncio.wait_for(elector.release(), 10)  # bounded by the release timeout, not the client's
    assert not elector.is_leader.is_set()
    await api.close()


async def test_a_key_refused_by_the_write_fence_is_retried() -> None:
    """A replica frozen past its renew deadline, whose elector then renews in time, stays leader:
    the keys its fence refused meanwhile must come back, not wait for the next resync."""
    api = KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(lambda _r: httpx2.Response(500))))
    ctl = Controller(ControllerConfig(leader_elect=False, workers=1), api=api)
    calls: list[str] = []

    async def reconcile(key: str) -> float | None:
        calls.append(key)
        if len(calls) == 1:
            raise NotLeader("not writing leaderworkersets: lease last renewed 12.0s ago")
        return None

    ctl.reconciler.reconcile = reconcile  # type: ignore[method-assign]
    worker = asyncio.create_task(ctl._worker())
    ctl.queue.add("ns/g")
    for _ in range(200):
        if len(calls) == 2:
            break
        await asyncio.sleep(0.05)
    assert calls == ["ns/g", "ns/g"]
    ctl.queue.shutdown(drain=False)
    await asyncio.wait_for(worker, 5)
    await api.close()


async def test_a_scaler_that_lost_its_lease_leaves_its_drains_to_the_new_leader() -> None:
    """On the way out after losing the Lease, clearing the drain marks is refused by the fence: the
    scaler must still return (and the process exit as a standby), not die with a traceback."""
    from pdorch.scaler.loop import BuiltinScaler, RoleState, ScalerConfig

    marked = {"name": "g-decode-1", "namespace": "ns", "annotations": {"pdorch.io/draining": "true"}}
    pods = {"items": [{"metadata": marked}]}
    api = KubeApi(
        httpx2.AsyncClient(transport=httpx2.MockTransport(lambda _r: httpx2.Response(200, json=pods)))
    )

    def fenced(res: object) -> None:
        raise NotLeader("not writing pods: lease pdorch-system/pdorch-scaler last renewed 11.0s ago")

    api.write_guard = fenced
    scaler = BuiltinScaler(api, ScalerConfig())
    state = RoleState()
    state.draining_to = 1
    scaler.roles[("ns", "g", "decode")] = state
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(scaler.run(stop), 10)
    assert state.draining_to == 1  # left for the new leader, which reads the marks
    await api.close()


async def test_a_leader_whose_lease_another_candidate_recreated_first_steps_down() -> None:
    """The Lease was deleted; the standby re-created it between this leader's read (not found) and
    its own create (409): the standby leads from then on."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.method == "GET":
            return httpx2.Response(404, json={"kind": "Status", "code": 404, "reason": "NotFound"})
        return httpx2.Response(409, json={"kind": "Status", "code": 409, "reason": "AlreadyExists"})

    api = KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://k8s.invalid"))
    elector = LeaseElector(api, "pdorch-system", "ctl", "me", renew_deadline=30.0, retry_period=0.01)
    elector.is_leader.set()
    elector._last_renew = time.monotonic()
    await asyncio.wait_for(elector.run(), 5)
    assert elector.lost.is_set() and not elector.holds()
    await api.close()

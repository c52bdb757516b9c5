"""Two controller replicas: only the leader writes; killing it hands over within the lease."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import pytest
from lightkube import Client
from lightkube.resources.coordination_v1 import Lease

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from tests.integration.test_controller import LWS, SG, example, lws_names, update_spec, wait_available

pytestmark = pytest.mark.integration

LEASE_DURATION = 15.0  # the controller's default leaseDurationSeconds


def _leader_and_standby(devcluster: ClusterState, prefix: str) -> tuple[str, ControllerProc, ControllerProc]:
    """A fresh Lease `<prefix>-…`, replica `<prefix>-a` leading it, and `<prefix>-b` started after."""
    lease = f"{prefix}-{uuid.uuid4().hex[:6]}"
    a = ControllerProc(devcluster.kubeconfig, f"{prefix}-a", lease)
    try:
        a.wait_ready()
        wait_for(a.is_leader, 30, f"{prefix}-a leads")
        return lease, a, ControllerProc(devcluster.kubeconfig, f"{prefix}-b", lease)
    except BaseException:
        a.stop()
        raise


def _two_decodes(spec: dict[str, Any]) -> None:
    next(r for r in spec["roles"] if r["name"] == "decode")["replicas"] = 2


def test_only_the_leader_writes_and_a_standby_takes_over(
    kube: Client, namespace: str, devcluster: ClusterState, pdorch_crds: list[str]
) -> None:
    lease, a, b = _leader_and_standby(devcluster, "ha")
    try:
        b.wait_ready()
        kube.create(SG.from_dict(example("ha")), namespace=namespace)
        wait_available(kube, namespace, "ha")
        assert not b.is_leader()
        assert b.requests() == 0, "the standby must not write"
        assert kube.get(Lease, lease, namespace="pdorch-system").spec.holderIdentity == a.identity

        a.stop(signal.SIGKILL)  # no graceful release: the standby must wait the lease out
        killed = time.monotonic()
        wait_for(b.is_leader, LEASE_DURATION + 15, "the standby takes over")
        takeover = time.monotonic() - killed
        assert takeover <= LEASE_DURATION + 2 * 2.0 + 3, f"takeover took {takeover:.1f}s"

        update_spec(kube, namespace, "ha", _two_decodes)
        wait_for(
            lambda: kube.get(LWS, "ha-decode", namespace=namespace).spec["replicas"] == 2,
            60,
            "new leader reconciles",
        )
        assert lws_names(kube, namespace, "ha") == {"ha-proxy", "ha-prefill", "ha-decode"}  # no duplicates
        assert b.requests() > 0
    finally:
        a.stop()
        b_code = b.stop()  # SIGTERM: graceful, releases the lease
    assert b_code == 0
    released = kube.get(Lease, lease, namespace="pdorch-system")
    assert not released.spec.holderIdentity


def test_a_frozen_leader_wakes_up_fenced_and_exits(
    kube: Client, namespace: str, devcluster: ClusterState, pdorch_crds: list[str]
) -> None:
    """A leader frozen past its lease (GC pause, SIGSTOP, starved node) must not act on its stale
    caches when it wakes: the standby leads by then, so it stops with code 1 and writes nothing."""
    lease, a, b = _leader_and_standby(devcluster, "frz")
    try:
        b.wait_ready()
        kube.create(SG.from_dict(example("frz")), namespace=namespace)
        wait_available(kube, namespace, "frz")
        a.send(signal.SIGSTOP)
        wait_for(b.is_leader, LEASE_DURATION + 15, "the standby takes over")
        update_spec(kube, namespace, "frz", _two_decodes)
        wait_for(
            lambda: kube.get(LWS, "frz-decode", namespace=namespace).spec["replicas"] == 2, 60, "b scales"
        )
        generation = kube.get(LWS, "frz-decode", namespace=namespace).metadata.generation
        a.send(signal.SIGCONT)
        a.proc.wait(30)  # renew fails at once (b holds the Lease), then it steps down
        assert a.proc.returncode == 1, a.log_tail()
        log = a.log.read_text(errors="replace")
        assert "lost leadership" in log
        assert "failed (retrying with backoff)" not in log.split("lost leadership")[-1]
        decode = kube.get(LWS, "frz-decode", namespace=namespace)
        assert decode.spec["replicas"] == 2 and decode.metadata.generation == generation
        assert kube.get(Lease, lease, namespace="pdorch-system").spec.holderIdentity == b.identity
    finally:
        a.send(signal.SIGCONT)
        a.stop()
        b.stop()

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


def test_only_the_leader_writes_and_a_standby_takes_over(
    kube: Client, namespace: str, devcluster: ClusterState, pdorch_crds: list[str]
) -> None:
    lease = f"ha-{uuid.uuid4().hex[:6]}"
    a = ControllerProc(devcluster.kubeconfig, "replica-a", lease)
    a.wait_ready()
    wait_for(a.is_leader, 30, "replica-a leads")
    b = ControllerProc(devcluster.kubeconfig, "replica-b", lease)
    try:
        b.wait_ready()
        kube.create(SG.from_dict(example("ha")), namespace=namespace)
        wait_available(kube, namespace, "ha")
        assert not b.is_leader()
        assert b.requests() == 0, "the standby must not write"
        assert kube.get(Lease, lease, namespace="pdorch-system").spec.holderIdentity == "replica-a"

        a.stop(signal.SIGKILL)  # no graceful release: the standby must wait the lease out
        killed = time.monotonic()
        wait_for(b.is_leader, LEASE_DURATION + 15, "replica-b takes over")
        takeover = time.monotonic() - killed
        assert takeover <= LEASE_DURATION + 2 * 2.0 + 3, f"takeover took {takeover:.1f}s"

        def more_decode(spec: dict[str, Any]) -> None:
            next(r for r in spec["roles"] if r["name"] == "decode")["replicas"] = 2

        update_spec(kube, namespace, "ha", more_decode)
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

"""Two controller replicas: only the leader writes; killing it hands over within the lease."""

from __future__ import annotations

import signal
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client
from lightkube.resources.coordination_v1 import Lease

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from tests.compat.helpers import free_port, sample, spawn, stop, wait_http_ok
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


def test_a_frozen_leader_wakes_up_steps_down_and_exits_writing_nothing(
    kube: Client, namespace: str, devcluster: ClusterState, pdorch_crds: list[str]
) -> None:
    """A leader frozen past its lease (GC pause, SIGSTOP, starved node) must not act on its stale
    caches when it wakes: the standby leads by then, so it stops with code 1 and writes nothing.
    Here its first renewal fails before any reconcile writes, so the write fence is not reached;
    tests/unit/test_leader_fence.py shows the fence refusing a stale leader's writes."""
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


def _scaler(
    devcluster: ClusterState, tmp_path: Path, namespace: str, lease: str, name: str
) -> tuple[Any, str]:
    """A `pdorch scaler --leader-elect` process and its /metrics URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "pdorch.cli", "scaler", "--kubeconfig", devcluster.kubeconfig]
    cmd += ["--namespace", namespace, "--interval", "1", "--metrics-addr", f"127.0.0.1:{port}"]
    cmd += ["--leader-elect", "--lease-name", lease, "--identity", name]
    proc = spawn(cmd, tmp_path / f"{name}.log")
    url = f"http://127.0.0.1:{port}/metrics"
    wait_http_ok(url, 30, proc, tmp_path / f"{name}.log")
    return proc, url


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _leads(url: str, lease: str) -> bool:
    return sample(_metrics(url), "leader_election_master_status", {"name": lease}) == 1


def _non_lease_requests(url: str) -> float:
    text = _metrics(url)
    return sample(text, "pdorch_kube_requests_total") - sample(
        text, "pdorch_kube_requests_total", {"resource": "leases"}
    )


def test_scaler_replicas_elect_one_leader_and_a_standby_takes_over(
    kube: Client, namespace: str, devcluster: ClusterState, tmp_path: Path, pdorch_crds: list[str]
) -> None:
    """Two `pdorch scaler --leader-elect` processes: only the Lease holder reads groups and decides
    (the standby sends nothing but Lease reads); a SIGKILLed leader is replaced within the lease
    duration, and a SIGTERMed one releases the Lease on its way out."""
    lease = f"scaler-{uuid.uuid4().hex[:6]}"
    a, a_url = _scaler(devcluster, tmp_path, namespace, lease, "sa")
    b = None
    try:
        wait_for(lambda: _leads(a_url, lease), 30, "sa leads")
        b, b_url = _scaler(devcluster, tmp_path, namespace, lease, "sb")
        wait_for(lambda: _non_lease_requests(a_url) > 0, 15, "the leader deciding")
        time.sleep(3)  # several of the standby's campaign rounds and the leader's ticks
        assert not _leads(b_url, lease)
        assert _non_lease_requests(b_url) == 0, "the standby must only campaign"
        assert kube.get(Lease, lease, namespace="pdorch-system").spec.holderIdentity == "sa"

        a.kill()  # SIGKILL: no release, the standby waits the lease out
        a.wait(timeout=10)
        killed = time.monotonic()
        wait_for(lambda: _leads(b_url, lease), LEASE_DURATION + 15, "sb takes over")
        assert time.monotonic() - killed <= LEASE_DURATION + 2 * 2.0 + 3
        wait_for(lambda: _non_lease_requests(b_url) > 0, 15, "the new leader deciding")

        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=20) == 0
        assert kube.get(Lease, lease, namespace="pdorch-system").spec.holderIdentity in ("", None)
    finally:
        for p in (a, b):
            if p is not None:
                stop(p)

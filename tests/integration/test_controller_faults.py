"""Controller faults on the dev cluster: the API server restarting mid-reconcile, etcd freezing,
and SIGKILLs of the controller while groups are created and scaled. Every case must converge with
no orphaned and no duplicated objects; the printed numbers feed docs/reliability.md."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from lightkube import Client

from pdorch.devcluster.cluster import ClusterState, DevCluster
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.process import free_port
from pdorch.devcluster.waiting import wait_for, wait_http_ok
from tests.integration.test_controller import LWS, SG, _light_group, condition, update_spec

pytestmark = pytest.mark.integration


def _converged(kube: Client, namespace: str, names: list[str], replicas: int = 1) -> bool:
    """Every group Available with all roles ready, exactly its 2 LWS at `replicas`, nothing else."""
    lws = [o.to_dict() for o in kube.list(LWS, namespace=namespace)]
    want = {f"{n}-{r}" for n in names for r in ("prefill", "decode")}
    if sorted(o["metadata"]["name"] for o in lws) != sorted(want):
        return False
    if any((o["spec"].get("replicas") != replicas) or not o["metadata"].get("ownerReferences") for o in lws):
        return False
    for n in names:
        c = condition(kube.get(SG, n, namespace=namespace), "Available")
        if not (c and c["status"] == "True" and c["reason"] == "AllRolesReady"):
            return False
    return True


def _create(kube: Client, namespace: str, names: list[str]) -> None:
    for n in names:
        kube.create(SG.from_dict(copy.deepcopy(_light_group(n))), namespace=namespace)


def _cluster(devcluster: ClusterState) -> DevCluster:
    from pathlib import Path

    return DevCluster(Path(devcluster.dir))


def _scale(replicas: int) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        for r in spec["roles"]:
            r["replicas"] = replicas

    return edit


def test_converges_after_an_apiserver_restart_during_reconciles(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    names = [f"ar-{i:02d}" for i in range(15)]
    pid = controller.proc.pid
    _create(kube, namespace, names)
    down_s = _cluster(devcluster).restart("kube-apiserver")  # SIGKILL, then the same command line
    t0 = time.monotonic()
    wait_for(lambda: _converged(kube, namespace, names), 180, "groups converged after the API server restart")
    recover_s = time.monotonic() - t0
    print("apiserver restart:", json.dumps({"groups": len(names), "apiserver_down_s": round(down_s, 1),
                                            "converged_after_s": round(recover_s, 1)}))  # fmt: skip
    assert controller.proc.pid == pid and controller.proc.poll() is None  # it reconnected, not restarted


def test_converges_while_etcd_freezes(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc
) -> None:
    """A slow etcd: frozen (SIGSTOP) for 4 s twice while groups are created and scaled."""
    etcd = devcluster.process("etcd")
    assert etcd is not None
    names = [f"se-{i:02d}" for i in range(10)]
    _create(kube, namespace, names)
    for _ in range(2):
        os.kill(etcd.pid, signal.SIGSTOP)
        time.sleep(4)
        os.kill(etcd.pid, signal.SIGCONT)
        time.sleep(1)
    t0 = time.monotonic()
    wait_for(lambda: _converged(kube, namespace, names), 180, "groups converged after etcd stalls")
    for n in names:
        update_spec(kube, namespace, n, _scale(2))
    os.kill(etcd.pid, signal.SIGSTOP)
    time.sleep(4)
    os.kill(etcd.pid, signal.SIGCONT)
    wait_for(lambda: _converged(kube, namespace, names, replicas=2), 180, "scaled groups converged")
    print(
        "etcd freezes:",
        json.dumps(
            {"groups": len(names), "freezes": 3, "converged_after_s": round(time.monotonic() - t0, 1)}
        ),
    )
    assert controller.proc.poll() is None


def test_sigkill_of_the_controller_at_random_points_of_create_and_scale(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    rng = random.Random(11)
    names = [f"kk-{i:02d}" for i in range(10)]
    kills = 0

    def kill_soon() -> None:
        nonlocal kills
        time.sleep(rng.uniform(0.05, 1.0))
        controller.kill()
        kills += 1
        controller.restart()
        controller.wait_ready(60)

    # Create, killing the controller between and right after creates.
    for i, n in enumerate(names):
        kube.create(SG.from_dict(copy.deepcopy(_light_group(n))), namespace=namespace)
        if i % 2 == 0:
            kill_soon()
    for _ in range(5):
        kill_soon()
    wait_for(lambda: _converged(kube, namespace, names), 180, "created groups converged")
    # Scale up and down, killing it mid-way each time.
    for replicas in (3, 2):
        for n in names:
            update_spec(kube, namespace, n, _scale(replicas))
        for _ in range(5):
            kill_soon()
        wait_for(
            lambda r=replicas: _converged(kube, namespace, names, replicas=r), 180, f"scaled to {replicas}"
        )
    print("controller SIGKILLs:", json.dumps({"groups": len(names), "kills": kills}))
    assert kills >= 20


def test_sigterm_before_the_caches_sync_stops_at_once(tmp_path: Any) -> None:
    """An apiserver that never answers: the controller keeps retrying its lists, and a SIGTERM then
    ends it cleanly (exit 0), not after the 120 s sync timeout with a traceback."""
    kubeconfig = tmp_path / "dead.kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "dead", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "dead", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    port = free_port()
    log = tmp_path / "controller.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdorch.cli", "controller", "--kubeconfig", str(kubeconfig),
             "--no-leader-elect", "--health-addr", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_http_ok(
                f"http://127.0.0.1:{port}/healthz", 30, lambda: None if proc.poll() is None else "exited"
            )
            time.sleep(1)  # its informers are retrying their first lists
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert "Traceback" not in log.read_text()

"""Shared fixtures.

`devcluster` brings the real local control plane up once per test session (only when an
integration or e2e test asks for it) and tears it down at the end. Set
PDORCH_DEVCLUSTER_REUSE=<name> to run against an already running `pdorch dev-cluster --name <name>`
instead; it is then left running.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from pdorch.devcluster.cluster import ClusterState, DevCluster, default_state_dir, install_pdorch_crds
from pdorch.devcluster.controller_process import ControllerProc

REPO = Path(__file__).resolve().parents[1]


def _progress(msg: str) -> None:
    print(f"[devcluster] {msg}", flush=True)


@pytest.fixture(scope="session")
def devcluster() -> Iterator[ClusterState]:
    """A running dev cluster for the whole session."""
    reuse = os.environ.get("PDORCH_DEVCLUSTER_REUSE")
    if reuse:
        cluster = DevCluster(default_state_dir(reuse), progress=_progress)
        state = cluster.state()
        if state is None or not cluster.is_up():
            pytest.fail(
                f"PDORCH_DEVCLUSTER_REUSE={reuse} but that dev cluster is not up: run `pdorch dev-cluster --name {reuse} up`"
            )
        yield state
        return
    # PDORCH_DEVCLUSTER_NAME lets two test sessions on one machine run side by side.
    cluster = DevCluster(
        default_state_dir(os.environ.get("PDORCH_DEVCLUSTER_NAME", "pytest")), progress=_progress
    )
    state = cluster.up()
    try:
        yield state
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def kube(devcluster: ClusterState) -> Client:
    """A lightkube client with admin rights on the dev cluster."""
    return devcluster.client()


@pytest.fixture
def namespace(kube: Client) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube.create(Namespace(metadata=ObjectMeta(name=name, labels={"pdorch.io/test": "true"})))
    yield name
    kube.delete(Namespace, name)


@pytest.fixture(scope="session")
def pdorch_crds(kube: Client) -> list[str]:
    """pdorch's generated CRDs, installed with server-side apply, plus the controller's namespace."""
    return install_pdorch_crds(kube, "pdorch-test")


@pytest.fixture(scope="module")
def controller(devcluster: ClusterState, pdorch_crds: list[str]) -> Iterator[ControllerProc]:
    """One leader-elected `pdorch controller` subprocess for the module."""
    ctl = ControllerProc(
        devcluster.kubeconfig, f"ctl-{uuid.uuid4().hex[:6]}", f"lease-{uuid.uuid4().hex[:6]}"
    )
    try:
        ctl.wait_ready()
        yield ctl
    finally:
        code = ctl.stop()
        if code not in (0, None):
            print(ctl.log_tail())

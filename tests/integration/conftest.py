"""Fixtures for controller tests: pdorch's CRDs installed, a running controller subprocess."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from lightkube import Client
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from pdorch.devcluster.cluster import ClusterState, wait_for_crds
from pdorch.devcluster.controller_process import ControllerProc

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pdorch_crds(kube: Client) -> list[str]:
    """pdorch's generated CRDs, installed with server-side apply, plus the controller's namespace."""
    names = []
    for f in sorted((REPO / "manifests" / "crd").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        kube.apply(from_dict(doc), field_manager="pdorch-test", force=True)
        names.append(doc["metadata"]["name"])
    wait_for_crds(kube, names)
    try:
        kube.create(Namespace(metadata=ObjectMeta(name="pdorch-system")))
    except ApiError as e:
        if e.status.code != 409:
            raise
    return names


@pytest.fixture(scope="module")
def controller(devcluster: ClusterState, pdorch_crds: list[str]) -> Iterator[ControllerProc]:
    """One leader-elected controller replica for the module."""
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

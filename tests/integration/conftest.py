"""Fixtures for controller tests: pdorch's CRDs installed, a running controller subprocess."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc

REPO = Path(__file__).resolve().parents[2]


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

"""What a dev-cluster pod's backend is, read from the pod object (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from pdorch.devcluster.pod_backends import DEFAULT_GRACE_S, TERMINATING_ENGINE_S, backend_for, engine_drain_s

pytestmark = pytest.mark.unit


def _pod(
    command: list[str], args: list[str] | None = None, grace: int | None = None, kind: str = "decode"
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "engine", "command": command, "args": args or []}]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {
        "metadata": {"name": "g-decode-0", "uid": "u1", "labels": {"pdorch.io/role-type": kind}},
        "spec": spec,
        "status": {"phase": "Running", "podIP": "127.1.0.5"},
    }


def test_an_engine_drains_for_its_shutdown_timeout_within_the_pods_grace() -> None:
    sim = ["pdorch", "sim", "--role", "decode"]
    # vLLM's default (no flag): requests in flight are aborted on SIGTERM.
    assert engine_drain_s(_pod(sim)) == 0.0
    assert engine_drain_s(_pod([*sim, "--shutdown-timeout", "20"], grace=60)) == 20.0
    assert engine_drain_s(_pod(["vllm"], ["serve", "m", "--shutdown-timeout=45"], grace=60)) == 45.0
    # The kubelet kills the container at the end of the grace, whatever the engine asked for.
    assert engine_drain_s(_pod([*sim, "--shutdown-timeout", "50"], grace=10)) == 10 - TERMINATING_ENGINE_S
    assert engine_drain_s(_pod([*sim, "--shutdown-timeout", "50"])) == DEFAULT_GRACE_S - TERMINATING_ENGINE_S
    # A deletion's own grace (kubectl delete --grace-period=5) is what the kubelet gives.
    deleted = _pod([*sim, "--shutdown-timeout", "50"], grace=60)
    deleted["metadata"]["deletionGracePeriodSeconds"] = 5
    assert engine_drain_s(deleted) == 5 - TERMINATING_ENGINE_S
    # The same pod, now being deleted with that grace, keeps its backend (an unequal one was
    # stopped at once as another pod's, aborting what a drain should have finished: helper-78).
    assert backend_for(deleted) == backend_for(_pod([*sim, "--shutdown-timeout", "50"], grace=60))
    assert engine_drain_s(_pod(["vllm"], ["serve", "m", "--shutdown_timeout", "20"], grace=60)) == 20.0
    assert engine_drain_s(_pod([*sim, "--shutdown-timeout", "x"])) == 0.0
    assert engine_drain_s(_pod([*sim, "--shutdown-timeout"])) == 0.0
    b = backend_for(_pod([*sim, "--shutdown-timeout", "20"], grace=60))
    assert b is not None and b.drain_s == 20.0 and b.kind == "decode"
    # The proxy pod runs `pdorch proxy`, which drains by its own flags.
    proxy = backend_for(_pod(["pdorch", "proxy", "--shutdown-timeout", "20"], kind="proxy"))
    assert proxy is not None and proxy.drain_s == 0.0

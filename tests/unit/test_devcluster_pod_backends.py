"""What a dev-cluster pod's backend is, read from the pod object (no I/O)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdorch.devcluster.pod_backends import (
    TERMINATING_ENGINE_S,
    backend_for,
    engine_drain_s,
    stop_budget_s,
)
from pdorch.roles.pods import DEFAULT_GRACE_S

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
    assert b is not None and b.kind == "decode"


def _decode(uid: str, *, deleted_with: int | None = None, revision: str = "r1") -> dict[str, Any]:
    pod = _pod(["pdorch", "sim", "--shutdown-timeout", "50"], grace=60)
    pod["metadata"]["uid"] = uid
    pod["metadata"]["labels"]["pdorch.io/revision"] = revision
    if deleted_with is not None:
        pod["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
        pod["metadata"]["deletionGracePeriodSeconds"] = deleted_with
    return pod


async def _replay(
    monkeypatch: pytest.MonkeyPatch, *steps: list[dict[str, Any]] | float
) -> list[tuple[Any, ...]]:
    """What `PodBackends._sync` starts and stops over successive views of the pods (a float: wait)."""
    from types import SimpleNamespace

    from pdorch.devcluster import pod_backends

    monkeypatch.setattr(pod_backends, "TERMINATING_ENGINE_S", 0.05)
    p = pod_backends.PodBackends(kubeconfig="unused", namespace="ns", group="g")
    p._informer = SimpleNamespace(store={})  # type: ignore[assignment]
    seen: list[tuple[Any, ...]] = []

    async def start(b: Any) -> None:
        p._running[b.pod] = b
        seen.append(("start", b.uid))

    async def stop(name: str, *, drain_s: float = 0.0) -> None:
        p._ends.pop(name, None)
        seen.append(("stop", p._running.pop(name).uid, drain_s))

    p._start_backend = start  # type: ignore[method-assign]
    p._stop_backend = stop  # type: ignore[method-assign]
    for step in steps:
        if isinstance(step, float):
            await asyncio.sleep(step)
            continue
        p._informer.store = {pod["metadata"]["uid"]: pod for pod in step}
        await p._sync()
    return seen


async def test_a_terminating_pod_drains_and_a_vanished_one_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    window = 0.05
    # Deleted with its spec's grace: after the window, a drain of its --shutdown-timeout.
    assert await _replay(
        monkeypatch, [_decode("u1")], [_decode("u1", deleted_with=60)], 0.1, [_decode("u1", deleted_with=60)]
    ) == [
        ("start", "u1"),
        ("stop", "u1", 50.0),
    ]
    # Seen terminating, then gone (kwok removed it) or replaced under its name before the window
    # ended: it still drains; its successor starts.
    assert await _replay(monkeypatch, [_decode("u1")], [_decode("u1", deleted_with=60)], []) == [
        ("start", "u1"),
        ("stop", "u1", 50.0),
    ]
    assert await _replay(monkeypatch, [_decode("u1")], [_decode("u1", deleted_with=60)], [_decode("u2")]) == [
        ("start", "u1"),
        ("stop", "u1", 50.0),
        ("start", "u2"),
    ]
    # A second delete with a shorter grace inside the window shortens the drain.
    assert await _replay(
        monkeypatch,
        [_decode("u1")],
        [_decode("u1", deleted_with=30)],
        [_decode("u1", deleted_with=2)],
        0.1,
        [],
    ) == [("start", "u1"), ("stop", "u1", 2 - window)]
    # Gone without a termination window (force-deleted): killed. So is it when a successor of the
    # same name, itself terminating, is all the next view shows (not the successor's drain).
    assert await _replay(monkeypatch, [_decode("u1")], []) == [("start", "u1"), ("stop", "u1", 0.0)]
    assert await _replay(monkeypatch, [_decode("u1")], [_decode("u2", deleted_with=30)]) == [
        ("start", "u1"),
        ("stop", "u1", 0.0),
    ]


def _proxy(
    uid: str, *, grace: int = 65, shutdown_grace: str | None = "60", deleted_with: int | None = None
) -> dict[str, Any]:
    cmd = ["pdorch", "proxy", "--group", "g", "--namespace", "ns"]
    if shutdown_grace is not None:
        cmd += ["--shutdown-grace", shutdown_grace]
    pod = _pod(cmd, grace=grace, kind="proxy")
    pod["metadata"].update(name="g-proxy-0", uid=uid)
    if deleted_with is not None:
        pod["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
        pod["metadata"]["deletionGracePeriodSeconds"] = deleted_with
    return pod


async def test_a_terminating_proxy_gets_the_rest_of_its_pods_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy's process runs with its pod's --shutdown-grace and, once its pod is terminating,
    gets what the kubelet would leave it after SIGTERM (not the drain of an engine flag it lacks)."""
    b = backend_for(_proxy("u1"))
    assert b is not None and b.kind == "proxy" and b.shutdown_grace_s == 60.0
    no_flag = backend_for(_proxy("u1", shutdown_grace=None))
    assert no_flag is not None and no_flag.shutdown_grace_s is None
    assert stop_budget_s(_proxy("u1", deleted_with=65), "proxy") == 65 - TERMINATING_ENGINE_S
    assert stop_budget_s(_proxy("u1", deleted_with=65), "decode") == 0.0  # no --shutdown-timeout
    window = 0.05
    assert await _replay(
        monkeypatch, [_proxy("u1")], [_proxy("u1", deleted_with=65)], 0.1, [_proxy("u1", deleted_with=65)]
    ) == [("start", "u1"), ("stop", "u1", 65 - window)]
    # Force-deleted: gone without a window, it gets no more than SIGTERM's shortest wait.
    assert await _replay(monkeypatch, [_proxy("u1")], []) == [("start", "u1"), ("stop", "u1", 0.0)]

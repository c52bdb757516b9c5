"""Facts about a pod object (plain dict) that the controller, the proxy and the scaler read."""

from __future__ import annotations

import datetime as dt
from typing import Any


def _ready_condition(pod: dict[str, Any]) -> dict[str, Any] | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c
    return None


def is_ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    c = _ready_condition(pod)
    return c is not None and c.get("status") == "True"


def started_since(pod: dict[str, Any]) -> float | None:
    """When the pod's containers last (re)started (Unix seconds; the earliest running container's
    start), or None when one is not running or none says. Unlike the Ready condition, a readiness
    probe that fails and passes again does not move it: it dates the engine process, whose
    counters start at 0."""
    times = []
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        try:
            times.append(dt.datetime.fromisoformat(c["state"]["running"]["startedAt"]).timestamp())
        except (KeyError, TypeError, ValueError):
            return None
    return min(times) if times else None


def is_terminating(pod: dict[str, Any]) -> bool:
    """The pod has a deletionTimestamp (it must not take new work)."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


# Kubernetes' terminationGracePeriodSeconds when a pod (template) sets none.
DEFAULT_GRACE_S = 30


def termination_grace_s(pod: dict[str, Any] | None) -> int:
    """The terminationGracePeriodSeconds a pod or pod template asks for (Kubernetes' 30 when unset)."""
    grace = ((pod or {}).get("spec") or {}).get("terminationGracePeriodSeconds")
    # bool is an int to Python, not to the apiserver.
    return grace if isinstance(grace, int) and not isinstance(grace, bool) else DEFAULT_GRACE_S

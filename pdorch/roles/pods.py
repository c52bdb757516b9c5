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


def ready_since(pod: dict[str, Any]) -> float | None:
    """When the pod last became Ready (Unix seconds), or None if it is not Ready or does not say."""
    c = _ready_condition(pod)
    if c is None or c.get("status") != "True":
        return None
    try:
        return dt.datetime.fromisoformat(c["lastTransitionTime"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def is_terminating(pod: dict[str, Any]) -> bool:
    """The pod has a deletionTimestamp (it must not take new work)."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))

"""Facts about a pod object (plain dict) that the controller, the proxy and the scaler read."""

from __future__ import annotations

import datetime as dt
from typing import Any


def is_ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def ready_since(pod: dict[str, Any]) -> float | None:
    """When the pod last became Ready (Unix seconds), or None if it is not Ready or does not say."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "True":
            try:
                return dt.datetime.fromisoformat(c["lastTransitionTime"]).timestamp()
            except (KeyError, TypeError, ValueError):
                return None
    return None


def is_terminating(pod: dict[str, Any]) -> bool:
    """The pod has a deletionTimestamp (it must not take new work)."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))

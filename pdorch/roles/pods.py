"""Facts about a pod object (plain dict) that the controller and the proxy both read."""

from __future__ import annotations

from typing import Any


def is_ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def is_terminating(pod: dict[str, Any]) -> bool:
    """The pod has a deletionTimestamp (it must not take new work)."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))

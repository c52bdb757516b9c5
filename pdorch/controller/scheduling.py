"""Why a role's pods are not running: the scheduler could not place them (pure, no I/O).

A GPU cluster's most common trouble: pods Pending because no node has the GPUs, memory or labels
they ask for. The scheduler says so only on each pod (condition `PodScheduled=False`, reason
`Unschedulable`, and a `FailedScheduling` event); the group's status sums it up per role so that
`kubectl describe sg` answers "why is decode not up?" (condition `PodsUnschedulable`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from pdorch.controller.status import parse_rfc3339

UNSCHEDULABLE = "Unschedulable"
# A pod is reported once the scheduler has failed to place it for this long: a node joining or a
# preemption under way clears within seconds, and a condition flapping with them would be noise.
GRACE_S = 30.0
MAX_MESSAGE = 400


def _unscheduled_since(pod: Mapping[str, Any]) -> tuple[dt.datetime, str] | None:
    """When the scheduler last found no node for `pod`, and its message; None if it is placed,
    being deleted, or not (yet) judged unschedulable."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    for c in (pod.get("status") or {}).get("conditions") or []:
        if (
            c.get("type") == "PodScheduled"
            and c.get("status") == "False"
            and c.get("reason") == UNSCHEDULABLE
        ):
            since = parse_rfc3339(c.get("lastTransitionTime"))
            return (since, str(c.get("message") or "")) if since is not None else None
    return None


def unschedulable(
    pods: Iterable[Mapping[str, Any]], now: dt.datetime, grace_s: float = GRACE_S
) -> str | None:
    """What one role's pods the scheduler could not place for `grace_s` say: their count and the
    scheduler's message for the one waiting longest (which node constraint fails), or None."""
    stuck = [
        found
        for p in pods
        if (found := _unscheduled_since(p)) is not None and (now - found[0]).total_seconds() >= grace_s
    ]
    if not stuck:
        return None
    # No waiting time in the text: a message that changed on every pass would rewrite the status
    # every pass (the condition's lastTransitionTime says since when).
    _, message = min(stuck, key=lambda s: s[0])
    text = f"{len(stuck)} {'pod' if len(stuck) == 1 else 'pods'} not scheduled"
    if message:
        text += f": {message.strip()}"
    return text[:MAX_MESSAGE]

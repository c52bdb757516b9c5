"""The group's summary of pods the scheduler could not place (pdorch.controller.scheduling)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from pdorch.controller import status as st
from pdorch.controller.scheduling import GRACE_S, unschedulable

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 12, 7, 10, 0, 0, tzinfo=dt.UTC)
NO_GPU = "0/8 nodes are available: 8 Insufficient nvidia.com/gpu. preemption: 0/8 nodes are available."


def _pod(
    waited_s: float | None, message: str = NO_GPU, deleting: bool = False, reason: str = "Unschedulable"
) -> dict[str, Any]:
    md: dict[str, Any] = {"name": "p"}
    if deleting:
        md["deletionTimestamp"] = "2026-12-07T09:59:00Z"
    if waited_s is None:  # placed
        conds = [{"type": "PodScheduled", "status": "True"}]
    else:
        since = (NOW - dt.timedelta(seconds=waited_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
        conds = [{"type": "PodScheduled", "status": "False", "reason": reason, "message": message,
                  "lastTransitionTime": since}]  # fmt: skip
    return {"metadata": md, "status": {"phase": "Pending", "conditions": conds}}


def test_pods_waiting_past_the_grace_are_counted_with_the_longest_waiters_message() -> None:
    pods = [
        _pod(GRACE_S + 50, NO_GPU),
        _pod(GRACE_S + 5, "0/8 nodes are available: 8 node(s) didn't match"),
        _pod(None),
    ]
    assert unschedulable(pods, NOW) == f"2 pods not scheduled: {NO_GPU}"


def test_nothing_is_said_within_the_grace_for_placed_deleting_or_gated_pods() -> None:
    assert unschedulable([_pod(GRACE_S - 1)], NOW) is None  # a node may be joining
    assert unschedulable([_pod(None)], NOW) is None
    assert unschedulable([_pod(600, deleting=True)], NOW) is None
    assert unschedulable([_pod(600, reason="SchedulingGated")], NOW) is None
    assert unschedulable([], NOW) is None
    assert unschedulable([_pod(GRACE_S)], NOW) == f"1 pod not scheduled: {NO_GPU}"


def test_the_message_does_not_change_while_the_pods_keep_waiting() -> None:
    """A message carrying the waiting time would rewrite the group's status on every pass."""
    assert unschedulable([_pod(60)], NOW) == unschedulable([_pod(600)], NOW)


def test_the_condition_warns_when_it_appears_and_resolves_when_it_goes() -> None:
    cond = st.condition(st.PODS_UNSCHEDULABLE, True, "Unschedulable", "decode: 1 pod not scheduled", 1, [])
    before: dict[str, Any] = {"conditions": []}
    stuck = {"conditions": [cond]}
    assert st.transition_events(before, stuck) == [
        (
            "Warning",
            "Unschedulable",
            "PodsUnschedulable is now True: decode: 1 pod not scheduled",
            "PodsUnschedulable",
        )
    ]
    assert st.transition_events(stuck, before) == [
        ("Normal", "Resolved", "PodsUnschedulable is now False", "PodsUnschedulable")
    ]

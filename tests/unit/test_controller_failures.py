"""Picking a role's creation failure from Warning events (pdorch.controller.failures)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from pdorch.controller.failures import creation_failures, event_time, last_applied
from pdorch.controller.informer import strip

pytestmark = pytest.mark.unit

LWS = {"prefill": "g-prefill", "decode": "g-decode"}


def _ev(
    kind: str, name: str, message: str, at: str, reason: str = "FailedCreate", typ: str = "Warning"
) -> dict[str, Any]:
    return {
        "type": typ,
        "reason": reason,
        "involvedObject": {"kind": kind, "name": name},
        "message": message,
        "lastTimestamp": at,
    }


def test_the_newest_failed_create_of_the_role_lws_or_its_statefulsets_is_picked() -> None:
    events = [
        _ev(
            "LeaderWorkerSet", "g-prefill", "Failed to create leader statefulset: old", "2026-12-05T10:00:00Z"
        ),
        _ev("StatefulSet", "g-prefill-0", "create Pod g-prefill-0-1 failed: quota", "2026-12-05T10:05:00Z"),
        _ev("StatefulSet", "g-prefill", "create Pod g-prefill-0 failed: PodSecurity", "2026-12-05T10:03:00Z"),
        _ev("LeaderWorkerSet", "g-prefill", "noise", "2026-12-05T10:09:00Z", typ="Normal"),
        _ev("LeaderWorkerSet", "g-prefill", "other", "2026-12-05T10:09:00Z", reason="GroupsProgressing"),
        _ev("Pod", "g-decode-0", "not ours", "2026-12-05T10:09:00Z"),
        _ev("LeaderWorkerSet", "g-prefill-extra", "another group's LWS", "2026-12-05T10:09:00Z"),
    ]
    got = creation_failures(events, LWS, {})
    assert got == {"prefill": "create Pod g-prefill-0-1 failed: quota"}


def test_failures_older_than_the_current_spec_are_ignored() -> None:
    """After a fix the controller re-applies the LWS: the warnings about the earlier spec no longer apply."""
    events = [_ev("LeaderWorkerSet", "g-decode", "volumeMounts[0].name: Not found", "2026-12-05T10:00:00Z")]
    fixed_at = dt.datetime(2026, 12, 5, 10, 1, tzinfo=dt.UTC)
    assert creation_failures(events, LWS, {"decode": fixed_at}) == {}
    assert creation_failures(events, LWS, {"decode": None}) == {"decode": "volumeMounts[0].name: Not found"}


def test_event_time_prefers_the_series_then_the_last_timestamp() -> None:
    ev = {
        "series": {"lastObservedTime": "2026-12-05T22:13:27.415272Z"},
        "eventTime": "2026-12-05T22:13:27.326412Z",
        "metadata": {"creationTimestamp": "2026-12-05T22:13:27Z"},
    }
    assert event_time(ev) == dt.datetime(2026, 12, 5, 22, 13, 27, 415272, tzinfo=dt.UTC)
    assert event_time({"lastTimestamp": "2026-12-05T10:00:00Z"}) == dt.datetime(
        2026, 12, 5, 10, tzinfo=dt.UTC
    )
    assert event_time({}) is None


def test_a_restarted_controller_reads_its_last_apply_from_managed_fields() -> None:
    lws = {
        "metadata": {
            "managedFields": [
                {"manager": "pdorch", "operation": "Apply", "time": "2026-12-05T10:01:00Z"},
                # LWS's controller writing status, and a human's kubectl edit: not our change.
                {
                    "manager": "lws",
                    "operation": "Update",
                    "subresource": "status",
                    "time": "2026-12-05T10:09:00Z",
                },
                {"manager": "kubectl-edit", "operation": "Update", "time": "2026-12-05T10:08:00Z"},
                {
                    "manager": "pdorch",
                    "operation": "Apply",
                    "subresource": "status",
                    "time": "2026-12-05T10:07:00Z",
                },
            ]
        }
    }
    assert last_applied(lws, "pdorch") == dt.datetime(2026, 12, 5, 10, 1, tzinfo=dt.UTC)
    assert last_applied(lws, "someone-else") is None
    assert last_applied({"metadata": {}}, "pdorch") is None


def test_the_cache_keeps_who_wrote_when_but_not_the_field_sets() -> None:
    obj = {
        "metadata": {
            "name": "g-decode",
            "managedFields": [
                {
                    "manager": "pdorch",
                    "operation": "Apply",
                    "time": "2026-12-05T10:01:00Z",
                    "fieldsV1": {"f:spec": {}},
                }
            ],
        }
    }
    stripped = strip(obj)
    assert stripped["metadata"]["managedFields"] == [
        {"manager": "pdorch", "operation": "Apply", "time": "2026-12-05T10:01:00Z"}
    ]
    assert last_applied(stripped, "pdorch") is not None


def test_a_claim_templates_volume_replaces_the_templates_own_in_the_check() -> None:
    """The StatefulSet gives its pods a volume per claim template, replacing a template volume of
    that name; the bare pod template check must see the same volumes (review of 2a96f8f)."""
    from pdorch.controller.reconciler import _with_claim_volumes

    template = {"spec": {"containers": [{"name": "c"}], "volumes": [{"name": "data"}, {"name": "cfg"}]}}
    assert _with_claim_volumes(template, []) is template
    probed = _with_claim_volumes(template, ["data", "cache"])
    assert probed["spec"]["volumes"] == [
        {"name": "cfg"},
        {"name": "data", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    assert template["spec"]["volumes"] == [{"name": "data"}, {"name": "cfg"}]  # the intent is untouched


async def test_one_list_of_a_namespaces_warnings_serves_its_groups_and_a_timeout_is_cached() -> None:
    """One list per namespace per 15 s for all its groups; a list that times out (an overloaded
    apiserver, the case this is for) is cached as unreadable, not retried by every reconcile at
    once (review of the shared list)."""
    import asyncio
    import time
    from types import SimpleNamespace

    import httpx2

    from pdorch.controller.reconciler import Reconciler

    calls: list[str] = []

    async def slow_timeout(*_a: Any, **_k: Any) -> Any:
        calls.append("list")
        await asyncio.sleep(0.01)
        raise httpx2.ReadTimeout("slow")

    r = Reconciler(api=SimpleNamespace(list=slow_timeout), caches=None, events=None, options=None)  # type: ignore[arg-type]
    now = time.monotonic()
    results = await asyncio.gather(*(r._failed_create_warnings("ns", now) for _ in range(5)))
    assert results == [None] * 5 and calls == ["list"]
    assert await r._failed_create_warnings("ns", time.monotonic()) is None and calls == ["list"]
    assert await r._failed_create_warnings("ns", time.monotonic() + 16) is None and calls == ["list", "list"]


def test_a_role_lacks_groups_while_its_surge_groups_are_not_all_ready() -> None:
    """A rollout's surge groups that cannot be created (a quota) or whose workers cannot (a quota
    that fits the leader) leave the ready count at the desired one: still lacking, so their
    FailedCreate warnings are read (helper-71 A; helper-76 R1 on counting created groups)."""
    from pdorch.controller import status as st
    from pdorch.controller.reconciler import _lacking

    def role(replicas: int, ready: int, surge: int) -> st.RoleObservation:
        return st.RoleObservation("decode", "decode", 2, replicas, ready, 0, 0, True, surge=surge)

    assert _lacking(role(2, 2, 1))  # the surge group not created
    assert _lacking(role(3, 2, 1))  # created (its leader exists), not ready
    assert not _lacking(role(3, 3, 1))
    assert not _lacking(role(2, 2, 0))
    assert _lacking(role(2, 1, 0))

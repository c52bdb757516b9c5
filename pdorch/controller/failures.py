"""Why a role's groups are not being created: the FailedCreate warnings of its LWS and StatefulSets.

The CRD keeps pod templates opaque and LWS's own admission checks only their structure, so a
template the StatefulSet validation refuses (a volumeMount naming no volume, a duplicate port) or
pods the namespace refuses (Pod Security, quota) surface only as Warning events on the LWS (its
controller could not create the StatefulSet) or on the StatefulSet (it could not create pods).
This module picks, per role, the newest such warning that is younger than the role's current spec,
so the group's status can say it (condition `ReplicaFailure`, as a Deployment does).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from pdorch.controller.status import parse_rfc3339

FAILED_CREATE = "FailedCreate"
# Event kinds that carry a role's creation failures: LWS (its StatefulSets) and StatefulSet (pods).
_KINDS = ("LeaderWorkerSet", "StatefulSet")
MAX_MESSAGE = 600


def event_time(ev: Mapping[str, Any]) -> dt.datetime | None:
    """When an event (core/v1 shape) last happened: its series, last timestamp, event time or creation."""
    series = ev.get("series") or {}
    md = ev.get("metadata") or {}
    for ts in (
        series.get("lastObservedTime"),
        ev.get("lastTimestamp"),
        ev.get("eventTime"),
        md.get("creationTimestamp"),
    ):
        parsed = parse_rfc3339(ts)
        if parsed is not None:
            return parsed
    return None


def last_applied(obj: Mapping[str, Any], manager: str) -> dt.datetime | None:
    """When `manager` last changed `obj`'s spec by server-side apply (its managedFields entry), so
    a restarted controller knows which warnings came before its last change."""
    times = [
        parse_rfc3339(e.get("time"))
        for e in (obj.get("metadata") or {}).get("managedFields") or []
        if isinstance(e, dict)
        and e.get("manager") == manager
        and e.get("operation") == "Apply"
        and not e.get("subresource")
    ]
    return max((t for t in times if t is not None), default=None)


def _owner_role(name: str, lws_names: Mapping[str, str]) -> str | None:
    """The role whose LWS is `name`, or whose StatefulSet it is (`<lws>` leaders, `<lws>-<i>` workers)."""
    for role, lws in lws_names.items():
        if name == lws:
            return role
        head, sep, tail = name.rpartition("-")
        if sep and head == lws and tail.isdigit():
            return role
    return None


def creation_failures(
    events: Iterable[Mapping[str, Any]],
    lws_names: Mapping[str, str],
    since: Mapping[str, dt.datetime | None],
) -> dict[str, str]:
    """Role -> the message of its newest FailedCreate warning newer than `since[role]`.

    `lws_names` maps role -> LWS name; events regarding other objects are ignored.
    """
    newest: dict[str, tuple[dt.datetime, str]] = {}
    for ev in events:
        if ev.get("type") != "Warning" or ev.get("reason") != FAILED_CREATE:
            continue
        obj = ev.get("involvedObject") or ev.get("regarding") or {}
        if obj.get("kind") not in _KINDS:
            continue
        role = _owner_role(str(obj.get("name") or ""), lws_names)
        when = event_time(ev)
        if role is None or when is None:
            continue
        cutoff = since.get(role)
        if cutoff is not None and when < cutoff:
            continue
        text = str(ev.get("message") or ev.get("note") or "").strip()
        if role not in newest or when > newest[role][0]:
            newest[role] = (when, text[:MAX_MESSAGE])
    return {role: text for role, (_when, text) in newest.items()}

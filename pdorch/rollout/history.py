"""Revision history of a ServingGroup: one ControllerRevision per revision, for rollbacks.

The controller records the spec of every new update revision as a ControllerRevision (apps/v1)
owned by the group, named `<group>-<revision>`, with an increasing `.revision` number, and keeps
the newest `HISTORY_LIMIT`. `pdorch rollback` puts one of them back as the spec; the planner then
rolls to it like to any other revision. Everything here is pure; the controller and the CLI do I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pdorch.roles.labels import LABEL_GROUP, LABEL_MANAGED_BY, LABEL_REVISION, MANAGED_BY

HISTORY_LIMIT = 10


def revision_object(sg: dict[str, Any], revision: str, number: int) -> dict[str, Any]:
    """The ControllerRevision recording `sg`'s spec as `revision` (number `number`)."""
    md = sg["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": {
            "name": f"{md['name']}-{revision}",
            "namespace": md["namespace"],
            "labels": {LABEL_GROUP: md["name"], LABEL_REVISION: revision, LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [
                {
                    "apiVersion": sg["apiVersion"],
                    "kind": sg["kind"],
                    "name": md["name"],
                    "uid": md["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "data": {"spec": sg["spec"]},
        "revision": number,
    }


def owned_records(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ControllerRevisions a ServingGroup owns (LWS keeps its own, with the same group label)."""
    return [
        c
        for c in items
        if any(
            r.get("kind") == "ServingGroup" for r in (c.get("metadata") or {}).get("ownerReferences") or []
        )
    ]


def revision_of_object(cr: dict[str, Any]) -> str:
    """The pdorch revision a ControllerRevision records."""
    return ((cr.get("metadata") or {}).get("labels") or {}).get(LABEL_REVISION, "")


def next_number(existing: Sequence[dict[str, Any]]) -> int:
    """The `.revision` number for a new record (1 + the highest so far)."""
    return 1 + max((int(c.get("revision") or 0) for c in existing), default=0)


def stale_record(existing: Sequence[dict[str, Any]], revision: str) -> dict[str, Any] | None:
    """The record of `revision` when it is not the newest one (the group returned to it).

    It must become the newest again, as `kubectl rollout undo` renumbers a ReplicaSet: otherwise
    "the previous revision" of a group rolled back to an old revision would be the one just left
    behind by the rollback's own predecessor, e.g. a bad revision the rollback escaped.
    """
    record = next((c for c in existing if revision_of_object(c) == revision), None)
    if record is None or int(record.get("revision") or 0) == next_number(existing) - 1:
        return None
    return record


def to_prune(existing: Sequence[dict[str, Any]], keep: str, limit: int = HISTORY_LIMIT) -> list[str]:
    """Names of the oldest records beyond `limit` (never the one for revision `keep`)."""
    ordered = sorted(existing, key=lambda c: int(c.get("revision") or 0), reverse=True)
    out = []
    for c in ordered[limit:]:
        if revision_of_object(c) != keep:
            out.append(c["metadata"]["name"])
    return out


def rollback_target(
    existing: Sequence[dict[str, Any]], current: str | None, update: str | None, to: str | None = None
) -> dict[str, Any]:
    """Which record `pdorch rollback` restores.

    `to` names a revision explicitly. Otherwise: during a rollout (current != update) the revision
    the group ran before it (`current`); after one, the newest record older than `update`.
    Raises ValueError with what to do when there is no such record.
    """
    by_rev = {revision_of_object(c): c for c in existing}
    if to is not None:
        if to not in by_rev:
            known = ", ".join(sorted(by_rev)) or "none"
            raise ValueError(f"no recorded revision {to!r} (recorded: {known})")
        return by_rev[to]
    if current and update and current != update:
        if current in by_rev:
            return by_rev[current]
        raise ValueError(f"the revision before this rollout ({current}) is not recorded; pass --to-revision")
    newer = by_rev.get(update or "")
    limit = int(newer.get("revision") or 0) if newer else None
    older = [
        c
        for c in existing
        if revision_of_object(c) != update and (limit is None or int(c.get("revision") or 0) < limit)
    ]
    if not older:
        raise ValueError("no earlier revision is recorded for this group")
    return max(older, key=lambda c: int(c.get("revision") or 0))

"""Revision history of a ServingGroup: one ControllerRevision per revision, for rollbacks.

The controller records the spec of every new update revision as a ControllerRevision (apps/v1)
owned by the group, named `<group>-<revision>`, with an increasing `.revision` number, and keeps
the newest `HISTORY_LIMIT`. `pdorch rollback` puts the revision-defining fields of one of them back
into the live spec (`restore_revision`); the planner then rolls to it like to any other revision.
Everything here is pure; the controller and the CLI do I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pdorch.api.errors import format_validation_error
from pdorch.api.servinggroup import KV_ROLE_TYPES, ServingGroupSpec
from pdorch.roles.labels import LABEL_GROUP, LABEL_MANAGED_BY, LABEL_REVISION, MANAGED_BY
from pdorch.roles.revision import REVISION_ROLE_FIELDS, REVISION_SPEC_FIELDS, compute_revision

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


def owned_records(items: Sequence[dict[str, Any]], uid: str | None = None) -> list[dict[str, Any]]:
    """The ControllerRevisions a ServingGroup owns (LWS keeps its own, with the same group label);
    with `uid`, only this group object's (a group deleted and created again under the same name
    does not inherit the old one's records, which the garbage collector is about to remove)."""
    return [
        c
        for c in items
        if any(
            r.get("kind") == "ServingGroup" and (uid is None or r.get("uid") == uid)
            for r in (c.get("metadata") or {}).get("ownerReferences") or []
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


def live_update_revision(sg: dict[str, Any]) -> str | None:
    """The revision `sg`'s spec defines (what the controller rolls to), or status.updateRevision
    when the spec does not parse (the controller then keeps the last accepted one).

    `pdorch rollback` decides from this, not from status alone: right after a rollback, status
    still names the revision rolled away from until the controller writes it, while the history
    may already number the restored revision newest, and the target then skipped back one more.
    Once status describes the current generation it is taken as it is (a CLI of another release
    than the controller could hash differently)."""
    status = sg.get("status") or {}
    generation = (sg.get("metadata") or {}).get("generation")
    if (
        status.get("updateRevision")
        and generation is not None
        and status.get("observedGeneration") == generation
    ):
        return str(status["updateRevision"])
    try:
        return compute_revision(ServingGroupSpec.model_validate(sg.get("spec") or {}))
    except ValidationError:
        return status.get("updateRevision")


class RollbackRefused(ValueError):
    """The recorded revision cannot be put back into the live spec; the message says why."""


@dataclass(frozen=True)
class Restored:
    """The live spec with a recorded revision's defining fields put back, and what else happened
    to the role set (one sentence per added or removed role)."""

    spec: dict[str, Any]
    notes: tuple[str, ...]


def _kv_roles(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in spec.get("roles") or [] if r.get("type") in KV_ROLE_TYPES}


def restore_revision(live: dict[str, Any], recorded: dict[str, Any], revision: str) -> Restored:
    """`live` (a ServingGroup spec, wire form) with revision `revision` restored from `recorded`
    (the spec its ControllerRevision holds, any pdorch version's).

    Only what the revision hashes comes back (REVISION_SPEC_FIELDS and, per KV role,
    REVISION_ROLE_FIELDS; absent in the record means absent, i.e. the default): replicas, scaling,
    startupPolicy, the proxy role, ratio, rolloutStrategy and router stay as they are now, since
    they changed without a rollout and a rollback must not undo a scale-up or a router change.
    The KV role set is part of the revision, so a KV role added since is removed and one removed
    since comes back as recorded (replicas and scaling too: there is nothing live to keep); both
    are reported in `notes`. A role whose type differs between the two is refused, as is a result
    the API would refuse (RollbackRefused).
    """
    rec_kv = _kv_roles(recorded)
    live_roles = list(live.get("roles") or [])
    for role in live_roles:
        was = rec_kv.get(role.get("name", ""))
        if was is not None and was.get("type") != role.get("type"):
            raise RollbackRefused(
                f"role {role['name']} is {role.get('type')} now but {was['type']} in revision "
                f"{revision}: its replicas and scaling cannot carry over to another type; rename the "
                "role in the spec or restore that revision by hand"
            )
    roles: list[dict[str, Any]] = []
    notes: list[str] = []
    live_names = {r.get("name") for r in live_roles}
    for role in live_roles:
        if role.get("type") not in KV_ROLE_TYPES:
            roles.append(role)  # the proxy is not part of the revision
            continue
        was = rec_kv.get(role["name"])
        if was is None:
            notes.append(
                f"role {role['name']} ({role['type']}) removed: revision {revision} has no such role"
            )
            continue
        merged = {k: v for k, v in role.items() if k not in REVISION_ROLE_FIELDS}
        merged.update({k: copy.deepcopy(was[k]) for k in REVISION_ROLE_FIELDS if k in was})
        roles.append(merged)
    for name, was in rec_kv.items():
        if name not in live_names:
            roles.append(copy.deepcopy(was))
            notes.append(
                f"role {name} ({was['type']}) restored as recorded in revision {revision} "
                f"(replicas {was.get('replicas', 1)}): it is not in the live spec"
            )
    spec = {k: v for k, v in live.items() if k not in REVISION_SPEC_FIELDS}
    spec.update({k: copy.deepcopy(recorded[k]) for k in REVISION_SPEC_FIELDS if k in recorded})
    spec["roles"] = roles
    try:
        model = ServingGroupSpec.model_validate(spec)
    except ValidationError as e:
        problems = "; ".join(format_validation_error(e)[:5])
        raise RollbackRefused(
            f"revision {revision} does not fit the live spec (the API would refuse it): {problems}"
        ) from e
    try:
        want = compute_revision(ServingGroupSpec.model_validate(recorded))
    except ValidationError:
        want = None  # a record today's schema refuses: the fields above were still copied verbatim
    if want is not None and compute_revision(model) != want:
        raise RollbackRefused(f"restoring revision {revision} would not reproduce it (a pdorch bug)")
    return Restored(spec, tuple(notes))

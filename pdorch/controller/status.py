"""Pure status computation: observed LWS objects -> ServingGroup status and conditions.

Conditions follow the Kubernetes API conventions (type, status, reason, message,
lastTransitionTime, observedGeneration); lastTransitionTime moves only when status flips, so an
unchanged world yields an identical status and the controller writes nothing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

AVAILABLE = "Available"
PROGRESSING = "Progressing"
INVALID = "Invalid"
ROLLOUT_STALLED = "RolloutStalled"
# Present (True) only while the update revision's ControllerRevision could not be written.
REVISION_RECORD_FAILED = "RevisionRecordFailed"

SUMMARY_TYPES = ("proxy", "prefill", "decode", "worker")


# Timestamps in status and conditions: RFC 3339, whole seconds, UTC (as metav1.Time serialises).
RFC3339_SECONDS = "%Y-%m-%dT%H:%M:%SZ"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime(RFC3339_SECONDS)


@dataclass(frozen=True)
class RoleObservation:
    """What the controller saw of one role's LWS."""

    name: str
    type: str
    desired: int
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    partition: int = 0
    exists: bool = False
    # LWS's status reflects the current spec (status.observedGeneration == generation). Right after
    # a template change the old status still counts every group as updated.
    current: bool = True


def observe_role(name: str, rtype: str, desired: int, lws: dict[str, Any] | None) -> RoleObservation:
    """Read replicas/ready/updated/partition from an LWS (None if it does not exist yet)."""
    if lws is None:
        return RoleObservation(name, rtype, desired)
    st = lws.get("status") or {}
    ru = ((lws.get("spec") or {}).get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    return RoleObservation(
        name=name,
        type=rtype,
        desired=desired,
        replicas=int(st.get("replicas") or 0),
        ready=int(st.get("readyReplicas") or 0),
        updated=int(st.get("updatedReplicas") or 0),
        partition=int(ru.get("partition") or 0),
        exists=True,
        current=_status_is_current(lws),
    )


def _status_is_current(lws: dict[str, Any]) -> bool:
    """Whether an LWS's status was computed for its current spec (generation)."""
    observed = (lws.get("status") or {}).get("observedGeneration")
    if observed is None:
        return True  # releases that never report it are taken at their word
    return int(observed) >= int((lws.get("metadata") or {}).get("generation") or 0)


def condition(
    ctype: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int,
    previous: list[dict[str, Any]],
) -> dict[str, Any]:
    """A condition, keeping the previous lastTransitionTime if its status did not change."""
    s = "Unknown" if status is None else ("True" if status else "False")
    prev = find_condition(previous, ctype)
    ltt = (
        prev["lastTransitionTime"]
        if prev and prev.get("status") == s and prev.get("lastTransitionTime")
        else now_rfc3339()
    )
    return {
        "type": ctype,
        "status": s,
        "reason": reason,
        "message": message,
        "lastTransitionTime": ltt,
        "observedGeneration": generation,
    }


def find_condition(conditions: list[dict[str, Any]], ctype: str) -> dict[str, Any] | None:
    """The condition of type `ctype` in a conditions list, or None."""
    return next((c for c in conditions if c.get("type") == ctype), None)


def resumed_progress(
    previous: dict[str, Any], new: dict[str, Any], now: dt.datetime
) -> tuple[str, float] | None:
    """The persisted `lastProgressTime` and its age in seconds, if a restarted controller may go on
    counting from it: the previous status has one and its roles look exactly as they do now (else
    something moved while no controller watched, which is progress)."""
    stamp = previous.get("lastProgressTime")
    if not isinstance(stamp, str) or previous.get("roles") != new.get("roles"):
        return None
    try:
        then = dt.datetime.strptime(stamp, RFC3339_SECONDS).replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return stamp, max(0.0, (now - then).total_seconds())


def summarize(roles: list[RoleObservation]) -> dict[str, str]:
    """Ready/desired per role type, e.g. {"prefill": "3/4"}, for printer columns."""
    out = {}
    for t in SUMMARY_TYPES:
        rs = [r for r in roles if r.type == t]
        if rs:
            out[t] = f"{sum(r.ready for r in rs)}/{sum(r.desired for r in rs)}"
    return out


def compute_status(
    generation: int,
    roles: list[RoleObservation],
    revision: str,
    previous: dict[str, Any] | None,
    current_revision: str | None = None,
    invalid: str | None = None,
) -> dict[str, Any]:
    """The full status object for a ServingGroup.

    `invalid` is a reason message when the spec could not be rendered or was refused by the API
    server; the group then reports Invalid=True and its other conditions Unknown.
    """
    prev_conds = list((previous or {}).get("conditions") or [])
    if invalid is not None:
        conds = [
            condition(INVALID, True, "SpecRejected", invalid, generation, prev_conds),
            condition(
                AVAILABLE,
                None,
                "SpecRejected",
                "the spec is invalid; see the Invalid condition",
                generation,
                prev_conds,
            ),
            condition(
                PROGRESSING,
                False,
                "SpecRejected",
                "nothing is rolled out until the spec is fixed",
                generation,
                prev_conds,
            ),
        ]
        return {
            **{k: v for k, v in (previous or {}).items() if k not in ("conditions", "observedGeneration")},
            "observedGeneration": generation,
            "conditions": conds,
        }

    not_ready = [r for r in roles if r.ready < r.desired]
    serving_types = {"prefill", "decode"} | ({"proxy"} if any(r.type == "proxy" for r in roles) else set())
    missing_path = sorted(t for t in serving_types if not any(r.type == t and r.ready > 0 for r in roles))
    if not missing_path and not not_ready:
        available = condition(
            AVAILABLE, True, "AllRolesReady", "every role has all its groups ready", generation, prev_conds
        )
    elif not missing_path:
        names = ", ".join(f"{r.name} {r.ready}/{r.desired}" for r in not_ready)
        available = condition(
            AVAILABLE,
            True,
            "MinimumRolesReady",
            f"serving, but not every group is ready: {names}",
            generation,
            prev_conds,
        )
    else:
        available = condition(
            AVAILABLE,
            False,
            "RoleNotReady",
            f"no ready group yet for role type(s): {', '.join(missing_path)}",
            generation,
            prev_conds,
        )

    rolling = [r for r in roles if r.updated < r.desired or r.partition > 0]
    stale = [r.name for r in roles if r.exists and not r.current]
    if not all(r.exists for r in roles):
        progressing = condition(
            PROGRESSING, True, "CreatingRoles", "creating LeaderWorkerSets", generation, prev_conds
        )
    elif rolling:
        names = ", ".join(f"{r.name} {r.updated}/{r.desired} updated" for r in rolling)
        progressing = condition(PROGRESSING, True, "RolloutInProgress", names, generation, prev_conds)
    elif not_ready or any(r.replicas != r.desired for r in roles):
        progressing = condition(
            PROGRESSING, True, "Scaling", "waiting for groups to become ready", generation, prev_conds
        )
    elif stale:
        progressing = condition(
            PROGRESSING,
            True,
            "Updating",
            f"waiting for LWS to act on the latest spec of {', '.join(stale)}",
            generation,
            prev_conds,
        )
    else:
        progressing = condition(
            PROGRESSING, False, "Complete", f"revision {revision} is fully rolled out", generation, prev_conds
        )

    invalid_c = condition(INVALID, False, "Valid", "the spec was accepted", generation, prev_conds)
    done = progressing["status"] == "False"
    return {
        "observedGeneration": generation,
        "currentRevision": revision if done else (current_revision or revision),
        "updateRevision": revision,
        "roles": [
            {
                "name": r.name,
                "type": r.type,
                "desiredReplicas": r.desired,
                "replicas": r.replicas,
                "readyReplicas": r.ready,
                "updatedReplicas": r.updated,
                "partition": r.partition,
            }
            for r in roles
        ],
        "summary": summarize(roles),
        "conditions": [available, progressing, invalid_c],
    }


def transitions(old: dict[str, Any] | None, new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Conditions whose status changed: (type, old status, new status, reason)."""
    before = {c["type"]: c.get("status") for c in ((old or {}).get("conditions") or [])}
    return [
        (c["type"], before.get(c["type"], ""), c["status"], c.get("reason", ""))
        for c in new.get("conditions", [])
        if before.get(c["type"]) != c["status"]
    ]

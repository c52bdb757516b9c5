"""Pure status computation: observed LWS objects -> ServingGroup status and conditions.

Conditions follow the Kubernetes API conventions (type, status, reason, message,
lastTransitionTime, observedGeneration); lastTransitionTime moves only when status flips, so an
unchanged world yields an identical status and the controller writes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdorch.roles.labels import ANNOTATION_ROLLOUT

AVAILABLE = "Available"
PROGRESSING = "Progressing"
INVALID = "Invalid"
ROLLOUT_STALLED = "RolloutStalled"
# Progressing=False reason when the LWS apply itself fails (the reconciler's Warning says why).
APPLY_FAILED = "ApplyFailed"
# Present (True) only while the update revision's ControllerRevision could not be written.
REVISION_RECORD_FAILED = "RevisionRecordFailed"
# Present (True) only while a role's LWS or StatefulSets report that they cannot create its groups.
REPLICA_FAILURE = "ReplicaFailure"
# Present (True) only while some role's pods have waited for a node (`pdorch.controller.scheduling`).
PODS_UNSCHEDULABLE = "PodsUnschedulable"
# On a ServingRoleScaler: True while its spec.replicas lies outside the role's min/max (HPA's reasons).
SCALING_LIMITED = "ScalingLimited"
# Written by pdorch's scaler (not the controller) on a Builtin role's ServingRoleScaler.
SCALING_ACTIVE = "ScalingActive"

SUMMARY_TYPES = ("proxy", "prefill", "decode", "worker")


# Timestamps in status and conditions: RFC 3339, whole seconds, UTC (as metav1.Time serialises).
RFC3339_SECONDS = "%Y-%m-%dT%H:%M:%SZ"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime(RFC3339_SECONDS)


def parse_rfc3339(stamp: Any) -> dt.datetime | None:
    """An API timestamp (whole seconds or with a fraction, `Z` or an offset) as an aware datetime;
    None when absent or malformed."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        parsed = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


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
    # Ready groups on the update revision (the planner's count while it drives a rollout).
    updated_ready: int = 0
    # Groups a rollout keeps above `desired` for the time being.
    surge: int = 0


def observe_role(name: str, rtype: str, desired: int, lws: dict[str, Any] | None) -> RoleObservation:
    """Read replicas/ready/updated/partition from an LWS (None if it does not exist yet).

    `desired` is what the operator asked for (spec, or the ServingRoleScaler), never the rollout's
    temporary replicas. `updated_ready` is LWS's best guess (ready and updated counted apart);
    the controller replaces it with the planner's exact count during a rollout.
    """
    if lws is None:
        return RoleObservation(name, rtype, desired)
    st = lws.get("status") or {}
    spec = lws.get("spec") or {}
    ru = (spec.get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    ready, updated = int(st.get("readyReplicas") or 0), int(st.get("updatedReplicas") or 0)
    # Only an LWS marked mid-rollout holds surge; any other excess is a scale-down under way.
    marked = ANNOTATION_ROLLOUT in ((lws.get("metadata") or {}).get("annotations") or {})
    return RoleObservation(
        name=name,
        type=rtype,
        desired=desired,
        replicas=int(st.get("replicas") or 0),
        ready=ready,
        updated=updated,
        partition=int(ru.get("partition") or 0),
        exists=True,
        current=_status_is_current(lws),
        updated_ready=min(ready, updated),
        surge=max(0, int(spec.get("replicas") or 0) - desired) if marked else 0,
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


def _groups(n: int) -> str:
    return f"{n} group" if n == 1 else f"{n} groups"


def scaler_status(
    bounds: tuple[int | None, int | None],
    srs: dict[str, Any],
    current: int,
    selector: str,
    applied: bool,
    held_for_drain: int | None = None,
    hold_limit_s: float | None = None,
    held_by_rollout: str | None = None,
) -> dict[str, Any]:
    """The controller's part of a ServingRoleScaler's status.

    `bounds` are the role's (minReplicas, maxReplicas); `current` the groups its LWS has;
    `applied` whether the LWS got the scaler's replicas as they are now (not while a rollout sizes
    it): only then is this generation observed, else the previous observedGeneration stays.
    ScalingLimited says when a `/scale` write beyond the bounds is held at them, which the
    Desired column alone does not show. `held_for_drain`: the size a Builtin role keeps above a
    lowered maxReplicas until pdorch's scaler has drained the groups it removes.
    `held_by_rollout`: why a paused, blocked or stalled rollout holds the role's size (a scale
    waits for the rollout's next step, and such a rollout takes none by itself); it limits only a
    scale the LWS has not got (a generation not yet observed, asking for other than `current`).
    """
    have = srs.get("status") or {}
    generation = int((srs.get("metadata") or {}).get("generation") or 0)
    spec = srs.get("spec") or {}
    asked, (low, high) = spec.get("replicas"), bounds
    role = f"{spec.get('servingGroup')}/{spec.get('role')}"
    if asked is not None and high is not None and int(asked) > high and held_for_drain is not None:
        reason = "TooManyReplicas"
        message = (
            f"spec.replicas {asked} is above maxReplicas {high} of role {role}: it is held at "
            f"{_groups(held_for_drain)} while pdorch's scaler drains the groups above {high} (it "
            f"writes spec.replicas once they are idle); `kubectl scale` to {high} cuts them at once"
        )
        if hold_limit_s is not None:
            message += f"; if they are not drained {hold_limit_s:.0f}s after the change, it applies anyway"
    elif asked is not None and high is not None and int(asked) > high:
        reason = "TooManyReplicas"
        message = (
            f"spec.replicas {asked} is above maxReplicas {high} of role {role}: it is held at "
            f"{_groups(high)}; raise scaling.maxReplicas in the ServingGroup to allow more"
        )
    elif asked is not None and low is not None and int(asked) < low:
        reason = "TooFewReplicas"
        message = (
            f"spec.replicas {asked} is below minReplicas {low} of role {role}: it is held at "
            f"{_groups(low)}; lower scaling.minReplicas in the ServingGroup to allow fewer"
        )
    elif (
        held_by_rollout is not None
        and not applied
        and generation != have.get("observedGeneration")
        and asked is not None
        and int(asked) != current
    ):
        # A size the LWS has not got (a scale since the LWS last got one), which the rollout holds.
        reason = "HeldByRollout"
        message = (
            f"spec.replicas {asked} of role {role} waits for the rollout, which holds the role's size "
            f"until its next step and takes none now ({held_by_rollout}): resume the rollout or fix "
            "what blocks it"
        )
    else:
        reason, message = (
            "DesiredWithinRange",
            "spec.replicas is within the role's minReplicas and maxReplicas",
        )
    limited = condition(
        SCALING_LIMITED,
        reason != "DesiredWithinRange",
        reason,
        message,
        generation,
        have.get("conditions") or [],
    )
    out: dict[str, Any] = {"replicas": current, "selector": selector, "conditions": [limited]}
    observed = generation if applied else have.get("observedGeneration")
    if observed is not None:
        out["observedGeneration"] = observed
    return out


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
    then = parse_rfc3339(stamp)
    if then is None or previous.get("roles") != new.get("roles"):
        return None
    return stamp, max(0.0, (now - then).total_seconds())


def summarize(roles: list[RoleObservation]) -> dict[str, str]:
    """Ready/desired per role type, e.g. {"prefill": "3/4"}, for printer columns.

    Ready counts at most `desired` per role: surge groups of a rollout (or groups a scale-down has
    not removed yet) would otherwise show 5/4 while the operator's 4 are what counts."""
    out = {}
    for t in SUMMARY_TYPES:
        rs = [r for r in roles if r.type == t]
        if rs:
            out[t] = f"{sum(min(r.ready, r.desired) for r in rs)}/{sum(r.desired for r in rs)}"
    return out


# Progressing's reason while groups neither scaled nor rolled are replaced (a deleted pod).
RECOVERING = "Recovering"


def _was_settled(previous: dict[str, Any] | None, generation: int, roles: list[RoleObservation]) -> bool:
    """Whether the last status showed this spec complete (or recovering) at today's desired counts."""
    if not previous or previous.get("observedGeneration") != generation:
        return False
    prog = find_condition(previous.get("conditions") or [], PROGRESSING) or {}
    if prog.get("reason") not in ("Complete", RECOVERING):
        return False
    before = {r.get("name"): r.get("desiredReplicas") for r in previous.get("roles") or []}
    return all(before.get(r.name) == r.desired for r in roles)


def rollout_state(conditions: list[dict[str, Any]]) -> str:
    """One word for the Rollout printer column, from the conditions.

    Invalid, Stalled, Paused, Progressing (a rollout or the first creation under way), Scaling,
    ApplyFailed, or Complete (the update revision runs everywhere).
    """
    invalid = find_condition(conditions, INVALID)
    if invalid is not None and invalid.get("status") == "True":
        return "Invalid"
    stalled = find_condition(conditions, ROLLOUT_STALLED)
    if stalled is not None and stalled.get("status") == "True":
        return "Stalled"
    if stalled is not None and stalled.get("reason") == "Paused":
        return "Paused"
    progressing = find_condition(conditions, PROGRESSING) or {}
    reason = str(progressing.get("reason") or "")
    if progressing.get("status") == "True":
        if reason == RECOVERING:
            return "Complete"  # no rollout or scale under way; READY shows the groups coming back
        return "Scaling" if reason == "Scaling" else "Progressing"
    return reason or "Unknown"


def stalled_condition(
    kind: str,
    reason: str,
    stalled_for: float,
    deadline: int,
    since: str,
    generation: int,
    previous: list[dict[str, Any]],
) -> dict[str, Any]:
    """RolloutStalled while a rollout is active, from the planner's decision `kind` and `reason`.

    The message names when progress stopped (`since`, status.lastProgressTime), not for how long:
    an elapsed time would change every pass and rewrite an unchanged stall forever."""
    if kind == "blocked":
        return condition(ROLLOUT_STALLED, True, "CannotProgress", reason, generation, previous)
    if kind == "paused":
        return condition(ROLLOUT_STALLED, False, "Paused", reason, generation, previous)
    if stalled_for > deadline:
        return condition(
            ROLLOUT_STALLED,
            True,
            "ProgressDeadlineExceeded",
            f"no progress since {since} (progressDeadlineSeconds {deadline}): {reason}",
            generation,
            previous,
        )
    return condition(ROLLOUT_STALLED, False, "Progressing", reason, generation, previous)


def compute_status(
    generation: int,
    roles: list[RoleObservation],
    revision: str,
    previous: dict[str, Any] | None,
    current_revision: str | None = None,
    invalid: str | None = None,
    rolling: bool = False,
    cohorts: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """The full status object for a ServingGroup.

    `invalid` is a reason message when the spec could not be rendered or was refused by the API
    server; the group then reports Invalid=True, keeps its revisions (nothing is rolled out), and
    still reports the roles and availability of the LWS that serve meanwhile. `rolling` says the
    planner drives a rollout (also while only its surge groups remain to be removed). `cohorts`:
    ready groups per revision and role type while a rollout is active (the proxy pairs a prefill
    only with a decode of its revision, so availability needs one revision with both).
    """
    prev_conds = list((previous or {}).get("conditions") or [])
    available = _available(roles, generation, prev_conds, cohorts)
    if invalid is not None:
        conds = [
            condition(INVALID, True, "SpecRejected", invalid, generation, prev_conds),
            available,
            condition(
                PROGRESSING,
                False,
                "SpecRejected",
                "nothing is rolled out until the spec is fixed",
                generation,
                prev_conds,
            ),
        ]
        # A revision still unrecorded stays so (and is retried once the spec is valid again).
        conds += [c for c in prev_conds if c.get("type") == REVISION_RECORD_FAILED]
        kept = ("currentRevision", "updateRevision", "lastProgressTime")
        return {
            **{k: v for k, v in (previous or {}).items() if k in kept},
            "observedGeneration": generation,
            "roles": _role_statuses(roles),
            "summary": {**summarize(roles), "rollout": rollout_state(conds)},
            "conditions": conds,
        }

    not_ready = [r for r in roles if r.ready < r.desired]
    # Groups that exist and are not on the update revision (groups still to be created are a
    # scale-up, not a rollout).
    updating = [r for r in roles if r.updated < min(r.replicas, r.desired) or r.partition > 0]
    stale = [r.name for r in roles if r.exists and not r.current]
    if not all(r.exists for r in roles):
        progressing = condition(
            PROGRESSING, True, "CreatingRoles", "creating LeaderWorkerSets", generation, prev_conds
        )
    elif updating or rolling:
        names = ", ".join(
            f"{r.name} {min(r.updated_ready, r.desired)}/{r.desired} ready on the update revision"
            for r in roles
            if r in updating or r.surge or r.updated_ready < r.desired
        )
        progressing = condition(
            PROGRESSING, True, "RolloutInProgress", names or "rollout in progress", generation, prev_conds
        )
    elif not_ready and _was_settled(previous, generation, roles):
        # Nothing was scaled or rolled since the group was complete: groups are being replaced (a
        # pod deleted or crashed). (LWS counts a group as a replica once its leader pod exists, so
        # a new group or a scale-up that is still loading would look the same without this test.)
        names = ", ".join(f"{r.name} {r.ready}/{r.desired}" for r in not_ready)
        progressing = condition(
            PROGRESSING,
            True,
            RECOVERING,
            f"waiting for groups to be ready again: {names}",
            generation,
            prev_conds,
        )
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
    conds = [available, progressing, invalid_c]
    return {
        "observedGeneration": generation,
        "currentRevision": revision if done else (current_revision or revision),
        "updateRevision": revision,
        "roles": _role_statuses(roles),
        # The controller sets summary.rollout again once RolloutStalled is known.
        "summary": {**summarize(roles), "rollout": rollout_state(conds)},
        "conditions": conds,
    }


def _available(
    roles: list[RoleObservation],
    generation: int,
    prev_conds: list[dict[str, Any]],
    cohorts: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """Available: every serving role type has a ready group (True), all groups ready or not, and
    during a rollout (`cohorts`) one revision has both a ready prefill and a ready decode."""
    not_ready = [r for r in roles if r.ready < r.desired]
    serving_types = {"prefill", "decode"} | ({"proxy"} if any(r.type == "proxy" for r in roles) else set())
    missing_path = sorted(t for t in serving_types if not any(r.type == t and r.ready > 0 for r in roles))
    # An empty map is a pod cache behind the LWS counts, not a proof of no pair.
    if (
        not missing_path
        and cohorts
        and not any(p.get("prefill") and p.get("decode") for p in cohorts.values())
    ):
        per_revision = "; ".join(
            f"{rev}: " + ", ".join(f"{t} {n}" for t, n in sorted(per.items()))
            for rev, per in sorted(cohorts.items())
        )
        return condition(
            AVAILABLE,
            False,
            "NoRevisionPair",
            "no revision has both a ready prefill and a ready decode group, and the proxy pairs a "
            f"prefill only with a decode of its own revision (ready groups per revision: {per_revision})",
            generation,
            prev_conds,
        )
    if not missing_path and not not_ready:
        return condition(
            AVAILABLE, True, "AllRolesReady", "every role has all its groups ready", generation, prev_conds
        )
    if not missing_path:
        names = ", ".join(f"{r.name} {r.ready}/{r.desired}" for r in not_ready)
        return condition(
            AVAILABLE,
            True,
            "MinimumRolesReady",
            f"serving, but not every group is ready: {names}",
            generation,
            prev_conds,
        )
    # A type whose every role asks for 0 groups will not come by waiting: say so.
    # (Only types with roles observed: an invalid spec's group may have no LWS at all.)
    zero = [
        t
        for t in missing_path
        if any(r.type == t for r in roles) and all(r.desired == 0 for r in roles if r.type == t)
    ]
    message = f"no ready group yet for role type(s): {', '.join(missing_path)}"
    if zero:
        message = (
            f"no group is asked for role type(s) {', '.join(zero)} (replicas 0), so no request can be "
            "served; " + message
        )
    return condition(AVAILABLE, False, "RoleNotReady", message, generation, prev_conds)


def _role_statuses(roles: list[RoleObservation]) -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "type": r.type,
            "desiredReplicas": r.desired,
            "replicas": r.replicas,
            "readyReplicas": r.ready,
            "updatedReplicas": r.updated,
            "updatedReadyReplicas": r.updated_ready,
            "surgeReplicas": r.surge,
            "partition": r.partition,
        }
        for r in roles
    ]


# Conditions the status carries only while True: their going away is their flip to False.
_ONLY_WHILE_TRUE = (REPLICA_FAILURE, REVISION_RECORD_FAILED, PODS_UNSCHEDULABLE)


def transitions(old: dict[str, Any] | None, new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Conditions whose status changed: (type, old status, new status, reason)."""
    before = {c["type"]: c.get("status") for c in ((old or {}).get("conditions") or [])}
    now = new.get("conditions", [])
    present = {c["type"] for c in now}
    return [
        (c["type"], before.get(c["type"], ""), c["status"], c.get("reason", ""))
        for c in now
        if before.get(c["type"]) != c["status"]
    ] + [
        (t, "True", "False", "Resolved")
        for t in _ONLY_WHILE_TRUE
        if before.get(t) == "True" and t not in present
    ]


# Conditions that are True when something is wrong.
_TROUBLE = frozenset({INVALID, ROLLOUT_STALLED, REVISION_RECORD_FAILED, REPLICA_FAILURE, PODS_UNSCHEDULABLE})


def transition_events(old: dict[str, Any] | None, new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The Events announcing `new`'s condition flips: (type, reason, note, series).

    Warning when something needs a human: a stalled rollout, a revision record refused, groups
    that cannot be created, a group that stopped serving. A new group's first "nothing wrong"
    (Invalid, RolloutStalled, ... False) is no event. Invalid=True and Progressing=False for
    ApplyFailed are left out: the controller's InvalidSpec and ApplyFailed Warnings carry the
    message, and one refusal is one event. The series is the condition type, so the event recorder drops only a repeat of the same
    flip, never a flip back or a second one.
    """
    messages = {c["type"]: c.get("message") or "" for c in new.get("conditions") or []}
    out = []
    for ctype, old_s, new_s, reason in transitions(old, new):
        if (ctype == INVALID and new_s == "True") or (
            ctype == PROGRESSING and new_s == "False" and reason == APPLY_FAILED
        ):
            continue
        if (ctype in _TROUBLE or ctype == AVAILABLE) and old_s == "" and new_s == "False":
            # A new group reporting nothing wrong, or not serving yet, for the first time: no news
            # (its `Created` event says it is starting; `Available is now True` follows).
            continue
        warning = (ctype in _TROUBLE and new_s == "True" and ctype != INVALID) or (
            ctype == AVAILABLE and new_s == "False" and old_s == "True"
        )
        # The condition's message says why, so `kubectl describe` needs no trip to `-o yaml`.
        note = f"{ctype} is now {new_s}" + (f": {messages[ctype]}" if messages.get(ctype) else "")
        out.append(("Warning" if warning else "Normal", reason or ctype, note, ctype))
    return out


ProgressMark = tuple[str, tuple[int, int], float, str]


def rollout_position(writing: dict[str, tuple[int, int]] | None, observed: dict[str, tuple[int, int]]) -> str:
    """Where a rollout stands after this pass, for `progress_mark`: the (replicas, partition) per
    role a step being written sets, else the observed ones. A step written is progress at once (a
    rollout resumed after a pause longer than its deadline is not stalled by the pause)."""
    return repr(sorted((writing if writing is not None else observed).items()))


def progress_mark(
    mark: ProgressMark | None, step: str, ready: tuple[int, int], now: float, stamp: Callable[[], str]
) -> ProgressMark:
    """A rollout's progress mark after a pass: (step, most (new, total) groups ready in it, when the
    mark last moved, that time as RFC 3339). It moves when another step was written, or when more
    groups are ready than ever in this step; ready counts that fall and come back (a new revision
    crash looping past its readiness probe) do not move it, as in a Deployment."""
    if mark is None or mark[0] != step:
        return (step, ready, now, stamp())
    best = mark[1]
    if ready[0] > best[0] or ready[1] > best[1]:
        return (step, (max(ready[0], best[0]), max(ready[1], best[1])), now, stamp())
    return mark

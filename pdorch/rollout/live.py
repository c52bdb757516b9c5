"""From live objects to the planner and back: which partitions and replicas to apply now.

Pure functions over plain dicts (LWS and pod objects as the API returns them), so the controller
stays a thin I/O shell and every rule here is unit-testable.

How pdorch drives an LWS of a KV role (DESIGN.md "Rollout"):

* during a rollout the LWS's own rolling update is neutralised (maxSurge 0, maxUnavailable 100%):
  it only ever recreates the groups at or above the partition pdorch sets, all at once (at rest
  maxUnavailable is 1, so a change pdorch did not plan rolls a group at a time);
* a new revision's template goes in with partition = current replicas, so nothing moves yet;
* each planner step lowers partitions (recreating old groups on the new template) and sets
  replicas (surge above desired, or scale events), across roles in one decision.

A group "slot" i of a role is ready for the planner when the group exists, all its pods are Ready
and none is terminating, and, for slots at or above the partition, the group runs the update
revision (so a step LWS has not finished yet reads as "not ready" and the planner waits).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pdorch.roles.labels import (
    ANNOTATION_ROLLOUT,
    LABEL_REVISION,
    LWS_GROUP_INDEX,
    LWS_SIZE,
    LWS_WORKER_INDEX,
)
from pdorch.roles.pods import is_ready, is_terminating
from pdorch.rollout import step_record
from pdorch.rollout.planner import (
    effective_tolerance,
    initial_state,
    next_step,
    step_fits,
    with_auto_tolerance,
)
from pdorch.rollout.state import KV_TYPES, Decision, RoleAction, RoleObservation, RolloutSpec, deviation
from pdorch.rollout.step_record import StepRecord


@dataclass(frozen=True)
class GroupState:
    """One LWS group (replica) of a role, read from its pods."""

    index: int
    revision: str
    ready: bool


@dataclass(frozen=True)
class LiveRole:
    """A KV role as the controller sees it: desired replicas and its live LWS (if any)."""

    name: str
    type: str
    desired: int
    lws: dict[str, Any] | None
    groups: tuple[GroupState, ...] = ()


@dataclass(frozen=True)
class RolloutPlan:
    """What to apply now.

    `actions`: role -> (replicas, partition) for every KV role with a live LWS while a rollout is
    active (empty otherwise: the spec's replicas and partition 0 apply). `decision` is the
    planner's, None when no rollout is active. `cohorts` counts ready groups per revision and role
    type, for status and metrics. `step`: the step `decision` takes (numbered), None when it takes
    none. `records`: the step record each KV role's LWS is to carry: this step's, or when there is
    none the one it carries (a pass that writes no step never stamps a record on an LWS). A record
    says what its step wrote, not what the LWS holds now (a hold or a scale since may differ):
    `step_record.unwritten` compares values only on the LWS that carry the step being finished.
    """

    active: bool
    actions: dict[str, tuple[int, int]]
    decision: Decision | None
    observations: tuple[RoleObservation, ...] = ()
    cohorts: dict[str, dict[str, int]] = field(default_factory=dict)
    tolerance: float | None = None
    step: StepRecord | None = None
    records: dict[str, StepRecord | None] = field(default_factory=dict)


def lws_revision(lws: dict[str, Any]) -> str | None:
    """The pdorch revision of an LWS's pod template (None for objects pdorch did not render)."""
    lwt = (lws.get("spec") or {}).get("leaderWorkerTemplate") or {}
    tmpl = lwt.get("leaderTemplate") or lwt.get("workerTemplate") or {}
    return ((tmpl.get("metadata") or {}).get("labels") or {}).get(LABEL_REVISION)


def lws_replicas_partition(lws: dict[str, Any]) -> tuple[int, int]:
    """(spec.replicas, rollingUpdateConfiguration.partition) of an LWS."""
    spec = lws.get("spec") or {}
    ru = (spec.get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    return int(spec.get("replicas") or 0), int(ru.get("partition") or 0)


def _group_size(leader: dict[str, Any] | None, default: int) -> int:
    """The size of the template a group was created from (LWS annotates it on every pod).

    After a `size` change the old groups still have the old size; judging them by the new one
    would call a smaller old group never ready and stall the rollout before its first step.
    """
    value = ((leader or {}).get("metadata", {}).get("annotations") or {}).get(LWS_SIZE)
    try:
        return max(1, int(value)) if value is not None else default
    except ValueError:
        return default


def group_states(pods: Iterable[dict[str, Any]], size: int) -> tuple[GroupState, ...]:
    """Per group index: the leader's revision, and whether all its pods are Ready and staying.

    A group needs as many pods as the size on its leader's LWS annotation (`size` when absent)."""
    by_index: dict[int, list[dict[str, Any]]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        try:
            idx = int(labels.get(LWS_GROUP_INDEX, ""))
        except ValueError:
            continue
        by_index.setdefault(idx, []).append(pod)
    out = []
    for idx in sorted(by_index):
        members = by_index[idx]
        leader = next(
            (p for p in members if ((p["metadata"].get("labels") or {}).get(LWS_WORKER_INDEX, "0")) == "0"),
            None,
        )
        rev = ((leader or {}).get("metadata", {}).get("labels") or {}).get(LABEL_REVISION, "")
        ready = (
            leader is not None
            and len(members) >= _group_size(leader, size)
            and all(is_ready(p) and not is_terminating(p) for p in members)
            and all((p["metadata"].get("labels") or {}).get(LABEL_REVISION, "") == rev for p in members)
        )
        out.append(GroupState(idx, rev, ready))
    return tuple(out)


def observe(role: LiveRole, update_revision: str, base_revision: str | None = None) -> RoleObservation:
    """The planner's view of one role with a live LWS (see the module doc for slot readiness).

    `base_revision`: the revision the whole group ran before this rollout (status.currentRevision);
    never-ready groups on neither it nor the update revision are `abandoned`."""
    assert role.lws is not None
    replicas, partition = lws_replicas_partition(role.lws)
    if lws_revision(role.lws) != update_revision:
        # The new template is not in yet: it will go in with partition = replicas.
        partition = replicas
    # A hand scale-down below the partition (kubectl scale lws) leaves only old groups: count those
    # that exist, not a negative number of new ones.
    partition = min(partition, replicas)
    groups = {g.index: g for g in role.groups}
    old_ready = new_ready = 0
    for i in range(replicas):
        g = groups.get(i)
        if g is None or not g.ready:
            continue
        if i < partition:
            old_ready += 1
        elif g.revision == update_revision:
            new_ready += 1
    return RoleObservation(
        name=role.name,
        type=role.type,
        desired=role.desired,
        old_ready=old_ready,
        new_ready=new_ready,
        old_total=partition,
        new_total=replicas - partition,
        partition=partition,
        surge=replicas - role.desired,
        old_revisions=_old_revisions(groups, partition),
        abandoned=_abandoned(groups, partition, update_revision, base_revision),
    )


def observations(
    roles: Sequence[LiveRole], update_revision: str, base_revision: str | None = None
) -> list[RoleObservation]:
    """The planner's view of the roles with a live LWS (`observe` each), as `plan` and
    `pdorch plan --from-live` both start from it."""
    observed = [observe(r, update_revision, base_revision) for r in roles]
    if any(o.partition for o in observed) and all(_runs_only(r, update_revision) for r in roles):
        # A spec put back to the revision every group still runs (a refused rollout reverted): the
        # template goes back in and recreates nothing. Planned as a rollout from those groups to
        # themselves, the budgets refused it again, for ever (helper-86). They are all new.
        observed = [_all_new(o) for o in observed]
    return observed


def _all_new(o: RoleObservation) -> RoleObservation:
    """`o` with every group counted on the update revision (partition 0)."""
    return replace(
        o,
        old_ready=0,
        new_ready=o.old_ready + o.new_ready,
        old_total=0,
        new_total=o.old_total + o.new_total,
        partition=0,
        old_revisions=(),
        abandoned=0,
    )


def _runs_only(role: LiveRole, revision: str) -> bool:
    """Every group up to the LWS's replicas exists and its pods run `revision`."""
    assert role.lws is not None
    replicas, _ = lws_replicas_partition(role.lws)
    revisions = {g.index: g.revision for g in role.groups}
    return all(revisions.get(i) == revision for i in range(replicas))


def _abandoned(
    groups: dict[int, GroupState], partition: int, update_revision: str, base_revision: str | None
) -> int:
    """How many of the top old groups are not ready on a revision that is neither the base nor
    the update one: groups of a rollout a rollback or a newer spec replaced, which may never start.
    The base is this role's index 0's revision while that group is ready (groups of the revision
    this role serves from are starting, or crashed, and are waited for), and the revision the whole
    group ran before (`base_revision`, status.currentRevision). With the latter, index 0 itself can
    be abandoned: a role whose every group moved to a replaced revision that never started is
    recreated (helper-86: it was waited for for ever)."""
    first = groups.get(0)
    serving = {base_revision} if base_revision else set()
    if first is not None and (first.ready or not base_revision):
        serving.add(first.revision)
    n = 0
    for i in range(partition - 1, -1 if base_revision else 0, -1):
        g = groups.get(i)
        if g is None or g.ready or not g.revision or g.revision in serving or g.revision == update_revision:
            break
        n += 1
    return n


def _old_revisions(groups: dict[int, GroupState], partition: int) -> tuple[tuple[str, int], ...]:
    """Run lengths of the old groups' revisions from index 0 up. A group whose pods are gone (being
    recreated) counts with its neighbours' run: it still belongs to the revision its index held."""
    runs: list[tuple[str, int]] = []
    unknown = 0  # groups below the first one whose revision is known
    for i in range(partition):
        g = groups.get(i)
        rev = g.revision if g is not None and g.revision else (runs[-1][0] if runs else None)
        if rev is None:
            unknown += 1
        elif runs and runs[-1][0] == rev:
            runs[-1] = (rev, runs[-1][1] + 1)
        else:
            runs.append((rev, 1 + unknown))
            unknown = 0
    return tuple(runs) if runs else ((("", unknown),) if unknown else ())


def is_rolling(roles: Sequence[LiveRole], update_revision: str) -> bool:
    """A rollout is active while some KV role's LWS has another revision, a partition > 0, or is
    still marked mid-rollout (surge groups not removed yet; see ANNOTATION_ROLLOUT)."""
    for r in roles:
        if r.lws is None:
            continue
        _, partition = lws_replicas_partition(r.lws)
        marked = ANNOTATION_ROLLOUT in ((r.lws.get("metadata") or {}).get("annotations") or {})
        if lws_revision(r.lws) != update_revision or partition > 0 or marked:
            return True
    return False


def cohorts(roles: Sequence[LiveRole]) -> dict[str, dict[str, int]]:
    """Ready groups per revision and role type: {revision: {"prefill": n, "decode": m, ...}}."""
    out: dict[str, dict[str, int]] = {}
    for r in roles:
        for g in r.groups:
            if g.ready and g.revision:
                per = out.setdefault(g.revision, {})
                per[r.type] = per.get(r.type, 0) + 1
    return out


def cohort_deviation(p: int, d: int, ratio_p: int, ratio_d: int) -> float:
    """Relative P:D deviation of one cohort as a number: 0 when empty, 1.0 when one-sided."""
    dev = deviation(p, d, ratio_p, ratio_d)
    return 1.0 if dev is None else float(dev)


def max_cohort_deviation(by_revision: dict[str, dict[str, int]], ratio_p: int, ratio_d: int) -> float:
    """Largest relative P:D deviation among revisions with ready groups (1.0 for a one-sided cohort)."""
    return max(
        (
            cohort_deviation(per.get("prefill", 0), per.get("decode", 0), ratio_p, ratio_d)
            for per in by_revision.values()
        ),
        default=0.0,
    )


def plan(
    roles: Sequence[LiveRole],
    update_revision: str,
    spec: RolloutSpec | None,
    written: StepRecord | None = None,
    cache_may_lag: bool = True,
    old_down_for: float = math.inf,
    base_revision: str | None = None,
) -> RolloutPlan:
    """Decide the partitions and replicas of the KV roles for this reconcile.

    `spec.tolerance` None asks for `auto_tolerance`. Roles whose LWS does not exist yet are left to
    the renderer (created on the update revision). `written`: the last step this controller wrote
    in full; a newer one some LWS carries and others lack is a step another controller (or this
    one, before a failed write) did not finish, and is finished before anything else. The step
    this controller just wrote is not: its LWS objects may only lag in the watch cache, and while
    `cache_may_lag` (it was written moments ago) an LWS showing an older step is held at `written`.
    `old_down_for`: see `next_step`. `base_revision`: see `observe`.
    """
    kv = [r for r in roles if r.type in KV_TYPES]
    by_rev = cohorts(kv)
    if spec is None or not is_rolling(kv, update_revision):
        return RolloutPlan(False, {}, None, cohorts=by_rev)
    live = [r for r in kv if r.lws is not None]
    observed = observations(live, update_revision, base_revision)
    # From the rollout's start state (desired replicas, all old): one tolerance for the whole
    # rollout, not one that drifts with the live state.
    spec = with_auto_tolerance(spec, initial_state([(r.name, r.type, r.desired) for r in live]))
    records = {r.name: step_record.read(r.lws) for r in live if r.lws is not None}
    step: StepRecord | None = None
    lagging = cache_may_lag and _cache_lags(records, written, update_revision)
    cut = None if lagging else cut_short(live, observed, update_revision, spec, written)
    if lagging:
        # This controller wrote `written` in full, and some LWS still show an older step: the watch
        # cache has not caught up. Planning (or holding) from it would write the older values back.
        assert written is not None
        decision = Decision(
            "wait",
            {n: RoleAction(r, p) for n, (r, p) in written.to_dict().items()},
            f"waiting for the watch cache to show step {written.number}",
        )
        records = dict.fromkeys(records, written)
    elif cut is not None and cut.unready:
        decision = Decision(
            "wait",
            {o.name: RoleAction(o.replicas, o.partition) for o in observed},
            f"waiting for readiness of {', '.join(cut.unready)} to finish step {cut.step.number}",
        )
    elif cut is not None:
        # Even when paused: the pause came after this step was decided, and half of it is a state
        # no plan passes through.
        decision = Decision(
            "step",
            {n: RoleAction(r, p) for n, (r, p) in cut.step.to_dict().items()},
            f"finish step {cut.step.number}, whose write of {', '.join(cut.missing)} was cut short",
        )
        step = cut.step
    else:
        decision = next_step(observed, spec, old_down_for)
    if decision.kind == "done":
        # Every group is new and ready at the desired replicas: render plainly (drops the marker).
        return RolloutPlan(False, {}, decision, tuple(observed), by_rev)
    actions = {n: (a.replicas, a.partition) for n, a in decision.roles.items()}
    if decision.kind == "step" and step is None:
        step = StepRecord.of(
            step_record.next_number(list(records.values()), written), update_revision, actions
        )
    if step is not None:
        records = dict.fromkeys(records, step)
    eff = effective_tolerance(observed, spec)
    return RolloutPlan(
        True,
        actions,
        decision,
        tuple(observed),
        by_rev,
        tolerance=None if eff is None else float(eff),
        step=step,
        records=records,
    )


def _cache_lags(
    records: dict[str, StepRecord | None], written: StepRecord | None, update_revision: str
) -> bool:
    """Whether some LWS still shows the record it had before `written` went out. Not for a step
    of another revision (a new spec since: holding would put its template in at that step's
    partitions), nor a missing record after a rollout's first step (an LWS recreated without one)."""
    if written is None or written.revision != update_revision or sorted(records) != sorted(written.to_dict()):
        return False
    return any(written.number == 1 if r is None else r.number < written.number for r in records.values())


@dataclass(frozen=True)
class CutShort:
    """A step whose LWS writes were cut short, to be finished before anything else."""

    step: StepRecord
    missing: list[str]  # the roles it did not reach
    unready: list[str]  # of those, the ones with a group not ready: finished once they are


def cut_short(
    roles: Sequence[LiveRole],
    observed: Sequence[RoleObservation],
    update_revision: str,
    spec: RolloutSpec,
    written: StepRecord | None = None,
) -> CutShort | None:
    """The half-written step the controller finishes (`written` as in `plan`), if any.

    None also when finishing it would not be a step the planner could take now: a role it did not
    reach must move within its surge and unavailability budgets at today's desired replicas (a
    scale since, or a record no controller wrote, is planned afresh instead).
    """
    views = [_lws_view(r, update_revision) for r in roles if r.lws is not None]
    last = step_record.latest([v.record for v in views])
    if not step_record.newer(last, written):
        return None
    assert last is not None
    missing = step_record.unwritten(last, views, update_revision)
    if not missing:
        return None
    targets = last.to_dict()
    by_name = {o.name: o for o in observed}
    # A role already at its target only lacks the step's record: writing that moves no group, so
    # neither its readiness nor its budgets hold the step up (else never-ready old groups there
    # would be waited for, where the planner recreates them).
    at_target = {v.name for v in views if (v.replicas, v.partition) == targets.get(v.name) and v.on_revision}
    moving = [n for n in missing if n not in at_target]
    if any(by_name[n].abandoned for n in moving):
        return None  # the planner recreates never-ready groups first; waiting for them never ends
    roles_by_name = {r.name: r for r in roles}
    unready = [n for n in moving if _kept_unready(roles_by_name[n], by_name[n], targets[n], update_revision)]
    if not all(step_fits(by_name[n], spec, RoleAction(*targets[n])) for n in moving):
        return None
    return CutShort(last, missing, unready)


def _kept_unready(
    role: LiveRole, obs: RoleObservation, target: tuple[int, int], update_revision: str
) -> bool:
    """Whether a group that a step to `target` (replicas, partition) keeps as it is is not ready.
    The groups it recreates or deletes are not waited for: when they never start (the reason for a
    recreate step; a surge group the step removes), waiting for them never ends (helper-86)."""
    target_replicas, target_partition = target
    groups = {g.index: g for g in role.groups}
    for i in range(min(obs.replicas, target_replicas)):
        if target_partition <= i < obs.partition:
            continue
        g = groups.get(i)
        if g is None or not g.ready or (i >= obs.partition and g.revision != update_revision):
            return True
    return False


def _lws_view(role: LiveRole, update_revision: str) -> step_record.LwsView:
    assert role.lws is not None
    replicas, partition = lws_replicas_partition(role.lws)
    return step_record.LwsView(
        role.name,
        replicas,
        partition,
        lws_revision(role.lws) == update_revision,
        step_record.read(role.lws),
    )

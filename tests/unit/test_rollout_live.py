"""From live LWS/pod objects to planner observations and back (pure)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pdorch.roles.labels import (
    ANNOTATION_ROLLOUT,
    ANNOTATION_ROLLOUT_STEP,
    LABEL_REVISION,
    LWS_GROUP_INDEX,
    LWS_SIZE,
    LWS_WORKER_INDEX,
)
from pdorch.rollout import live, step_record
from pdorch.rollout.planner import auto_tolerance, initial_state, simulate
from pdorch.rollout.state import RolloutSpec

pytestmark = pytest.mark.unit

OLD, NEW = "aaaaaaaaaa", "bbbbbbbbbb"


def _lws(replicas: int, partition: int, revision: str) -> dict[str, Any]:
    return {
        "spec": {
            "replicas": replicas,
            "leaderWorkerTemplate": {"workerTemplate": {"metadata": {"labels": {LABEL_REVISION: revision}}}},
            "rolloutStrategy": {"rollingUpdateConfiguration": {"partition": partition}},
        }
    }


def _pod(
    index: int, revision: str, ready: bool = True, worker: int = 0, terminating: bool = False
) -> dict[str, Any]:
    md: dict[str, Any] = {
        "labels": {LWS_GROUP_INDEX: str(index), LWS_WORKER_INDEX: str(worker), LABEL_REVISION: revision}
    }
    if terminating:
        md["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": md,
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_group_states_need_every_pod_ready_and_staying() -> None:
    pods = [
        _pod(0, OLD),
        _pod(0, OLD, worker=1),
        _pod(1, NEW),
        _pod(1, NEW, worker=1, ready=False),
        _pod(2, NEW),  # worker missing
        _pod(3, OLD, terminating=True),
        _pod(3, OLD, worker=1),
    ]
    states = {g.index: g for g in live.group_states(pods, size=2)}
    assert states[0] == live.GroupState(0, OLD, True)
    assert not states[1].ready and states[1].revision == NEW
    assert not states[2].ready
    assert not states[3].ready


def test_group_states_judge_each_group_by_the_size_it_was_created_with() -> None:
    # roles[].size 1 -> 2: the old one-pod groups are complete; a new group needs its worker.
    def sized(pod: dict[str, Any], size: int) -> dict[str, Any]:
        pod["metadata"]["annotations"] = {LWS_SIZE: str(size)}
        return pod

    pods = [sized(_pod(0, OLD), 1), sized(_pod(1, NEW), 2), sized(_pod(2, NEW), 2), _pod(2, NEW, worker=1)]
    states = {g.index: g for g in live.group_states(pods, size=2)}
    assert states[0].ready
    assert not states[1].ready
    assert states[2].ready


def test_group_states_ignore_pods_without_a_group_index() -> None:
    assert live.group_states([{"metadata": {"labels": {}}, "status": {}}], 1) == ()


def test_observe_before_the_new_template_is_in_counts_everything_old() -> None:
    role = live.LiveRole(
        "prefill", "prefill", 4, _lws(4, 0, OLD), tuple(live.GroupState(i, OLD, True) for i in range(4))
    )
    obs = live.observe(role, NEW)
    assert (obs.partition, obs.old_total, obs.new_total, obs.old_ready, obs.new_ready) == (4, 4, 0, 4, 0)


def test_observe_slots_above_the_partition_must_run_the_new_revision() -> None:
    groups = (
        live.GroupState(0, OLD, True),
        live.GroupState(1, OLD, True),
        live.GroupState(2, OLD, True),  # LWS has not recreated it yet: not ready as a new slot
        live.GroupState(3, NEW, True),
        live.GroupState(4, NEW, False),
    )
    obs = live.observe(live.LiveRole("prefill", "prefill", 4, _lws(5, 2, NEW), groups), NEW)
    assert (obs.partition, obs.old_total, obs.new_total) == (2, 2, 3)
    assert (obs.old_ready, obs.new_ready, obs.surge) == (2, 1, 1)
    assert not obs.all_ready


def test_is_rolling() -> None:
    assert not live.is_rolling([live.LiveRole("p", "prefill", 2, _lws(2, 0, NEW))], NEW)
    assert live.is_rolling([live.LiveRole("p", "prefill", 2, _lws(2, 0, OLD))], NEW)
    assert live.is_rolling([live.LiveRole("p", "prefill", 2, _lws(2, 1, NEW))], NEW)
    assert not live.is_rolling([live.LiveRole("p", "prefill", 2, None)], NEW)


def _ready_role(name: str, typ: str, n: int, rev: str) -> live.LiveRole:
    return live.LiveRole(
        name, typ, n, _lws(n, 0, rev), tuple(live.GroupState(i, rev, True) for i in range(n))
    )


def test_plan_is_inactive_without_a_template_change() -> None:
    roles = [_ready_role("prefill", "prefill", 4, NEW), _ready_role("decode", "decode", 2, NEW)]
    plan = live.plan(roles, NEW, RolloutSpec(2, 1, 0.0, "25%", "25%"))
    assert not plan.active and plan.actions == {}
    assert plan.cohorts == {NEW: {"prefill": 4, "decode": 2}}


def test_plan_first_step_moves_both_roles_on_ratio() -> None:
    roles = [_ready_role("prefill", "prefill", 8, OLD), _ready_role("decode", "decode", 4, OLD)]
    plan = live.plan(roles, NEW, RolloutSpec(2, 1, None, "25%", "25%"))
    assert plan.active and plan.decision is not None and plan.decision.kind == "step"
    (rp, kp), (rd, kd) = plan.actions["prefill"], plan.actions["decode"]
    assert kp * 1 == kd * 2 and (rp - kp) == 2 * (rd - kd)  # both cohorts exactly 2:1
    assert rp <= 10 and rd <= 5 and kp < 8 and kd < 4
    assert plan.tolerance == 0.0


def test_plan_waits_while_a_new_slot_is_not_ready() -> None:
    groups = tuple(live.GroupState(i, OLD if i < 6 else NEW, i != 7) for i in range(8))
    prefill = live.LiveRole("prefill", "prefill", 8, _lws(8, 6, NEW), groups)
    decode = live.LiveRole(
        "decode",
        "decode",
        4,
        _lws(4, 3, NEW),
        tuple(live.GroupState(i, OLD if i < 3 else NEW, True) for i in range(4)),
    )
    plan = live.plan([prefill, decode], NEW, RolloutSpec(2, 1, 0.0, 1, 1))
    assert plan.decision is not None and plan.decision.kind == "wait"
    assert plan.actions == {"prefill": (8, 6), "decode": (4, 3)}  # hold


def test_paused_holds_partitions_but_switches_templates_with_partition_equal_replicas() -> None:
    roles = [_ready_role("prefill", "prefill", 2, OLD), _ready_role("decode", "decode", 1, OLD)]
    plan = live.plan(roles, NEW, RolloutSpec(2, 1, 0.5, 1, 1, paused=True))
    assert plan.decision is not None and plan.decision.kind == "paused"
    assert plan.actions == {"prefill": (2, 2), "decode": (1, 1)}


def test_max_cohort_deviation() -> None:
    assert live.max_cohort_deviation({OLD: {"prefill": 4, "decode": 2}}, 2, 1) == 0.0
    assert live.max_cohort_deviation({OLD: {"prefill": 3, "decode": 2}}, 2, 1) == pytest.approx(0.25)
    assert live.max_cohort_deviation({NEW: {"prefill": 1}}, 2, 1) == 1.0


def test_auto_tolerance_is_the_smallest_that_completes() -> None:
    spec = RolloutSpec(2, 1, None, 0, 1)
    tol = auto_tolerance(initial_state([("p", "prefill", 8), ("d", "decode", 4)]), spec)
    # maxUnavailable 1 without surge cannot move 2 prefills per decode: one role runs ahead.
    assert 0 < tol <= 1
    # Exact 2:1 steps are possible with 25% budgets.
    assert (
        auto_tolerance(
            initial_state([("p", "prefill", 8), ("d", "decode", 4)]), RolloutSpec(2, 1, None, "25%", "25%")
        )
        == 0.0
    )


def test_surge_is_removed_only_after_every_group_is_ready() -> None:
    marked = _lws(10, 0, NEW)
    marked["metadata"] = {"annotations": {ANNOTATION_ROLLOUT: NEW}}
    # Partitions are 0 and the revision matches, but the marker says the rollout is not over.
    not_ready = tuple(live.GroupState(i, NEW, i >= 2) for i in range(10))
    prefill = live.LiveRole("prefill", "prefill", 8, marked, not_ready)
    assert live.is_rolling([prefill], NEW)
    plan = live.plan([prefill], NEW, RolloutSpec(2, 1, 0.0, 2, 2))
    assert plan.active and plan.decision is not None and plan.decision.kind == "wait"
    assert plan.actions == {"prefill": (10, 0)}  # surge kept while groups 0 and 1 start
    ready = live.LiveRole(
        "prefill", "prefill", 8, marked, tuple(live.GroupState(i, NEW, True) for i in range(10))
    )
    plan = live.plan([ready], NEW, RolloutSpec(2, 1, 0.0, 2, 2))
    assert plan.actions == {"prefill": (8, 0)}  # then removed
    done = _lws(8, 0, NEW)
    done["metadata"] = marked["metadata"]
    final = live.LiveRole(
        "prefill", "prefill", 8, done, tuple(live.GroupState(i, NEW, True) for i in range(8))
    )
    plan = live.plan([final], NEW, RolloutSpec(2, 1, 0.0, 2, 2))
    assert not plan.active and plan.decision is not None and plan.decision.kind == "done"


def test_a_plain_scale_down_is_not_a_rollout() -> None:
    assert not live.is_rolling([live.LiveRole("p", "prefill", 4, _lws(6, 0, NEW))], NEW)


def test_without_spec_ratio_the_rollout_ratio_follows_the_current_desired_replicas() -> None:
    # An autoscaled group: roles[].replicas (2P:1D) is only the initial size; the scalers move it.
    from pathlib import Path

    import yaml

    from pdorch.api.servinggroup import ServingGroup
    from pdorch.rollout.commands import rollout_spec

    doc = yaml.safe_load((Path(__file__).parents[2] / "examples/sim-pd/servinggroup.yaml").read_text())
    doc["spec"].pop("ratio", None)
    sg = ServingGroup.model_validate(doc)
    assert (rollout_spec(sg).ratio_p, rollout_spec(sg).ratio_d) == (2, 1)
    now = rollout_spec(sg, desired={"prefill": 6, "decode": 3, "proxy": 5})
    assert (now.ratio_p, now.ratio_d) == (2, 1)
    now = rollout_spec(sg, desired={"prefill": 3, "decode": 3})
    assert (now.ratio_p, now.ratio_d) == (1, 1)
    doc["spec"]["ratio"] = {"prefill": 2, "decode": 1}
    declared = rollout_spec(ServingGroup.model_validate(doc), desired={"prefill": 3, "decode": 3})
    assert (declared.ratio_p, declared.ratio_d) == (2, 1)


def test_observe_reports_the_old_groups_revisions_from_the_bottom() -> None:
    # A was rolling to B (partition 2 of 5) when C arrived (template C held at partition = replicas).
    pods = [_pod(1, OLD), _pod(2, NEW), _pod(3, NEW), _pod(4, NEW)]  # group 0's pods are gone
    role = live.LiveRole("prefill", "prefill", 5, _lws(5, 5, "cccccccccc"), live.group_states(pods, 1))
    obs = live.observe(role, "cccccccccc")
    assert obs.old_revisions == ((OLD, 2), (NEW, 3))
    assert obs.partition == 5 and obs.old_ready == 4


def test_observe_clamps_a_partition_above_hand_scaled_replicas() -> None:
    role = live.LiveRole("decode", "decode", 4, _lws(1, 3, NEW), live.group_states([_pod(0, OLD)], 1))
    obs = live.observe(role, NEW)
    assert (obs.partition, obs.old_total, obs.new_total, obs.old_ready) == (1, 1, 0, 1)


@pytest.mark.parametrize("target", [OLD, "cccccccccc"], ids=["rollback", "fix-forward"])
def test_never_ready_groups_of_an_abandoned_revision_are_recreated_not_waited_for(target: str) -> None:
    """A rollout to NEW (whose pods never schedule) added surge groups 4-5 and 2 on top; then a
    rollback to OLD or a newer spec replaced it. Those groups are now old-side and will never be
    ready: the planner recreates them on the current template instead of waiting forever (it used
    to hold the group at reduced capacity with RolloutStalled)."""

    def role(name: str, desired: int, surge: int) -> live.LiveRole:
        n = desired + surge
        groups = tuple(live.GroupState(i, OLD if i < desired else NEW, i < desired) for i in range(n))
        return live.LiveRole(name, name, desired, _lws(n, n, target), groups)

    roles = [role("prefill", 4, 2), role("decode", 2, 1)]
    plan = live.plan(roles, target, RolloutSpec(2, 1, None, "25%", "25%"))
    assert plan.decision is not None and plan.decision.kind == "step", plan.decision
    assert plan.actions == {"prefill": (6, 4), "decode": (3, 2)}  # partitions drop below them
    assert [o.abandoned for o in plan.observations] == [2, 1]
    # Recreated on the current template, they are new groups the plan waits for as usual.
    recreated = [
        live.LiveRole(
            r.name,
            r.type,
            r.desired,
            _lws(r.desired + s, r.desired, target),
            tuple(
                live.GroupState(i, OLD if i < r.desired else target, i < r.desired)
                for i in range(r.desired + s)
            ),
        )
        for r, s in zip(roles, (2, 1), strict=True)
    ]
    after = live.plan(recreated, target, RolloutSpec(2, 1, None, "25%", "25%"))
    assert after.decision is not None and after.decision.kind == "wait"


def test_an_unready_group_of_the_base_revision_is_waited_for() -> None:
    """A crashed old group (the revision everything else runs) is not abandoned: waited for."""
    groups = tuple(live.GroupState(i, OLD, i != 3) for i in range(4))
    prefill = live.LiveRole("prefill", "prefill", 4, _lws(4, 4, NEW), groups)
    decode = _ready_role("decode", "decode", 2, OLD)
    decode = live.LiveRole("decode", "decode", 2, _lws(2, 2, NEW), decode.groups)
    plan = live.plan([prefill, decode], NEW, RolloutSpec(2, 1, None, "25%", "25%"))
    assert plan.decision is not None and plan.decision.kind == "wait"
    assert [o.abandoned for o in plan.observations] == [0, 0]


def test_a_refused_rollout_put_back_is_over_not_refused_again() -> None:
    """3P:2D at tolerance 0 with maxSurge 1 and maxUnavailable 0 is refused before anything moves
    (the templates went in at partition = replicas). Putting the spec back (a rollback) left every
    group on the update revision, yet it was planned as a rollout from them to themselves and
    refused again, for ever (helper-86). It is over: partitions 0, nothing recreated."""
    spec = RolloutSpec(3, 2, 0.0, 1, 0)

    def role(name: str, n: int, template: str) -> live.LiveRole:
        return live.LiveRole(
            name, name, n, _lws(n, n, template), tuple(live.GroupState(i, OLD, True) for i in range(n))
        )

    refused = live.plan([role("prefill", 3, OLD), role("decode", 2, OLD)], NEW, spec)
    assert refused.decision is not None and refused.decision.kind == "blocked"
    back = live.plan([role("prefill", 3, NEW), role("decode", 2, NEW)], OLD, spec)
    assert back.decision is not None and back.decision.kind == "done", back.decision
    assert not back.active and back.actions == {}


def test_a_role_moved_whole_to_a_never_ready_revision_is_recreated_after_a_rollback() -> None:
    """Two decode roles of one group each: the first step moved decode-b's only group (index 0)
    to NEW, which never gets ready; then a rollback to OLD. Judged against its own index 0, that
    group was on the 'base' revision and waited for, for ever (helper-86); judged against the
    revision the group ran before (status.currentRevision) it is abandoned and recreated."""
    prefill = live.LiveRole(
        "prefill",
        "prefill",
        2,
        _lws(2, 2, NEW),
        (live.GroupState(0, OLD, True), live.GroupState(1, OLD, True)),
    )
    decode_a = live.LiveRole("decode-a", "decode", 1, _lws(1, 1, NEW), (live.GroupState(0, OLD, True),))
    decode_b = live.LiveRole("decode-b", "decode", 1, _lws(1, 1, NEW), (live.GroupState(0, NEW, False),))
    spec = RolloutSpec(1, 1, 0.0, 0, 1)
    stuck = live.plan([prefill, decode_a, decode_b], OLD, spec)
    assert stuck.decision is not None and stuck.decision.kind == "wait"  # no base: as before
    plan = live.plan([prefill, decode_a, decode_b], OLD, spec, base_revision=OLD)
    assert plan.decision is not None and plan.decision.kind == "step", plan.decision
    assert plan.actions["decode-b"] == (1, 0) and plan.actions["decode-a"] == (1, 1)
    assert [o.abandoned for o in plan.observations] == [0, 0, 1]


def test_a_never_ready_surge_group_beside_a_ready_one_of_its_revision_is_recreated() -> None:
    """A rollout to NEW added two surge groups: one got ready, one never does; then a rollback.
    The ready one does not make its never-ready sibling one to wait for (helper-88)."""
    groups = (*(live.GroupState(i, OLD, True) for i in range(2)), live.GroupState(2, NEW, True))
    prefill = live.LiveRole(
        "prefill", "prefill", 2, _lws(4, 4, OLD), (*groups, live.GroupState(3, NEW, False))
    )
    decode = live.LiveRole(
        "decode", "decode", 2, _lws(2, 2, OLD), tuple(live.GroupState(i, OLD, True) for i in range(2))
    )
    plan = live.plan([prefill, decode], OLD, RolloutSpec(1, 1, None, 2, 1), base_revision=OLD)
    assert plan.decision is not None and plan.decision.kind == "step", plan.decision
    assert [o.abandoned for o in plan.observations] == [1, 0]


def _written(role: live.LiveRole, plan: live.RolloutPlan) -> live.LiveRole:
    """`role` after the controller's LWS write of `plan`, once LWS has recreated its groups."""
    replicas, partition = plan.actions[role.name]
    lws = _lws(replicas, partition, NEW)
    assert plan.step is not None
    lws["metadata"] = {"annotations": {ANNOTATION_ROLLOUT: NEW, ANNOTATION_ROLLOUT_STEP: plan.step.encode()}}
    groups = tuple(live.GroupState(i, OLD if i < partition else NEW, True) for i in range(replicas))
    return live.LiveRole(role.name, role.type, role.desired, lws, groups)


def _without_records(role: live.LiveRole) -> live.LiveRole:
    assert role.lws is not None
    return live.LiveRole(role.name, role.type, role.desired, {"spec": role.lws["spec"]}, role.groups)


def _finish(roles: list[live.LiveRole], spec: RolloutSpec, written: step_record.StepRecord | None) -> int:
    """Plan and write every step to the end (no interruption); the number of steps."""
    for n in range(200):
        plan = live.plan(roles, NEW, spec, written)
        assert plan.decision is not None
        if plan.decision.kind == "done":
            return n
        assert plan.decision.kind == "step", plan.decision.reason
        roles = [_written(r, plan) for r in roles]
        written = plan.step
    raise AssertionError("the rollout did not finish")


def _three_roles() -> tuple[list[live.LiveRole], RolloutSpec]:
    """Two prefill roles (1 and 3 groups) and a decode (3), all old and ready, at 1:1 with
    tolerance 0: step 1 moves all three, and its half without d0 is blocked for the planner alone."""
    roles = [_ready_role("p0", "prefill", 1, OLD), _ready_role("p1", "prefill", 3, OLD)]
    return [*roles, _ready_role("d0", "decode", 3, OLD)], RolloutSpec(1, 1, 0.0, "25%", 1)


def test_a_step_whose_lws_writes_were_cut_short_is_finished_as_planned() -> None:
    """Two prefill roles and one decode at 1:1: the first step lowers all three partitions, and a
    controller stopped after writing both prefills leaves an old side of 2:1 that no single step
    of the planner mends. The restarted controller reads the step back from the LWS it wrote and
    writes the rest; the rollout then finishes."""
    roles, spec = _three_roles()
    first = live.plan(roles, NEW, spec)
    assert first.decision is not None and first.decision.kind == "step" and first.step is not None
    assert first.step.number == 1 and first.step.to_dict() == first.actions
    half = [_written(r, first) if r.type == "prefill" else r for r in roles]

    alone = live.plan([_without_records(r) for r in half], NEW, spec)
    assert alone.decision is not None and alone.decision.kind == "blocked"

    resumed = live.plan(half, NEW, spec)  # a new controller: it wrote nothing itself
    assert resumed.decision is not None and resumed.decision.kind == "step"
    assert resumed.decision.reason == "finish step 1, whose write of d0 was cut short"
    assert resumed.actions == first.actions and resumed.step == first.step
    assert _finish([_written(r, resumed) for r in half], spec, resumed.step) > 0


def test_a_cut_short_recreate_of_old_groups_that_never_start_is_not_waited_for() -> None:
    """OLD's pods never start, so the spec is fixed to NEW and the planner recreates every old
    group at once; the controller stopped after writing prefill's part. Finishing the step waited
    for decode's readiness, i.e. for the very groups the step recreates: for ever (helper-86)."""
    never = tuple(live.GroupState(i, OLD, False) for i in range(2))
    roles = [
        live.LiveRole("prefill", "prefill", 2, _lws(2, 2, NEW), never),
        live.LiveRole("decode", "decode", 1, _lws(1, 1, NEW), never[:1]),
    ]
    spec = RolloutSpec(2, 1, None, "25%", 1)
    first = live.plan(roles, NEW, spec)
    assert first.decision is not None and first.decision.kind == "step" and first.step is not None
    assert first.actions == {"prefill": (2, 0), "decode": (1, 0)}
    lws = _lws(2, 0, NEW)
    lws["metadata"] = {"annotations": {ANNOTATION_ROLLOUT: NEW, ANNOTATION_ROLLOUT_STEP: first.step.encode()}}
    prefill = live.LiveRole(
        "prefill", "prefill", 2, lws, tuple(live.GroupState(i, NEW, False) for i in range(2))
    )
    resumed = live.plan([prefill, roles[1]], NEW, spec)  # a new controller: it wrote nothing itself
    assert resumed.decision is not None and resumed.decision.kind == "step", resumed.decision
    assert resumed.actions["decode"] == (1, 0)


def test_the_step_a_controller_wrote_itself_is_not_redone_while_the_cache_lags() -> None:
    roles, spec = _three_roles()
    first = live.plan(roles, NEW, spec)
    lagging = [_written(r, first) if r.type == "prefill" else r for r in roles]
    again = live.plan(lagging, NEW, spec, written=first.step)
    assert again.decision is not None and "finish step" not in again.decision.reason


@settings(max_examples=150, deadline=None)
@given(
    ratio=st.sampled_from([(1, 1), (2, 1), (3, 1), (1, 2), (3, 2)]),
    sizes=st.lists(st.integers(1, 8), min_size=3, max_size=5),
    n_prefill=st.integers(1, 2),
    surge=st.sampled_from([1, 2, "25%", "50%"]),
    unavailable=st.sampled_from([0, 1, "25%"]),
    cuts=st.lists(st.integers(0, 31), max_size=40),
)
# Found by this test: finishing step 2 was cut before d4 (already at its target) got the step's
# record, so after step 3 was cut too d4 was two records behind and step 3 could not be finished
# (the planner, from that half-written state, found no step: blocked).
@example(ratio=(1, 1), sizes=[6, 2, 5, 6, 7], n_prefill=1, surge=2, unavailable=0, cuts=[0, 2, 13, 12])
def test_a_rollout_cut_short_between_lws_writes_any_number_of_times_finishes(
    ratio: tuple[int, int],
    sizes: list[int],
    n_prefill: int,
    surge: int | str,
    unavailable: int | str,
    cuts: list[int],
) -> None:
    """Several roles per type. At each step the controller may stop after writing only some of the
    LWS objects (`cuts`: a bit mask of the roles written, 0 = all); a new controller takes over. No
    state on the way is refused, and the rollout finishes."""
    roles = [
        _ready_role(f"p{i}" if i < n_prefill else f"d{i}", "prefill" if i < n_prefill else "decode", n, OLD)
        for i, n in enumerate(sizes)
    ]
    spec = RolloutSpec(*ratio, None, surge, unavailable)
    if live.plan(roles, NEW, spec).decision.kind != "step":  # type: ignore[union-attr]
        return  # refused before anything moves: not this test's concern
    written = None
    cut = iter(cuts)
    for _ in range(500):
        plan = live.plan(roles, NEW, spec, written)
        assert plan.decision is not None
        if plan.decision.kind == "done":
            return
        assert plan.decision.kind == "step", plan.decision.reason
        mask = next(cut, 0) % (1 << len(roles))
        if mask:
            roles = [_written(r, plan) if mask >> i & 1 else r for i, r in enumerate(roles)]
            written = None
        else:
            roles = [_written(r, plan) for r in roles]
            written = plan.step
    raise AssertionError("the rollout did not finish")


def test_a_role_changed_after_the_step_was_written_is_planned_afresh() -> None:
    """A half-written step, but one of the roles that carries it was scaled by hand since: the
    step is left behind (finishing it would undo the edit), and the planner plans from the state."""
    roles, spec = _three_roles()
    first = live.plan(roles, NEW, spec)
    half = [_written(r, first) if r.name != "p1" else r for r in roles]
    assert live.plan(half, NEW, spec).decision.reason.startswith("finish step 1")  # type: ignore[union-attr]
    assert half[2].lws is not None
    half[2].lws["spec"]["replicas"] += 1
    plan = live.plan(half, NEW, spec)
    assert plan.decision is not None and "finish step" not in plan.decision.reason


def test_a_half_written_step_of_a_replaced_rollout_is_not_finished_after_a_rollback() -> None:
    """Rolling to NEW, then to a third revision whose first step was cut short, then back to NEW:
    the LWS that the third revision's step reached carry its record, so NEW's older step is not
    forced onto them; the planner plans from the state."""
    roles, spec = _three_roles()
    first = live.plan(roles, NEW, spec)
    done = [_written(r, first) for r in roles]
    assert done[2].lws is not None
    other = step_record.StepRecord.of(1, "cccccccccc", {"p0": (1, 0), "p1": (3, 3), "d0": (3, 3)})
    done[2].lws["metadata"]["annotations"][ANNOTATION_ROLLOUT_STEP] = other.encode()
    done[2].lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]["partition"] = 3
    plan = live.plan(done, NEW, spec)
    assert plan.decision is not None and "finish step" not in plan.decision.reason


def test_every_lws_of_a_step_carries_the_same_numbered_record_until_the_next_step() -> None:
    roles = [_ready_role("prefill", "prefill", 8, OLD), _ready_role("decode", "decode", 4, OLD)]
    spec = RolloutSpec(2, 1, 0.0, "25%", "25%")
    first = live.plan(roles, NEW, spec)
    assert first.step is not None
    done = [_written(r, first) for r in roles]
    # Recreated groups not ready yet: the controller waits and keeps the record it wrote.
    waiting = [live.LiveRole(r.name, r.type, r.desired, r.lws, r.groups[:-1]) for r in done]
    held = live.plan(waiting, NEW, spec, written=first.step)
    assert held.decision is not None and held.decision.kind == "wait" and held.step is None
    assert held.records == {"prefill": first.step, "decode": first.step}
    second = live.plan(done, NEW, spec, written=first.step)
    assert second.step is not None and second.step.number == 2 and second.step.to_dict() == second.actions


def test_a_pass_that_writes_no_step_stamps_no_record_on_an_lws_without_it() -> None:
    """A wait (or pause) after a cut-short write keeps each LWS's own record: stamping the newest
    on the LWS it never reached would pair that record with values it never had."""
    roles, spec = _three_roles()
    first = live.plan(roles, NEW, spec)
    half = [_written(r, first) if r.name != "d0" else r for r in roles]
    # A new group of p1 is not ready yet; d0 is: the step is finished at once, and a paused
    # group's hold carries each LWS's own record.
    paused = live.plan(half, NEW, replace(spec, paused=True), written=None)
    assert paused.decision is not None and paused.decision.reason.startswith("finish step 1")
    # d0's group 0 crashed: one the step keeps (a group the step recreates is not waited for).
    crashed = [
        live.LiveRole(r.name, r.type, r.desired, r.lws, r.groups[1:]) if r.name == "d0" else r for r in half
    ]
    held = live.plan(crashed, NEW, spec)
    assert held.decision is not None and held.decision.kind == "wait", held.decision
    assert "to finish step 1" in held.decision.reason
    assert held.records == {"p0": first.step, "p1": first.step, "d0": None}


def test_steps_are_numbered_on_from_a_replaced_rollouts_records() -> None:
    """The LWS still carry step 5 of a rollout to another revision that was replaced before it
    ended: the rollout to NEW numbers its first step 6, so a cut-short step 6 is told apart from
    that rollout's steps and finished, while an LWS recreated without any record is not forced."""
    roles, spec = _three_roles()
    other = step_record.StepRecord.of(5, "cccccccccc", {"p0": (1, 1), "p1": (3, 3), "d0": (3, 3)})
    for r in roles:
        assert r.lws is not None
        r.lws["metadata"] = {"annotations": {ANNOTATION_ROLLOUT_STEP: other.encode()}}
    first = live.plan(roles, NEW, spec)
    assert first.step is not None and first.step.number == 6
    half = [_written(r, first) if r.name != "d0" else r for r in roles]
    retry = live.plan(half, NEW, spec)
    assert retry.decision is not None and retry.decision.reason.startswith("finish step 6")
    recreated = live.LiveRole("d0", "decode", 3, _lws(3, 0, OLD), half[2].groups)
    plan = live.plan([*half[:2], recreated], NEW, spec)
    assert plan.decision is not None and "finish step" not in plan.decision.reason


def test_a_finish_that_no_longer_fits_the_budgets_is_planned_afresh() -> None:
    """Decode scaled down from 4 to 2 after step 1 reached only prefill: raising decode to 5
    groups would exceed desired + maxSurge, so the planner plans from the state instead. A record
    no controller wrote (recreating every decode group at once) is refused the same way."""
    roles = [_ready_role("prefill", "prefill", 8, OLD), _ready_role("decode", "decode", 4, OLD)]
    spec = RolloutSpec(2, 1, None, "25%", "25%")
    first = live.plan(roles, NEW, spec)
    assert first.actions["decode"][0] == 5
    half = [_written(roles[0], first), live.LiveRole("decode", "decode", 2, roles[1].lws, roles[1].groups)]
    plan = live.plan(half, NEW, spec)
    assert plan.decision is not None and "finish step" not in plan.decision.reason
    assert plan.actions["decode"][0] <= 3
    forged = step_record.StepRecord.of(1, NEW, {"prefill": first.actions["prefill"], "decode": (4, 0)})
    prefill = _written(roles[0], first)
    assert prefill.lws is not None
    prefill.lws["metadata"]["annotations"][ANNOTATION_ROLLOUT_STEP] = forged.encode()
    plan = live.plan([prefill, roles[1]], NEW, spec)
    assert plan.decision is not None and "finish step" not in plan.decision.reason


def test_a_lagging_watch_cache_is_held_at_the_step_written_not_written_back() -> None:
    """After step 2 was written in full, the cache still shows decode at step 1: the pass holds
    every role at step 2's targets instead of writing decode's older values back."""
    roles = [_ready_role("prefill", "prefill", 8, OLD), _ready_role("decode", "decode", 4, OLD)]
    spec = RolloutSpec(2, 1, 0.0, "25%", "25%")
    first = live.plan(roles, NEW, spec)
    after_first = [_written(r, first) for r in roles]
    second = live.plan(after_first, NEW, spec, written=first.step)
    assert second.step is not None and second.step.number == 2
    lagging = [_written(after_first[0], second), after_first[1]]
    plan = live.plan(lagging, NEW, spec, written=second.step)
    assert plan.decision is not None and plan.decision.kind == "wait"
    assert plan.actions == second.actions and plan.records == dict.fromkeys(plan.records, second.step)
    # Long after the write, the older record is a change since (say, removed by hand), not a lag:
    # the rollout is not held for good.
    later = live.plan(lagging, NEW, spec, written=second.step, cache_may_lag=False)
    assert later.decision is not None and "watch cache" not in later.decision.reason


def test_a_step_written_before_a_new_spec_is_not_held_under_the_new_template() -> None:
    """Step 2 went out in full and the cache still shows decode at step 1 when a new spec arrives:
    holding at step 2 would put the new template in at step 2's partitions (every group above
    them recreated at once), so the pass is the planner's."""
    roles = [_ready_role("prefill", "prefill", 8, OLD), _ready_role("decode", "decode", 4, OLD)]
    spec = RolloutSpec(2, 1, 0.0, "25%", "25%")
    first = live.plan(roles, NEW, spec)
    after_first = [_written(r, first) for r in roles]
    second = live.plan(after_first, NEW, spec, written=first.step)
    lagging = [_written(after_first[0], second), after_first[1]]
    plan = live.plan(lagging, "cccccccccc", spec, written=second.step)
    assert plan.decision is not None and "watch cache" not in plan.decision.reason


def test_a_cut_short_step_whose_role_has_abandoned_groups_is_left_to_the_planner() -> None:
    """The rest of the step was to recreate a role's never-ready groups of a replaced revision:
    waiting for that role's readiness would wait for the very groups the step replaces."""
    roles = [_ready_role("prefill", "prefill", 8, OLD), _ready_role("decode", "decode", 4, OLD)]
    spec = RolloutSpec(2, 1, 0.0, "25%", "25%")
    first = live.plan(roles, NEW, spec)
    assert first.step is not None
    # Step 1's new groups never became ready (a bad image); then a fix, revision C.
    stuck = []
    for r in roles:
        written = _written(r, first)
        replicas, partition = first.actions[r.name]
        groups = tuple(
            live.GroupState(i, OLD if i < partition else NEW, i < partition) for i in range(replicas)
        )
        stuck.append(live.LiveRole(r.name, r.type, r.desired, written.lws, groups))
    fix = "cccccccccc"
    recreate = live.plan(stuck, fix, spec, written=first.step)
    assert recreate.decision is not None and recreate.decision.reason.startswith("recreate never-ready")
    assert recreate.step is not None
    prefill = stuck[0]
    assert prefill.lws is not None
    replicas, partition = recreate.actions["prefill"]
    lws = _lws(replicas, partition, fix)
    lws["metadata"] = {
        "annotations": {ANNOTATION_ROLLOUT: fix, ANNOTATION_ROLLOUT_STEP: recreate.step.encode()}
    }
    half = [live.LiveRole("prefill", "prefill", 8, lws, prefill.groups), stuck[1]]
    plan = live.plan(half, fix, spec)
    assert plan.decision is not None and plan.decision.kind == "step", plan.decision
    assert "waiting for readiness" not in plan.decision.reason


@pytest.mark.parametrize(
    "value",
    [
        "",
        "{}",
        "not json",
        '{"n":1,"revision":"x","to":{"p":[1]}}',
        '{"n":1,"revision":"x","to":{"p":[1,2]}}',  # partition above replicas
        '{"n":"1","revision":"x","to":{"p":[1,0]}}',
        '{"n":1,"revision":"x","to":["p"]}',
        '{"n":true,"revision":"x","to":{"p":[1,0]}}',
        '{"n":1,"revision":"x","to":{"p":[true,false]}}',
        '{"n":1,"revision":"x","to":{"p":[-1,-2]}}',
        "[" * 5000 + "]" * 5000,
        '{"n":1,"revision":"' + "x" * 40_000 + '","to":{}}',
    ],
)
def test_an_unreadable_step_record_is_ignored(value: str) -> None:
    assert step_record.decode(value) is None


def test_a_step_record_reads_back_what_it_wrote() -> None:
    record = step_record.StepRecord.of(3, NEW, {"decode": (5, 1), "prefill": (10, 2)})
    assert step_record.decode(record.encode()) == record
    assert record.encode() == ('{"n":3,"revision":"bbbbbbbbbb","to":{"decode":[5,1],"prefill":[10,2]}}')


def test_a_cut_step_whose_unwritten_role_is_at_target_does_not_wait_for_its_never_ready_groups() -> None:
    """helper-74 B2: step 1 reached p0 and d0; d1 was already at its target and only lacked the
    record, while every old group is down for good. Finishing the step writes d1's record (no
    group moves), so d1's readiness does not hold it up; the planner then recreates the old groups,
    as it did before a role at its target counted as missing."""
    step = step_record.StepRecord.of(1, NEW, {"p0": (3, 2), "d0": (3, 2), "d1": (2, 2)})

    def role(name: str, typ: str, replicas: int, record: step_record.StepRecord | None) -> live.LiveRole:
        lws = _lws(replicas, 2, NEW)
        lws["metadata"] = {"annotations": {ANNOTATION_ROLLOUT: NEW}}
        if record is not None:
            lws["metadata"]["annotations"][ANNOTATION_ROLLOUT_STEP] = record.encode()
        groups = [live.GroupState(0, OLD, False), live.GroupState(1, OLD, False)]
        groups += [live.GroupState(2, NEW, True)] if replicas == 3 else []
        return live.LiveRole(name, typ, 2, lws, tuple(groups))

    roles = [role("p0", "prefill", 3, step), role("d0", "decode", 3, step), role("d1", "decode", 2, None)]
    spec = RolloutSpec(1, 1, None, 1, 0)
    plan = live.plan(roles, NEW, spec, old_down_for=3600.0)
    assert plan.decision is not None and plan.decision.kind == "step", plan.decision
    assert plan.decision.reason == "finish step 1, whose write of d1 was cut short"
    written = [_written(r, plan) if r.name == "d1" else r for r in roles]
    written = [
        live.LiveRole(r.name, r.type, r.desired, r.lws, roles[i].groups) for i, r in enumerate(written)
    ]
    after = live.plan(written, NEW, spec, plan.step, old_down_for=3600.0)
    assert after.decision is not None and after.decision.kind == "step", after.decision
    assert "recreate" in after.decision.reason, after.decision.reason


def test_the_offline_simulation_of_a_layered_live_state_plans_as_the_controller() -> None:
    """A rollout to NEW half done (prefill OLD NEW NEW, decode OLD OLD NEW), then a newer spec: the
    old side holds two revisions. `pdorch plan --from-live` simulates from the live observations;
    it rebuilt the groups without their revisions, planned the old side as one cohort and showed a
    first step that leaves NEW's old groups one-sided, which the controller avoids (helper-86)."""
    newer = "cccccccccc"

    def role(name: str, revisions: list[str], partition: int) -> live.LiveRole:
        n = len(revisions)
        groups = tuple(live.GroupState(i, rev, True) for i, rev in enumerate(revisions))
        return live.LiveRole(name, name, n, _lws(n, partition, NEW), groups)

    roles = [role("prefill", [OLD, NEW, NEW], 1), role("decode", [OLD, OLD, NEW], 2)]
    spec = RolloutSpec(1, 1, 0.0, "100%", "34%")
    controller = live.plan(roles, newer, spec)
    assert controller.decision is not None and controller.decision.kind == "step"
    snaps = simulate(spec, [live.observe(r, newer) for r in roles], lambda *_: 1)
    first = next(s for s in snaps if s.decision.kind == "step")
    assert {r.name: (r.replicas, r.partition) for r in first.roles} == controller.actions
    assert snaps[-1].decision.kind == "done"


def test_a_cut_short_step_does_not_wait_for_a_surge_group_it_removes() -> None:
    """Step 3 removes the surge (prefill 3 -> 2, decode 2 -> 1 groups); the controller stopped
    after writing prefill's part, and decode's surge group has since stopped being ready (its
    engine crashed). Finishing the step deletes that group: waiting for it first waited as long as
    it stayed down."""
    step2 = step_record.StepRecord.of(2, NEW, {"prefill": (3, 0), "decode": (2, 0)})
    step3 = step_record.StepRecord.of(3, NEW, {"prefill": (2, 0), "decode": (1, 0)})

    def role(
        name: str, replicas: int, step: step_record.StepRecord, ready: tuple[bool, ...]
    ) -> live.LiveRole:
        lws = _lws(replicas, 0, NEW)
        lws["metadata"] = {"annotations": {ANNOTATION_ROLLOUT: NEW, ANNOTATION_ROLLOUT_STEP: step.encode()}}
        groups = tuple(live.GroupState(i, NEW, r) for i, r in enumerate(ready))
        return live.LiveRole(name, name, step3.to_dict()[name][0], lws, groups)

    spec = RolloutSpec(2, 1, None, 1, 1)
    roles = [role("prefill", 2, step3, (True, True)), role("decode", 2, step2, (True, False))]
    resumed = live.plan(roles, NEW, spec)  # a new controller: it wrote nothing itself
    assert resumed.decision is not None and resumed.decision.kind == "step", resumed.decision
    assert resumed.decision.reason == "finish step 3, whose write of decode was cut short"
    assert resumed.actions["decode"] == (1, 0)
    # Decode's kept group not ready: that one is waited for.
    down = [roles[0], role("decode", 2, step2, (False, True))]
    waiting = live.plan(down, NEW, spec)
    assert waiting.decision is not None and waiting.decision.kind == "wait", waiting.decision

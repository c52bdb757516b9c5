"""Status computation and intent diffing: pure functions the controller's quiet-when-idle rests on."""

from __future__ import annotations

import datetime as dt

import pytest

from pdorch.controller import status as st
from pdorch.controller.intent import (
    HASH_ANNOTATION,
    changed_by_others,
    intent_hash,
    is_subset,
    needs_apply,
    same_values,
    stamp,
    version_marker,
)

pytestmark = pytest.mark.unit


def _roles(p_ready: int, d_ready: int, x_ready: int = 1, updated: bool = True) -> list[st.RoleObservation]:
    def obs(name: str, t: str, want: int, ready: int) -> st.RoleObservation:
        return st.RoleObservation(name, t, want, want, ready, want if updated else 0, 0, True)

    return [
        obs("proxy", "proxy", 1, x_ready),
        obs("prefill", "prefill", 2, p_ready),
        obs("decode", "decode", 1, d_ready),
    ]


def _cond(status: dict, ctype: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_all_ready_is_available_and_complete() -> None:
    s = st.compute_status(3, _roles(2, 1), "abc", None)
    assert _cond(s, "Available")["status"] == "True"
    assert _cond(s, "Available")["reason"] == "AllRolesReady"
    assert _cond(s, "Progressing")["status"] == "False"
    assert _cond(s, "Invalid")["status"] == "False"
    assert s["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in s["conditions"])
    assert s["summary"] == {"proxy": "1/1", "prefill": "2/2", "decode": "1/1", "rollout": "Complete"}
    assert s["currentRevision"] == s["updateRevision"] == "abc"


def test_missing_decode_means_not_available() -> None:
    s = st.compute_status(1, _roles(2, 0), "abc", None)
    a = _cond(s, "Available")
    assert a["status"] == "False"
    assert "decode" in a["message"]


def test_partial_readiness_still_serves() -> None:
    s = st.compute_status(1, _roles(1, 1), "abc", None)
    assert _cond(s, "Available")["reason"] == "MinimumRolesReady"
    assert _cond(s, "Progressing")["status"] == "True"


def test_a_rollout_without_a_same_revision_pair_is_not_available() -> None:
    """Mid-rollout the ready counts can cover every role type while no revision has both a ready
    prefill and a ready decode (the old decode crashed, the new prefill still loads): the proxy
    pairs only within a revision, so nothing can be served (helper-80)."""
    roles = _roles(2, 1, updated=False)
    split = {"old": {"prefill": 2}, "new": {"decode": 1}}
    a = _cond(st.compute_status(4, roles, "new", None, "old", rolling=True, cohorts=split), "Available")
    assert (a["status"], a["reason"]) == ("False", "NoRevisionPair")
    assert "new: decode 1; old: prefill 2" in a["message"]
    paired = {"old": {"prefill": 1, "decode": 1}, "new": {"decode": 1, "prefill": 1}}
    a = _cond(st.compute_status(4, roles, "new", None, "old", rolling=True, cohorts=paired), "Available")
    assert a["status"] == "True"
    # No map (no rollout) or an empty one (the pod cache behind the LWS counts): the counts decide.
    for cohorts in (None, {}):
        assert (
            _cond(st.compute_status(4, roles, "new", None, cohorts=cohorts), "Available")["status"] == "True"
        )


def test_unchanged_world_gives_identical_status() -> None:
    first = st.compute_status(2, _roles(2, 1), "abc", None)
    again = st.compute_status(2, _roles(2, 1), "abc", first)
    assert again == first  # lastTransitionTime kept: the controller writes nothing


def test_a_restarted_controller_resumes_the_persisted_progress_clock() -> None:
    now = dt.datetime(2026, 12, 5, 12, 0, 0, tzinfo=dt.UTC)
    before = st.compute_status(2, _roles(2, 1, updated=False), "abc", None)
    before["lastProgressTime"] = "2026-12-05T11:50:00Z"
    same = st.compute_status(2, _roles(2, 1, updated=False), "abc", before)
    assert st.resumed_progress(before, same, now) == ("2026-12-05T11:50:00Z", 600.0)
    # A group became ready while no controller watched: that is progress, the clock restarts.
    moved = st.compute_status(2, _roles(1, 1, updated=False), "abc", before)
    assert st.resumed_progress(before, moved, now) is None
    assert st.resumed_progress({**before, "lastProgressTime": "yesterday"}, same, now) is None
    assert (
        st.resumed_progress({k: v for k, v in before.items() if k != "lastProgressTime"}, same, now) is None
    )
    # A clock that stepped back never gives a negative age.
    assert st.resumed_progress(before, same, now - dt.timedelta(hours=1)) == ("2026-12-05T11:50:00Z", 0.0)


def test_transition_time_moves_only_on_flip() -> None:
    before = st.compute_status(1, _roles(2, 0), "abc", None)
    for c in before["conditions"]:
        c["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    after = st.compute_status(1, _roles(2, 1), "abc", before)
    assert _cond(after, "Available")["lastTransitionTime"] != "2000-01-01T00:00:00Z"
    assert _cond(after, "Invalid")["lastTransitionTime"] == "2000-01-01T00:00:00Z"
    flips = {t[0] for t in st.transitions(before, after)}
    assert flips == {"Available", "Progressing"}


def test_invalid_status_names_the_problem_and_keeps_reporting_the_serving_lws() -> None:
    ok = st.compute_status(1, _roles(2, 1), "abc", None)
    ok["lastProgressTime"] = "2026-12-05T11:50:00Z"
    # The spec went invalid, then the decode's only group failed: status must say so, not keep
    # showing the last valid pass's 1/1 and Available Unknown.
    bad = st.compute_status(2, _roles(2, 0), "", ok, invalid="spec.roles[1].size: must be >= 1")
    inv = _cond(bad, "Invalid")
    assert inv["status"] == "True" and "spec.roles[1].size" in inv["message"]
    avail = _cond(bad, "Available")
    assert (avail["status"], avail["reason"]) == ("False", "RoleNotReady") and "decode" in avail["message"]
    assert _cond(bad, "Progressing")["reason"] == "SpecRejected"
    assert bad["summary"] == {"proxy": "1/1", "prefill": "2/2", "decode": "0/1", "rollout": "Invalid"}
    assert [r["readyReplicas"] for r in bad["roles"]] == [1, 2, 0]
    assert bad["observedGeneration"] == 2
    # Nothing is rolled out while invalid: the revisions and the progress clock stay as they were.
    assert (bad["currentRevision"], bad["updateRevision"], bad["lastProgressTime"]) == (
        "abc",
        "abc",
        "2026-12-05T11:50:00Z",
    )
    # Still serving under an invalid spec: Available stays True, not Unknown.
    serving = st.compute_status(2, _roles(2, 1), "", ok, invalid="spec.roles[1].size: must be >= 1")
    assert _cond(serving, "Available")["status"] == "True"
    # An unchanged world under the same invalid spec writes nothing.
    assert (
        st.compute_status(2, _roles(2, 1), "", serving, invalid="spec.roles[1].size: must be >= 1") == serving
    )


def test_an_unrecorded_revision_stays_unrecorded_while_the_spec_is_invalid() -> None:
    """RevisionRecordFailed is what makes the controller retry recording a revision; an invalid
    interlude dropped it, so the revision was never recorded and a false "Resolved" event went out
    (helper-80)."""
    ok = st.compute_status(1, _roles(2, 1), "abc", None)
    failed = st.condition(st.REVISION_RECORD_FAILED, True, "RecordRefused", "500", 1, [])
    ok["conditions"].append(failed)
    bad = st.compute_status(2, _roles(2, 1), "", ok, invalid="spec.roles[0].replicas: must be >= 0")
    assert _cond(bad, st.REVISION_RECORD_FAILED) == failed
    assert not [t for t in st.transitions(ok, bad) if t[0] == st.REVISION_RECORD_FAILED]


def test_a_scaler_held_by_a_stuck_rollout_says_so() -> None:
    srs = {"metadata": {"generation": 2}, "spec": {"servingGroup": "g", "role": "decode", "replicas": 2}}
    held = st.scaler_status((1, 3), srs, 1, "sel", applied=False, held_by_rollout="rollout paused")
    c = held["conditions"][0]
    assert (c["type"], c["status"], c["reason"]) == ("ScalingLimited", "True", "HeldByRollout")
    assert "spec.replicas 2" in c["message"] and "rollout paused" in c["message"]
    assert "observedGeneration" not in held  # the LWS did not get generation 2's replicas
    # Nothing scaled since the LWS got its size (generation observed): nothing is held, no Warning
    # on every autoscaled role of a paused rollout (helper-82).
    paused = {"applied": False, "held_by_rollout": "rollout paused"}
    seen = {**srs, "status": {"observedGeneration": 2}}
    c = st.scaler_status((1, 3), seen, 1, "sel", **paused)["conditions"][0]  # type: ignore[arg-type]
    assert (c["status"], c["reason"]) == ("False", "DesiredWithinRange")
    # Nor when it asks for the size the LWS has: a scaler created mid-rollout (never observed), or a
    # scale undone while paused (helper-84).
    c = st.scaler_status((1, 3), srs, 2, "sel", **paused)["conditions"][0]  # type: ignore[arg-type]
    assert (c["status"], c["reason"]) == ("False", "DesiredWithinRange")
    # A bound still comes first: the rollout's end would not apply 5 either.
    over = {**srs, "spec": {**srs["spec"], "replicas": 5}}
    c = st.scaler_status((1, 3), over, 1, "sel", applied=False, held_by_rollout="rollout paused")[
        "conditions"
    ][0]
    assert c["reason"] == "TooManyReplicas"


def test_a_rejected_new_group_does_not_claim_it_asks_for_no_groups() -> None:
    """A group refused before any LWS exists has no role observed: Available said "no group is
    asked for role type(s) decode, prefill (replicas 0)" while the spec asked for 2 and 1."""
    a = _cond(st.compute_status(1, [], "", None, invalid="spec.roles[1]...: name Engine_X"), "Available")
    assert a["status"] == "False" and "replicas 0" not in a["message"], a
    zero = [st.RoleObservation("prefill", "prefill", 0, exists=True), *_roles(0, 1)[2:]]
    a = _cond(st.compute_status(1, zero, "abc", None), "Available")
    assert "no group is asked for role type(s) prefill (replicas 0)" in a["message"], a


def _surged(ready: int, updated_ready: int, desired: int = 4, surge: int = 1) -> st.RoleObservation:
    """A prefill role mid-rollout: `desired` asked for, `surge` extra groups exist."""
    return st.RoleObservation(
        "prefill",
        "prefill",
        desired,
        replicas=desired + surge,
        ready=ready,
        updated=updated_ready,
        partition=desired + surge - updated_ready,
        exists=True,
        updated_ready=updated_ready,
        surge=surge,
    )


def test_summary_and_roles_report_the_operators_desired_count_during_a_rollout() -> None:
    decode = st.RoleObservation("decode", "decode", 2, 3, 3, 1, 2, True, updated_ready=1, surge=1)
    s = st.compute_status(5, [_surged(5, 1), decode], "new", None, "old", rolling=True)
    # Surge groups neither inflate the desired count nor push ready above it (was 5/5 and 3/3).
    assert s["summary"] == {"prefill": "4/4", "decode": "2/2", "rollout": "Progressing"}
    prefill = s["roles"][0]
    assert (prefill["desiredReplicas"], prefill["replicas"], prefill["readyReplicas"]) == (4, 5, 5)
    assert (prefill["updatedReadyReplicas"], prefill["surgeReplicas"]) == (1, 1)
    assert s["currentRevision"] == "old" and s["updateRevision"] == "new"
    # A frozen rollout with a surge group never ready: 4 old groups serve, 4/4 (was 4/5).
    frozen = st.compute_status(5, [_surged(4, 0), decode], "new", None, "old", rolling=True)
    assert frozen["summary"]["prefill"] == "4/4"


def test_a_rollout_removing_its_last_surge_groups_is_still_in_progress() -> None:
    # Every group is on the new revision and the partition is 0, but the surge group is still
    # there: the planner is driving it, so the rollout is not Complete and currentRevision waits.
    last = st.RoleObservation("prefill", "prefill", 4, 5, 5, 5, 0, True, updated_ready=5, surge=1)
    decode = st.RoleObservation("decode", "decode", 2, 2, 2, 2, 0, True, updated_ready=2)
    s = st.compute_status(5, [last, decode], "new", None, "old", rolling=True)
    prog = _cond(s, "Progressing")
    assert (prog["status"], prog["reason"]) == ("True", "RolloutInProgress")
    assert "prefill 4/4 ready on the update revision" in prog["message"]
    assert s["currentRevision"] == "old"


def test_rollout_state_for_the_printer_column() -> None:
    def conds(**by_type: tuple[str, str]) -> list[dict]:
        return [{"type": t, "status": v[0], "reason": v[1]} for t, v in by_type.items()]

    assert st.rollout_state(conds(Progressing=("False", "Complete"))) == "Complete"
    assert st.rollout_state(conds(Progressing=("True", "RolloutInProgress"))) == "Progressing"
    assert st.rollout_state(conds(Progressing=("True", "CreatingRoles"))) == "Progressing"
    assert st.rollout_state(conds(Progressing=("True", "Scaling"))) == "Scaling"
    assert st.rollout_state(conds(Progressing=("False", "ApplyFailed"))) == "ApplyFailed"
    assert (
        st.rollout_state(
            conds(
                Progressing=("True", "RolloutInProgress"), RolloutStalled=("True", "ProgressDeadlineExceeded")
            )
        )
        == "Stalled"
    )
    assert (
        st.rollout_state(conds(Progressing=("True", "RolloutInProgress"), RolloutStalled=("False", "Paused")))
        == "Paused"
    )
    assert (
        st.rollout_state(conds(Invalid=("True", "SpecRejected"), RolloutStalled=("True", "x"))) == "Invalid"
    )


def test_an_unchanged_stall_gives_an_identical_condition() -> None:
    """The message says since when, not for how long: a stall that does not change writes nothing."""
    first = st.stalled_condition("wait", "waiting for prefill", 301.2, 300, "2026-12-05T11:50:00Z", 3, [])
    assert first["status"] == "True" and first["reason"] == "ProgressDeadlineExceeded"
    assert "2026-12-05T11:50:00Z" in first["message"]
    later = st.stalled_condition(
        "wait", "waiting for prefill", 407.9, 300, "2026-12-05T11:50:00Z", 3, [first]
    )
    assert later == first
    assert st.stalled_condition("wait", "r", 10, 300, "t", 3, [])["reason"] == "Progressing"
    assert st.stalled_condition("blocked", "r", 0, 300, "t", 3, [])["reason"] == "CannotProgress"
    assert st.stalled_condition("paused", "r", 999, 300, "t", 3, [])["status"] == "False"


def test_transition_events_warn_on_a_stall_and_report_an_invalid_spec_once() -> None:
    ok = st.compute_status(1, _roles(2, 1), "abc", None)
    ok["conditions"].append(st.condition(st.ROLLOUT_STALLED, False, "Progressing", "", 1, []))
    stalled = {**ok, "conditions": [c for c in ok["conditions"] if c["type"] != st.ROLLOUT_STALLED]}
    for reason in ("CannotProgress", "ProgressDeadlineExceeded"):
        stalled["conditions"] = [
            *stalled["conditions"][:3],
            st.condition(st.ROLLOUT_STALLED, True, reason, "", 1, []),
        ]
        events = st.transition_events(ok, stalled)
        assert events == [("Warning", reason, "RolloutStalled is now True", "RolloutStalled")]
    # The InvalidSpec Warning (with the message) is the controller's; the flip adds no second one.
    bad = st.compute_status(2, _roles(2, 1), "", ok, invalid="bad")
    assert [e for e in st.transition_events(ok, bad) if e[0] == "Warning"] == []
    fixed = st.compute_status(3, _roles(2, 1), "abc", bad)
    assert (
        "Normal",
        "Valid",
        "Invalid is now False: the spec was accepted",
        "Invalid",
    ) in st.transition_events(bad, fixed)
    # A failed apply: the reconciler's ApplyFailed Warning says why; the flip adds no Normal event.
    others = [c for c in fixed["conditions"] if c["type"] != st.PROGRESSING]
    rolling = {**fixed, "conditions": [*others, st.condition(st.PROGRESSING, True, "Rolling", "", 3, [])]}
    failing = {
        **fixed,
        "conditions": [*others, st.condition(st.PROGRESSING, False, st.APPLY_FAILED, "denied", 3, [])],
    }
    assert [e for e in st.transition_events(rolling, failing) if e[3] == st.PROGRESSING] == []
    done = {**fixed, "conditions": [*others, st.condition(st.PROGRESSING, False, "Complete", "", 3, [])]}
    assert [e[:2] for e in st.transition_events(rolling, done)] == [("Normal", "Complete")]
    # A second outage is a Warning again, and says what is missing.
    down = st.compute_status(3, _roles(2, 0), "abc", fixed)
    note = "Available is now False: no ready group yet for role type(s): decode"
    assert ("Warning", "RoleNotReady", note, "Available") in st.transition_events(fixed, down)


def test_observe_role_reads_lws_status_and_partition() -> None:
    lws = {
        "spec": {"rolloutStrategy": {"rollingUpdateConfiguration": {"partition": 2}}},
        "status": {"replicas": 4, "readyReplicas": 3, "updatedReplicas": 2},
    }
    o = st.observe_role("prefill", "prefill", 4, lws)
    assert (o.replicas, o.ready, o.updated, o.partition, o.exists) == (4, 3, 2, 2, True)
    assert (o.updated_ready, o.surge) == (2, 0)
    # Only an LWS a rollout marked holds surge (else the excess is a scale-down under way).
    marked = {
        "metadata": {"annotations": {"pdorch.io/rollout": "abc"}},
        "spec": {"replicas": 5, "rolloutStrategy": {"rollingUpdateConfiguration": {"partition": 3}}},
        "status": {"replicas": 5, "readyReplicas": 4, "updatedReplicas": 2},
    }
    assert st.observe_role("prefill", "prefill", 4, marked).surge == 1
    assert st.observe_role("prefill", "prefill", 4, {**marked, "metadata": {}}).surge == 0
    assert not st.observe_role("x", "decode", 1, None).exists


def test_status_is_not_complete_until_lws_has_observed_the_latest_spec() -> None:
    # A template change bumps the LWS generation; until LWS reconciles it, its status still counts
    # every group as updated.
    lws = {
        "metadata": {"generation": 3},
        "spec": {"rolloutStrategy": {"rollingUpdateConfiguration": {"partition": 0}}},
        "status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 2},
    }
    kinds = [("proxy", "proxy"), ("prefill", "prefill"), ("decode", "decode")]
    roles = [st.observe_role(n, t, 1, lws) for n, t in kinds]
    s = st.compute_status(3, roles, "abc", None)
    prog = _cond(s, "Progressing")
    assert prog["status"] == "True" and prog["reason"] == "Updating"
    caught_up = {**lws, "status": {**lws["status"], "observedGeneration": 3}}
    roles = [st.observe_role(n, t, 1, caught_up) for n, t in kinds]
    assert _cond(st.compute_status(3, roles, "abc", None), "Progressing")["reason"] == "Complete"
    unreported = {**lws, "status": {k: v for k, v in lws["status"].items() if k != "observedGeneration"}}
    assert st.observe_role("p", "prefill", 1, unreported).current


def test_intent_hash_ignores_its_own_annotation_and_key_order() -> None:
    a = {"kind": "X", "metadata": {"name": "n"}, "spec": {"a": 1, "b": 2}}
    b = {
        "spec": {"b": 2, "a": 1},
        "metadata": {"name": "n", "annotations": {HASH_ANNOTATION: "zzz"}},
        "kind": "X",
    }
    assert intent_hash(a) == intent_hash(b)
    stamped, h = stamp(a)
    assert stamped["metadata"]["annotations"][HASH_ANNOTATION] == h
    assert "annotations" not in a["metadata"]  # the input is not mutated


def test_needs_apply_detects_hand_edits_via_generation() -> None:
    intent, h = stamp({"kind": "X", "metadata": {"name": "n"}, "spec": {"replicas": 2}})
    live = {
        "metadata": {"name": "n", "generation": 4, "annotations": {HASH_ANNOTATION: h}},
        "spec": {"replicas": 2},
    }
    marker = version_marker(live)
    assert not needs_apply(h, live, marker, intent)
    edited = {**live, "metadata": {**live["metadata"], "generation": 5}, "spec": {"replicas": 7}}
    assert needs_apply(h, edited, marker, intent)
    assert needs_apply(h, None, None, intent)
    other, h2 = stamp({"kind": "X", "metadata": {"name": "n"}, "spec": {"replicas": 3}})
    assert needs_apply(h2, live, marker, other)
    # Only the first is someone else's change (the Reverted warning): a new intent of ours is not,
    # and after a restart (no marker) it cannot be told.
    assert changed_by_others(h, edited, marker)
    assert not changed_by_others(h, live, marker)
    assert not changed_by_others(h2, edited, marker)
    assert not changed_by_others(h, edited, None)
    assert not changed_by_others(h, None, marker)


def test_needs_apply_after_restart_falls_back_to_subset() -> None:
    intent, h = stamp({"kind": "X", "metadata": {"name": "n"}, "spec": {"replicas": 2, "t": [{"a": 1}]}})
    live = {
        "metadata": {"name": "n", "annotations": {HASH_ANNOTATION: h}},
        "spec": {"replicas": 2, "t": [{"a": 1, "defaulted": True}], "extra": 1},
    }
    assert not needs_apply(h, live, None, intent)
    live["spec"]["replicas"] = 9
    assert needs_apply(h, live, None, intent)


def test_is_subset_lists_and_scalars() -> None:
    assert is_subset({"a": [1, 2]}, {"a": [1, 2], "b": 3})
    assert not is_subset({"a": [1, 2]}, {"a": [1]})
    assert not is_subset({"a": True}, {"a": 1})
    assert is_subset({"port": 8000}, {"port": 8000})


def test_a_child_controlled_by_another_owner_is_foreign() -> None:
    from pdorch.controller.reconciler import foreign_owner

    def child(*refs: dict[str, object]) -> dict[str, object]:
        return {"metadata": {"name": "g-prefill", "ownerReferences": list(refs)}}

    ours = {"kind": "ServingGroup", "name": "g", "uid": "u1", "controller": True}
    other = {"kind": "ServingGroup", "name": "g2", "uid": "u2", "controller": True}
    assert foreign_owner(child(ours), "u1") is None
    assert foreign_owner(child(other), "u1") == ("ServingGroup", "g2")
    assert foreign_owner(child({**other, "controller": False}), "u1") is None  # not a controller
    assert foreign_owner(child(), "u1") is None  # unowned: adopted


def test_progress_is_a_new_step_or_more_groups_ready_than_ever_in_it_not_a_flap() -> None:
    stamps = iter(f"t{i}" for i in range(10))
    mark = st.progress_mark(None, "step1", (0, 4), 0.0, lambda: next(stamps))
    assert mark == ("step1", (0, 4), 0.0, "t0")
    # A new group ready: progress.
    mark = st.progress_mark(mark, "step1", (1, 5), 10.0, lambda: next(stamps))
    assert mark[2:] == (10.0, "t1")
    # It crashes (not ready) and comes back: no progress either way, the deadline keeps running.
    for ready in ((0, 4), (1, 5), (0, 4), (1, 5)):
        mark = st.progress_mark(mark, "step1", ready, 20.0, lambda: next(stamps))
        assert mark[2:] == (10.0, "t1")
    # The next step written: progress, and its counts start afresh.
    mark = st.progress_mark(mark, "step2", (1, 5), 30.0, lambda: next(stamps))
    assert mark == ("step2", (1, 5), 30.0, "t2")


def test_a_new_groups_first_all_clear_is_no_event_and_replica_failure_warns() -> None:
    def conds(**status: str) -> dict[str, object]:
        return {"conditions": [{"type": t, "status": v, "reason": f"R{t}"} for t, v in status.items()]}

    # Not serving yet is no news either (it is starting: `Created` said so).
    first = conds(Available="False", Invalid="False", RolloutStalled="False", ReplicaFailure="False")
    assert st.transition_events(None, first) == []
    failing = conds(Available="False", Invalid="False", RolloutStalled="False", ReplicaFailure="True")
    assert st.transition_events(first, failing) == [
        ("Warning", "RReplicaFailure", "ReplicaFailure is now True", "ReplicaFailure")
    ]
    # The controller drops ReplicaFailure once groups can be created again: that is its flip back,
    # and news (else a second outage's Warning would repeat the first's and be dropped).
    cleared = conds(Available="True", Invalid="False", RolloutStalled="False")
    assert ("Normal", "Resolved", "ReplicaFailure is now False", "ReplicaFailure") in st.transition_events(
        failing, cleared
    )


def test_a_step_being_written_is_where_the_rollout_stands() -> None:
    observed = {"decode": (2, 1), "prefill": (3, 2)}
    writing = {"decode": (2, 0), "prefill": (3, 1)}
    before = st.rollout_position(None, observed)
    now = st.rollout_position(writing, observed)
    assert now != before  # a step written this pass is progress at once
    assert st.rollout_position(None, writing) == now  # and the next pass, observing it, is not


def _srs(replicas: int, generation: int, status: dict | None = None) -> dict:
    return {
        "metadata": {"name": "g-decode", "generation": generation},
        "spec": {"servingGroup": "g", "role": "decode", "replicas": replicas},
        "status": status or {},
    }


@pytest.mark.parametrize(
    ("asked", "status", "reason", "bound"),
    [
        (9, "True", "TooManyReplicas", "maxReplicas 4"),
        (0, "True", "TooFewReplicas", "minReplicas 1"),
        (3, "False", "DesiredWithinRange", ""),
    ],
)
def test_a_scaler_says_when_its_replicas_are_held_at_a_bound(
    asked: int, status: str, reason: str, bound: str
) -> None:
    out = st.scaler_status((1, 4), _srs(asked, 7), current=3, selector="a=b", applied=True)
    (cond,) = out["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("ScalingLimited", status, reason)
    assert bound in cond["message"]
    assert ("g/decode" in cond["message"]) == (status == "True")
    assert out["observedGeneration"] == 7 and cond["observedGeneration"] == 7
    assert (out["replicas"], out["selector"]) == (3, "a=b")


def test_a_scalers_condition_keeps_its_transition_time_while_it_holds() -> None:
    first = st.scaler_status((1, 4), _srs(9, 2), current=4, selector="s", applied=True)
    first["conditions"][0]["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    later = st.scaler_status((1, 4), _srs(12, 3, first), current=4, selector="s", applied=True)
    assert later["observedGeneration"] == 3
    assert later["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert "spec.replicas 12" in later["conditions"][0]["message"]
    back = st.scaler_status((1, 4), _srs(2, 4, later), current=4, selector="s", applied=True)
    assert back["conditions"][0]["lastTransitionTime"] != "2026-01-01T00:00:00Z"


def test_unbounded_roles_are_never_limited() -> None:
    out = st.scaler_status((None, None), _srs(10000, 1), current=5, selector="s", applied=True)
    assert out["conditions"][0]["status"] == "False"


def test_a_scaler_sized_by_a_rollout_keeps_its_observed_generation() -> None:
    """Mid-rollout the LWS is sized by the planner (a paused rollout keeps the old size): the new
    generation is not reported as observed until the LWS gets it."""
    before = st.scaler_status((1, 4), _srs(1, 1), current=1, selector="s", applied=True)
    during = st.scaler_status((1, 4), _srs(3, 2, before), current=1, selector="s", applied=False)
    assert during["observedGeneration"] == 1
    assert "observedGeneration" not in st.scaler_status((1, 4), _srs(3, 2), 1, "s", applied=False)
    held = st.scaler_status((1, 1), _srs(3, 2), current=1, selector="s", applied=True)
    assert "held at 1 group;" in held["conditions"][0]["message"]


def test_a_role_type_asked_for_zero_groups_is_named_as_such_not_as_not_ready_yet() -> None:
    roles = [
        st.RoleObservation("proxy", "proxy", 1, 1, 1, 1, 0, True),
        st.RoleObservation("prefill", "prefill", 2, 2, 2, 2, 0, True),
        st.RoleObservation("decode", "decode", 0, 0, 0, 0, 0, True),
    ]
    available = _cond(st.compute_status(1, roles, "abc", None), st.AVAILABLE)
    assert available["status"] == "False"
    assert available["message"].startswith("no group is asked for role type(s) decode (replicas 0)")
    # A type that asks for groups but has none ready yet reads as before.
    waiting = _cond(st.compute_status(1, _roles(2, 0), "abc", None), st.AVAILABLE)
    assert waiting["message"] == "no ready group yet for role type(s): decode"


def test_a_scale_up_reads_as_scaling_and_a_replaced_group_as_recovering_not_as_a_rollout() -> None:
    """helper-71 G: groups still to be created counted as not updated (a scale-up read
    RolloutInProgress), and a deleted pod's group coming back read as Scaling."""
    up = [
        st.RoleObservation("prefill", "prefill", 3, 2, 2, 2, 0, True),  # 3 wanted, 2 exist
        st.RoleObservation("decode", "decode", 1, 1, 1, 1, 0, True),
    ]
    prog = _cond(st.compute_status(1, up, "abc", None), st.PROGRESSING)
    assert (prog["status"], prog["reason"]) == ("True", "Scaling")
    settled = st.compute_status(
        1,
        [
            st.RoleObservation("prefill", "prefill", 2, 2, 2, 2, 0, True),
            st.RoleObservation("decode", "decode", 1, 1, 1, 1, 0, True),
        ],
        "abc",
        None,
    )
    assert _cond(settled, st.PROGRESSING)["reason"] == "Complete"
    back = [
        st.RoleObservation("prefill", "prefill", 2, 2, 1, 2, 0, True),  # one group being replaced
        st.RoleObservation("decode", "decode", 1, 1, 1, 1, 0, True),
    ]
    status = st.compute_status(1, back, "abc", settled)
    prog = _cond(status, st.PROGRESSING)
    assert (prog["status"], prog["reason"]) == ("True", "Recovering")
    assert prog["message"] == "waiting for groups to be ready again: prefill 1/2"
    assert status["summary"]["rollout"] == "Complete"
    # helper-74 B1: LWS counts a group once its leader pod exists, so a new group (no settled
    # status before) or a scale-up (desired changed) that is still loading is not Recovering.
    assert _cond(st.compute_status(1, back, "abc", None), st.PROGRESSING)["reason"] == "Scaling"
    scaled = [st.RoleObservation("prefill", "prefill", 4, 4, 2, 4, 0, True), back[1]]
    assert _cond(st.compute_status(1, scaled, "abc", settled), st.PROGRESSING)["reason"] == "Scaling"


def test_same_values_takes_a_number_and_its_string_form_as_equal() -> None:
    """An LWS the API stored with `nvidia.com/gpu: "1"` and our apply of `1` is no change anyone
    reads: a hand edit that pdorch's apply does not undo is ChangedOutside, not Reverted."""
    stored = {"limits": {"nvidia.com/gpu": "1"}, "image": "x", "n": [1, {"a": True}]}
    assert same_values(stored, {"limits": {"nvidia.com/gpu": 1}, "image": "x", "n": ["1", {"a": True}]})
    assert not same_values(stored, {"limits": {"nvidia.com/gpu": 2}, "image": "x", "n": [1, {"a": True}]})
    assert not same_values(stored, {"limits": {"nvidia.com/gpu": "1"}, "image": "y", "n": [1, {"a": True}]})
    assert not same_values({"a": True}, {"a": "True"})
    assert not same_values({"a": 1}, {"a": 1, "b": 2})
    # The API's canonical quantities (helper-76): 0.5 CPU is "500m", 1000 is "1k", 2.0 is "2".
    assert same_values(
        {"cpu": 0.5, "m": 1000, "g": 2.0, "mem": 1073741824},
        {"cpu": "500m", "m": "1k", "g": "2", "mem": "1Gi"},
    )
    assert not same_values({"cpu": 0.5}, {"cpu": "600m"})
    # A bool is no number: 1 and True differ, as do 0 and False.
    assert not same_values({"a": 1}, {"a": True}) and not same_values({"a": 0}, {"a": False})

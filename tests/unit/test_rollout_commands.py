"""`pdorch plan` and `pdorch rollback` pieces that need no cluster: the live planning inputs must
be the controller's, and the rollback diff (pure)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from pdorch.api.servinggroup import ServingGroup
from pdorch.controller import reconciler
from pdorch.roles.labels import ANNOTATION_ROLLOUT, LABEL_REVISION, LWS_GROUP_INDEX, LWS_WORKER_INDEX
from pdorch.roles.rolescaler import held_for_drain, scaled_replicas, scaler_replicas, status_desired
from pdorch.rollout import commands, live
from pdorch.rollout.planner import auto_tolerance, initial_state, next_step
from pdorch.rollout.state import KV_TYPES
from tests.unit.test_rollout_live import _lws, _three_roles, _written

pytestmark = pytest.mark.unit

OLD, NEW = "aaaaaaaaaa", "bbbbbbbbbb"
EXAMPLE = Path(__file__).parents[2] / "examples/sim-pd/servinggroup.yaml"


def _doc(prefill: int, decode: int, scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["namespace"] = "ns"
    for role in doc["spec"]["roles"]:
        if role["type"] in KV_TYPES:
            role["replicas"] = {"prefill": prefill, "decode": decode}[role["type"]]
            if scaling is not None:
                role["scaling"] = scaling
    return doc


def _pod(index: int, revision: str, ready: bool = True) -> dict[str, Any]:
    labels = {LWS_GROUP_INDEX: str(index), LWS_WORKER_INDEX: "0", LABEL_REVISION: revision}
    return {
        "metadata": {"labels": labels},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def _role(name: str, desired: int, lws: dict[str, Any], pods: list[dict[str, Any]]) -> live.LiveRole:
    return live.LiveRole(name, name, desired, lws, live.group_states(pods, 1))


SCALED = {"mode": "External", "minReplicas": 0, "maxReplicas": 4}
BUILTIN_MAX_1 = {
    "mode": "Builtin",
    "minReplicas": 1,
    "maxReplicas": 1,
    "targets": {"tpotMs": 50, "ttftMs": 500},
}


def test_scaler_replicas_are_the_scalers_within_bounds_and_zero_is_zero() -> None:
    sg = ServingGroup.model_validate(_doc(2, 2, SCALED))
    role = sg.spec.role("prefill")
    assert scaler_replicas(role, {"spec": {"replicas": 0}}) == 0  # `or roles[].replicas` made it 2
    assert scaler_replicas(role, {"spec": {"replicas": 9}}) == 4
    assert scaler_replicas(role, {"spec": {}}) is None and scaler_replicas(role, None) is None
    static = ServingGroup.model_validate(_doc(2, 2)).spec.role("prefill")
    assert scaler_replicas(static, {"spec": {"replicas": 3}}) is None


def test_a_builtin_role_above_a_lowered_max_keeps_its_groups_until_the_scaler_drains_them() -> None:
    """maxReplicas 4 -> 1 on a Builtin role at 3 cut the LWS to 1 at once, killing the streams on
    the two removed groups, and the scaler then called it drained (helper-65)."""
    role = ServingGroup.model_validate(_doc(1, 1, BUILTIN_MAX_1)).spec.role("decode")
    at3 = {"spec": {"replicas": 3}}
    assert scaled_replicas(role, {"spec": {"replicas": 3}}, at3) == 3  # held: the scaler drains first
    assert held_for_drain(role, {"spec": {"replicas": 3}}, at3) == 3
    assert scaled_replicas(role, {"spec": {"replicas": 2}}, at3) == 2  # its drain to 2 is written
    assert scaled_replicas(role, {"spec": {"replicas": 1}}, at3) == 1  # within the bound: as asked
    assert scaled_replicas(role, {"spec": {"replicas": 5}}, at3) == 3  # never above what runs
    assert held_for_drain(role, {"spec": {"replicas": 3}}, {"spec": {"replicas": 1}}) is None
    rolling = {"metadata": {"annotations": {ANNOTATION_ROLLOUT: NEW}}, "spec": {"replicas": 4}}
    assert scaled_replicas(role, {"spec": {"replicas": 3}}, rolling, last_desired=3) == 3  # not the surge
    # HPA or KEDA (External) drains nothing: the bound applies at once, as before.
    external = ServingGroup.model_validate(
        _doc(1, 1, {"mode": "External", "minReplicas": 1, "maxReplicas": 1})
    ).spec.role("decode")
    assert scaled_replicas(external, {"spec": {"replicas": 3}}, at3) == 1
    assert held_for_drain(external, {"spec": {"replicas": 3}}, at3) is None


def test_a_missing_scaler_keeps_the_lws_size_less_a_rollouts_surge() -> None:
    """A scaler deleted mid-rollout was recreated at the LWS's size, surge included, which the
    role then kept after the rollout."""
    sg = ServingGroup.model_validate(_doc(2, 2, SCALED))
    role = sg.spec.role("decode")
    steady = {"spec": {"replicas": 3}}
    rolling = {"metadata": {"annotations": {ANNOTATION_ROLLOUT: NEW}}, "spec": {"replicas": 3}}
    assert scaled_replicas(role, None, steady, last_desired=2) == 3  # not mid-rollout: the LWS's size
    assert scaled_replicas(role, None, rolling, last_desired=2) == 2
    assert scaled_replicas(role, None, rolling) == 3  # no record of the desired size: the LWS's
    assert scaled_replicas(role, {"spec": {"replicas": 1}}, rolling, last_desired=2) == 1
    sg = ServingGroup.model_validate(
        {
            **_doc(2, 2, SCALED),
            "status": {"roles": [{"name": "decode", "type": "decode", "desiredReplicas": 2}]},
        }
    )
    assert status_desired(sg) == {"decode": 2}


@pytest.mark.parametrize("srs", [None, {}, {"replicas": 0}, {"replicas": 3}, {"replicas": 7}])
@pytest.mark.parametrize(
    "scaling", [None, {"mode": "Static"}, SCALED, {"mode": "External", "minReplicas": 1}]
)
def test_scaler_replicas_agree_with_the_controller(srs: dict[str, Any] | None, scaling: Any) -> None:
    from pdorch.controller.kubeapi import LWS, SERVING_ROLE_SCALER
    from pdorch.controller.reconciler import Caches, Reconciler
    from pdorch.roles.render import RenderOptions

    sg = ServingGroup.model_validate(_doc(2, 2, scaling))
    obj = None if srs is None else {"spec": srs}

    class Cache:
        def get(self, namespace: str, name: str) -> dict[str, Any] | None:
            return obj

    class Lws:
        def get(self, namespace: str, name: str) -> dict[str, Any] | None:
            return {"spec": {"replicas": 5}}  # a running LWS: the size a missing scaler keeps

    rec = Reconciler(None, Caches(None, {SERVING_ROLE_SCALER: Cache(), LWS: Lws()}), None, RenderOptions())  # type: ignore[arg-type]
    controller = {n: o.replicas for n, o in rec._overrides(sg, "ns", "g").items()}
    lws = Lws().get("ns", "x")
    mine = {r.name: v for r in sg.spec.roles if (v := scaled_replicas(r, obj, lws)) is not None}
    assert mine == controller
    if obj is None and scaling not in (None, {"mode": "Static"}):
        assert set(controller.values()) == {min(5, 4) if scaling == SCALED else 5}


def test_from_live_plans_with_the_scalers_ratio_as_the_controller_does(capsys: Any) -> None:
    # The cluster repro: spec 2:2, ServingRoleScalers at prefill 1 / decode 3, a template change.
    # The controller plans 1:3 and refuses (CannotProgress); --from-live planned 2:2 and said done.
    sg = ServingGroup.model_validate(_doc(2, 2, SCALED))
    roles = [
        _role("prefill", 1, _lws(1, 0, OLD), [_pod(0, OLD)]),
        _role("decode", 3, _lws(3, 0, OLD), [_pod(i, OLD) for i in range(3)]),
    ]
    plan = commands.live_plan(sg, roles, NEW)
    assert plan.rolling and (plan.spec.ratio_p, plan.spec.ratio_d) == (1, 3)
    controller = live.plan(roles, NEW, commands.rollout_spec(sg, desired={"prefill": 1, "decode": 3}))
    assert controller.decision is not None and controller.decision.kind == "blocked"
    assert commands._print_plan(sg, plan.spec, plan.auto, plan.initial, 1) == 3
    out = capsys.readouterr().out
    assert "ratio 1:3" in out and "# blocked:" in out


def test_from_live_keeps_the_tolerance_of_the_rollouts_start() -> None:
    # 2P:1D after the first step: prefill 1 old + 2 new, decode 1 old + 1 new. From this state
    # alone the smallest tolerance is 0.25 (what --from-live printed); the rollout started at 0.5
    # and the controller keeps that.
    sg = ServingGroup.model_validate(_doc(2, 1))
    for ready in (False, True):
        roles = [
            _role("prefill", 2, _lws(3, 1, NEW), [_pod(0, OLD), _pod(1, NEW, ready), _pod(2, NEW, ready)]),
            _role("decode", 1, _lws(2, 1, NEW), [_pod(0, OLD), _pod(1, NEW, ready)]),
        ]
        plan = commands.live_plan(sg, roles, NEW)
        start = initial_state([("prefill", "prefill", 2), ("decode", "decode", 1)])
        assert plan.auto and plan.spec.tolerance == auto_tolerance(start, plan.spec) == 0.5
        assert auto_tolerance(plan.initial, plan.spec) == 0.25
        # The controller resolves the tolerance itself: the same inputs give the same decision.
        controller = live.plan(roles, NEW, commands.rollout_spec(sg, desired={"prefill": 2, "decode": 1}))
        assert controller.decision == next_step(plan.initial, plan.spec)


def test_from_live_starts_after_a_step_cut_short_as_the_controller_finishes_it(capsys: Any) -> None:
    """Two prefill roles and a decode at 1:1; step 1 was written to the prefills only. The
    controller writes the rest of it; --from-live says so and plans from there (it finishes),
    where planning from the half-written state is refused."""
    doc = _doc(1, 3)
    proxy, prefill, decode = doc["spec"]["roles"]
    doc["spec"]["roles"] = [proxy, prefill | {"name": "p0"}, prefill | {"name": "p1", "replicas": 3}]
    doc["spec"]["roles"].append(decode | {"name": "d0"})
    doc["spec"]["ratio"] = {"prefill": 1, "decode": 1}
    doc["spec"]["rolloutStrategy"] = {"maxSurge": "25%", "maxUnavailable": 1, "ratioTolerance": 0}
    sg = ServingGroup.model_validate(doc)
    old, _ = _three_roles()
    first = live.plan(old, NEW, commands.rollout_spec(sg, desired={"p0": 1, "p1": 3, "d0": 3}))
    half = [_written(r, first) if r.name != "d0" else r for r in old]
    plan = commands.live_plan(sg, half, NEW)
    assert plan.finishing == (1, ["d0"])
    assert {o.name: (o.replicas, o.partition) for o in plan.initial} == first.actions
    assert commands._print_plan(sg, plan.spec, plan.auto, plan.initial, 1) == 0
    observed = [live.observe(r, NEW) for r in half]
    assert next_step(observed, plan.spec).kind == "blocked"
    assert "# done" in capsys.readouterr().out


def test_from_live_without_a_rollout_plans_the_next_change_from_the_desired_replicas() -> None:
    sg = ServingGroup.model_validate(_doc(2, 2, SCALED))
    roles = [
        _role("prefill", 0, _lws(0, 0, NEW), []),
        _role("decode", 3, _lws(3, 0, NEW), [_pod(i, NEW) for i in range(3)]),
    ]
    plan = commands.live_plan(sg, roles, NEW)
    assert not plan.rolling
    assert [(o.name, o.desired, o.partition) for o in plan.initial] == [("prefill", 0, 0), ("decode", 3, 3)]


def test_plan_from_file_takes_the_ratio_from_from_replicas(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "sg.yaml"
    path.write_text(yaml.safe_dump(_doc(2, 2, SCALED)))
    args = argparse.Namespace(
        from_live=None, filename=str(path), from_replicas=["prefill=1", "decode=3"], delay=1
    )
    assert commands.run(args) == 3
    assert "ratio 1:3" in capsys.readouterr().out


def test_spec_diff_shows_only_what_changes() -> None:
    before = {"roles": [{"name": "p", "replicas": 6, "tag": "v2"}], "router": {"policy": "power_of_two"}}
    after = {"router": {"policy": "power_of_two"}, "roles": [{"name": "p", "replicas": 6, "tag": "v1"}]}
    diff = commands.spec_diff(before, after)
    changed = [line for line in diff.splitlines()[2:] if line[:1] in "+-"]
    assert changed == ["-  tag: v2", "+  tag: v1"]  # key order does not count as a change
    assert commands.spec_diff(before, before) == ""


def test_the_header_says_when_the_enforced_tolerance_is_wider_than_the_declared(capsys: Any) -> None:
    # 2 prefills and 1 decode are far off a declared 1:1000 ratio: the planner holds cohorts
    # within the replicas' own deviation (1999), not within the declared 1.
    doc = _doc(2, 1)
    doc["spec"]["ratio"] = {"prefill": 1, "decode": 1000, "tolerance": 1}
    sg = ServingGroup.model_validate(doc)
    spec = commands.rollout_spec(sg)
    start = initial_state([(r.name, r.type.value, r.replicas) for r in sg.spec.roles if r.type in KV_TYPES])
    commands._print_plan(sg, spec, False, start, 1)
    header = capsys.readouterr().out.splitlines()[0]
    assert "tolerance 1 (enforced: 1999, the desired replicas' own deviation)" in header, header
    doc["spec"]["ratio"] = {"prefill": 2, "decode": 1, "tolerance": 0.5}
    sg = ServingGroup.model_validate(doc)
    commands._print_plan(sg, commands.rollout_spec(sg), False, start, 1)
    assert "enforced" not in capsys.readouterr().out.splitlines()[0]


def test_the_controllers_hold_above_a_lowered_max_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pdorch's scaler (or with its metrics unreadable) nothing drains: the hold ends after
    MAX_DRAIN_HOLD_S and the bound applies, as for External roles (helper-67)."""
    role = ServingGroup.model_validate(_doc(1, 1, BUILTIN_MAX_1)).spec.role("decode")
    srs, at3 = {"spec": {"replicas": 3}}, {"spec": {"replicas": 3}}
    clock = [1000.0]
    monkeypatch.setattr(reconciler.time, "monotonic", lambda: clock[0])
    holder = SimpleNamespace(_drain_hold_since={})

    def scaled(srs: dict[str, Any]) -> tuple[int | None, int | None]:
        return reconciler.Reconciler._scaled(holder, "ns/g", role, srs, at3, None)  # type: ignore[arg-type]

    assert scaled(srs) == (3, 3)  # held at what runs
    clock[0] += reconciler.MAX_DRAIN_HOLD_S - 1
    assert scaled(srs) == (3, 3)
    clock[0] += 1
    assert scaled(srs) == (1, None)  # ran out: the bound, at once
    # Drained to the bound: the hold is forgotten, and a later lowering gets its full time.
    assert scaled({"spec": {"replicas": 1}}) == (1, None)
    assert holder._drain_hold_since == {}
    assert scaled(srs) == (3, 3)


class _Cache:
    """An informer cache holding nothing."""

    def get(self, namespace: str, name: str) -> None:
        return None


def test_a_role_removed_while_held_is_held_no_longer() -> None:
    """The hold's start is forgotten when its role leaves the spec or stops being autoscaled;
    kept, it would requeue the group every second once its time ran out."""
    doc = _doc(1, 1, BUILTIN_MAX_1)
    sg = ServingGroup.model_validate(doc)
    holder = SimpleNamespace(
        _drain_hold_since={"ns/g": {"decode": 0.0, "old-decode": 0.0}},
        caches=SimpleNamespace(children={reconciler.SERVING_ROLE_SCALER: _Cache(), reconciler.LWS: _Cache()}),
        _scaled=lambda *a: reconciler.Reconciler._scaled(holder, *a),  # type: ignore[arg-type]
    )
    reconciler.Reconciler._overrides(holder, sg, "ns", "g")  # type: ignore[arg-type]
    assert holder._drain_hold_since == {}  # decode is not held (no scaler yet); old-decode is gone

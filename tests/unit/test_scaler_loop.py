"""The pure helpers of the scaler process: a role's scaling fields -> damping and policy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from pdorch.api.servinggroup import Role, Scaling, ServingGroup
from pdorch.proxy.endpoints import Endpoint
from pdorch.roles.pods import started_since
from pdorch.scaler import loop
from pdorch.scaler.loop import (
    damping_config,
    damping_from_scaling,
    endpoints_started_after,
    group_policy,
    held_size,
    may_hold_work,
    recommend,
    surge_groups,
)
from pdorch.scaler.observe import RoleLoad, role_load
from pdorch.scaler.policy import SloPolicyConfig
from pdorch.scaler.scrape import EngineSample
from pdorch.sim.latency import DISTSERVE_OPT13B_A100 as DIST

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TEMPLATE = {"spec": {"containers": [{"name": "engine", "image": "x"}]}}


def _role(rtype: str, scaling: dict[str, object]) -> Role:
    return Role.model_validate(
        {"name": rtype, "type": rtype, "replicas": 1, "workerTemplate": TEMPLATE, "scaling": scaling}
    )


def test_scaling_fields_become_the_damping_config() -> None:
    r = _role(
        "decode",
        {
            "mode": "Builtin",
            "minReplicas": 1,
            "maxReplicas": 7,
            "targets": {"tpotMs": 80},
            "scaleDownStabilizationSeconds": 20,
            "cooldownSeconds": 5,
        },
    )
    d = damping_config(r)
    assert (d.min_replicas, d.max_replicas, d.scale_down_stabilization_s, d.cooldown_s) == (1, 7, 20, 5)
    assert d.scale_up_stabilization_s == 0
    assert d.scale_down_after_miss_s is None
    r.scaling.scale_down_after_miss_seconds = 1200  # type: ignore[union-attr]
    assert damping_config(r).scale_down_after_miss_s == 1200


def test_recommend_uses_the_role_type_and_its_target() -> None:
    load = RoleLoad(
        ready_replicas=1, window_s=15, request_rate=20, mean_prompt_tokens=1000, mean_output_tokens=200
    )
    p = recommend(
        _role("prefill", {"mode": "Builtin", "maxReplicas": 9, "targets": {"ttftMs": 2000}}),
        load,
        DIST,
        SloPolicyConfig(),
    )
    assert p.reason.startswith("prefill") and p.replicas >= 3
    d = recommend(
        _role("decode", {"mode": "Builtin", "maxReplicas": 9, "targets": {"tpotMs": 100}}),
        load,
        DIST,
        SloPolicyConfig(),
    )
    assert d.reason.startswith("decode")


def test_a_builtin_role_capped_at_zero_gets_no_floor_above_its_cap() -> None:
    # Only reachable on objects stored before the >= 1 CEL rule; must not raise in every tick.
    d = damping_from_scaling(Scaling.model_construct(mode="Builtin", max_replicas=0, min_replicas=None))
    assert (d.min_replicas, d.max_replicas) == (0, 0)
    assert damping_from_scaling(Scaling(mode="Builtin", max_replicas=5)).min_replicas == 1


def test_a_group_behind_the_prefill_queue_gets_the_queued_profile() -> None:
    raw = yaml.safe_load((EXAMPLES / "sim-pd" / "servinggroup.yaml").read_text())
    base = SloPolicyConfig(forecast_lead_s=30.0)
    assert group_policy(ServingGroup.model_validate(raw), base) == base
    raw["spec"].setdefault("router", {})["prefillQueue"] = {"maxInflightTokens": 16384}
    queued = group_policy(ServingGroup.model_validate(raw), base)
    assert queued.max_prefill_utilisation > base.max_prefill_utilisation
    assert queued.forecast_lead_s == base.forecast_lead_s  # the process's lead is kept
    raw["spec"].pop("router")
    assert group_policy(ServingGroup.model_validate(raw), base) == base


def test_scaling_clamp_applies_only_the_bounds_that_are_set() -> None:
    s = Scaling(mode="External", min_replicas=2, max_replicas=4)
    assert [s.clamp(n) for n in (0, 3, 9)] == [2, 3, 4]
    assert Scaling(mode="External").clamp(50) == 50
    assert Scaling(mode="External", max_replicas=4).clamp(0) == 0


def _pod(
    name: str, started: str | None, ready_at: str | None = None, sidecar: str | None = None
) -> dict[str, object]:
    cond: dict[str, str] = {"type": "Ready", "status": "True" if started else "False"}
    if started:
        cond["lastTransitionTime"] = ready_at or started
    engine = {"name": "engine", "state": {"running": {"startedAt": started}} if started else {"waiting": {}}}
    statuses = [engine] + (
        [{"name": "side", "state": {"running": {"startedAt": sidecar}}}] if sidecar else []
    )
    return {"metadata": {"name": name}, "status": {"conditions": [cond], "containerStatuses": statuses}}


def test_only_pods_whose_engines_started_since_the_last_tick_are_new_engines() -> None:
    t0 = dt.datetime(2026, 12, 5, 12, 0, 0, tzinfo=dt.UTC).timestamp()
    pods = [
        _pod("old", "2026-12-05T11:00:00Z"),  # running for an hour: lifetime counters
        _pod("new", "2026-12-05T12:00:10Z"),  # started after the last tick: counters since 0
        _pod("odd", None),
        # Readiness flapped after the last tick, the engine did not restart: lifetime counters (read
        # as new, one tick of a long-running engine's counts became a 100,000x rate spike).
        _pod("flap", "2026-12-05T09:00:00Z", ready_at="2026-12-05T12:00:10Z"),
        # A sidecar restarted next to an old engine: still the old engine's counters.
        _pod("side", "2026-12-05T09:00:00Z", sidecar="2026-12-05T12:00:10Z"),
    ]
    eps = [Endpoint(url=f"http://127.0.0.{i}:8000", role="decode", host="h", port=1, pod=p["metadata"]["name"])  # type: ignore[index]
           for i, p in enumerate(pods, 1)]  # fmt: skip
    assert endpoints_started_after(pods, eps, t0) == {"http://127.0.0.2:8000"}
    assert endpoints_started_after(pods, eps, None) == set()  # first tick: nothing is known new
    # Started at 12:00:10.7 reads "12:00:10": still after a tick at 12:00:10.5.
    assert endpoints_started_after(pods, eps, t0 + 10.5) == {"http://127.0.0.2:8000"}
    assert started_since(pods[1]) == t0 + 10 and started_since(pods[2]) is None
    assert started_since({"status": {}}) is None


def test_a_drain_victim_that_runs_unready_may_still_hold_work() -> None:
    running = {"metadata": {"name": "p"}, "status": {"phase": "Running", "podIP": "127.1.0.5"}}
    assert may_hold_work(running)  # a failed readiness probe under load: wait for it
    assert not may_hold_work({"metadata": {"name": "p"}, "status": {"phase": "Pending"}})
    deleting = {**running, "metadata": {"name": "p", "deletionTimestamp": "2026-12-05T12:00:00Z"}}
    assert not may_hold_work(deleting)


def test_a_forgotten_role_leaves_no_series() -> None:
    loop.RECOMMENDED.labels("ns", "gone", "decode").set(3)
    loop.SCALE_EVENTS.labels("ns", "gone", "decode", "up").inc()
    loop._drop_series("ns", "gone", "decode")
    names = {
        (s.name, tuple(sorted(s.labels.items())))
        for m in (loop.RECOMMENDED, loop.SCALE_EVENTS)
        for fam in m.collect()
        for s in fam.samples
    }
    assert not any(("group", "gone") in labels for _, labels in names)
    loop._drop_series("ns", "gone", "decode")  # twice is fine


def test_the_role_state_carries_what_a_tick_without_a_new_scrape_repeats() -> None:
    """Through `RoleState.read`, as the scaler tick calls it: Prometheus scraped at 0 and 30 s,
    the scaler reads at 15 s intervals; the tick at 45 s sees no newer scrape and reads 30 s's
    interval again (10 requests/s), not zero."""
    st = loop.RoleState()
    samples = {t: EngineSample("vllm", requests_total=10 * t, at=float(t)) for t in (0, 30, 60)}
    reads = []
    for now, scraped in ((15.0, 0), (30.0, 30), (45.0, 30), (60.0, 60)):
        seen, last = st.read(["a"], [samples[scraped]], (), now, now)  # scrape times: the same clock
        if last is not None:
            reads.append((role_load(seen.prev, seen.cur, now - last).request_rate, seen.repeated))
    assert reads == [(10.0, 0), (10.0, 1), (10.0, 0)]


def test_unmarked_groups_above_the_desired_size_are_a_rollouts_surge() -> None:
    def leader(index: int, marked: bool = False) -> dict[str, object]:
        md: dict[str, object] = {"name": f"g-decode-{index}", "labels": {loop.LWS_GROUP_INDEX: str(index)}}
        if marked:
            md["annotations"] = {loop.ANNOTATION_DRAINING: "true"}
        return {"metadata": md}

    # Desired 3 with LWS at 5 mid-rollout: groups 3 and 4 are surge, a scale-down must not drain them.
    assert [p["metadata"]["name"] for p in surge_groups([leader(i) for i in range(5)], 3)] == [
        "g-decode-3",
        "g-decode-4",
    ]
    # After a scale-down 3 -> 2 was written, its drained victim waits for LWS to remove it: no surge.
    assert surge_groups([leader(0), leader(1), leader(2, marked=True)], 2) == []
    # Nor is a group being deleted (a rollout's surge removed, a hand scale-down, a lost node).
    going = leader(2)
    going["metadata"]["deletionTimestamp"] = "2026-12-06T12:00:00Z"  # type: ignore[index]
    assert surge_groups([leader(0), leader(1), going], 2) == []
    assert surge_groups([leader(i) for i in range(3)], 3) == []


def test_unknown_load_holds_a_scale_down_but_not_a_drain_under_way_unless_unreadable() -> None:
    assert held_size(4, None, 2, unread=0, blind=0) is None  # every leader read with a baseline
    assert held_size(4, None, 6, unread=1, blind=0) is None  # a scale-up is never held
    assert held_size(4, None, 2, unread=1, blind=0) == 4
    assert held_size(4, None, 2, unread=0, blind=1) == 4
    # A drain 4 -> 2 under way: a leader without a baseline (given back by a retarget) does not
    # cancel it; an unreadable one does.
    assert held_size(4, 2, 2, unread=0, blind=1) == 2
    assert held_size(4, 2, 1, unread=1, blind=0) == 4
    # ... but never on below this tick's recommendation (3 here), which understates the load.
    assert held_size(4, 2, 3, unread=0, blind=1) == 4


def test_unknown_load_never_holds_a_role_above_its_max_replicas() -> None:
    """maxReplicas lowered to 1 below a Builtin role at 3, one leader unreadable: the hold kept 3,
    no drain started, and the controller (which waits for the scaler's drain) held the role above
    its bound for good (helper-67)."""
    assert held_size(3, None, 1, unread=1, blind=0, ceiling=1) == 1
    assert held_size(3, None, 1, unread=0, blind=2, ceiling=2) == 2
    assert held_size(4, None, 2, unread=1, blind=0, ceiling=6) == 4  # a bound above: as before

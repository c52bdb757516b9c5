"""Revision history records and rollback targets (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pdorch.rollout import history

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).parents[2] / "examples/sim-pd/servinggroup.yaml"

SG = {
    "apiVersion": "pdorch.io/v1alpha1",
    "kind": "ServingGroup",
    "metadata": {"name": "g", "namespace": "ns", "uid": "u-1"},
    "spec": {"roles": [{"name": "decode"}]},
}


def _rec(rev: str, n: int) -> dict[str, Any]:
    return history.revision_object(SG, rev, n)


def test_revision_object_is_owned_labelled_and_keeps_the_spec() -> None:
    cr = _rec("abc", 3)
    assert cr["metadata"]["name"] == "g-abc"
    assert cr["metadata"]["labels"]["pdorch.io/group"] == "g"
    assert history.revision_of_object(cr) == "abc"
    assert cr["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert cr["data"]["spec"] == SG["spec"] and cr["revision"] == 3


def test_next_number_and_prune() -> None:
    recs = [_rec(f"r{i}", i) for i in range(1, 14)]
    assert history.next_number([]) == 1
    assert history.next_number(recs) == 14
    pruned = history.to_prune(recs, keep="r13", limit=10)
    assert pruned == ["g-r3", "g-r2", "g-r1"]
    assert "g-r1" not in history.to_prune(recs, keep="r1", limit=10)


def test_rollback_target_during_and_after_a_rollout() -> None:
    recs = [_rec("a", 1), _rec("b", 2), _rec("c", 3)]
    # During a rollout from b to c: back to b.
    assert history.revision_of_object(history.rollback_target(recs, "b", "c")) == "b"
    # After it: the newest older than c.
    assert history.revision_of_object(history.rollback_target(recs, "c", "c")) == "b"
    # Rolled back to b: b's record becomes the newest again, and the previous revision is c.
    assert history.stale_record(recs, "b") is recs[1]
    assert history.stale_record(recs, "c") is None and history.stale_record(recs, "z") is None
    again = [recs[0], recs[2], _rec("b", history.next_number(recs))]
    assert history.revision_of_object(history.rollback_target(again, "b", "b")) == "c"
    assert history.revision_of_object(history.rollback_target(recs, "c", "c", to="a")) == "a"


def test_rollback_after_a_rollback_and_a_new_deploy_returns_to_the_good_revision() -> None:
    # a (good) -> b (bad) -> rollback to a -> c: rolling c back must restore a, not the bad b.
    recs = [_rec("a", 1), _rec("b", 2)]
    stale = history.stale_record(recs, "a")
    assert stale is not None
    recs = [r for r in recs if r is not stale] + [_rec("a", history.next_number(recs))]
    recs.append(_rec("c", history.next_number(recs)))
    assert history.revision_of_object(history.rollback_target(recs, "c", "c")) == "a"


def test_a_second_rollback_before_the_controller_wrote_status_goes_by_the_live_spec() -> None:
    """b -> c, then `pdorch rollback` back to b: the controller renumbers b's record newest before
    it writes status. A second rollback in between read status (still c, c) and the renumbered
    history, and picked a, the revision before b. The live spec says the group is rolling to b."""
    spec_b = yaml.safe_load(EXAMPLE.read_text())["spec"]
    live = {
        **SG,
        "metadata": {**SG["metadata"], "generation": 5},
        "spec": spec_b,
        "status": {"currentRevision": "c", "updateRevision": "c", "observedGeneration": 4},
    }
    b = history.live_update_revision(live)
    assert b is not None and b != "c"
    renumbered = [_rec("a", 1), _rec("c", 3), _rec(b, 4)]
    # What the CLI used to pass (status alone):
    assert history.revision_of_object(history.rollback_target(renumbered, "c", "c")) == "a"
    # From the live spec: the rollback to b is itself the rollout, so "back" is c.
    assert history.revision_of_object(history.rollback_target(renumbered, "c", b)) == "c"
    # A spec that does not parse leaves status's word, and so does a status of this generation.
    assert history.live_update_revision({**live, "spec": {"roles": "nope"}}) == "c"
    current = {**live, "status": {**live["status"], "observedGeneration": 5}}
    assert history.live_update_revision(current) == "c"


def test_rollback_target_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="no recorded revision 'z'"):
        history.rollback_target([_rec("a", 1)], "a", "a", to="z")
    with pytest.raises(ValueError, match="no earlier revision"):
        history.rollback_target([_rec("a", 1)], "a", "a")
    with pytest.raises(ValueError, match="--to-revision"):
        history.rollback_target([_rec("b", 2)], "a", "b")


def test_owned_records_skip_lws_revisions() -> None:
    lws_cr = {"metadata": {"name": "g-prefill-abc", "ownerReferences": [{"kind": "LeaderWorkerSet"}]}}
    assert history.owned_records([_rec("a", 1), lws_cr]) == [_rec("a", 1)]


# --- restore_revision: what `pdorch rollback` writes -------------------------------------------


def _role(name: str, typ: str, replicas: int, image: str, **extra: Any) -> dict[str, Any]:
    tmpl = {"spec": {"containers": [{"name": "engine", "image": image}]}}
    return {"name": name, "type": typ, "replicas": replicas, "workerTemplate": tmpl, **extra}


def _spec(*roles: dict[str, Any], engine: str = "vllm", **extra: Any) -> dict[str, Any]:
    proxy = {"name": "proxy", "type": "proxy", "replicas": 1}
    return {"engine": {"name": engine}, "roles": [proxy, *roles], **extra}


def _revision(spec: dict[str, Any]) -> str:
    from pdorch.api.servinggroup import ServingGroupSpec
    from pdorch.roles.revision import compute_revision

    return compute_revision(ServingGroupSpec.model_validate(spec))


def test_rollback_restores_the_revision_and_keeps_replicas_scaling_and_router() -> None:
    # The cluster repro: prefill scaled 4 -> 6 and router.policy changed after v1 was recorded,
    # then a template change (v2). Rolling back must bring v1's image, not 4 and least_load.
    recorded = _spec(
        _role("prefill", "prefill", 4, "img:v1"),
        _role("decode", "decode", 2, "img:v1", scaling={"mode": "External", "maxReplicas": 4}),
        router={"policy": "least_load"},
    )
    live = _spec(
        _role("prefill", "prefill", 6, "img:v2", size=2, port=9000, startupPolicy="LeaderReady"),
        _role("decode", "decode", 3, "img:v2", scaling={"mode": "External", "maxReplicas": 8}),
        engine="vllm",
        router={"policy": "power_of_two"},
        rolloutStrategy={"maxSurge": 1},
        ratio={"prefill": 2, "decode": 1},
    )
    live["engine"]["kvTransfer"] = {"connector": "NixlConnector"}
    out = history.restore_revision(live, recorded, "v1")
    assert _revision(out.spec) == _revision(recorded) != _revision(live)
    prefill, decode = out.spec["roles"][1], out.spec["roles"][2]
    assert prefill["workerTemplate"] == recorded["roles"][1]["workerTemplate"]
    # size and port were not set in v1: back to their defaults (absent), not kept from v2.
    assert "size" not in prefill and "port" not in prefill
    assert prefill["replicas"] == 6 and prefill["startupPolicy"] == "LeaderReady"
    assert decode["replicas"] == 3 and decode["scaling"] == {"mode": "External", "maxReplicas": 8}
    assert out.spec["engine"] == {"name": "vllm"}
    for key in ("router", "rolloutStrategy", "ratio"):
        assert out.spec[key] == live[key]
    assert out.spec["roles"][0] is live["roles"][0] and out.notes == ()
    assert live["roles"][1]["workerTemplate"]["spec"]["containers"][0]["image"] == "img:v2"  # not mutated


def test_rollback_with_an_unchanged_revision_changes_nothing() -> None:
    spec = _spec(_role("prefill", "prefill", 4, "img:v1"), _role("decode", "decode", 2, "img:v1"))
    moved = _spec(_role("prefill", "prefill", 9, "img:v1"), _role("decode", "decode", 1, "img:v1"))
    assert history.restore_revision(moved, spec, "v1").spec == moved


def test_rollback_keeps_the_live_proxy_role() -> None:
    recorded = _spec(_role("prefill", "prefill", 1, "a"), _role("decode", "decode", 1, "a"))
    recorded["roles"][0]["replicas"] = 5
    live = {
        "engine": {"name": "vllm"},
        "roles": [_role("prefill", "prefill", 1, "b"), _role("decode", "decode", 1, "b")],
    }
    out = history.restore_revision(live, recorded, "v1")
    assert [r["type"] for r in out.spec["roles"]] == ["prefill", "decode"]  # no proxy then, none now


def test_rollback_role_set_changes_are_reported() -> None:
    recorded = _spec(
        _role("prefill", "prefill", 4, "a"),
        _role("decode", "decode", 2, "a"),
        _role("kvstore", "worker", 3, "a"),
    )
    live = _spec(
        _role("prefill", "prefill", 6, "b"),
        _role("decode", "decode", 2, "b"),
        _role("decode-b", "decode", 1, "b"),
    )
    out = history.restore_revision(live, recorded, "v1")
    assert [r["name"] for r in out.spec["roles"]] == ["proxy", "prefill", "decode", "kvstore"]
    assert out.spec["roles"][3] == recorded["roles"][3]  # nothing live to keep: as recorded
    assert out.notes == (
        "role decode-b (decode) removed: revision v1 has no such role",
        "role kvstore (worker) restored as recorded in revision v1 (replicas 3): it is not in the live spec",
    )
    assert _revision(out.spec) == _revision(recorded)


def test_rollback_refuses_a_role_that_changed_type() -> None:
    recorded = _spec(_role("a", "prefill", 2, "x"), _role("b", "decode", 1, "x"))
    live = _spec(_role("a", "decode", 2, "y"), _role("b", "prefill", 1, "y"))
    with pytest.raises(history.RollbackRefused, match="role a is decode now but prefill in revision v1"):
        history.restore_revision(live, recorded, "v1")
    # The live proxy taking the name of a recorded KV role is the same conflict.
    live = _spec(_role("x", "prefill", 2, "y"), _role("b", "decode", 1, "y"))
    recorded = {"engine": {"name": "vllm"}, "roles": [_role("proxy", "prefill", 1, "x"), live["roles"][2]]}
    with pytest.raises(history.RollbackRefused, match="role proxy is proxy now but prefill"):
        history.restore_revision(live, recorded, "v1")


def test_rollback_refuses_a_result_the_api_would_refuse() -> None:
    # Conditional disaggregation (router, kept) needs vllm; the recorded revision ran sglang.
    recorded = _spec(_role("prefill", "prefill", 1, "x"), _role("decode", "decode", 1, "x"), engine="sglang")
    live = _spec(
        _role("prefill", "prefill", 1, "y"),
        _role("decode", "decode", 1, "y"),
        router={"conditionalDisaggregation": {"minPromptTokens": 64}},
    )
    with pytest.raises(
        history.RollbackRefused, match=r"does not fit the live spec.*conditionalDisaggregation"
    ):
        history.restore_revision(live, recorded, "v1")


def test_rollback_reads_records_written_before_it_kept_only_the_revision() -> None:
    # Records hold the whole spec as it was (replicas, router...), as every pdorch version wrote them.
    old_sg = {**SG, "spec": _spec(_role("prefill", "prefill", 4, "a"), _role("decode", "decode", 2, "a"))}
    old_sg["spec"]["router"] = {"policy": "least_load"}
    record = history.revision_object(old_sg, "v1", 1)
    live = _spec(
        _role("prefill", "prefill", 6, "b"),
        _role("decode", "decode", 2, "b"),
        router={"policy": "power_of_two"},
    )
    out = history.restore_revision(live, record["data"]["spec"], history.revision_of_object(record))
    assert out.spec["roles"][1]["replicas"] == 6 and out.spec["router"] == {"policy": "power_of_two"}
    assert out.spec["roles"][1]["workerTemplate"] == old_sg["spec"]["roles"][1]["workerTemplate"]


def test_revision_fields_are_what_the_revision_hashes() -> None:
    # REVISION_ROLE_FIELDS drives the rollback; it must name every input of the hash, no more.
    from pdorch.api.servinggroup import Role
    from pdorch.roles.revision import REVISION_ROLE_FIELDS, _role_input

    role = Role.model_validate(
        {
            **_role("p", "prefill", 1, "a", size=2, port=9000, bootstrapPort=9001),
            "leaderTemplate": {"spec": {"containers": [{"name": "leader", "image": "a"}]}},
            "restartPolicy": "None",
            "subGroupPolicy": {"subGroupSize": 2},
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "v"},
                    "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
                }
            ],
            "networkConfig": {"subdomainPolicy": "Shared"},
        }
    )
    assert set(_role_input(role)) == set(REVISION_ROLE_FIELDS)


def test_owned_records_of_one_group_object_skip_an_earlier_groups_of_the_same_name() -> None:
    mine, earlier = _rec("a", 1), _rec("b", 2)
    mine["metadata"]["ownerReferences"] = [{"kind": "ServingGroup", "uid": "new"}]
    earlier["metadata"]["ownerReferences"] = [{"kind": "ServingGroup", "uid": "old"}]
    assert history.owned_records([mine, earlier], "new") == [mine]
    assert history.owned_records([mine, earlier]) == [mine, earlier]

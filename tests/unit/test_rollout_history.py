"""Revision history records and rollback targets (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from pdorch.rollout import history

pytestmark = pytest.mark.unit

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

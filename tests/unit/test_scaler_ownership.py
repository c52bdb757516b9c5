"""Who set a role's size (pdorch.scaler.ownership) and what a size another writer set does to the
damping (helper-65 finding 5: an HPA and the scaler on one ServingRoleScaler fought unseen)."""

from __future__ import annotations

import pytest

from pdorch.scaler.damping import DampingConfig, DampingState, damp, rebaseline
from pdorch.scaler.ownership import (
    CONFLICT_WINDOW_S,
    SizeOwnership,
    foreign_note,
    intend_size,
    replicas_manager,
    see_size,
    wrote_size,
)

pytestmark = pytest.mark.unit


def test_the_first_sight_and_the_scalers_own_writes_are_not_foreign() -> None:
    s = SizeOwnership()
    assert not see_size(s, "u1", 1, 2, 0.0).foreign  # a (re)started scaler's baseline
    assert not see_size(s, "u1", 1, 2, 15.0).foreign
    wrote_size(s, 1, 1)  # this scaler wrote 1 over generation 1
    assert not see_size(s, "u1", 2, 1, 30.0).foreign
    # The group re-created under the same name: another object, generation 1 again.
    assert not see_size(s, "u2", 1, 3, 45.0).foreign


def test_a_size_another_writer_set_is_foreign_and_names_the_size_before() -> None:
    s = SizeOwnership()
    see_size(s, "u1", 1, 4, 0.0)
    seen = see_size(s, "u1", 2, 6, 15.0)  # kubectl scale 4 -> 6
    assert seen.foreign and seen.previous == 4
    assert not seen.overrode and not seen.warn  # the scaler had not written 4: an operator's change
    assert not see_size(s, "u1", 2, 6, 30.0).foreign  # seen once, then it is the baseline


def test_a_writer_that_keeps_replacing_the_scalers_sizes_is_warned_about_once_a_window() -> None:
    s = SizeOwnership()
    see_size(s, "u1", 1, 3, 0.0)
    gen, t, warned = 1, 0.0, []
    for _ in range(4):  # the scaler writes 1, the HPA (minReplicas 3) writes 3 back
        wrote_size(s, gen, 1)
        gen += 2
        t += 300.0
        seen = see_size(s, "u1", gen, 3, t)
        assert seen.foreign and seen.overrode
        warned.append(seen.warn)
    assert warned == [False, True, False, False]
    assert seen.conflicting and seen.overrides == 4
    # An hour later without another replacement the episode is over; the next one warns again.
    t += CONFLICT_WINDOW_S
    for _ in range(2):
        wrote_size(s, gen, 1)
        gen += 2
        t += 300.0
        seen = see_size(s, "u1", gen, 3, t)
    assert seen.warn and seen.overrides == 2


def test_the_manager_that_owns_spec_replicas_names_the_other_writer() -> None:
    def entry(manager: str, time: str, replicas: bool = True) -> dict[str, object]:
        spec = {"f:replicas": {}} if replicas else {"f:role": {}}
        return {"manager": manager, "time": time, "fieldsV1": {"f:spec": spec}}

    obj = {
        "metadata": {
            "managedFields": [
                entry("pdorch", "2026-12-07T06:00:00Z", replicas=False),
                entry("pdorch-scaler", "2026-12-07T07:00:00Z"),
                entry("kube-controller-manager", "2026-12-07T06:30:00Z"),
            ]
        }
    }
    assert replicas_manager(obj, "pdorch-scaler") == "kube-controller-manager"
    assert replicas_manager({"metadata": {}}, "pdorch-scaler") is None
    seen = see_size(s := SizeOwnership(), "u", 1, 3, 0.0)
    wrote_size(s, 1, 1)
    wrote_size(s, 3, 1)
    seen = see_size(s, "u", 3, 3, 10.0)
    assert "another writer" in foreign_note(seen, 3, None)


def test_a_foreign_size_is_not_reversed_before_the_cooldown_and_the_scale_down_window() -> None:
    cfg = DampingConfig(min_replicas=1, max_replicas=8, scale_down_stabilization_s=120, cooldown_s=60)
    s = DampingState()
    # The scaler wants 1 for a while; its window lets it go at 120 s (the drain starts).
    assert [damp(s, cfg, t, 4, 1).replicas for t in range(0, 150, 15)][8] == 1
    rebaseline(s, 165.0, 6)  # kubectl scale to 6 mid-drain
    got = {t: damp(s, cfg, t, 6, 1).replicas for t in range(180, 285, 15)}
    assert set(got.values()) == {6}, got  # the drain to 1 went on at once before
    assert damp(s, cfg, 285.0, 6, 1).replicas == 1  # a whole scale-down window after the change


def test_a_foreign_scale_down_holds_a_scale_up_for_the_cooldown_too() -> None:
    # The burst exemption (up right after the scaler's own down) would reverse an HPA's
    # maxReplicas at the next tick: after another writer's change the cooldown holds both ways.
    cfg = DampingConfig(min_replicas=1, max_replicas=8, cooldown_s=60)
    s = DampingState()
    rebaseline(s, 0.0, 2)
    d = damp(s, cfg, 15.0, 2, 5)
    assert d.replicas == 2 and d.held == "cooldown 60s"
    assert damp(s, cfg, 61.0, 2, 5).replicas == 5


def test_a_write_whose_answer_was_lost_is_still_the_scalers() -> None:
    s = SizeOwnership()
    see_size(s, "u1", 4, 3, 0.0)
    intend_size(s, 4, 1)  # the /scale PATCH timed out after the server applied it
    assert not see_size(s, "u1", 5, 1, 15.0).foreign
    intend_size(s, 5, 2)  # refused (409): someone else wrote 4 meanwhile
    seen = see_size(s, "u1", 6, 4, 30.0)
    assert seen.foreign and seen.previous == 1 and seen.overrode

"""Per-group controller metrics: ratio deviation never frozen, every series gone with the group."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from pdorch.controller import reconciler as rc
from pdorch.controller import status as st

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sim-pd" / "servinggroup.yaml"


def _roles(p_ready: int, d_ready: int) -> list[st.RoleObservation]:
    return [
        st.RoleObservation("prefill", "prefill", 2, 2, p_ready, 2, 0, True),
        st.RoleObservation("decode", "decode", 1, 1, d_ready, 1, 0, True),
    ]


def _value(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_ratio_deviation_is_set_when_a_side_has_no_ready_group() -> None:
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["spec"]["ratio"] = {"prefill": 2, "decode": 1, "tolerance": 0.5}
    declared = rc.declared_ratio(obj["spec"])
    assert declared == (2, 1)
    assert rc.ratio_deviation(declared, _roles(2, 1)) == 0.0
    assert rc.ratio_deviation(declared, _roles(1, 1)) == pytest.approx(0.6931, abs=1e-3)
    # No decode ready: no P:D pair can form; was left at its last value (0 = "on ratio").
    assert rc.ratio_deviation(declared, _roles(2, 0)) == 1.0
    assert rc.ratio_deviation(declared, _roles(0, 1)) == 1.0
    assert rc.ratio_deviation(declared, _roles(0, 0)) == 1.0
    # Nothing declared: the desired counts' ratio (2:1 here).
    assert rc.ratio_deviation(None, _roles(1, 1)) == pytest.approx(0.6931, abs=1e-3)
    assert rc.ratio_deviation((1, 1), _roles(1, 1)) == 0.0
    obj["metadata"] = {"namespace": "m", "name": "ratio"}
    labels = {"namespace": "m", "group": "ratio"}
    rc._record_ratio(obj, _roles(2, 1))
    assert _value("pdorch_ratio_deviation", labels) == 0.0
    rc._record_ratio(obj, _roles(2, 0))
    assert _value("pdorch_ratio_deviation", labels) == 1.0


@pytest.mark.parametrize(
    "ratio",
    [
        None,
        "2:1",
        {"prefill": 0, "decode": 1},
        {"prefill": 2},
        {"prefill": True, "decode": 1},
        {"prefill": 1.5, "decode": 1},
    ],
)
def test_a_ratio_the_models_would_refuse_is_not_declared(ratio: object) -> None:
    # An Invalid spec's gauge then compares with the desired counts instead of failing.
    assert rc.declared_ratio({"ratio": ratio}) is None
    assert rc.declared_ratio("not a spec") is None


def test_a_deleted_group_leaves_no_series_behind() -> None:
    labels = {"namespace": "m", "group": "g3"}
    rc.ROLLOUT_STALLED.labels("m", "g3").set(1)
    rc.COHORT_DEVIATION.labels("m", "g3").set(0.5)
    rc.RATIO_DEVIATION.labels("m", "g3").set(0.2)
    rc.ROLLOUT_STEPS.labels("m", "g3").inc()
    rc.ROLLOUT_STALLED.labels("m", "other").set(1)
    rc.forget_group_metrics("m", "g3")
    for name in (
        "pdorch_rollout_stalled",
        "pdorch_rollout_cohort_ratio_deviation",
        "pdorch_ratio_deviation",
        "pdorch_rollout_steps_total",
    ):
        assert _value(name, labels) is None, name
    assert _value("pdorch_rollout_stalled", {"namespace": "m", "group": "other"}) == 1
    rc.forget_group_metrics("m", "never-seen")  # nothing recorded: no error

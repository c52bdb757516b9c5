"""Injected sim faults: which engines misbehave, and refusal of bad settings."""

from __future__ import annotations

import pytest

from pdorch.sim.faults import Faults, validate_faults

pytestmark = pytest.mark.unit


def test_faults_apply_to_listed_roles_only() -> None:
    assert not Faults().applies("decode")  # nothing configured
    f = Faults(roles=frozenset({"prefill"}), status=503)
    assert f.applies("prefill") and not f.applies("decode")
    assert Faults(hang=True).applies("both")  # no roles = every role


@pytest.mark.parametrize(
    ("faults", "flag"),
    [
        (Faults(status=200), "--fault-status"),
        (Faults(stall_after_tokens=-1), "--fault-stall-after"),
        (Faults(roles=frozenset({"router"}), hang=True), "--fault-roles"),
    ],
)
def test_bad_fault_settings_name_the_flag(faults: Faults, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        validate_faults(faults)

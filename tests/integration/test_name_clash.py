"""Two groups whose object names collide (names are <group>-<role>, both may contain '-'): the
second is marked Invalid naming the clash, and the first keeps its objects (real apiserver, LWS)."""

from __future__ import annotations

from typing import Any

import pytest
from lightkube import Client

from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from tests.integration.test_controller import LWS, SG, condition, example, wait_available

pytestmark = pytest.mark.integration


def _invalid(kube: Client, namespace: str, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        c = condition(kube.get(SG, name, namespace=namespace), "Invalid")
        return c if c and c["status"] == "True" else None

    return wait_for(check, 60, f"{name} Invalid")


def test_a_group_whose_names_clash_with_another_is_invalid_and_takes_nothing_over(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    kube.create(SG.from_dict(example("co-ll")), namespace=namespace)
    wait_available(kube, namespace, "co-ll")
    before = kube.get(LWS, "co-ll-prefill", namespace=namespace)

    # "co" + role "ll-prefill" is the LeaderWorkerSet co-ll-prefill, which is co-ll's.
    clash = example("co")
    next(r for r in clash["spec"]["roles"] if r["type"] == "prefill")["name"] = "ll-prefill"
    kube.create(SG.from_dict(clash), namespace=namespace)
    c = _invalid(kube, namespace, "co")
    assert "LeaderWorkerSet co-ll-prefill belongs to ServingGroup co-ll" in c["message"], c
    assert "rename this group or the role" in c["message"]

    # "co-ll-prefill"'s proxy Service would be the headless Service LWS keeps for co-ll-prefill.
    kube.create(SG.from_dict(example("co-ll-prefill")), namespace=namespace)
    c = _invalid(kube, namespace, "co-ll-prefill")
    assert "Service co-ll-prefill" in c["message"], c

    after = kube.get(LWS, "co-ll-prefill", namespace=namespace)
    assert after.metadata.generation == before.metadata.generation
    assert after.metadata.ownerReferences[0].name == "co-ll"
    assert condition(kube.get(SG, "co-ll", namespace=namespace), "Available")["status"] == "True"

"""The pydantic mirror of the CRD's validation refuses what the apiserver refuses, naming the field.

The cases in data/servinggroup_cases.yaml were also run through the apiserver's own CRD validation
code (structural schema + CEL, k8s.io/apiextensions-apiserver v0.34.4) with the same expectations.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pdorch.api.base import CelRule
from pdorch.api.errors import SpecError, field_path, format_validation_error, load_servinggroups
from pdorch.api.scaler import ServingRoleScalerSpec
from pdorch.api.servinggroup import (
    MAX_GROUP_NAME_LENGTH,
    MAX_ROLE_NAME_LENGTH,
    Role,
    RolloutStrategy,
    Scaling,
    ServingGroup,
    ServingGroupSpec,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"
EXAMPLE = Path(__file__).parents[2] / "examples" / "sim-pd" / "servinggroup.yaml"
CASES: list[dict[str, Any]] = yaml.safe_load((DATA / "servinggroup_cases.yaml").read_text())


def _problems(obj: dict[str, Any]) -> list[str]:
    try:
        ServingGroup.model_validate(copy.deepcopy(obj))
    except ValidationError as exc:
        return format_validation_error(exc)
    return []


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    problems = _problems(case["object"])
    if case["expect"] == "ok":
        assert problems == []
    else:
        assert problems, "expected a refusal"
        assert any(case["expect"] in p for p in problems), problems


def test_cases_cover_both_outcomes() -> None:
    expects = [c["expect"] for c in CASES]
    assert expects.count("ok") >= 5
    assert len(expects) - expects.count("ok") >= 20


def test_example_is_a_valid_sim_pd_group() -> None:
    (sg,) = load_servinggroups(EXAMPLE.read_text(), str(EXAMPLE))
    by_name = {r.name: r for r in sg.spec.roles}
    assert sg.spec.engine.name == "vllm"
    assert (by_name["prefill"].replicas, by_name["prefill"].size) == (2, 1)
    assert (by_name["decode"].replicas, by_name["decode"].size) == (1, 1)
    assert not by_name["proxy"].has_template
    for role in ("prefill", "decode"):
        (container,) = by_name[role].worker_template["spec"]["containers"]
        assert container["image"] == "pdorch/sim:dev"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["command"][:2] == ["pdorch", "sim"]
        assert "--role" in container["command"] and role in container["command"]


def test_errors_name_the_field_path() -> None:
    obj = copy.deepcopy(CASES[0]["object"])
    obj["spec"]["roles"][1]["replicas"] = -3
    obj["spec"]["roles"][2]["scaling"] = {"mode": "External", "minReplicas": 4, "maxReplicas": 1}
    problems = _problems(obj)
    assert any(p.startswith("spec.roles[1].replicas:") for p in problems), problems
    assert any(p.startswith("spec.roles[2].scaling:") and "minReplicas" in p for p in problems), problems


def test_several_broken_rules_are_all_reported() -> None:
    obj = copy.deepcopy(CASES[0]["object"])
    roles = obj["spec"]["roles"]
    obj["spec"]["roles"] = [r for r in roles if r["type"] != "prefill"] + [{"name": "p2", "type": "proxy"}]
    problems = _problems(obj)
    assert any("at least one role of type prefill" in p for p in problems)
    assert any("at most one role of type proxy" in p for p in problems)


def test_field_path_skips_pydantic_internal_steps() -> None:
    loc = ("spec", "rolloutStrategy", "maxSurge", "function-after[_check_int_or_percent(), union[int,str]]")
    assert field_path(loc) == "spec.rolloutStrategy.maxSurge"
    assert field_path(("spec", "roles", 3, "name")) == "spec.roles[3].name"


def test_load_refuses_other_kinds_and_bad_yaml() -> None:
    with pytest.raises(SpecError, match="kind must be ServingGroup"):
        load_servinggroups("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_servinggroups("a: [1, 2\n")
    with pytest.raises(SpecError, match="no ServingGroup"):
        load_servinggroups("")


def test_metadata_name_is_required() -> None:
    obj = copy.deepcopy(CASES[0]["object"])
    obj["metadata"] = {"generateName": "x-"}
    assert any("metadata" in p and "name is required" in p for p in _problems(obj))


def test_int_or_string_keeps_the_type_given() -> None:
    s = RolloutStrategy.model_validate({"maxSurge": "25%", "maxUnavailable": 2})
    assert (s.max_surge, s.max_unavailable) == ("25%", 2)
    assert s.to_wire()["maxSurge"] == "25%"
    with pytest.raises(ValidationError):
        RolloutStrategy.model_validate({"maxSurge": True})


def test_defaults_match_the_design() -> None:
    role = Role.model_validate(
        {
            "name": "d",
            "type": "decode",
            "workerTemplate": CASES[0]["object"]["spec"]["roles"][2]["workerTemplate"],
        }
    )
    assert (role.replicas, role.size, role.port, role.scaling_mode) == (1, 1, 8000, "Static")
    assert RolloutStrategy().progress_deadline_seconds == 600
    assert RolloutStrategy().paused is False


def test_name_budget_fits_kubernetes_limits() -> None:
    # Worst case names derived by LWS: worker StatefulSet `<group>-<role>-<groupIndex>` must stay
    # <= 52 (its controller-revision-hash label adds 11), pod `<sts>-<workerIndex>` <= 63.
    lws = MAX_GROUP_NAME_LENGTH + 1 + MAX_ROLE_NAME_LENGTH
    worker_sts = lws + 1 + len("9999")
    pod = worker_sts + 1 + len("1023")
    assert worker_sts <= 52
    assert pod <= 63


@pytest.mark.parametrize(
    "model", [Scaling, Role, RolloutStrategy, ServingGroupSpec, ServingGroup, ServingRoleScalerSpec]
)
def test_every_cel_rule_has_a_field_naming_message(model: type) -> None:
    rules: tuple[CelRule, ...] = model.cel_rules
    assert rules
    for rule in rules:
        assert rule.rule and rule.message
        # The message must point at a field (e.g. "spec.roles", "scaling.minReplicas").
        assert any(
            tok in rule.message
            for tok in ("spec.", "roles[]", "scaling.", "rolloutStrategy.", "metadata.name")
        )


@pytest.mark.parametrize(("surge", "unavailable"), [("00%", 0), ("000%", "00%"), (0, "0%")])
def test_zero_budgets_are_refused_however_zero_is_written(surge: Any, unavailable: Any) -> None:
    with pytest.raises(ValidationError, match="must not both be 0"):
        RolloutStrategy(max_surge=surge, max_unavailable=unavailable)


@pytest.mark.parametrize(
    ("auth", "field"),
    [({"secretName": "api..keys"}, "secretName"), ({"secretName": "k", "key": "tokens/api"}, "key")],
)
def test_router_auth_names_kubernetes_refuses_are_refused(auth: dict[str, str], field: str) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["router"] = {"auth": auth}
    problems = _problems(doc)
    assert any(field in p for p in problems), problems
    doc["spec"]["router"] = {"auth": {"secretName": "api.keys", "key": "api_key.v1"}}
    assert _problems(doc) == []


@pytest.mark.parametrize(
    ("size", "sub", "kind", "ok"),
    [
        (4, 2, None, True),
        (5, 2, None, True),  # size - 1 divides
        (5, 3, None, False),
        (2, 4, None, False),  # larger than size
        (4, 2, "LeaderExcluded", False),  # size - 1 = 3
        (5, 2, "LeaderExcluded", True),
    ],
)
def test_sub_group_size_follows_the_lws_rules(size: int, sub: int, kind: str | None, ok: bool) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    role = next(r for r in doc["spec"]["roles"] if r["type"] == "decode")
    role["size"] = size
    role["subGroupPolicy"] = {"subGroupSize": sub, **({"subGroupPolicyType": kind} if kind else {})}
    problems = _problems(doc)
    assert (problems == []) == ok, problems
    if not ok:
        assert any("subGroupSize" in p for p in problems), problems


def _rule(model: type, needle: str) -> dict[str, Any]:
    (rule,) = [r.to_schema() for r in model.cel_rules if needle in r.rule]
    return rule


@pytest.mark.parametrize(
    ("name", "refused"),
    [("prefill-0", True), ("decode-12", True), ("7", True), ("p0", False), ("a-1b", False)],
)
def test_role_names_lws_indices_could_take(name: str, refused: bool) -> None:
    """LWS names group i's StatefulSets and pods `<group>-<role>-<i>`: a role `prefill-0` would take
    role `prefill`'s names (and a role `0` of group `g-prefill` those of group `g`)."""
    numbered = _rule(Role, "self.name.matches(")
    pattern = numbered["rule"].split("matches('")[1].split("')")[0]
    assert (re.fullmatch(pattern, name) is not None) == refused


def test_rules_added_in_a_later_release_spare_what_was_stored_before() -> None:
    """Numbered role names and a router without a proxy role are refused by the apiserver on new
    data only (`optionalOldSelf`): a group stored before the rule existed stays writable (status,
    finalizers), and the controller, which validates stored groups with these models, does not
    mark it Invalid (tests/integration/test_validation.py checks the apiserver's side)."""
    numbered = _rule(Role, "self.name.matches(")
    assert numbered["optionalOldSelf"] is True and numbered["rule"].startswith("oldSelf.hasValue() ||")
    router = _rule(ServingGroupSpec, "oldSelf.value().router")
    assert router["optionalOldSelf"] is True and "oldSelf.value().router" in router["rule"]
    doc = yaml.safe_load(EXAMPLE.read_text())
    next(r for r in doc["spec"]["roles"] if r["type"] == "decode")["name"] = "decode-1"
    doc["spec"]["roles"] = [r for r in doc["spec"]["roles"] if r["type"] != "proxy"]
    assert _problems(doc) == []


def test_an_sglang_bootstrap_port_must_not_be_the_server_port() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["engine"] = {"name": "sglang"}
    prefill = next(r for r in doc["spec"]["roles"] if r["type"] == "prefill")
    prefill["bootstrapPort"] = 8000
    assert any("must differ from roles[].port" in p for p in _problems(doc))
    prefill["bootstrapPort"] = 8998
    assert _problems(doc) == []

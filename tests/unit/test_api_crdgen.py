"""The generated CRDs are structural, carry the CEL rules and subresources, and match the repo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pdorch.api import crdgen
from pdorch.api.crdgen import (
    ALL_CRDS,
    SERVING_GROUP_CRD,
    SERVING_ROLE_SCALER_CRD,
    SchemaError,
    check_crds,
    crd_object,
    crd_yaml,
    structural_schema,
    write_crds,
)
from pdorch.api.servinggroup import Role, RolloutStrategy, Scaling, ServingGroup, ServingGroupSpec

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]

# Keys allowed in a structural schema node (apiextensions v1 JSONSchemaProps minus refs/unions).
ALLOWED_KEYS = {
    "type", "format", "description", "properties", "items", "required", "enum", "default",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "minProperties", "maxProperties", "nullable",
    "additionalProperties", "x-kubernetes-validations", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type", "x-kubernetes-embedded-resource",
}  # fmt: skip


def structural_problems(node: Any, path: str = "") -> list[str]:
    """An independent checker of the structural-schema rules (notes/python-k8s.md §5)."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return [f"{path}: not a schema object"]
    for key in node:
        if key not in ALLOWED_KEYS:
            problems.append(f"{path}: forbidden key {key!r}")
    marker = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if not node.get("type") and not marker:
        problems.append(f"{path}: node without type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties next to additionalProperties")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            problems.append(f"{path}: numeric {key} (OAS3 wants a boolean)")
    if "default" in node and node["default"] is None:
        problems.append(f"{path}: null default")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path}: array without items")
    for rule in node.get("x-kubernetes-validations", []):
        if not rule.get("rule") or not rule.get("message"):
            problems.append(f"{path}: CEL rule without rule/message")
    for name, sub in (node.get("properties") or {}).items():
        problems.extend(structural_problems(sub, f"{path}.{name}"))
    if "items" in node:
        problems.extend(structural_problems(node["items"], f"{path}[]"))
    if isinstance(node.get("additionalProperties"), dict):
        problems.extend(structural_problems(node["additionalProperties"], f"{path}{{}}"))
    return problems


def _schema(crd: crdgen.CrdSpec) -> dict[str, Any]:
    return crd_object(crd)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in (node.get("properties") or {}).items():
        out.extend(_walk(sub, f"{path}.{name}"))
    if "items" in node:
        out.extend(_walk(node["items"], f"{path}[]"))
    return out


@pytest.mark.parametrize("crd", ALL_CRDS, ids=lambda c: c.kind)
def test_generated_schema_is_structural(crd: crdgen.CrdSpec) -> None:
    assert structural_problems(_schema(crd)) == []


@pytest.mark.parametrize("out", crdgen.CRD_DIRS, ids=str)
@pytest.mark.parametrize("crd", ALL_CRDS, ids=lambda c: c.kind)
def test_committed_crd_matches_models(crd: crdgen.CrdSpec, out: Path) -> None:
    # The Helm chart's crds/ holds copies (helm warned on every symlink): both must be current.
    path = REPO / out / crd.filename
    assert path.exists(), f"missing {path}; run `pdorch crds`"
    assert path.read_text() == crd_yaml(crd), f"{path} drifted; run `pdorch crds`"


def test_checker_catches_pydantic_raw_output() -> None:
    # The oracle itself must fail on what plain pydantic emits.
    raw = ServingGroupSpec.model_json_schema(by_alias=True)
    problems = "\n".join(structural_problems(raw))
    assert "$defs" in problems or "forbidden key" in problems
    assert "title" in problems


def test_every_cel_rule_of_the_models_lands_in_the_crd() -> None:
    text = crd_yaml(SERVING_GROUP_CRD)
    rules = [
        r.rule for m in (Scaling, Role, RolloutStrategy, ServingGroupSpec, ServingGroup) for r in m.cel_rules
    ]
    schema = _schema(SERVING_GROUP_CRD)
    found = [v["rule"] for _, node in _walk(schema) for v in node.get("x-kubernetes-validations", [])]
    assert sorted(found) == sorted(rules)
    assert "metadata.name.size()" in text


def test_root_rules_guard_the_group_name() -> None:
    root = _schema(SERVING_GROUP_CRD)
    rules = [v["rule"] for v in root["x-kubernetes-validations"]]
    assert any("self.metadata.name.size() <= 28" in r for r in rules)


def test_cel_lists_and_strings_are_bounded() -> None:
    # The apiserver's CEL cost estimator rejects rules over unbounded lists/strings.
    for path, node in _walk(_schema(SERVING_GROUP_CRD)) + _walk(_schema(SERVING_ROLE_SCALER_CRD)):
        if not path.startswith((".spec", ".status")):
            continue  # apiVersion/kind: standard fields no rule reads
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "string" and node.get("format") != "date-time":
            assert "maxLength" in node or "enum" in node, path


def test_roles_and_conditions_are_list_maps() -> None:
    spec = _schema(SERVING_GROUP_CRD)["properties"]["spec"]
    roles = spec["properties"]["roles"]
    assert roles["x-kubernetes-list-type"] == "map"
    assert roles["x-kubernetes-list-map-keys"] == ["name"]
    assert (roles["minItems"], roles["maxItems"]) == (2, 10)
    conds = _schema(SERVING_GROUP_CRD)["properties"]["status"]["properties"]["conditions"]
    assert conds["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conds["items"]["properties"]["status"]["enum"]) == {"True", "False", "Unknown"}


def test_pod_templates_are_opaque_objects() -> None:
    role = _schema(SERVING_GROUP_CRD)["properties"]["spec"]["properties"]["roles"]["items"]
    for key in ("leaderTemplate", "workerTemplate"):
        assert role["properties"][key]["type"] == "object"
        assert role["properties"][key]["x-kubernetes-preserve-unknown-fields"] is True
        assert "properties" not in role["properties"][key]
    assert role["properties"]["type"]["enum"] == ["proxy", "prefill", "decode", "worker"]
    assert role["properties"]["name"]["maxLength"] == 16


def test_int_or_string_fields() -> None:
    rs = _schema(SERVING_GROUP_CRD)["properties"]["spec"]["properties"]["rolloutStrategy"]
    for key in ("maxSurge", "maxUnavailable"):
        assert rs["properties"][key]["x-kubernetes-int-or-string"] is True
        assert "type" not in rs["properties"][key]
        assert "anyOf" not in rs["properties"][key]
    assert rs["properties"]["progressDeadlineSeconds"]["default"] == 600


def test_exclusive_bounds_are_oas3() -> None:
    targets = _schema(SERVING_GROUP_CRD)["properties"]["spec"]["properties"]["roles"]["items"]["properties"][
        "scaling"
    ]["properties"]["targets"]
    assert targets["properties"]["ttftMs"]["exclusiveMinimum"] is True
    assert targets["properties"]["ttftMs"]["minimum"] == 0


def test_status_has_no_defaults() -> None:
    for crd in ALL_CRDS:
        status = _schema(crd)["properties"]["status"]
        assert all("default" not in node for _, node in _walk(status))


def test_servinggroup_crd_shape() -> None:
    crd = crd_object(SERVING_GROUP_CRD)
    assert crd["metadata"]["name"] == "servinggroups.pdorch.io"
    spec = crd["spec"]
    assert spec["group"] == "pdorch.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["sg"]
    assert spec["names"]["plural"] == "servinggroups"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Prefill"]["jsonPath"] == ".status.summary.prefill"
    assert columns["Decode"]["jsonPath"] == ".status.summary.decode"
    assert columns["Proxy"]["jsonPath"] == ".status.summary.proxy"
    # The serving revision, not the update one (no group of it is ready when a rollout starts);
    # the rollout's state has its own column so a stall shows in `kubectl get sg`.
    assert columns["Revision"]["jsonPath"] == ".status.currentRevision"
    assert columns["Update Revision"]["jsonPath"] == ".status.updateRevision"
    assert columns["Update Revision"]["priority"] == 1
    assert columns["Rollout"]["jsonPath"] == ".status.summary.rollout"
    assert columns["Available"]["jsonPath"] == '.status.conditions[?(@.type=="Available")].status'
    assert columns["Age"]["type"] == "date"


def test_scaler_crd_has_scale_subresource_with_string_selector() -> None:
    crd = crd_object(SERVING_ROLE_SCALER_CRD)
    assert crd["spec"]["names"]["shortNames"] == ["srs"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["properties"]["status"]["properties"]["selector"]["type"] == "string"
    replicas = schema["properties"]["spec"]["properties"]["replicas"]
    # The /scale handler needs spec.replicas to always exist.
    assert replicas["type"] == "integer" and replicas["default"] == 1
    assert any("oldSelf" in v["rule"] for v in schema["properties"]["spec"]["x-kubernetes-validations"])


def test_rewriter_refuses_real_unions() -> None:
    class Bad(BaseModel):
        x: int | list[int]

    with pytest.raises(SchemaError, match="anyOf"):
        structural_schema(Bad)


def test_yaml_is_parseable_and_stable() -> None:
    for crd in ALL_CRDS:
        text = crd_yaml(crd)
        assert text == crd_yaml(crd)
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


def test_write_then_check(tmp_path: Path) -> None:
    assert len(check_crds(tmp_path)) == len(ALL_CRDS)  # nothing written yet: all missing
    write_crds(tmp_path)
    assert check_crds(tmp_path) == []
    target = tmp_path / SERVING_GROUP_CRD.filename
    target.write_text(target.read_text().replace("maxItems: 10", "maxItems: 11"))
    (diff,) = check_crds(tmp_path)
    assert "maxItems: 11" in diff and "maxItems: 10" in diff

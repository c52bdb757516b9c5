"""Pod-template checks the opaque CRD schema cannot make: each bad template is refused by the
models (so the controller marks the group Invalid, naming the field) instead of crashing render or
being refused later by the StatefulSet LWS creates, where no condition reports it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pdorch.api.errors import format_validation_error
from pdorch.api.servinggroup import ServingGroup
from pdorch.roles.render import RenderOptions, render

pytestmark = pytest.mark.unit

EXAMPLE = yaml.safe_load(
    (Path(__file__).parents[2] / "examples" / "sim-pd" / "servinggroup.yaml").read_text()
)


def _with_prefill_template(edit: Any) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLE)
    role = next(r for r in doc["spec"]["roles"] if r["type"] == "prefill")
    edit(role["workerTemplate"])
    return doc


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda t: t.update(metadata="x"), "metadata must be an object"),
        (lambda t: t.update(metadata={"labels": "x"}), "metadata.labels must be a map"),
        (lambda t: t.update(metadata={"labels": ["a"]}), "metadata.labels must be a map"),
        (lambda t: t.update(metadata={"annotations": []}), "metadata.annotations must be a map"),
        (lambda t: t.update(metadata={"labels": {"model": "llama3.1:8b"}}), "not a valid label value"),
        (lambda t: t.update(metadata={"labels": {"m": 3}}), "must be a string"),
        (lambda t: t.update(metadata={"labels": {"bad key!": "x"}}), "not a valid Kubernetes key"),
        (
            lambda t: t.update(metadata={"annotations": {"Example.com/a": "x"}}),
            "prefix must be a DNS subdomain",
        ),
        (lambda t: t["spec"]["containers"][0].update(name="Engine_1"), "must be a DNS label"),
        (lambda t: t["spec"]["containers"][0].pop("image"), "needs an image"),
        # helper-71 H: passed the dry-run PodTemplate, then jammed a rollout at the StatefulSet.
        (
            lambda t: t["spec"]["containers"][0].update(image="pdorch/sim:dev "),
            "leading or trailing whitespace",
        ),
        (
            lambda t: t["spec"].update(initContainers=[{"name": "init", "image": " busybox"}]),
            "spec.initContainers[0].image ' busybox' has leading or trailing whitespace",
        ),
        (lambda t: t["spec"]["containers"].append(dict(t["spec"]["containers"][0])), "is used twice"),
        # Valid in a pod, refused in a StatefulSet's template (LWS's pods are a StatefulSet's).
        (lambda t: t["spec"].update(restartPolicy="Never"), "only restart Always"),
        (lambda t: t["spec"].update(activeDeadlineSeconds=60), "activeDeadlineSeconds is not allowed"),
    ],
)
def test_bad_templates_are_refused_naming_the_field(edit: Any, expect: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ServingGroup.model_validate(_with_prefill_template(edit))
    problems = format_validation_error(exc.value)
    assert any(expect in p and "workerTemplate" in p for p in problems), problems


def test_null_metadata_and_free_annotations_render() -> None:
    def edit(t: dict[str, Any]) -> None:
        t["metadata"] = None

    sg = ServingGroup.model_validate(_with_prefill_template(edit))
    assert render(sg, RenderOptions())  # metadata: null is "no metadata", as Kubernetes reads it

    def annotated(t: dict[str, Any]) -> None:
        t["metadata"] = {
            "labels": {"app.kubernetes.io/name": "x", "empty": ""},
            "annotations": {"a/b": "any: text"},
        }

    assert render(ServingGroup.model_validate(_with_prefill_template(annotated)), RenderOptions())


def _with_claims(*claims: Any) -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLE)
    next(r for r in doc["spec"]["roles"] if r["type"] == "decode")["volumeClaimTemplates"] = list(claims)
    return doc


_SPEC = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}


@pytest.mark.parametrize(
    ("claim", "expect"),
    [
        ({}, "metadata.name is required"),
        ({"metadata": {"name": "Data"}, "spec": _SPEC}, "metadata.name is required"),
        ({"metadata": {"name": "data"}}, "spec.accessModes needs at least one"),
        ({"metadata": {"name": "data"}, "spec": {**_SPEC, "accessModes": ["ReadWrite"]}}, "accessModes"),
        ({"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"]}}, "storage needs a size"),
        (
            {"metadata": {"name": "data"}, "spec": {**_SPEC, "resources": {"requests": {"storage": "lots"}}}},
            "100Gi",
        ),
        (
            {"metadata": {"name": "data"}, "spec": {**_SPEC, "resources": {"requests": {"storage": True}}}},
            "100Gi",
        ),
        # A claim of size 0 passes LWS and the pattern of a quantity; the StatefulSet refuses it.
        (
            {"metadata": {"name": "data"}, "spec": {**_SPEC, "resources": {"requests": {"storage": "0Gi"}}}},
            "above zero",
        ),
        (
            {"metadata": {"name": "data"}, "spec": {**_SPEC, "resources": {"requests": {"storage": 0}}}},
            "above zero",
        ),
        # Kubernetes cannot parse a fractional exponent, nor a trailing newline (review of efc72d3).
        (
            {
                "metadata": {"name": "data"},
                "spec": {**_SPEC, "resources": {"requests": {"storage": "1e1.5"}}},
            },
            "above zero",
        ),
        (
            {
                "metadata": {"name": "data"},
                "spec": {**_SPEC, "resources": {"requests": {"storage": "5Gi\n"}}},
            },
            "above zero",
        ),
        ({"metadata": {"name": "data\n"}, "spec": _SPEC}, "metadata.name is required"),
    ],
)
def test_claim_templates_a_statefulset_would_refuse_are_refused_naming_the_field(
    claim: dict[str, Any], expect: str
) -> None:
    """Such a claim template locked its role: the StatefulSet was refused, and claim templates
    cannot change once stored. The CRD's schema refuses these (tests/integration/test_validation.py);
    this is its mirror, for `pdorch render` and the controller."""
    with pytest.raises(ValidationError) as exc:
        ServingGroup.model_validate(_with_claims(claim))
    problems = format_validation_error(exc.value)
    assert any(expect in p and "volumeClaimTemplates" in p for p in problems), problems


@pytest.mark.parametrize("storage", ["10Gi", "500M", "1e9", "1.5Ti", 1073741824])
def test_claim_templates_with_a_name_an_access_mode_and_a_size_pass_unchanged(storage: Any) -> None:
    claim = {
        "metadata": {"name": "data", "labels": {"a": "b"}},
        "spec": {**_SPEC, "resources": {"requests": {"storage": storage}}, "storageClassName": "fast"},
    }
    sg = ServingGroup.model_validate(_with_claims(claim))
    assert next(r for r in sg.spec.roles if r.type.value == "decode").volume_claim_templates == [claim]

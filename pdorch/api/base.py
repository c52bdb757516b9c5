"""Building blocks shared by pdorch's API models.

The pydantic models are the single source of truth for both offline validation (`pdorch render`)
and the CRD schema (`pdorch crds`). Cross-field rules are declared once as `CelRule`s: each carries
the CEL expression the apiserver evaluates (`x-kubernetes-validations`) and a Python predicate that
mirrors it, so the cluster and the CLI refuse the same specs with the same message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

# A Kubernetes name without dots (role and container names, a claim template's name).
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A Kubernetes object name that may contain dots (Secrets, ConfigMaps, label-key prefixes).
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# Kubernetes int-or-string (maxSurge / maxUnavailable): a non-negative int or a percentage.
PERCENT_CEL = "^[0-9]{1,3}%$"
_PERCENT = re.compile(PERCENT_CEL)


def _refuse_bool(value: Any) -> Any:
    # Runs before the union: lax int validation would otherwise turn YAML `true` into 1.
    if isinstance(value, bool):
        raise ValueError("must be an integer or a percentage like '25%'")
    return value


def _check_int_or_percent(value: int | str) -> int | str:
    """Accept `5` or `"25%"`; reject negatives and strings that are not percentages."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must be >= 0")
        return value
    if not _PERCENT.match(value):
        raise ValueError(f"{value!r} must be an integer or a percentage like '25%'")
    return value


IntOrString = Annotated[
    int | str,
    BeforeValidator(_refuse_bool),
    AfterValidator(_check_int_or_percent),
    # Structural schemas spell int-or-string as this marker alone (no type, no anyOf).
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]

# Opaque objects (PodTemplateSpec, PVC templates, engine extras): kept as-is by the apiserver.
# Inlining the PodTemplateSpec schema would make the CRD megabytes big; the controller validates
# the rendered LWS with a server-side dry run instead.
FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]


def enum_field(default: Any = ..., **kwargs: Any) -> Any:
    """A Field for a string enum with a maxLength, so CEL cost estimation sees a bounded string."""
    extra = kwargs.pop("json_schema_extra", {}) or {}
    extra = {"maxLength": 64, **extra}
    return Field(default, json_schema_extra=extra, **kwargs)


@dataclass(frozen=True)
class CelRule:
    """One cross-field rule, enforced by the apiserver (CEL) and by pydantic (Python mirror).

    `check` receives the validated model instance and returns True when the rule holds.
    `message` must name the field and say what to fix: it is what users see from kubectl.
    `field_path` (optional, relative JSONPath like `.maxReplicas`) points kubectl at the field.
    `optional_old_self`: the rule also runs on create, with `oldSelf` an optional (`oldSelf.hasValue()`):
    how a rule added in a later release spares objects stored before it. The apiserver's ratcheting
    does not, for objects holding free-form fields (pod templates): they could no longer be written
    at all, not even their status or finalizers.
    """

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None
    optional_old_self: bool = False
    # False: the apiserver alone enforces it (a transition rule, or one that spares stored objects,
    # which the controller validates with these models too); `check` then always passes.
    mirrored: bool = True

    def to_schema(self) -> dict[str, Any]:
        """The `x-kubernetes-validations` entry for this rule."""
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.optional_old_self:
            out["optionalOldSelf"] = True
        return out


def cel_schema(rules: Sequence[CelRule]) -> dict[str, Any]:
    """`json_schema_extra` carrying the CEL rules of a model."""
    return {"x-kubernetes-validations": [r.to_schema() for r in rules]}


class ApiModel(BaseModel):
    """Base of all API models: camelCase on the wire, snake_case in Python, unknown fields refused.

    Subclasses list their cross-field rules in `cel_rules`; pass `cel_schema(cel_rules)` as the
    model's `json_schema_extra` so the CRD carries them.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        # A typo such as `replica:` must fail offline too (kubectl's strict field validation
        # refuses unknown fields as well).
        extra="forbid",
        use_attribute_docstrings=True,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_mirrors(self) -> ApiModel:
        # Report every broken rule at once, so one `pdorch render` shows all that needs fixing.
        broken = [r.message for r in self.cel_rules if not r.check(self)]
        if broken:
            raise ValueError("\n".join(broken))
        return self

    def to_wire(self) -> dict[str, Any]:
        """The model as Kubernetes JSON: camelCase keys, unset optional fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

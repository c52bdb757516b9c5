"""The `metav1.Condition` shape used in pdorch status blocks."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from pdorch.api.base import ApiModel, enum_field

# metav1.Condition's type pattern: an optional DNS-subdomain prefix, then a CamelCase name.
_CONDITION_TYPE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)


class ConditionStatus(StrEnum):
    """Condition status values from the Kubernetes API conventions."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """One observation of the object's state (Kubernetes API conventions, metav1.Condition)."""

    type: str = Field(max_length=316, pattern=_CONDITION_TYPE)
    """Condition type in CamelCase, e.g. Available, Progressing, RolloutStalled, Invalid."""
    status: ConditionStatus = enum_field()
    """True, False or Unknown."""
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """Programmatic CamelCase identifier of the last transition's cause."""
    message: str = Field("", max_length=32768)
    """Human-readable details of the last transition."""
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    """When the status last changed (RFC 3339)."""
    observed_generation: int | None = Field(None, ge=0)
    """The .metadata.generation this condition was computed from."""


# Conditions merge per `type` under server-side apply, so status writers do not clobber each other.
CONDITIONS_LIST_EXTRA = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}

"""`ServingRoleScaler` (pdorch.io/v1alpha1): the per-role `/scale` target.

The controller creates one per role whose scaling mode is External or Builtin. HPA/KEDA (External)
or pdorch's scaler (Builtin) write `spec.replicas` through the `/scale` subresource; the controller
copies it into the role's LeaderWorkerSet, within the role's minReplicas/maxReplicas, and reports
`status.replicas`, `status.selector`, `status.observedGeneration` and the ScalingLimited condition.
pdorch's scaler writes `status.lastScaleTime`, `status.lastScaleReason` and the ScalingActive condition.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import ConfigDict, Field

from pdorch.api.base import DNS1123_LABEL, ApiModel, CelRule, cel_schema
from pdorch.api.conditions import CONDITIONS_LIST_EXTRA, Condition
from pdorch.api.servinggroup import (
    API_VERSION,
    MAX_GROUP_NAME_LENGTH,
    MAX_ROLE_NAME_LENGTH,
    ObjectMeta,
)

KIND = "ServingRoleScaler"
PLURAL = "servingrolescalers"
SHORT_NAME = "srs"


class ServingRoleScalerSpec(ApiModel):
    """Desired replicas of one role."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            # Transition rule: only the apiserver sees the old object, so the Python mirror passes.
            rule="self.servingGroup == oldSelf.servingGroup && self.role == oldSelf.role",
            message="spec.servingGroup and spec.role are immutable; create a new ServingRoleScaler",
            check=lambda _: True,
        ),
    )
    model_config = ConfigDict(json_schema_extra=cel_schema(cel_rules))

    serving_group: str = Field(min_length=1, max_length=MAX_GROUP_NAME_LENGTH, pattern=DNS1123_LABEL)
    """Name of the ServingGroup (same namespace)."""
    role: str = Field(min_length=1, max_length=MAX_ROLE_NAME_LENGTH, pattern=DNS1123_LABEL)
    """Name of the role inside the ServingGroup."""
    # The /scale handler needs the field behind specReplicasPath to exist, or HPA deadlocks
    # (notes/python-k8s.md §8.6), hence a schema default.
    replicas: int = Field(1, ge=0, le=10000)
    """Desired LWS groups of the role; written by HPA/KEDA or pdorch's scaler via /scale."""


class ServingRoleScalerStatus(ApiModel):
    """Observed state, written by the controller; lastScaleTime, lastScaleReason and the
    ScalingActive condition by pdorch's scaler (server-side apply, each writer its own fields)."""

    replicas: int | None = Field(None, ge=0)
    """Groups of the role that currently exist (its LWS's status.replicas), a rollout's surge groups
    included, as a Deployment's status.replicas counts its surge pods."""
    selector: str | None = Field(None, max_length=1024)
    """Label selector (string form) of the role's leader pods, for HPA's /scale."""
    observed_generation: int | None = Field(None, ge=0)
    """The .metadata.generation whose spec.replicas the role's LeaderWorkerSet got."""
    last_scale_time: str | None = Field(None, json_schema_extra={"format": "date-time"})
    """When the built-in scaler last changed spec.replicas, or saw another writer change it."""
    last_scale_reason: str | None = Field(None, max_length=1024)
    """Why the built-in scaler chose the current replicas; for a size another writer set (kubectl
    scale, an HPA), who set it and that the scaler keeps it as its new baseline."""
    conditions: list[Condition] | None = Field(None, max_length=16, json_schema_extra=CONDITIONS_LIST_EXTRA)
    """Conditions of the scaler. ScalingLimited is True (reason TooManyReplicas or TooFewReplicas)
    while spec.replicas lies outside the role's minReplicas/maxReplicas and the role is held at
    the bound (a Builtin role above a lowered maxReplicas keeps its groups until pdorch's scaler
    has drained them), True (HeldByRollout) while a paused, blocked or stalled rollout holds a size
    the role's LWS has not got (a scale waits for the rollout's next step), False (DesiredWithinRange) otherwise; written by
    the controller.
    ScalingActive, on a Builtin role, is written by pdorch's scaler: False (reason
    MetricsUnavailable) while it cannot read any of the role's leaders' load and holds the role at
    its size (the declared ratio band may still raise it), True (ValidMetricFound) while it reads
    it."""


class ServingRoleScaler(ApiModel):
    """A ServingRoleScaler object."""

    api_version: str = Field(API_VERSION, alias="apiVersion")
    """pdorch.io/v1alpha1."""
    kind: str = KIND
    """ServingRoleScaler."""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: ServingRoleScalerSpec
    """Desired state."""
    status: ServingRoleScalerStatus | None = None
    """Observed state."""

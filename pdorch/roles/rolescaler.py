"""ServingRoleScaler objects for roles scaled by HPA/KEDA (External) or pdorch (Builtin)."""

from __future__ import annotations

from typing import Any

from pdorch.api import scaler
from pdorch.api.servinggroup import API_VERSION, Role, ScalingMode
from pdorch.roles.context import RenderContext
from pdorch.roles.naming import scaler_name


def needs_scaler(role: Role) -> bool:
    """Whether `role` gets a ServingRoleScaler (its scaling mode is External or Builtin)."""
    return role.scaling_mode in (ScalingMode.EXTERNAL, ScalingMode.BUILTIN)


def render_scaler(ctx: RenderContext, role: Role) -> dict[str, Any]:
    """The ServingRoleScaler intent `<group>-<role>`; spec.replicas starts at roles[].replicas."""
    spec: dict[str, Any] = {"servingGroup": ctx.group, "role": role.name}
    if ctx.override(role).include_scaler_replicas:
        spec["replicas"] = role.replicas
    return {
        "apiVersion": API_VERSION,
        "kind": scaler.KIND,
        "metadata": ctx.metadata(scaler_name(ctx.group, role.name), ctx.labels(role)),
        "spec": spec,
    }

"""ServingRoleScaler objects for roles scaled by HPA/KEDA (External) or pdorch (Builtin)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdorch.api import scaler
from pdorch.api.servinggroup import API_VERSION, Role, ScalingMode, ServingGroup
from pdorch.roles.context import RenderContext
from pdorch.roles.labels import ANNOTATION_ROLLOUT
from pdorch.roles.naming import scaler_name


def needs_scaler(role: Role) -> bool:
    """Whether `role` gets a ServingRoleScaler (its scaling mode is External or Builtin)."""
    return role.scaling_mode in (ScalingMode.EXTERNAL, ScalingMode.BUILTIN)


def scaler_replicas(role: Role, srs: Mapping[str, Any] | None) -> int | None:
    """The replicas `role`'s ServingRoleScaler asks for, within minReplicas/maxReplicas (a
    `kubectl scale` beyond them does not pass); None when the role has no scaler or it asks nothing
    yet (roles[].replicas then applies). 0 is an answer, not "unset"."""
    if not needs_scaler(role) or srs is None:
        return None
    replicas = (srs.get("spec") or {}).get("replicas")
    if replicas is None:
        return None
    assert role.scaling is not None  # needs_scaler
    return role.scaling.clamp(int(replicas))


def scaled_replicas(
    role: Role,
    srs: dict[str, Any] | None,
    lws: dict[str, Any] | None,
    last_desired: int | None = None,
    hold_for_drain: bool = True,
) -> int | None:
    """What an autoscaled role's LWS should have: its ServingRoleScaler's replicas (within bounds),
    or, while the scaler is missing (deleted by hand, or the role just switched to External) and
    the LWS runs, the LWS's own size: roles[].replicas would cut a scaled-up role back at once.
    An LWS a rollout holds above its size (surge) counts as `last_desired` instead (the role's
    desiredReplicas in the group's status), else the surge would stay for good.
    None: roles[].replicas applies. `hold_for_drain` False: a lowered maxReplicas applies at once
    (the caller's time limit on `held_for_drain` ran out)."""
    replicas = scaler_replicas(role, srs)
    if replicas is not None:
        held = held_for_drain(role, srs, lws, last_desired) if hold_for_drain else None
        return replicas if held is None else held
    if srs is not None or lws is None or not needs_scaler(role):
        return replicas
    assert role.scaling is not None  # needs_scaler
    return role.scaling.clamp(_lws_desired(lws, role, last_desired))


def _lws_desired(lws: dict[str, Any], role: Role, last_desired: int | None) -> int:
    """The LWS's size less a rollout's surge (`last_desired` while it is marked mid-rollout)."""
    mid_rollout = ANNOTATION_ROLLOUT in ((lws.get("metadata") or {}).get("annotations") or {})
    if mid_rollout and last_desired is not None:
        return last_desired
    return int((lws.get("spec") or {}).get("replicas", role.replicas))


def held_for_drain(
    role: Role, srs: Mapping[str, Any] | None, lws: dict[str, Any] | None, last_desired: int | None = None
) -> int | None:
    """The size a Builtin role keeps while its ServingRoleScaler asks for more than a lowered
    maxReplicas, or None. Cutting the LWS to the bound at once killed the requests on the removed
    groups; pdorch's scaler drains them first and then writes a size within the bound. An
    External role (HPA, KEDA: nothing drains) is cut to the bound as before."""
    if srs is None or lws is None or role.scaling_mode != ScalingMode.BUILTIN or role.scaling is None:
        return None
    high = role.scaling.max_replicas
    asked = (srs.get("spec") or {}).get("replicas")
    if high is None or asked is None or int(asked) <= high:
        return None
    live = _lws_desired(lws, role, last_desired)
    return min(int(asked), live) if live > high else None


def status_desired(sg: ServingGroup) -> dict[str, int]:
    """Each role's desiredReplicas as the group's status last recorded it (what `scaled_replicas`
    keeps for a role whose scaler is missing mid-rollout)."""
    roles = (sg.status.roles if sg.status is not None else None) or []
    return {r.name: r.desired_replicas for r in roles if r.desired_replicas is not None}


def render_scaler(ctx: RenderContext, role: Role) -> dict[str, Any]:
    """The ServingRoleScaler intent `<group>-<role>`; spec.replicas starts at the override's
    `scaler_replicas`, else roles[].replicas (the controller strips it once the scaler exists)."""
    seed = ctx.override(role).scaler_replicas
    spec: dict[str, Any] = {
        "servingGroup": ctx.group,
        "role": role.name,
        "replicas": role.replicas if seed is None else seed,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": scaler.KIND,
        "metadata": ctx.metadata(scaler_name(ctx.group, role.name), ctx.labels(role)),
        "spec": spec,
    }

"""One LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) per ServingGroup role."""

from __future__ import annotations

from typing import Any

from pdorch.api.servinggroup import KV_ROLE_TYPES, Role, RoleType, RolloutStrategy
from pdorch.roles.context import RenderContext, label_pod_template
from pdorch.roles.labels import (
    ANNOTATION_BOOTSTRAP_PORT,
    ANNOTATION_PORT,
    ANNOTATION_ROLLOUT,
    ANNOTATION_ROLLOUT_STEP,
)
from pdorch.roles.naming import lws_name
from pdorch.roles.proxy import builtin_proxy_template, with_router_env
from pdorch.rollout.state import resolve_int_or_percent

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"
# rollingUpdateConfiguration of KV roles during a rollout: pdorch's partition is the only brake.
LWS_MAX_SURGE = 0
LWS_MAX_UNAVAILABLE = "100%"
# At rest LWS rolls a template change pdorch did not plan (a hand edit, before pdorch puts it
# back; a new pdorch version rendering differently) one group at a time, not the whole role.
LWS_REST_MAX_UNAVAILABLE = 1


def _templates(ctx: RenderContext, role: Role) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(leaderTemplate, workerTemplate) before labelling.

    LWS requires a workerTemplate and falls back to it for the leader. A role that gives only a
    leaderTemplate therefore renders it as the workerTemplate: the same pods, one fewer field.
    """
    if role.type == RoleType.PROXY and not role.has_template:
        return None, builtin_proxy_template(ctx, role)
    leader, worker = role.leader_template, role.worker_template
    if role.type == RoleType.PROXY:
        leader = with_router_env(ctx, leader) if leader is not None else None
        worker = with_router_env(ctx, worker) if worker is not None else None
    if worker is None:
        assert leader is not None  # guaranteed by the Role CEL rules
        return None, leader
    return leader, worker


def _rolling_update(ctx: RenderContext, role: Role, replicas: int) -> dict[str, Any]:
    override = ctx.override(role)
    if role.type in KV_ROLE_TYPES:
        # pdorch's ratio-preserving planner moves these roles through `partition` and `replicas`;
        # LWS must not surge or hold back on its own, or the planner's cohorts would be wrong.
        max_surge: int | str = LWS_MAX_SURGE
        max_unavailable: int | str = LWS_MAX_UNAVAILABLE if override.rollout else LWS_REST_MAX_UNAVAILABLE
    else:
        strategy = ctx.sg.spec.rollout_strategy or RolloutStrategy()
        max_surge = override.max_surge if override.max_surge is not None else strategy.max_surge
        max_unavailable = (
            override.max_unavailable if override.max_unavailable is not None else strategy.max_unavailable
        )
    surge, unavailable = lws_budget(max_surge), lws_budget(max_unavailable)
    if (
        role.type not in KV_ROLE_TYPES
        and replicas > 0  # LWS lets a role of 0 replicas have both at 0
        and resolve_int_or_percent(surge, replicas, round_up=True) == 0
        and resolve_int_or_percent(unavailable, replicas, round_up=False) == 0
    ):
        # LWS refuses budgets that both come to 0 at the role's size (maxSurge 0 with 25% of one
        # proxy, say); a Deployment then lets one pod be unavailable, and so does pdorch.
        unavailable = 1
    # Partition is always explicit: dropping it from an SSA intent would reset it to 0 and let LWS
    # roll the whole role at once, bypassing the ratio-preserving planner.
    return {
        "partition": override.partition if override.partition is not None else 0,
        "maxSurge": surge,
        "maxUnavailable": unavailable,
    }


_INT32_MAX = 2**31 - 1


def lws_budget(value: int | str) -> int | str:
    """A rollout budget as LWS accepts it. The API allows up to 999% and any int ("more than
    replicas acts as replicas"); LWS refuses percentages above 100% and ints beyond int32, which
    mean the same as 100% and the largest int32 there."""
    if isinstance(value, str):
        return "100%" if int(value.rstrip("%")) > 100 else value
    return min(value, _INT32_MAX)


def render_lws(ctx: RenderContext, role: Role) -> dict[str, Any]:
    """The LWS intent of `role`: only fields pdorch owns, labels on object and pod templates."""
    override = ctx.override(role)
    pod_labels = ctx.labels(role, pod_template=True)
    pod_annotations = {ANNOTATION_PORT: str(role.port)}
    if role.bootstrap_port is not None:
        pod_annotations[ANNOTATION_BOOTSTRAP_PORT] = str(role.bootstrap_port)
    leader, worker = _templates(ctx, role)
    lwt: dict[str, Any] = {"size": role.size}
    if leader is not None:
        lwt["leaderTemplate"] = label_pod_template(leader, pod_labels, pod_annotations)
    lwt["workerTemplate"] = label_pod_template(worker, pod_labels, pod_annotations)
    if role.restart_policy is not None:
        lwt["restartPolicy"] = role.restart_policy.value
    if role.sub_group_policy is not None:
        lwt["subGroupPolicy"] = role.sub_group_policy.to_wire()
    if role.volume_claim_templates is not None:
        lwt["volumeClaimTemplates"] = [dict(t) for t in role.volume_claim_templates]

    replicas = override.replicas if override.replicas is not None else role.replicas
    spec: dict[str, Any] = {
        "replicas": replicas,
        "leaderWorkerTemplate": lwt,
        "rolloutStrategy": {
            "type": "RollingUpdate",
            "rollingUpdateConfiguration": _rolling_update(ctx, role, replicas),
        },
    }
    if role.startup_policy is not None:
        spec["startupPolicy"] = role.startup_policy.value
    if role.network_config is not None:
        spec["networkConfig"] = role.network_config.to_wire()
    metadata = ctx.metadata(lws_name(ctx.group, role.name), ctx.labels(role))
    if override.rollout:
        metadata["annotations"] = {ANNOTATION_ROLLOUT: ctx.revision}
        if override.step is not None:
            metadata["annotations"][ANNOTATION_ROLLOUT_STEP] = override.step
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": metadata,
        "spec": spec,
    }

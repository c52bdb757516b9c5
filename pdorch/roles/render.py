"""ServingGroup -> every object pdorch applies for it (pure; no cluster I/O).

Output objects are plain dicts meant as server-side-apply intents with field manager `pdorch`:
they hold only the fields pdorch owns. Order: proxy RBAC, proxy Service, one LeaderWorkerSet per
role (spec order), one ServingRoleScaler per autoscaled role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdorch.api.servinggroup import RoleType, ServingGroup
from pdorch.roles.context import RenderContext, RenderOptions, RoleOverride
from pdorch.roles.lws import render_lws
from pdorch.roles.proxy import proxy_rbac, proxy_service
from pdorch.roles.revision import compute_revision
from pdorch.roles.rolescaler import needs_scaler, render_scaler

__all__ = [
    "ObjectKey",
    "RenderOptions",
    "RoleOverride",
    "expected_keys",
    "has_builtin_proxy",
    "object_key",
    "render",
    "revision_of",
]

ObjectKey = tuple[str, str, str]


def render(
    sg: ServingGroup,
    options: RenderOptions | None = None,
    overrides: Mapping[str, RoleOverride] | None = None,
) -> list[dict[str, Any]]:
    """Render `sg` into its desired child objects.

    `overrides` maps role names to what the controller/rollout planner decided (replicas,
    partition, ...). Unknown role names are refused so a stale plan cannot silently do nothing.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - {r.name for r in sg.spec.roles}
    if unknown:
        raise KeyError(f"overrides for unknown roles: {sorted(unknown)}")
    ctx = RenderContext(
        sg=sg,
        revision=compute_revision(sg.spec),
        options=options or RenderOptions(),
        overrides=overrides,
    )
    objects: list[dict[str, Any]] = []
    proxy = sg.spec.proxy_role()
    if proxy is not None:
        # RBAC and Service also serve a user-supplied proxy template, which may reuse them.
        objects.extend(proxy_rbac(ctx, proxy))
        objects.append(proxy_service(ctx, proxy))
    objects.extend(render_lws(ctx, role) for role in sg.spec.roles)
    objects.extend(render_scaler(ctx, role) for role in sg.spec.roles if needs_scaler(role))
    return objects


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    """(apiVersion, kind, name) of a rendered or live object."""
    return (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


def expected_keys(sg: ServingGroup, options: RenderOptions | None = None) -> set[ObjectKey]:
    """Keys of every object `render` produces for `sg`: children with other keys can be pruned."""
    return {object_key(o) for o in render(sg, options)}


def revision_of(sg: ServingGroup) -> str:
    """The `pdorch.io/revision` of `sg`'s current spec."""
    return compute_revision(sg.spec)


def has_builtin_proxy(sg: ServingGroup) -> bool:
    """Whether the group's proxy role (if any) runs the built-in proxy template."""
    proxy = sg.spec.proxy_role()
    return proxy is not None and proxy.type == RoleType.PROXY and not proxy.has_template

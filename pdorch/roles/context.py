"""Inputs shared by every renderer: the group, its revision, options and per-role overrides."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from pdorch.api.servinggroup import API_VERSION, KIND, Role, RoleType, ServingGroup
from pdorch.roles.labels import OWNED_KEYS, role_labels

DEFAULT_PROXY_IMAGE = "ghcr.io/pdorch/pdorch:0.1.0"


@dataclass(frozen=True)
class RenderOptions:
    """Knobs of the renderer that are not part of the ServingGroup."""

    proxy_image: str = DEFAULT_PROXY_IMAGE
    """Image of the built-in proxy pod template."""
    namespace: str | None = None
    """Namespace to render into when the ServingGroup has none (offline render); else `default`."""


@dataclass(frozen=True)
class RoleOverride:
    """What the controller / rollout planner decides for a role on top of the spec.

    `replicas`: LWS replicas (e.g. copied from the role's ServingRoleScaler); default roles[].replicas.
    `partition`: LWS rollingUpdateConfiguration.partition; default 0 (everything on the new revision).
    `max_surge` / `max_unavailable`: per-step LWS values; default spec.rolloutStrategy's.
    `rollout`: mark the LWS as mid-rollout (see `pdorch.roles.labels.ANNOTATION_ROLLOUT`).
    `scaler_replicas`: what the role's ServingRoleScaler starts at when it is created now (default
    roles[].replicas): a scaler deleted by hand, or a role switched back to External, restarts at
    the size its LWS has instead of cutting it back. The controller applies it only on creation;
    afterwards HPA/KEDA or pdorch's scaler own the field.
    """

    replicas: int | None = None
    partition: int | None = None
    max_surge: int | str | None = None
    max_unavailable: int | str | None = None
    scaler_replicas: int | None = None
    # The KV role is part of a rollout in progress: its LWS carries ANNOTATION_ROLLOUT until the
    # planner says "done", so surge groups are only removed once every group is ready.
    rollout: bool = False
    # With `rollout`: the step record (pdorch.rollout.step_record) its LWS carries.
    step: str | None = None


@dataclass(frozen=True)
class RenderContext:
    """Everything one render pass needs; built once by `render`."""

    sg: ServingGroup
    revision: str
    options: RenderOptions = field(default_factory=RenderOptions)
    overrides: dict[str, RoleOverride] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """The ServingGroup's name."""
        return self.sg.name

    @property
    def namespace(self) -> str:
        """Namespace every object is rendered into (the group's own)."""
        return self.sg.metadata.namespace or self.options.namespace or "default"

    def override(self, role: Role) -> RoleOverride:
        """The override for `role` (an empty one when the controller gave none)."""
        return self.overrides.get(role.name, RoleOverride())

    def labels(self, role: Role, *, pod_template: bool = False) -> dict[str, str]:
        """pdorch's labels for an object (or pod template) of `role`.

        The proxy's pod template carries no revision label: the proxy serves every revision during
        a rollout, and a changing label would restart all proxies on each model rollout.
        """
        revision = None if pod_template and role.type == RoleType.PROXY else self.revision
        return role_labels(self.group, role.name, role.type.value, revision)

    def metadata(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        """metadata of a namespaced child: name, namespace, labels, and an owner reference."""
        meta: dict[str, Any] = {"name": name, "namespace": self.namespace, "labels": dict(labels)}
        refs = self.owner_references()
        if refs:
            meta["ownerReferences"] = refs
        return meta

    def owner_references(self) -> list[dict[str, Any]]:
        """The controller reference to the ServingGroup; empty offline, where there is no uid yet."""
        uid = self.sg.metadata.uid
        if not uid:
            return []
        return [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": self.group,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def label_pod_template(
    template: dict[str, Any], labels: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """A deep copy of `template` carrying `labels` and `annotations` (pdorch's keys win)."""
    out = copy.deepcopy(template)
    meta = out.setdefault("metadata", {})
    user = {k: v for k, v in (meta.get("labels") or {}).items() if k not in OWNED_KEYS}
    meta["labels"] = {**user, **labels}
    if annotations:
        meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
    return out

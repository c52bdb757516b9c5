"""`pdorch.io/revision`: which version of the model/engine a KV-bearing pod runs.

The proxy only pairs a prefill with a decode of the same revision, and the rollout planner moves
partitions from one revision to the next. So the hash covers exactly what makes KV caches
compatible or pods different: the KV roles' (prefill, decode, worker) names, types, sizes, pod
templates and ports, plus the engine settings. It leaves out replicas and scaling (they change
without a rollout) and the proxy role (a new proxy must not force a model rollout).

It also covers every field LWS's own revision covers (the whole leaderWorkerTemplate and
networkConfig): a change LWS would roll but pdorch did not see would bypass the planner (a group
at a time at rest, every group at once mid-rollout, where KV roles' LWS have maxUnavailable 100%).
Those fields enter the hash only when set, so groups that never use them keep their revision.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pdorch.api.servinggroup import KV_ROLE_TYPES, Role, ServingGroupSpec

REVISION_LENGTH = 10

# What defines a revision, in wire names: these fields of every KV role (`_role_input`) and these
# fields of the spec. `pdorch rollback` restores exactly these and keeps the rest of the live spec.
REVISION_ROLE_FIELDS = (
    "name",
    "type",
    "size",
    "leaderTemplate",
    "workerTemplate",
    "port",
    "bootstrapPort",
    "restartPolicy",
    "subGroupPolicy",
    "volumeClaimTemplates",
    "networkConfig",
)
REVISION_SPEC_FIELDS = ("engine",)


def _role_input(role: Role) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": role.name,
        "type": role.type.value,
        "size": role.size,
        "leaderTemplate": role.leader_template,
        "workerTemplate": role.worker_template,
        "port": role.port,
        "bootstrapPort": role.bootstrap_port,
    }
    # The rest of what LWS hashes; absent when unset (see the module docstring).
    lws_only = {
        "restartPolicy": role.restart_policy.value if role.restart_policy is not None else None,
        "subGroupPolicy": role.sub_group_policy.to_wire() if role.sub_group_policy is not None else None,
        "volumeClaimTemplates": role.volume_claim_templates,
        "networkConfig": role.network_config.to_wire() if role.network_config is not None else None,
    }
    data.update({k: v for k, v in lws_only.items() if v is not None})
    return data


def revision_input(spec: ServingGroupSpec) -> dict[str, Any]:
    """The canonical data the revision hashes (exposed for tests and debugging)."""
    roles = [
        _role_input(r)
        for r in sorted(spec.roles, key=lambda r: r.name)  # list order is not meaningful
        if r.type in KV_ROLE_TYPES
    ]
    return {"engine": spec.engine.to_wire(), "roles": roles}


def _integral(value: Any) -> Any:
    """`value` with floats that hold whole numbers as ints, at any depth: the apiserver stores a
    free-form `1.0e9` as 1000000000, so an offline render of the YAML must hash the same."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def compute_revision(spec: ServingGroupSpec) -> str:
    """First 10 hex digits of sha256 over canonical JSON of `revision_input` (a valid label value)."""
    canonical = json.dumps(
        _integral(revision_input(spec)), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_LENGTH]

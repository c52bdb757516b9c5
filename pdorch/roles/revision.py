"""`pdorch.io/revision`: which version of the model/engine a KV-bearing pod runs.

The proxy only pairs a prefill with a decode of the same revision, and the rollout planner moves
partitions from one revision to the next. So the hash covers exactly what makes KV caches
compatible or pods different: the KV roles' (prefill, decode, worker) names, types, sizes, pod
templates and ports, plus the engine settings. It leaves out replicas and scaling (they change
without a rollout) and the proxy role (a new proxy must not force a model rollout).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pdorch.api.servinggroup import KV_ROLE_TYPES, ServingGroupSpec

REVISION_LENGTH = 10


def revision_input(spec: ServingGroupSpec) -> dict[str, Any]:
    """The canonical data the revision hashes (exposed for tests and debugging)."""
    roles = [
        {
            "name": r.name,
            "type": r.type.value,
            "size": r.size,
            "leaderTemplate": r.leader_template,
            "workerTemplate": r.worker_template,
            "port": r.port,
            "bootstrapPort": r.bootstrap_port,
        }
        for r in sorted(spec.roles, key=lambda r: r.name)  # list order is not meaningful
        if r.type in KV_ROLE_TYPES
    ]
    return {"engine": spec.engine.to_wire(), "roles": roles}


def compute_revision(spec: ServingGroupSpec) -> str:
    """First 10 hex digits of sha256 over canonical JSON of `revision_input` (a valid label value)."""
    canonical = json.dumps(revision_input(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:REVISION_LENGTH]

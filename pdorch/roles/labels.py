"""Labels pdorch puts on everything it creates, and the selectors built from them."""

from __future__ import annotations

from collections.abc import Mapping

LABEL_GROUP = "pdorch.io/group"
LABEL_ROLE = "pdorch.io/role"
LABEL_ROLE_TYPE = "pdorch.io/role-type"
LABEL_REVISION = "pdorch.io/revision"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "pdorch"

# Pod-template annotations telling the proxy's pod discovery where the engine listens (the proxy
# may only read pods, not the ServingGroup).
ANNOTATION_PORT = "pdorch.io/port"
ANNOTATION_BOOTSTRAP_PORT = "pdorch.io/bootstrap-port"
# On a KV role's LWS while a rollout is in progress (value: the update revision). Partitions and
# revisions alone cannot tell "surge groups still to remove" from a plain scale-down.
ANNOTATION_ROLLOUT = "pdorch.io/rollout"
# On a KV role's LWS while a rollout is in progress: the last step the controller wrote, with every
# role's target (pdorch.rollout.step_record), so a step whose writes were cut short is finished.
ANNOTATION_ROLLOUT_STEP = "pdorch.io/rollout-step"
# Set by the built-in scaler on leader pods it is about to scale away: the proxy stops sending them
# new requests, and the scaler lowers replicas once their engines are idle (drain, not kill).
ANNOTATION_DRAINING = "pdorch.io/draining"

# Set by LWS on its pods; the leader of every group has worker-index 0.
LWS_WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_NAME = "leaderworkerset.sigs.k8s.io/name"
LWS_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
# Annotation LWS puts on every pod: the group size of the template the pod was created from.
LWS_SIZE = "leaderworkerset.sigs.k8s.io/size"

# Keys pdorch owns on pod templates; user-supplied values under these keys are overwritten.
OWNED_KEYS = (LABEL_GROUP, LABEL_ROLE, LABEL_ROLE_TYPE, LABEL_REVISION, LABEL_MANAGED_BY)


def role_labels(group: str, role: str, role_type: str, revision: str | None) -> dict[str, str]:
    """Labels of a role's objects and pods; `revision=None` leaves the revision label out."""
    labels = {
        LABEL_GROUP: group,
        LABEL_ROLE: role,
        LABEL_ROLE_TYPE: role_type,
        LABEL_MANAGED_BY: MANAGED_BY,
    }
    if revision is not None:
        labels[LABEL_REVISION] = revision
    return labels


def leader_selector(group: str, role: str) -> dict[str, str]:
    """Selects the leader pods of a role (one per LWS group), e.g. for the proxy Service or HPA."""
    return {LABEL_GROUP: group, LABEL_ROLE: role, LWS_WORKER_INDEX: "0"}


def selector_string(selector: Mapping[str, str]) -> str:
    """A label selector in string form (`a=b,c=d`, sorted), as `/scale`'s labelSelectorPath wants."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))

"""Names of the objects pdorch derives from a ServingGroup.

The length budget behind these names is explained next to `MAX_GROUP_NAME_LENGTH` in
pdorch/api/servinggroup.py; the CRD enforces it, so these helpers never need to truncate.
"""

from __future__ import annotations


def lws_name(group: str, role: str) -> str:
    """LeaderWorkerSet of a role: `<group>-<role>` (LWS also names its headless Service so)."""
    return f"{group}-{role}"


def scaler_name(group: str, role: str) -> str:
    """ServingRoleScaler of an autoscaled role: `<group>-<role>`, the HPA/KEDA target name."""
    return f"{group}-{role}"


def proxy_service_name(group: str) -> str:
    """ClusterIP Service in front of the proxy: the group's own name, what clients address."""
    return group


def proxy_rbac_name(group: str) -> str:
    """ServiceAccount, Role and RoleBinding of the built-in proxy: `<group>-proxy`."""
    return f"{group}-proxy"

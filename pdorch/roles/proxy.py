"""The built-in proxy: its pod template, RBAC and the group's client-facing Service.

The built-in proxy runs `pdorch proxy`, which discovers the group's prefill/decode leader pods by
watching pods, so it needs read access to pods in its own namespace and nothing else.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

from pdorch.api.servinggroup import Role, RoleType
from pdorch.proxy.config import ProxyConfig
from pdorch.roles.context import RenderContext
from pdorch.roles.labels import leader_selector
from pdorch.roles.naming import proxy_rbac_name, proxy_service_name
from pdorch.roles.pods import termination_grace_s

SERVICE_PORT = 8000
CONTAINER_NAME = "proxy"
ENV_ROUTER_CONFIG = "PDORCH_ROUTER_CONFIG"
ENV_API_KEY = "PDORCH_API_KEY"
# A fixed non-root UID, so runAsNonRoot holds even if the image's USER is a name.
NONROOT_UID = 65532


METRICS_PORT = 9090


def _container_security_context() -> dict[str, Any]:
    # Satisfies the "restricted" Pod Security Standard.
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(ctx: RenderContext) -> list[dict[str, Any]]:
    router = ctx.sg.spec.router
    if router is None:
        return []
    # Router settings reach the proxy as JSON; it has no RBAC to read the ServingGroup itself.
    env: list[dict[str, Any]] = [
        {"name": ENV_ROUTER_CONFIG, "value": json.dumps(router.to_wire(), sort_keys=True)}
    ]
    if router.auth is not None:
        env.append(
            {
                "name": ENV_API_KEY,
                "valueFrom": {"secretKeyRef": {"name": router.auth.secret_name, "key": router.auth.key}},
            }
        )
    return env


def _runs_pdorch_proxy(container: dict[str, Any]) -> bool:
    """Named `proxy`, or its command line runs `pdorch proxy` (`pdorch.cli proxy`, in a shell
    string, or `proxy` as the first argument to the image's entrypoint)."""
    words = [
        w
        for part in [*(container.get("command") or []), *(container.get("args") or [])]
        for w in str(part).split()
    ]
    return (
        container.get("name") == CONTAINER_NAME
        or (not container.get("command") and words[:1] == ["proxy"])
        or any(
            w.rsplit("/", 1)[-1] in ("pdorch", "pdorch.cli") and nxt == "proxy"
            for w, nxt in itertools.pairwise(words)
        )
    )


def with_router_env(ctx: RenderContext, template: dict[str, Any]) -> dict[str, Any]:
    """A user's proxy pod template with `spec.router` handed to its proxy container, as the built-in
    proxy gets it: a template of one's own (other resources, a sidecar) keeps the group's policy and
    API key. The proxy container is the one named `proxy` or running `pdorch proxy`; when none is
    recognised, every container gets the settings (a proxy silently left without its API key would
    serve anyone). A variable a container sets itself in `env` keeps its value."""
    env = _env(ctx)
    if not env:
        return template
    out = copy.deepcopy(template)
    containers = (out.get("spec") or {}).get("containers") or []
    proxies = [c for c in containers if _runs_pdorch_proxy(c)] or containers
    for c in proxies:
        own = {e.get("name") for e in c.get("env") or []}
        c["env"] = [*(c.get("env") or []), *(e for e in env if e["name"] not in own)]
    return out


# The built-in proxy's --shutdown-grace when the engines' pods get no longer (the flag's default).
BASE_SHUTDOWN_GRACE_S = round(ProxyConfig.model_fields["shutdown_grace_s"].default)
# Room the kubelet leaves the built-in proxy past its --shutdown-grace before SIGKILL.
KILL_MARGIN_S = 5


def proxy_shutdown_grace_s(ctx: RenderContext) -> int:
    """The built-in proxy's --shutdown-grace: the longest terminationGracePeriodSeconds of the
    group's prefill and decode pods, at least 30 s. Those pods' grace is how long the user lets an
    answer in flight finish when an engine ends (its drain); a proxy pod that is replaced (an
    upgrade, a router change) gives the streams it relays as long."""
    graces = [
        termination_grace_s(t)
        for r in ctx.sg.spec.roles
        if r.type in (RoleType.PREFILL, RoleType.DECODE)
        for t in (r.leader_template, r.worker_template)
        if t is not None
    ]
    return max([BASE_SHUTDOWN_GRACE_S, *graces])


def builtin_proxy_template(ctx: RenderContext, role: Role) -> dict[str, Any]:
    """Pod template of the built-in proxy for `role` (labels are added by the LWS renderer)."""
    port = role.port
    # Prometheus scrapes a separate port: the client port serves the API only.
    metrics_port = METRICS_PORT if port != METRICS_PORT else METRICS_PORT + 1
    grace_s = proxy_shutdown_grace_s(ctx)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": ctx.options.proxy_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "pdorch",
            "proxy",
            "--group",
            ctx.group,
            "--namespace",
            ctx.namespace,
            "--engine",
            ctx.sg.spec.engine.name.value,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            # The flag only when it differs from its default: existing groups' proxies do not roll.
            *(["--shutdown-grace", str(grace_s)] if grace_s != BASE_SHUTDOWN_GRACE_S else []),
        ],
        "ports": [
            {"name": "http", "containerPort": port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        # Readiness follows the engines (/health: a usable pair exists, or a decode for the decode-only
        # path of conditional disaggregation); liveness only the process.
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": {
            "requests": {"cpu": "250m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},
        },
        "securityContext": _container_security_context(),
        # readOnlyRootFilesystem: Python and aiohttp still want a writable temp dir.
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    env = _env(ctx)
    if env:
        container["env"] = env
    return {
        "metadata": {},
        "spec": {
            "serviceAccountName": proxy_rbac_name(ctx.group),
            # The proxy's own shutdown (drain delay, then in-flight requests up to its
            # --shutdown-grace, then error events) must end before the kubelet's SIGKILL.
            "terminationGracePeriodSeconds": grace_s + KILL_MARGIN_S,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": NONROOT_UID,
                "runAsGroup": NONROOT_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def proxy_rbac(ctx: RenderContext, role: Role) -> list[dict[str, Any]]:
    """ServiceAccount, Role (pods list/watch in the group's namespace) and RoleBinding."""
    name = proxy_rbac_name(ctx.group)
    labels = ctx.labels(role)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": ctx.metadata(name, labels)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": ctx.metadata(name, labels),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": ctx.metadata(name, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ctx.namespace}],
        },
    ]


def proxy_service(ctx: RenderContext, role: Role) -> dict[str, Any]:
    """ClusterIP Service `<group>` on port 8000, in front of the proxy role's leader pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.metadata(proxy_service_name(ctx.group), ctx.labels(role)),
        "spec": {
            # clusterIP is left to the apiserver (and thus not owned by pdorch under SSA).
            "type": "ClusterIP",
            "selector": leader_selector(ctx.group, role.name),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": role.port, "protocol": "TCP"}],
        },
    }
